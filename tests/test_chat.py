"""The terminal chat with people in the loop: yes/no for confirmations, files saved and uploaded."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator

from rich.console import Console

from petribus.chat import Chat

from .conftest import app
from .harness import Stack, session_state

HITL = app("hitl_bot")


class Typist:
    """Lines typed into the chat, one at a time, each once the screen shows what it waits for."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    def type(self, line: str) -> None:
        self.queue.put_nowait(line)

    async def lines(self) -> AsyncIterator[str]:
        while (line := await self.queue.get()) is not None:
            yield line


class Screen(io.StringIO):
    """What the chat printed; wakes waiters on every write instead of polling."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        self.changed.set()
        return n

    async def shows(self, text: str, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.getvalue():
                self.changed.clear()
                await self.changed.wait()


async def _chat(stack: Stack, screen: Screen, typist: Typist, tmp_path) -> tuple[Chat, asyncio.Task]:
    console = Console(file=screen, width=200, soft_wrap=True, markup=False, emoji=False, highlight=False)
    chat = Chat(stack.gateway.url.replace("http://", "ws://"), "hitl", console=console,
                download_dir=tmp_path / "downloads")
    return chat, asyncio.create_task(chat.run(typist.lines()))


async def test_chat_answers_confirmations_yes_and_no(settings, nc, tmp_path):
    screen, typist = Screen(), Typist()
    async with Stack(settings, [HITL]) as stack:
        chat, running = await _chat(stack, screen, typist, tmp_path)
        typist.type('/add Order {"id": 1}')
        await screen.shows("[confirm_transition] cancel")
        typist.type("y")
        await screen.shows("[transition_completed] cancel")
        typist.type('/add Ticket {"id": 2}')
        await screen.shows("[confirm_transition] escalate")
        typist.type("n")
        await screen.shows("[transition_completed] close")  # rejected for escalate, so it is closed
        typist.type('/add Refund {"amount": 30}')
        await screen.shows("[confirm_request] Refund 30 EUR?")
        typist.type("yes")
        await screen.shows("[transition_completed] refund")
        typist.type("/quit")
        sid = await running

    state, _ = await session_state(nc, "hitl", sid)
    assert state.counts() == {"Cancelled": 1, "Closed": 1, "RefundDecision": 1}
    assert state.marking()["RefundDecision"][0].data == {"amount": 30, "approved": True}
    assert not chat.questions


async def test_chat_uploads_a_requested_file_and_saves_sent_files(settings, nc, tmp_path):
    screen, typist = Screen(), Typist()
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 100)
    async with Stack(settings, [HITL]) as stack:
        chat, running = await _chat(stack, screen, typist, tmp_path)
        typist.type('/add Upload {"description": "the report"}')
        await screen.shows("[input_file_request] the report")
        typist.type(f"/upload {source}")
        await screen.shows("[transition_completed] echo_file")
        await screen.shows("[saved]")  # the transition sent the file back: the chat saved it
        typist.type("/quit")
        sid = await running

    state, _ = await session_state(nc, "hitl", sid)
    [received] = state.marking()["Received"]
    assert received.data["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    [saved] = list((tmp_path / "downloads").iterdir())
    assert saved.read_bytes() == source.read_bytes()


async def test_chat_says_when_there_is_nothing_to_answer_or_upload(settings, tmp_path):
    screen, typist = Screen(), Typist()
    async with Stack(settings, [HITL]) as stack:
        chat, running = await _chat(stack, screen, typist, tmp_path)
        await screen.shows("[session_created]")
        typist.type("/yes")
        await screen.shows("[nothing to answer]")
        typist.type("/upload /etc/hostname")
        await screen.shows("[nothing to upload]")
        typist.type("/help")  # this chat's own commands, then the bot's description (from the LLM service)
        await screen.shows("/upload PATH sends the file")
        await screen.shows("/quit (or Ctrl-D) leaves")
        await screen.shows("Commands: /add LOCATION {json}, /help.")
        typist.type("/quit")
        await running


async def test_chat_refuses_an_upload_larger_than_the_bot_accepts(settings, tmp_path):
    settings = settings.model_copy(update={"max_file_bytes": 1024})
    screen, typist = Screen(), Typist()
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 4096)
    async with Stack(settings, [HITL]) as stack:
        chat, running = await _chat(stack, screen, typist, tmp_path)
        typist.type('/add Upload {"description": "a big one", "timeout": 30}')
        await screen.shows("[input_file_request] a big one")
        typist.type(f"/upload {big}")
        await screen.shows("[upload refused]")
        assert chat.file_requests  # still open: the user can send a smaller file
        typist.type("/quit")
        await running


def test_a_failed_step_shows_its_type_where_it_raised_and_its_inputs():
    from petribus.chat import render

    traceback = ('Traceback (most recent call last):\n  File "/srv/app/invoice_bot.py", line 41, in parse_amount\n'
                 '    value = float(invoice.amount)\n    invoice = Invoice(amount=\'1,200.50\')\n'
                 "ValueError: could not convert string to float: '1,200.50'\n")
    shown = render({"type": "transition_failed", "metadata": {"transition_name": "parse_amount"}, "value": {
        "transition": "parse_amount", "error": "could not convert string to float: '1,200.50'",
        "error_type": "ValueError", "final": True, "attempt": 1, "traceback": traceback,
        "inputs": [{"id": "m1", "location": "Invoice", "data": {"amount": "1,200.50"}}]}})
    assert shown.splitlines() == [
        "[transition_failed] parse_amount: ValueError: could not convert string to float: '1,200.50'",
        "    at invoice_bot.py:41 in parse_amount: value = float(invoice.amount)",
        '    inputs: Invoice {"amount": "1,200.50"}',
    ]
    killed = render({"type": "transition_failed", "metadata": {}, "value": {
        "transition": "t", "error": "the worker was killed", "final": False, "attempt": 1}})
    assert killed == "[transition_failed] t: the worker was killed (attempt 1, will retry)"
