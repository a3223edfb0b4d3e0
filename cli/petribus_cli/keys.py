"""``petribus keys``: API keys for the gateway: create, list, revoke (``docs/security.md``).

``create`` prints the token once, on stdout alone (so ``TOKEN=$(petribus keys create --owner alice)``
works), and a note on stderr; the bucket keeps only a digest of its secret, so a lost token cannot be
shown again: revoke it and make another. ``list`` shows key ids, owners, flags and bots, never a token.
``revoke`` takes effect in every running gateway as soon as its watch delivers the change.

Exit codes, as the other commands: 0 done, 1 something failed (or ``revoke`` of a key that does not
exist), 2 a bad owner, bot or key id, 3 NATS cannot be reached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer

from petribus.errors import BusError, PetribusError
from petribus.keys import InvalidKey, check_key_id, check_owner

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_NATS = 3
CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")

keys_app = typer.Typer(
    name="keys", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Create, list and revoke API keys for the gateway; only a digest of each token is stored.",
)

NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
    help="NATS server URL (comma-separated for a cluster).")]


@keys_app.command("create")
def create_key(
    owner: Annotated[str, typer.Option("--owner", help="Who the key speaks for: the sessions it starts are "
                                       "this owner's, and only this owner's sessions are visible to it.")],
    admin: Annotated[bool, typer.Option("--admin", help="See and act on every owner's sessions.")] = False,
    bot: Annotated[list[str] | None, typer.Option(
        "--bot", help="A bot the key may use (repeatable); default: every bot.")] = None,
    nats_url: NatsUrl = None,
) -> None:
    """Make a key and print its token once. Send it as `Authorization: Bearer TOKEN` (docs/security.md)."""
    from petribus import keys

    _check(lambda: check_owner(owner))
    token, record = _run(nats_url, lambda js, replicas: keys.create(js, owner, admin=admin, bots=bot or [],
                                                                     replicas=replicas))
    typer.echo(token)
    scope = ", ".join(record.bots) if record.bots else "every bot"
    typer.echo(f"key {record.key_id} for owner {record.owner}{' (admin)' if record.admin else ''}, {scope}. "
               "This is the only time the token is shown; keep it secret.", err=True)


@keys_app.command("list")
def list_keys(nats_url: NatsUrl = None) -> None:
    """Every key: id, owner, admin, bots, when made and whether revoked. Tokens are never shown."""
    from petribus import keys

    found = _run(nats_url, lambda js, _: keys.listing(js))
    if not found:
        typer.echo("no keys; make one with: petribus keys create --owner NAME")
        return
    width = max(len(r.owner) for r in found)
    for r in found:
        state = f"revoked {_when(r.revoked)}" if r.revoked is not None else "live"
        typer.echo(f"{r.key_id}  {r.owner.ljust(width)}  {'admin' if r.admin else 'user '}  "
                   f"{_when(r.created)}  {state}  bots: {','.join(r.bots) or '*'}")


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The key's id, as `petribus keys list` shows it.")],
    nats_url: NatsUrl = None,
) -> None:
    """Revoke a key: running gateways refuse it as soon as their watch delivers the change. It stays listed,
    so events that name it still say whose it was."""
    from petribus import keys

    _check(lambda: check_key_id(key_id))
    record = _run(nats_url, lambda js, _: keys.revoke(js, key_id))
    if record is None:
        _fail(f"no key {key_id}; `petribus keys list` shows the keys there are", EXIT_FAILED)
    typer.echo(f"key {key_id} of owner {record.owner} revoked")  # type: ignore[union-attr]


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts or 0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _check(check: Callable[[], object]) -> None:
    try:
        check()
    except InvalidKey as exc:
        _fail(exc.message, EXIT_BAD_INPUT)


def _run(nats_url: str | None, action: Callable[[Any, int], Awaitable[T]]) -> T:
    """Connect, do ``action(jetstream, replicas)``, close; each failure becomes one message and an exit code."""
    from petribus import bus, keys
    from petribus.settings import Settings

    settings = Settings()
    url = nats_url or settings.nats_url

    async def main() -> T:
        nc = await bus.connect(url, name="petribus-keys", timeout=CONNECT_TIMEOUT_S, reconnect=False)
        try:
            js = nc.jetstream()
            await keys.bucket(js, replicas=settings.replicas)
            return await action(js, settings.replicas)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except InvalidKey as exc:
        _fail(exc.message, EXIT_BAD_INPUT)
    except BusError as exc:
        _fail(exc.message, EXIT_NO_NATS)
    except PetribusError as exc:
        _fail(exc.message, EXIT_FAILED)
    except Exception as exc:  # nats' own errors (no JetStream, a timeout)
        _fail(f"could not reach the keys bucket at {url}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)
