"""``petribus secrets``: set, list and delete the secrets transitions name (``docs/secrets.md``).

A value is read from stdin (``printf %s "$TOKEN" | petribus secrets set API_TOKEN``) or from a hidden
prompt, never from the command line, where it would land in the shell's history and in ``ps``. ``list``
shows names and when each was last set, never values.

Exit codes, as the other commands: 0 done, 1 something failed (or ``delete`` of a secret that is not
set), 2 a bad name or value, 3 NATS cannot be reached.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from petribus.errors import BusError, PetribusError
from petribus.secrets import InvalidSecret, check_name

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_NATS = 3
CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")

secrets_app = typer.Typer(
    name="secrets", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Set, list and delete the secrets transitions name with secrets=[...]. Values are never shown.",
)

NameArg = Annotated[str, typer.Argument(
    metavar="NAME", help="The secret's name, as the transition lists it and sees it as an environment "
    "variable: letters, digits and '_' (e.g. API_TOKEN).")]
NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
    help="NATS server URL (comma-separated for a cluster).")]


@secrets_app.command("set")
def set_secret(name: NameArg, nats_url: NatsUrl = None) -> None:
    """Store a secret. The value is read from stdin when it is piped, else from a hidden prompt; it is never
    taken from the command line (there is no --value), so it stays out of shell history and `ps`.

    One trailing newline of piped input is dropped. Running executors use the new value from their next
    firing on, without a restart.
    """
    from petribus import secrets

    _check(name)
    if sys.stdin is not None and not sys.stdin.isatty():
        value = sys.stdin.read()
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    else:
        value = typer.prompt(f"Value for {name}", hide_input=True, confirmation_prompt=True)
    _run(nats_url, lambda js: secrets.put(js, name, value))
    typer.echo(f"secret {name} set")


@secrets_app.command("list")
def list_secrets(nats_url: NatsUrl = None) -> None:
    """List the secrets' names and when each was last set (UTC). Values are never shown."""
    from petribus import secrets

    found = _run(nats_url, secrets.listing)
    if not found:
        typer.echo("no secrets set; add one with: petribus secrets set NAME")
        return
    width = max(len(s.name) for s in found)
    for s in found:
        when = s.updated.strftime("%Y-%m-%d %H:%M:%S UTC") if s.updated else "-"
        typer.echo(f"{s.name.ljust(width)}  {when}")


@secrets_app.command("delete")
def delete_secret(name: NameArg, nats_url: NatsUrl = None) -> None:
    """Delete a secret (and its history). Running executors stop using it from their next firing on; a
    transition that still names it then fails, unless the executor has PETRIBUS_SECRET_<NAME>."""
    from petribus import secrets

    _check(name)
    if not _run(nats_url, lambda js: secrets.remove(js, name)):
        _fail(f"secret {name} is not set; `petribus secrets list` shows the ones that are", EXIT_FAILED)
    typer.echo(f"secret {name} deleted")


def _check(name: str) -> None:
    try:
        check_name(name)
    except InvalidSecret as exc:
        _fail(exc.message, EXIT_BAD_INPUT)


def _run(nats_url: str | None, action: Callable[[Any], Awaitable[T]]) -> T:
    """Connect, do ``action(jetstream)``, close; each failure becomes one message and an exit code."""
    from petribus import bus, secrets
    from petribus.settings import Settings

    settings = Settings()
    url = nats_url or settings.nats_url

    async def main() -> T:
        nc = await bus.connect(url, name="petribus-secrets", timeout=CONNECT_TIMEOUT_S, reconnect=False)
        try:
            js = nc.jetstream()
            await secrets.bucket(js, replicas=settings.replicas)  # the first to need it makes it, replicated
            return await action(js)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except InvalidSecret as exc:
        _fail(exc.message, EXIT_BAD_INPUT)
    except BusError as exc:
        _fail(exc.message, EXIT_NO_NATS)
    except PetribusError as exc:
        _fail(exc.message, EXIT_FAILED)
    except Exception as exc:  # nats' own errors (no JetStream, a timeout): name the type, never a value
        _fail(f"could not reach the secrets bucket at {url}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)
