"""``petribus replay APP SESSION``: fold a recorded session with an app's net, without running any
transition, and report where the net would decide differently from what the log recorded
(``petribus.replay``; ``docs/replay.md``). For CI: record sessions once (``petribus sessions export``),
then replay them against every change of the app.

SESSION is a file made by ``petribus sessions export`` (verified as import verifies it), or the id of a
session read from NATS (``--nats-url``; its bot is the app's unless ``--bot`` names another).

Exit codes: 0 the net decides as the log did ("0 differences"), 1 it does not (each difference is listed
with its seq, kind and a sentence), 2 a bad APP, file or option, 3 NATS cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from petribus import bus
from petribus.bus import EventLog
from petribus.errors import BusError, PetribusError
from petribus.events import Event
from petribus.export import BadExport, load
from petribus.replay import Report, replay

EXIT_DIFFERENT = 1
EXIT_BAD_INPUT = 2
EXIT_NO_NATS = 3
CONNECT_TIMEOUT_S = 5.0

replay_app = typer.Typer(
    name="replay", add_completion=False, pretty_exceptions_enable=False,
    # A group (main.py adds it with add_typer) whose callback is the command: options may follow APP SESSION.
    context_settings={"allow_interspersed_args": True}, subcommand_metavar="",
    help="Check a recorded session against an app's net, without running anything.",
)


class Format(StrEnum):
    text = "text"
    json = "json"


@replay_app.callback(invoke_without_command=True)
def replay_command(
    app_spec: Annotated[str, typer.Argument(
        metavar="APP", help="The bot to check: path/to/app.py:bot or package.module:bot.")],
    session: Annotated[str, typer.Argument(
        metavar="SESSION", help="An exported session (.jsonl file), or a session id to read from NATS.")],
    until: Annotated[int | None, typer.Option(
        "--until", min=1, help="Replay up to and including this sequence (default: the whole log).")] = None,
    output: Annotated[Format, typer.Option(
        "--format", help="text (one line per difference) or json (one object, for CI).")] = Format.text,
    bot: Annotated[str | None, typer.Option(
        "--bot", help="The bot the session was recorded under, when reading it from NATS (default: the "
        "app's).")] = None,
    nats_url: Annotated[str | None, typer.Option(
        "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
        help="NATS server URL, when SESSION is a session id.")] = None,
) -> None:
    """Fold a recorded session with APP's net and list where it would decide differently: firings it would
    not make or would add, markers it no longer accepts. Exit 0 with "0 differences", else 1."""
    from petribus_cli.main import _load, _run  # at call time: main imports this module

    def body() -> int:
        [net] = _load([app_spec])
        events = _read(session, bot or net.bot, nats_url)
        report = replay(net, events, until=until)
        _show(report, output, until)
        return 0 if report.ok else EXIT_DIFFERENT

    _run(body)


def _read(session: str, bot: str, nats_url: str | None) -> list[tuple[int, Event]]:
    """The recorded log: from an export file when SESSION names one, else from NATS."""
    from petribus_cli.main import CliError

    path = Path(session)
    if path.suffix == ".jsonl" or path.exists():
        try:
            return load(path.read_bytes()).events
        except OSError as exc:
            raise CliError(f"cannot read {path} ({exc})", EXIT_BAD_INPUT) from None
        except BadExport as exc:
            raise CliError(f"{path}: {exc.message}", EXIT_BAD_INPUT) from None
    from petribus.settings import Settings

    url = nats_url or Settings().nats_url

    async def read() -> list[tuple[int, Event]]:
        nc = await bus.connect(url, name="petribus-replay", timeout=CONNECT_TIMEOUT_S, reconnect=False)
        try:
            return await EventLog(nc).read(bot, session)
        finally:
            await nc.close()

    try:
        events = asyncio.run(read())
    except BusError as exc:
        raise CliError(f"cannot read session {session} from NATS at {url}: {exc.message}", EXIT_NO_NATS) from None
    except PetribusError as exc:
        raise CliError(exc.message) from None
    if not events:
        raise CliError(f"no session {session!r} of bot {bot!r} at {url}: it never existed or was deleted (pass "
                       "--bot if it was recorded under another bot, or a .jsonl file)", EXIT_BAD_INPUT)
    return events


def _show(report: Report, output: Format, until: int | None) -> None:
    if output is Format.json:
        typer.echo(json.dumps({**report.to_json(), "until": until}, indent=2))
        return
    for d in report.differences:
        typer.echo(f"seq {d.seq}  {d.kind}  {d.message}")
    n = len(report.differences)
    typer.echo(f"{n} difference{'' if n == 1 else 's'} in session {report.session_id} of bot {report.bot}: "
               f"{report.events} events to seq {report.last_seq}, {report.decisions} decisions, "
               f"{report.firings} firings, {report.markers} markers checked")
