"""A faster header parser for nats-py, installed when ``petribus.bus`` is imported.

Every event petribus reads carries headers (its ``Nats-Msg-Id``; a direct get adds the sequence, the
subject and the time), and nats-py parses them in Python on the hot path of every service. Its
``Client._parse_header_lines`` tests each header name for whitespace one character at a time in a
generator, which measured about a third of the CPU of reading a session's log. This does the same
parse, with the same results for every input (``tests/test_nats_headers.py`` compares the two), using
a compiled pattern for that test. If nats-py changes the private method's name, nothing is replaced.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

_WHITESPACE = re.compile(r"\s")  # for str patterns: exactly the characters for which str.isspace() holds
_CRLF = b"\r\n"

original = getattr(Client, "_parse_header_lines", None)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    if original is not None and isinstance(Client.__dict__.get("_parse_header_lines"), staticmethod):
        Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
