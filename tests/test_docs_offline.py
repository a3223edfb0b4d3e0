"""The gateway's API pages work on a machine without the internet: ``/docs`` and ``/redoc`` reference no
outside address, and every script and style sheet they reference is served by the gateway itself."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import httpx
import pytest

from petribus.settings import Settings

from .conftest import app
from .harness import Stack


class _Assets(HTMLParser):
    """The addresses a page loads: ``<script src>`` and ``<link href>``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (Stack(settings, [app("counter")], parts=("gateway",)) as stack,
                httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as client):
        yield client


@pytest.mark.parametrize("page, needs", [("/docs", {".js", ".css"}), ("/redoc", {".js"})])
async def test_api_page_loads_only_assets_the_gateway_serves(http: httpx.AsyncClient, page: str,
                                                             needs: set[str]) -> None:
    html = await http.get(page)
    assert html.status_code == 200
    assert re.findall(r"https?://[^\s\"'<>]+", html.text) == []

    parser = _Assets()
    parser.feed(html.text)
    assert {u[u.rfind("."):] for u in parser.urls} >= needs
    for url in parser.urls:
        asset = await http.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url


async def test_swagger_page_reads_the_gateways_own_openapi(http: httpx.AsyncClient) -> None:
    html = (await http.get("/docs")).text
    assert "url: '/openapi.json'" in html
    assert (await http.get("/openapi.json")).json()["info"]["title"] == "petribus gateway"
