"""The web dashboard, driven in a real headless Chromium (Debian's, through playwright) against the real
stack: every test opens the page the gateway serves and acts as a person would.

Chromium comes from ``scripts/browser`` (``scripts/test`` runs it); without it these tests fail with the
reason, they are never skipped. Each step's screenshot goes to ``$PETRIBUS_TEST_ARTIFACTS/dashboard/``
(default ``test-artifacts/`` at the repository root) so a reviewer can look at them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from petribus import subjects
from petribus.bus import EventLog
from petribus.events import AgentMessage, AgentMessageDelta, Marker, MarkerAdded
from petribus.settings import Settings

from .conftest import app
from .harness import Stack

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("PETRIBUS_TEST_ARTIFACTS") or REPO / "test-artifacts") / "dashboard"
WAIT_MS = 30_000
MAX_ROWS = 120  # timeline rows the DOM may hold at once, whatever the session's length

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
    expect.set_options(timeout=WAIT_MS)
except ImportError:  # reported by the browser fixture, as a failure
    async_playwright = None  # type: ignore[assignment]


def chromium() -> str:
    """Debian's Chromium: scripts/test says where (or why not); run on its own, scripts/browser installs it."""
    if os.environ.get("PETRIBUS_BROWSER_ERROR"):
        pytest.fail(f"no browser for the dashboard tests: {os.environ['PETRIBUS_BROWSER_ERROR']}")
    exe = os.environ.get("PETRIBUS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is not None:
        return exe
    run = subprocess.run([str(REPO / "scripts" / "browser")], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        pytest.fail(f"scripts/browser could not provide a Chromium for the dashboard tests:\n{run.stderr}")
    return run.stdout.strip().removeprefix("export PETRIBUS_CHROMIUM=")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    exe = await asyncio.to_thread(chromium)
    if async_playwright is None:
        pytest.fail("the playwright package is missing: install the test extras (pip install -e '.[test]')")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                                          "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Tab:
    """A page of the dashboard, with what it logged and asked for, and a screenshot per step."""

    page: Page
    name: str
    origin: str
    problems: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    async def shot(self, step: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{self.name}--{step}.png"), full_page=True)

    def assert_clean(self) -> None:
        assert self.problems == [], self.problems  # no script error, no failed request
        assert self.foreign == [], self.foreign  # nothing fetched from anywhere but the gateway


async def open_tab(browser: Browser, origin: str, name: str) -> Tab:
    context = await browser.new_context(viewport={"width": 1400, "height": 1100})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    tab = Tab(page, name, origin)

    def problem(text: str) -> None:
        print(f"[{name}] {text}")  # shown with a failure's captured output
        tab.problems.append(text)

    page.on("pageerror", lambda exc: problem(f"page error: {exc}"))
    page.on("console", lambda msg: problem(f"console: {msg.text}") if msg.type == "error" else None)
    ws_origin = origin.replace("http://", "ws://")
    page.on("request", lambda req: None if req.url.startswith((origin, ws_origin, "blob:", "data:"))
            else tab.foreign.append(req.url))
    return tab


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> str:
    return str(request.node.name).removeprefix("test_")


def session_of(url: str) -> str:
    found = re.search(r"#/bots/[^/]+/sessions/([^/?]+)", url)
    assert found, url
    return found.group(1)


async def opened(page: Page, other_than: str = "") -> str:
    """The id of the session the page shows, once it has moved to one (other than ``other_than``)."""
    await page.wait_for_url(lambda url: re.search(r"#/bots/[^/]+/sessions/", url) is not None
                            and (not other_than or other_than not in url))
    return session_of(page.url)


async def new_session(http: httpx.AsyncClient, bot: str) -> str:
    made = await http.post(f"/bots/{bot}/sessions")
    assert made.status_code == 201, made.text
    return str(made.json()["session_id"])


async def add_marker(http: httpx.AsyncClient, bot: str, session_id: str, location: str, data: dict[str, Any]) -> int:
    added = await http.post(f"/bots/{bot}/sessions/{session_id}/markers", json={"location": location, "data": data})
    assert added.status_code == 201, added.text
    return int(added.json()["seq"])


# --- the whole flow -----------------------------------------------------------------------------------


async def test_full_flow_chat_marker_confirmation_graph_and_fork(settings: Settings, browser: Browser,
                                                                 artifacts: str) -> None:
    async with Stack(settings, [app("hitl_bot")]) as stack:
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(stack.gateway.url + "/")
        bot = page.locator('section.bot[data-bot="hitl"]')
        await expect(bot).to_be_visible()
        await tab.shot("01-home")

        # Open: a new session, its net drawn whole.
        await bot.locator('[data-action="new-session"]').click()
        session_id = await opened(page)
        await expect(page.locator("#net [data-transition]")).to_have_count(len(stack.nets[0].transitions))
        await expect(page.locator("#net [data-place]")).to_have_count(len(stack.nets[0].locations))
        await expect(page.locator("#stream-state")).to_have_text("connected")
        await tab.shot("02-session")

        # Chat: the message shows, and the (offline) model answers.
        await page.fill("#chat-input", "hello there")
        await page.click("#chat-form button")
        await expect(page.locator('.msg[data-role="user"]')).to_have_text("hello there")
        await expect(page.locator('.msg[data-role="agent"]').first).to_be_visible()
        await tab.shot("03-chat")

        # Add a marker: the confirm=True transition claims it and waits, lit as such, with Accept offered.
        await page.select_option("#marker-location", "Order")
        await page.fill("#marker-data", '{"id": 7}')
        await page.click("#marker-form button")
        cancel = page.locator('#net [data-transition="cancel"]')
        await expect(cancel).to_have_attribute("data-state", "awaiting")
        await expect(page.locator("#session-status [data-status]")).to_have_attribute("data-status", "waiting")
        confirmation = page.locator('.pending.confirmation[data-transition="cancel"]')
        await expect(confirmation).to_contain_text('"id": 7')
        await tab.shot("04-confirmation-waits")

        # Accept: the firing runs and the graph follows: Order empties, Cancelled gets the marker.
        await confirmation.locator("button.accept").click()
        await expect(page.locator('#net [data-place="Cancelled"]')).to_have_attribute("data-count", "1")
        await expect(page.locator('#net [data-place="Order"]')).to_have_attribute("data-count", "0")
        await expect(cancel).to_have_attribute("data-state", "idle")
        await tab.shot("05-accepted")

        # Reject: the ticket goes back, is not offered to escalate again, and close takes it.
        await page.select_option("#marker-location", "Ticket")
        await page.fill("#marker-data", '{"id": 3}')
        await page.click("#marker-form button")
        escalation = page.locator('.pending.confirmation[data-transition="escalate"]')
        await escalation.locator("button.reject").click()
        await expect(page.locator('#net [data-place="Closed"]')).to_have_attribute("data-count", "1")
        await expect(page.locator('#net [data-place="Escalated"]')).to_have_attribute("data-count", "0")

        # A transition lights up while a firing of it runs: refund asks its question mid-run.
        await page.select_option("#marker-location", "Refund")
        await page.fill("#marker-data", '{"amount": 5}')
        await page.click("#marker-form button")
        refund = page.locator('#net [data-transition="refund"]')
        await expect(refund).to_have_attribute("data-state", "firing")
        question = page.locator('.pending.question[data-transition="refund"]')
        await expect(question).to_contain_text("Refund 5 EUR?")
        await tab.shot("06-running-with-question")
        await question.locator("button.accept").click()
        await expect(page.locator('#net [data-place="RefundDecision"]')).to_have_attribute("data-count", "1")
        await expect(refund).to_have_attribute("data-state", "idle")

        # Markers are inspectable as JSON.
        await page.click('#net [data-place="RefundDecision"]')
        await expect(page.locator('#inspector .place-markers[data-place="RefundDecision"]')).to_contain_text(
            '"approved": true')
        await tab.shot("07-markers-inspected")

        # Timeline: choosing the Order's marker_added shows the state then; fork here opens the fork.
        await expect(page.locator("#timeline")).to_have_attribute("data-loaded", "true")
        row = page.locator('.tl-row[data-type="marker_added"]').first
        seq = await row.get_attribute("data-seq")
        await row.click()
        await expect(page.locator("#view-mode")).to_have_text(f"as of seq {seq}")
        await expect(page.locator('#net [data-place="Order"]')).to_have_attribute("data-count", "1")
        await expect(page.locator('#net [data-place="Cancelled"]')).to_have_attribute("data-count", "0")
        await tab.shot("08-timeline-past-state")
        await page.click("#fork-here")
        fork_id = await opened(page, other_than=session_id)
        await expect(page.locator("#forked-from a")).to_have_attribute("href", re.compile(f"{session_id}$"))
        await expect(page.locator("#forked-from")).to_contain_text(f"at seq {seq}")
        # The fork starts from that step: the Order marker is back, and cancel asks again there.
        await expect(page.locator('#net [data-transition="cancel"]')).to_have_attribute("data-state", "awaiting")
        await expect(page.locator('#net [data-place="Cancelled"]')).to_have_attribute("data-count", "0")
        await tab.shot("09-fork-opened")

        # Home lists both sessions, newest first, with their status.
        await page.goto(stack.gateway.url + "/#/")
        rows = page.locator('section.bot[data-bot="hitl"] tr.session-row')
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0)).to_have_attribute("data-session", fork_id)
        await expect(rows.nth(0)).to_have_attribute("data-status", "waiting")
        await expect(rows.nth(1)).to_have_attribute("data-session", session_id)
        await expect(rows.nth(1)).to_have_attribute("data-status", "idle")
        await tab.shot("10-home-with-statuses")
        tab.assert_clean()



async def test_a_reply_shows_as_it_is_streamed_and_is_then_replaced_by_the_whole_message(
    settings: Settings, browser: Browser, nc: Any, artifacts: str
) -> None:
    async with Stack(settings, [app("hitl_bot")], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        session_id = await new_session(http, "hitl")
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/hitl/sessions/{session_id}")
        await expect(page.locator("#stream-state")).to_have_text("connected")
        reply = AgentMessage(bot="hitl", session_id=session_id, text="Hello, how can I help?")
        for offset, piece in ((0, "Hello,"), (6, " how can"), (14, " I help?")):  # as the LLM service sends them
            delta = AgentMessageDelta(bot="hitl", session_id=session_id, text=piece, offset=offset,
                                      event_id=reply.id)
            await nc.publish(subjects.deltas("hitl", session_id), delta.model_dump_json().encode())
        streaming = page.locator(f'.msg.streaming[data-event="{reply.id}"]')
        await expect(streaming).to_have_text("Hello, how can I help?")
        await tab.shot("01-streaming")

        await EventLog(nc).append(reply)  # the whole reply lands in the log: it replaces the pieces
        await expect(page.locator('.msg[data-role="agent"]')).to_have_text("Hello, how can I help?")
        await expect(streaming).to_have_count(0)
        await tab.shot("02-whole-reply")
        tab.assert_clean()

# --- scale ---------------------------------------------------------------------------------------------


BIG = app("dashboard_big")
LONG = 10_000


async def test_timeline_of_10000_events_stays_small_in_the_dom_and_shows_a_late_state(
    settings: Settings, browser: Browser, nc: Any, artifacts: str
) -> None:
    async with Stack(settings, [BIG], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        session_id = await new_session(http, "dashboard_big")
        log = EventLog(nc)
        seqs: list[int] = []
        for start in range(0, LONG, 1000):  # nothing runs (gateway only): the markers stay in Step0
            seqs += await log.append_many([
                MarkerAdded(bot="dashboard_big", session_id=session_id, source="api",
                            marker=Marker(location="Step0", data={"n": i})) for i in range(start, start + 1000)])
        late = seqs[-10]  # the 9,991st marker

        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/dashboard_big/sessions/{session_id}")
        timeline = page.locator("#timeline")
        await expect(timeline).to_have_attribute("data-loaded", "true", timeout=120_000)
        await expect(page.locator("#timeline-count")).to_have_text(f"{LONG + 1} events")
        await expect(page.locator('#net [data-place="Step0"]')).to_have_attribute("data-count", str(LONG))
        assert 0 < await page.locator(".tl-row").count() <= MAX_ROWS
        await tab.shot("01-loaded")

        # Scrolled to the end, the DOM still holds a window of rows: the last ones.
        await timeline.evaluate("el => { el.scrollTop = el.scrollHeight; }")
        await expect(page.locator(f'.tl-row[data-seq="{seqs[-1]}"]')).to_be_visible()
        assert await page.locator(".tl-row").count() <= MAX_ROWS

        # Choosing a late event shows the state at it.
        await page.fill("#jump-seq", str(late))
        await page.click("#jump-form button")
        await expect(page.locator("#view-mode")).to_have_text(f"as of seq {late}")
        await expect(page.locator('#net [data-place="Step0"]')).to_have_attribute("data-count", str(LONG - 9))
        await expect(page.locator(f'.tl-row.selected[data-seq="{late}"]')).to_be_visible()
        await expect(page.locator(f'#inspector .step[data-seq="{late}"]')).to_contain_text('"n": 9990')
        assert await page.locator(".tl-row").count() <= MAX_ROWS
        await tab.shot("02-late-state")

        # ... and an early one, scrolled back to.
        await page.fill("#jump-seq", str(seqs[4]))
        await page.click("#jump-form button")
        await expect(page.locator('#net [data-place="Step0"]')).to_have_attribute("data-count", "5")
        await expect(page.locator(f'.tl-row.selected[data-seq="{seqs[4]}"]')).to_be_visible()
        assert await page.locator(".tl-row").count() <= MAX_ROWS
        await tab.shot("03-early-state")
        tab.assert_clean()


async def test_a_net_of_50_transitions_draws_every_transition_place_and_arc(
    settings: Settings, browser: Browser, artifacts: str
) -> None:
    async with Stack(settings, [BIG], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        net = stack.nets[0]
        session_id = await new_session(http, "dashboard_big")
        await add_marker(http, "dashboard_big", session_id, "Step4", {"n": 1})
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/dashboard_big/sessions/{session_id}")
        await expect(page.locator("#net [data-transition]")).to_have_count(50)
        await expect(page.locator("#net [data-place]")).to_have_count(51)
        arcs = sum(len(t.inputs) + len(t.outputs) for t in net.transitions)
        await expect(page.locator("#net .arc")).to_have_count(arcs)
        await expect(page.locator('#net [data-place="Step4"]')).to_have_attribute("data-count", "1")
        # Joins show their count on the arc; each node has its own room (no two boxes overlap).
        joins = [t for t in net.transitions if max(dict(t.inputs).values()) == 2]
        await expect(page.locator("#net .arc.input[data-count='2'] .arc-count")).to_have_count(len(joins))
        boxes = await page.eval_on_selector_all(
            "#net [data-transition] rect, #net [data-place] circle",
            "els => els.map(e => { const b = e.getBBox(); return [b.x, b.y, b.width, b.height]; })")
        assert len(boxes) == 101
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, (x, y, x2, y2)
        names = set(await page.eval_on_selector_all("#net [data-transition]",
                                                    "els => els.map(e => e.dataset.transition)"))
        assert names == {t.name for t in net.transitions}
        await tab.shot("01-net")
        await page.locator(".graph-panel").screenshot(path=str(ARTIFACTS / f"{tab.name}--02-net-panel.png"))
        tab.assert_clean()


# --- errors, forks -------------------------------------------------------------------------------------


async def test_a_failure_shows_its_traceback_and_the_inputs_of_the_failed_firing(
    settings: Settings, browser: Browser, artifacts: str
) -> None:
    async with Stack(settings, [app("errors_app")], parts=("scheduler", "executor", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        session_id = await new_session(http, "errors_app")
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/errors_app/sessions/{session_id}")
        await expect(page.locator("#stream-state")).to_have_text("connected")
        await add_marker(http, "errors_app", session_id, "AsyncOrder", {"item": "anvil", "qty": 1})

        failure = page.locator("#errors .failure")
        await expect(failure).to_have_count(1)
        await expect(failure.locator(".error-type")).to_have_text("LookupError")
        await expect(failure.locator(".error-message")).to_contain_text("no warehouse has 'anvil'")
        await expect(failure.locator(".traceback")).to_contain_text("ship_async")
        await expect(failure.locator(".inputs")).to_contain_text('"item": "anvil"')
        await expect(page.locator("#session-status [data-status]")).to_have_attribute("data-status", "failed")
        await expect(page.locator('#net [data-place="AsyncOrder"]')).to_have_attribute("data-count", "1")
        await tab.shot("01-failure")

        # The failed event in the timeline shows the same, and the home page lists the session as failed.
        await page.locator('.tl-row[data-type="transition_failed"]').click()
        await expect(page.locator("#inspector .failure .traceback")).to_contain_text("LookupError")
        await tab.shot("02-failure-in-timeline")
        await page.goto(stack.gateway.url + "/#/")
        await expect(page.locator(f'tr.session-row[data-session="{session_id}"]')).to_have_attribute(
            "data-status", "failed")
        await tab.shot("03-home-failed")
        tab.assert_clean()


async def test_fork_here_creates_the_fork_at_the_chosen_step_and_opens_it(
    settings: Settings, browser: Browser, artifacts: str
) -> None:
    async with Stack(settings, [BIG], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        source = await new_session(http, "dashboard_big")
        seqs = [await add_marker(http, "dashboard_big", source, "Step0", {"n": n}) for n in range(3)]
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/dashboard_big/sessions/{source}")
        await page.locator(f'.tl-row[data-seq="{seqs[1]}"]').click()
        await expect(page.locator('#net [data-place="Step0"]')).to_have_attribute("data-count", "2")
        await page.click("#fork-here")
        fork = await opened(page, other_than=source)
        await expect(page.locator("#view-mode")).to_have_text("live")
        await expect(page.locator('#net [data-place="Step0"]')).to_have_attribute("data-count", "2")
        await expect(page.locator('.tl-row[data-type="session_forked"]')).to_have_count(1)
        await tab.shot("01-fork")
        forked = (await http.get(f"/bots/dashboard_big/sessions/{fork}?events=false")).json()
        assert [m["data"]["n"] for m in forked["marking"]["Step0"]] == [0, 1]
        source_now = (await http.get(f"/bots/dashboard_big/sessions/{source}?events=false")).json()
        assert len(source_now["marking"]["Step0"]) == 3  # the source is untouched
        tab.assert_clean()


# --- files, keys, the page itself ----------------------------------------------------------------------


async def test_a_file_asked_for_is_uploaded_and_the_file_sent_back_downloads(
    settings: Settings, browser: Browser, artifacts: str
) -> None:
    async with Stack(settings, [app("hitl_bot")], parts=("scheduler", "executor", "gateway")) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        session_id = await new_session(http, "hitl")
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(f"{stack.gateway.url}/#/bots/hitl/sessions/{session_id}")
        await expect(page.locator("#stream-state")).to_have_text("connected")
        await add_marker(http, "hitl", session_id, "Upload", {"description": "your notes, please"})

        request = page.locator(".pending.file-request")
        await expect(request).to_contain_text("your notes, please")
        content = b"line one\nline two\n"
        await request.locator("input[type=file]").set_input_files(
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": content}])
        await tab.shot("01-file-asked")
        await request.locator("button.upload").click()

        files = page.locator("#files li")
        await expect(files).to_have_count(2)  # the upload, and the file echo_file sends back
        await expect(page.locator('#net [data-place="Received"]')).to_have_attribute("data-count", "1")
        await tab.shot("02-files")
        sent = (await http.get(f"/bots/hitl/sessions/{session_id}?events=false")).json()["files"]
        back = next(f for f in sent if f["direction"] == "output")
        async with page.expect_download() as downloading:
            await page.locator(f'#files li[data-file="{back["file_id"]}"] button.download').click()
        download = await downloading.value
        assert download.suggested_filename == back["name"]
        assert Path(await download.path()).read_bytes() == content
        tab.assert_clean()


async def test_with_keys_the_page_asks_for_one_and_shows_only_the_keys_owners_sessions(
    settings: Settings, browser: Browser, nc: Any, artifacts: str
) -> None:
    from petribus import keys

    alice = (await keys.create(nc.jetstream(), "alice"))[0]
    bob = (await keys.create(nc.jetstream(), "bob"))[0]
    async with Stack(settings, [app("hitl_bot")], parts=("scheduler", "gateway")) as stack:
        tab = await open_tab(browser, stack.gateway.url, artifacts)
        page = tab.page
        await page.goto(stack.gateway.url + "/")
        await expect(page.locator("#no-bots")).to_contain_text("enter an API key")
        await tab.shot("01-no-key")

        await page.fill("#key-input", alice)
        await page.click("#key-save")
        await page.locator('section.bot[data-bot="hitl"] [data-action="new-session"]').click()
        session_id = await opened(page)
        # The stream authenticates with its first message: alice's marker comes back through it.
        await expect(page.locator("#stream-state")).to_have_text("connected")
        await page.select_option("#marker-location", "Order")
        await page.fill("#marker-data", '{"id": 1}')
        await page.click("#marker-form button")
        await expect(page.locator('#net [data-transition="cancel"]')).to_have_attribute("data-state", "awaiting")
        await expect(page.locator('.tl-row[data-type="confirm_transition"]')).to_have_count(1)
        await tab.shot("02-alice-session")

        await page.goto(stack.gateway.url + "/#/")
        await expect(page.locator(f'tr.session-row[data-session="{session_id}"]')).to_have_count(1)
        await page.click("#key-clear")
        await page.fill("#key-input", bob)
        await page.click("#key-save")
        await expect(page.locator('section.bot[data-bot="hitl"] .sessions')).to_contain_text("No sessions yet")
        await tab.shot("03-bob-sees-none")
        # Bob opening alice's session by its id gets the same answer as for a session that does not exist.
        await page.goto(f"{stack.gateway.url}/#/bots/hitl/sessions/{session_id}")
        await expect(page.locator("#notice")).to_contain_text("unknown_session")
        tab.problems = [p for p in tab.problems if "404" not in p]  # that refusal, as the console logs it
        tab.assert_clean()


async def test_the_page_is_served_with_a_policy_of_its_own_origin_and_every_asset_is_local(
    settings: Settings,
) -> None:
    async with Stack(settings, [app("hitl_bot")], parts=("gateway",)) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        host = stack.gateway.url.removeprefix("http://")
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert f"connect-src 'self' ws://{host} wss://{host}" in policy and "frame-ancestors 'none'" in policy
        referenced = re.findall(r'(?:src|href)="([^"#][^"]*)"', page.text)
        assert referenced and all(ref.startswith("/ui/") for ref in referenced), referenced
        for ref in referenced:
            assert (await http.get(ref)).status_code == 200, ref
        shipped = Path(__file__).resolve().parent.parent / "services/gateway/petribus_gateway/dashboard"
        for path in shipped.rglob("*"):
            if path.is_file():
                text = path.read_text()
                for url in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s'\"]*", text):
                    assert url == "http://www.w3.org/2000/svg", (path.name, url)  # a namespace, never fetched
                served = await http.get(f"/ui/{path.relative_to(shipped)}")
                assert served.status_code == 200 and served.content == path.read_bytes(), path.name
