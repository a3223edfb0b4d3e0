"""The README's debugging loop on examples/invoice_bot.py, over the real stack: a step fails and says
why (type, traceback, the marker it consumed); the code is fixed; a fork at the step before the
failure runs the fixed code to the end, and the failed session stays as it was."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx

from petribus.bus import EventLog
from petribus.client import SyncClient
from petribus.events import TransitionFailed

from .harness import Stack

EXAMPLE = Path(__file__).parent.parent / "examples" / "invoice_bot.py"
BUG = "value = float(invoice.amount)"
FIX = 'value = float(invoice.amount.replace(",", ""))'
PARTS = ("scheduler", "executor", "gateway")


async def _until(log: EventLog, session_id: str, match, timeout: float = 60.0):
    async with asyncio.timeout(timeout):
        while True:
            events = await log.read("invoices", session_id)
            found = [(seq, ev) for seq, ev in events if match(ev)]
            if found:
                return found[0], events
            await log.wait_for("invoices", session_id, after=events[-1][0], match=lambda ev: True, timeout=timeout)


async def test_fail_fix_fork(settings, nc, tmp_path):
    app = tmp_path / "invoice_bot.py"
    shutil.copy(EXAMPLE, app)
    assert BUG in app.read_text()
    log = EventLog(nc)
    async with Stack(settings, [f"{app}:bot"], parts=PARTS) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as http:
        sid = (await http.post("/bots/invoices/sessions")).json()["session_id"]
        added = await http.post(f"/bots/invoices/sessions/{sid}/markers",
                                json={"location": "Invoice", "data": {"customer": "acme", "amount": "1,200.50"}})
        (seq, failed), _ = await _until(log, sid, lambda ev: isinstance(ev, TransitionFailed) and ev.final)
    assert failed.error_type == "ValueError" and "1,200.50" in failed.error
    assert failed.traceback is not None and "parse_amount" in failed.traceback and BUG in failed.traceback
    assert [m.data for m in failed.inputs] == [{"customer": "acme", "amount": "1,200.50"}]
    before = await log.read("invoices", sid)

    # The fix. A process that imported the app keeps its module (and workers fork from a fork server
    # that may have preloaded it), as any Python process does: the fixed code runs where it is loaded
    # anew, as ``petribus serve --reload`` does in a new process. Here: the fixed file, at a new path.
    fixed = tmp_path / "fixed" / "invoice_bot.py"
    fixed.parent.mkdir()
    fixed.write_text(app.read_text().replace(BUG, FIX))
    async with Stack(settings, [f"{fixed}:bot"], parts=PARTS) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30.0) as http:
        # As the README does it, with the sync client (in a thread: this loop serves the gateway).
        def readme(url: str) -> tuple[str, int, dict]:
            with SyncClient(url) as client:
                failed = client.session("invoices", session_id=sid)
                added = next(step for step in failed.history() if step.event.type == "marker_added")
                fork = failed.fork(at=added.seq)
                return fork.session_id, added.seq, fork.run(halt_after=["book"], since=0).event.value

        fork, at, done = await asyncio.to_thread(readme, stack.gateway.url)
        assert at == added.json()["seq"]  # the invoice was there; nothing had run yet
        assert done["transition"] == "book"
        _, events = await _until(log, fork, lambda ev: ev.type == "transition_completed" and ev.transition == "book")
        said = [ev.text for _, ev in events if ev.type == "agent_message"]
        assert said == ["Booked 1200.50 for acme"]
        state = (await http.get(f"/bots/invoices/sessions/{fork}", params={"events": "false"})).json()
        assert state["marking"]["Booked"][0]["data"] == {"customer": "acme", "cents": 120050}
    assert await log.read("invoices", sid) == before  # the failed session is as it was
