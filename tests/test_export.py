"""Session export and import (``petribus sessions``): the file format refuses a changed or cut file by line,
and a session moved through NATS comes back identical (events but for session id and seq, files byte for
byte), against a real nats-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

from petribus import bus
from petribus.bus import EventLog
from petribus.embedded import NatsServer
from petribus.errors import FileTooLarge, PetribusError
from petribus.events import SessionCreated, UserMessage
from petribus.export import BadExport, ExportedFile, SessionExport, dump, load
from petribus.files import FileStore
from petribus_cli.main import app as cli_app
from petribus_cli.sessions import EXIT_BAD_INPUT, EXIT_FAILED, read_session, write_session

GOLDEN = Path(__file__).parent / "golden"
HITL = GOLDEN / "hitl.jsonl"  # a recorded session with three files, one over a chunk line
T = TypeVar("T")


def small() -> bytes:
    events = [(1, SessionCreated(bot="b", session_id="s")), (3, UserMessage(bot="b", session_id="s", text="héllo"))]
    files = [ExportedFile("f1", "a.bin", "application/octet-stream", bytes(range(256)) * 300),
             ExportedFile("f2", "empty.txt", "text/plain", b"")]
    return b"".join(dump(SessionExport("b", "s", "2026-11-29T00:00:00Z", events, files)))


def refusal(data: bytes) -> str:
    with pytest.raises(BadExport) as caught:
        load(data)
    return caught.value.message


# --- the format -------------------------------------------------------------------------------------


def test_dump_and_load_round_trip():
    data = small()
    export = load(data)
    assert [(seq, e.type) for seq, e in export.events] == [(1, "session_created"), (3, "user_message")]
    assert export.events[1][1].text == "héllo"  # type: ignore[attr-defined]
    assert [(f.file_id, len(f.data)) for f in export.files] == [("f1", 76_800), ("f2", 0)]
    assert b"".join(dump(export)) == data  # the same export writes the same bytes


def test_a_changed_line_is_refused_naming_it():
    lines = small().split(b"\n")
    lines[2] = lines[2].replace("héllo".encode(), b"hello")
    assert b"hello" in lines[2]
    assert refusal(b"\n".join(lines)) == "line 3: the line was changed after export, or moved (its checksum does not match)"


def test_changed_file_bytes_are_refused_naming_the_line():
    lines = small().split(b"\n")
    chunk = json.loads(lines[4])
    assert chunk["kind"] == "chunk"
    lines[4] = lines[4].replace(chunk["data"][:8].encode(), b"AAAAAAAA", 1)
    assert lines[4] != small().split(b"\n")[4]
    assert refusal(b"\n".join(lines)).startswith("line 5: the line was changed after export")


@pytest.mark.parametrize("cut", [1, 40, 200])
def test_a_file_cut_inside_a_line_is_refused_as_truncated(cut):
    data = small()
    message = refusal(data[:-cut])
    assert "the file is truncated: its last line is cut short" in message


def test_a_file_cut_at_a_line_end_is_refused_as_truncated():
    lines = small().split(b"\n")
    cut = b"\n".join(lines[:3]) + b"\n"
    assert refusal(cut) == ("the file is truncated: it stops after line 3 without its end line; "
                            "export the session again")


def test_a_removed_or_added_line_is_refused():
    lines = small().split(b"\n")
    removed = b"\n".join(lines[:2] + lines[3:])
    assert refusal(removed).startswith("line 3: the line was changed after export, or moved")
    added = small() + lines[1] + b"\n"
    assert refusal(added) == "line 9: 1 line(s) follow the end line; the file was added to"


def test_an_empty_or_foreign_file_is_refused():
    assert "the file is empty" in refusal(b"")
    assert refusal(b'{"hello": "world"}\n').startswith("line 1: no line checksum")


def test_a_newer_format_version_says_to_upgrade():
    lines = small().split(b"\n")
    header = json.loads(lines[0])
    del header["check"]
    header["version"] = 2
    from petribus.export import _checked, _json

    lines[0] = _checked(1, _json(header)).rstrip(b"\n")
    assert "newer petribus" in refusal(b"\n".join(lines))


# --- through NATS -----------------------------------------------------------------------------------


def moved(event: Any) -> dict[str, Any]:
    """An event as JSON without what import changes: the session id, and the file URLs naming it."""
    data = json.loads(event.model_dump_json(exclude_none=True))
    data.pop("session_id")
    for key in ("url", "upload_url"):
        if key in data:
            data[key] = data[key].split("/files/")[1]
    return data


async def test_an_imported_session_exports_identical(nc):
    original = load(HITL.read_bytes())
    assert len(original.files) == 3

    seqs = await write_session(nc, original, session_id="moved-1")
    again = await read_session(nc, "moved-1")  # its bot found from the session id

    assert (again.bot, again.session_id) == ("hitl", "moved-1")
    assert [seq for seq, _ in again.events] == seqs == list(range(1, len(original.events) + 1))
    assert [moved(e) for _, e in again.events] == [moved(e) for _, e in original.events]
    assert {e.session_id for _, e in again.events} == {"moved-1"}
    urls = [e.url for _, e in again.events if getattr(e, "url", None)]  # type: ignore[attr-defined]
    assert urls and all(u.startswith("/bots/hitl/sessions/moved-1/files/") for u in urls)
    assert sorted((f.file_id, f.name, f.content_type, f.data) for f in again.files) == \
        sorted((f.file_id, f.name, f.content_type, f.data) for f in original.files)


async def test_import_under_another_bot_moves_events_and_files_to_it(nc):
    original = load(HITL.read_bytes())

    await write_session(nc, original, session_id="renamed", bot="hitl2")

    again = await read_session(nc, "renamed", bot="hitl2")
    assert {e.bot for _, e in again.events} == {"hitl2"} and len(again.files) == 3
    assert await EventLog(nc).last_seq("hitl", "renamed") == 0


async def test_import_refuses_a_session_that_exists_and_writes_nothing(nc):
    original = load(HITL.read_bytes())
    await EventLog(nc).append(SessionCreated(bot="hitl", session_id="taken"))

    with pytest.raises(PetribusError, match="exists already") as caught:
        await write_session(nc, original, session_id="taken")

    assert caught.value.code == "session_exists"
    assert len(await EventLog(nc).read("hitl", "taken")) == 1  # nothing appended to it
    for f in original.files:
        assert await FileStore(nc.jetstream(), 2**30).info("hitl", "taken", f.file_id) is None


async def test_import_refuses_a_file_over_the_limit_before_writing(nc):
    original = load(HITL.read_bytes())
    largest = max(len(f.data) for f in original.files)

    with pytest.raises(FileTooLarge, match="larger than this deployment's limit"):
        await write_session(nc, original, session_id="too-big", max_file_bytes=largest - 1)

    assert await EventLog(nc).last_seq("hitl", "too-big") == 0


async def test_an_import_that_fails_part_way_removes_what_it_wrote(nc, monkeypatch):
    events = [(1, SessionCreated(bot="b", session_id="s"))]
    events += [(n, UserMessage(bot="b", session_id="s", text=f"m{n}")) for n in range(2, 1202)]
    export = SessionExport("b", "s", "2026-11-29T00:00:00Z", events, [ExportedFile("f", "f.txt", "text/plain", b"x")])
    real = EventLog.append_batch
    batches: list[int] = []

    async def meddling(self: EventLog, batch: list, **kwargs: Any) -> list[int]:
        if batches:  # someone writes into the session between the import's first and second batch
            await self.append(UserMessage(bot="b", session_id="half", text="me first"))
        batches.append(len(batch))
        return await real(self, batch, **kwargs)

    monkeypatch.setattr(EventLog, "append_batch", meddling)
    with pytest.raises(PetribusError, match="was written to while it was imported"):
        await write_session(nc, export, session_id="half")

    assert batches == [1000, 201]  # the first batch landed, the second was refused
    assert await EventLog(nc).read("b", "half") == []
    assert await FileStore(nc.jetstream(), 2**30).info("b", "half", "f") is None


# --- the commands -----------------------------------------------------------------------------------


def cli(server: NatsServer, *args: str):
    return CliRunner().invoke(cli_app, ["sessions", *args, "--nats-url", server.url])


def on_bus(server: NatsServer, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(connection)`` against the server, for the synchronous command tests."""

    async def main() -> T:
        conn = await bus.connect(server.url, name="test")
        try:
            return await action(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


@pytest.fixture
def deployment(nats_server: NatsServer) -> NatsServer:
    """A server with petribus' streams, as a running deployment has them."""
    on_bus(nats_server, lambda conn: bus.ensure_streams(conn.jetstream()))
    return nats_server


def events_of(server: NatsServer, bot: str, session_id: str) -> list:
    return on_bus(server, lambda conn: EventLog(conn).read(bot, session_id))


def test_commands_import_then_export_round_trip(deployment, tmp_path):
    imported = cli(deployment, "import", str(HITL))
    assert imported.exit_code == 0, imported.output
    new_id = imported.output.strip()
    assert len(events_of(deployment, "hitl", new_id)) == len(load(HITL.read_bytes()).events)

    to_stdout = cli(deployment, "export", new_id)
    to_file = cli(deployment, "export", new_id, "--bot", "hitl", "--output", str(tmp_path / "out.jsonl"))

    assert to_stdout.exit_code == 0 and to_file.exit_code == 0, to_file.output
    original = load(HITL.read_bytes())
    for export in (load(to_stdout.stdout_bytes), load((tmp_path / "out.jsonl").read_bytes())):
        assert export.session_id == new_id
        assert [moved(e) for _, e in export.events] == [moved(e) for _, e in original.events]
        assert sorted(f.data for f in export.files) == sorted(f.data for f in original.files)

    replayed = CliRunner().invoke(cli_app, ["replay", f"{Path(__file__).parent / 'apps' / 'hitl_bot.py'}:bot",
                                            new_id, "--nats-url", deployment.url])
    assert replayed.exit_code == 0 and "0 differences" in replayed.output, replayed.output


def test_commands_refuse_a_tampered_or_cut_file_and_a_taken_id_writing_nothing(deployment, tmp_path):
    lines = HITL.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"data":{"id":1}', b'"data":{"id":9}', 1)
    assert lines[2] != HITL.read_bytes().split(b"\n")[2]  # the tampering happened
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"\n".join(lines))
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(HITL.read_bytes()[:-1000])

    bad = cli(deployment, "import", str(tampered), "--session-id", "nope")
    cut = cli(deployment, "import", str(truncated), "--session-id", "nope")
    first = cli(deployment, "import", str(HITL), "--session-id", "once")
    second = cli(deployment, "import", str(HITL), "--session-id", "once")

    assert bad.exit_code == EXIT_BAD_INPUT and "line 3: the line was changed after export" in bad.output
    assert "Nothing was imported" in bad.output
    assert cut.exit_code == EXIT_BAD_INPUT and "truncated" in cut.output
    assert events_of(deployment, "hitl", "nope") == []
    assert first.exit_code == 0 and first.output.strip() == "once"
    assert second.exit_code == EXIT_FAILED and "exists already" in second.output
    assert len(events_of(deployment, "hitl", "once")) == len(load(HITL.read_bytes()).events)


def test_export_of_an_unknown_session_says_so(deployment):
    refused = cli(deployment, "export", "no-such-session")
    assert refused.exit_code == EXIT_FAILED and "no session 'no-such-session'" in refused.output


def test_commands_without_a_deployment_say_what_to_start(nats_server):
    refused = cli(nats_server, "export", "any")
    assert refused.exit_code == 3 and "no PB_EVENTS stream" in refused.output
