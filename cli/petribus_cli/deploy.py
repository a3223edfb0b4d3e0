"""``petribus deploy``, ``release``, ``activate``, ``deactivate``, ``rollback`` and ``petribus deployments``:
versions of an app and which one each environment runs (``docs/deployments.md``).

``deploy`` packages the app's folder into a content-addressed version, stores it in NATS and makes it the
environment's active version; the others move versions between environments, stop and resume them, go
back to the one before, and show or set what is running where. Each change is recorded in the
deployment's history with the user who made it (``$USER``).

Exit codes, as the other commands: 0 done (also when there was nothing to change), 1 something failed
(a policy breach, nothing to release or roll back to), 2 a bad name, env, app or net, 3 NATS cannot be
reached.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from petribus.errors import BusError, PetribusError

if TYPE_CHECKING:
    from petribus.deploy import Deployment, Policies, Version

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_NATS = 3
CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")

deployments_app = typer.Typer(
    name="deployments", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="List the deployments, show one, its history and its policies, and set the policies.",
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The deployment's name, as given to deploy --name.")]
EnvOpt = Annotated[str, typer.Option("--env", help="The environment (e.g. dev, prod).")]
NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
    help="NATS server URL (comma-separated for a cluster).")]


def register(app: typer.Typer) -> None:
    """Hang these commands off the ``petribus`` command line."""
    for name, command in (("deploy", deploy_app), ("release", release_version), ("activate", activate_env),
                          ("deactivate", deactivate_env), ("rollback", rollback_env)):
        app.command(name)(command)
    app.add_typer(deployments_app, name="deployments")


def deploy_app(
    app: Annotated[str, typer.Argument(metavar="APP", help="The app, as path/to/app.py:bot; its folder is "
                                       "packaged.")],
    name: Annotated[str, typer.Option("--name", help="The deployment's name: letters, digits, '_' and '-'.")],
    env: Annotated[str | None, typer.Option("--env", help="The environment it goes to.")] = None,
    nats_url: NatsUrl = None,
) -> None:
    """Package the app's folder as a version, store it, and make it the active version in ENV.

    The version is named by its content: deploying the same folder again changes nothing. New sessions go
    to the new version; sessions started before stay on the version they started on.
    """
    from petribus import deploy

    env = env or deploy.DEFAULT_ENV
    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))
    version, dep = _run(nats_url, lambda js, replicas: deploy.deploy(js, app, name, env=env, actor=_actor(),
                                                                    replicas=replicas))
    typer.echo(f"version {version.version} of {name}: bot {version.bot}, {len(version.files)} file(s), "
               f"{version.size} bytes")
    if not dep.changed:
        typer.echo(f"{version.version} is already the active version of {name} in env {env}; nothing changed"
                   + (f" (it is deactivated: petribus activate {name} --env {env})" if dep.state != "active" else ""))
    else:
        typer.echo(f"env {env}: {name} now runs {version.version} (before: {dep.before or 'none'})")


def release_version(
    name: NameArg,
    src: Annotated[str, typer.Option("--from", help="The env whose active version is released.")],
    dst: Annotated[str, typer.Option("--to", help="The env that gets it.")],
    with_policies: Annotated[bool, typer.Option("--with-policies", help="Copy the --from env's policies too.")]
    = False,
    nats_url: NatsUrl = None,
) -> None:
    """Make the active version of NAME in --from the active version in --to too (--from is left as it is)."""
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(src), deploy.check_env(dst)))
    dep = _run(nats_url, lambda js, replicas: deploy.release(js, name, src=src, dst=dst, with_policies=with_policies,
                                                             actor=_actor(), replicas=replicas))
    if not dep.changed:
        typer.echo(f"{dep.active} is already the active version of {name} in env {dst}; nothing changed")
    else:
        typer.echo(f"env {dst}: {name} now runs {dep.active} from env {src} (before: {dep.before or 'none'})"
                   + ("; policies copied" if with_policies else ""))


def activate_env(name: NameArg, env: EnvOpt, nats_url: NatsUrl = None) -> None:
    """Send new sessions of NAME in ENV to its active version again, after deactivate."""
    from petribus import deploy

    _state(name, env, nats_url, deploy.activate, "active")


def deactivate_env(name: NameArg, env: EnvOpt, nats_url: NatsUrl = None) -> None:
    """Stop sending new sessions of NAME in ENV to it; the version stays, to activate again."""
    from petribus import deploy

    _state(name, env, nats_url, deploy.deactivate, "deactivated")


def _state(name: str, env: str, nats_url: str | None, action: Callable[..., Awaitable[Deployment]],
           word: str) -> None:
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))
    dep = _run(nats_url, lambda js, replicas: action(js, name, env=env, actor=_actor(), replicas=replicas))
    said = "already " if not dep.changed else ""
    typer.echo(f"{name} in env {env} is {said}{word} (version {dep.active or 'none'})")


def rollback_env(name: NameArg, env: EnvOpt, nats_url: NatsUrl = None) -> None:
    """Make the version that was active before the current one active again."""
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))
    dep = _run(nats_url, lambda js, replicas: deploy.rollback(js, name, env=env, actor=_actor(), replicas=replicas))
    typer.echo(f"env {env}: {name} rolled back from {dep.before} to {dep.active}")


@deployments_app.command("list")
def list_deployments(nats_url: NatsUrl = None) -> None:
    """Every deployment: env, name, active version, state and when that version was made active."""
    from petribus import deploy

    found = _run(nats_url, lambda js, _: deploy.deployments(js))
    if not found:
        typer.echo("no deployments; make one with: petribus deploy path/to/app.py:bot --name NAME")
        return
    rows = [("ENV", "NAME", "ACTIVE", "STATE", "DEPLOYED AT")]
    rows += [(d.env, d.name, d.active or "-", d.state, _when(d.since())) for d in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@deployments_app.command("versions")
def list_versions(
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="Only this deployment's versions.")] = None,
    nats_url: NatsUrl = None,
) -> None:
    """Every stored version (of NAME), oldest first."""
    from petribus import deploy

    found = _run(nats_url, lambda js, _: deploy.versions(js, name))
    if not found:
        typer.echo("no versions" + (f" of {name}" if name else ""))
    for v in found:
        typer.echo(f"{v.version}  {v.name}  {_when(v.created)}  by {v.created_by}  {v.app}  {len(v.files)} file(s)")


@deployments_app.command("show")
def show_deployment(name: NameArg, env: EnvOpt = "default", nats_url: NatsUrl = None) -> None:
    """The deployment of NAME in ENV, the details of its active version, and its policies."""
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))

    async def read(js: Any, _: int) -> tuple[Deployment | None, Version | None, Any]:
        from petribus.deployed import status

        dep = await deploy.get_deployment(js, name, env)
        version = await deploy.get_version(js, dep.active) if dep and dep.active else None
        return dep, version, (await status(js, version) if version is not None else None)

    dep, version, loaded = _run(nats_url, read)
    if dep is None:
        _fail(_missing(name, env), EXIT_FAILED)
    assert dep is not None
    typer.echo(f"deployment {name} in env {env}: {dep.state}, version {dep.active or 'none'} "
               f"(since {_when(dep.since())})")
    if version is not None:
        typer.echo(f"  bot:          {version.bot}")
        typer.echo(f"  app:          {version.app}")
        typer.echo(f"  digest:       sha256:{version.digest}")
        typer.echo(f"  created:      {_when(version.created)} by {version.created_by}")
        typer.echo(f"  files:        {', '.join(version.files)}")
        typer.echo(f"  requirements: {', '.join(version.requirements) or 'none'}")
        typer.echo(f"  transitions:  {', '.join(version.transitions)}")
        typer.echo(f"  pools:        {', '.join(version.pools) or 'none'}")
        typer.echo(f"  gpus:         {', '.join(version.gpus) or 'none'}")
        typer.echo(f"  model:        {version.model or 'the LLM service default'}")
        ready, why, reports = loaded
        typer.echo(f"  ready:        {'yes: new sessions go to it' if ready else 'no, ' + why}")
        for report in reports:  # what each service said when it loaded the version (--deployments)
            said = "loaded" if report.ok else f"FAILED: {report.error}"
            typer.echo(f"    {report.role} {report.instance}: {said} ({_when(report.at)})")
    typer.echo(f"  policies:     {deploy.describe_policies(dep.policies)}")
    if previous := dep.previous_version():
        typer.echo(f"  rollback to:  {previous}")


@deployments_app.command("history")
def show_history(name: NameArg, env: EnvOpt = "default", nats_url: NatsUrl = None) -> None:
    """What was done to NAME in ENV, oldest first: when, by whom, which version."""
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))
    dep = _run(nats_url, lambda js, _: deploy.get_deployment(js, name, env))
    if dep is None:
        _fail(_missing(name, env), EXIT_FAILED)
    assert dep is not None
    for e in dep.history:
        typer.echo(f"{_when(e.at)}  {e.action.ljust(10)}  {(e.version or '-').ljust(10)}  {e.actor}"
                   + (f"  {e.detail}" if e.detail else ""))


@deployments_app.command("policies")
def set_policies(
    name: NameArg,
    env: EnvOpt,
    pools: Annotated[str | None, typer.Option("--pools", help="Pools allowed, comma-separated; '*': any; "
                                              "'none': none.")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPU types allowed (e.g. T4,A10G; 'any' allows a GPU "
                                             "of any type); '*': any; 'none': no GPU.")] = None,
    max_concurrent_firings: Annotated[int | None, typer.Option(
        "--max-concurrent-firings", help="Firings at once per session; 0: no limit.")] = None,
    models: Annotated[str | None, typer.Option("--models", help="Models the bot may name; '*': any.")] = None,
    authorized: Annotated[bool | None, typer.Option("--authorized/--public", help="Whether callers need an API "
                                                    "key (default: the bot's own setting).")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Start from no policies (anything goes), then apply the "
                                        "options given.")] = False,
    nats_url: NatsUrl = None,
) -> None:
    """Set the policies of NAME in ENV: the options given change, the others stay. Without options, show them.
    Refused, changing nothing, when the active version breaks the new policies."""
    from petribus import deploy

    _check(lambda: (deploy.check_name(name), deploy.check_env(env)))
    changes: dict[str, Any] = {}
    for key, raw in (("pools", pools), ("gpus", gpus), ("models", models)):
        if raw is not None:
            changes[key] = _names(raw)
    if max_concurrent_firings is not None:
        if max_concurrent_firings < 0:
            _fail(f"--max-concurrent-firings {max_concurrent_firings}: give a whole number >= 1, or 0 for no limit",
                  EXIT_BAD_INPUT)
        changes["max_concurrent_firings"] = max_concurrent_firings or None
    if authorized is not None:
        changes["authorized"] = authorized
    if not changes and not reset:
        dep = _run(nats_url, lambda js, _: deploy.get_deployment(js, name, env))
        typer.echo(deploy.describe_policies(dep.policies if dep else deploy.Policies()))
        return

    def change(current: Policies) -> Policies:
        base = deploy.Policies() if reset else current
        return deploy.Policies.model_validate({**base.model_dump(), **changes})

    dep = _run(nats_url, lambda js, replicas: deploy.amend_policies(js, name, env=env, change=change, actor=_actor(),
                                                                    replicas=replicas))
    said = "set" if dep.changed else "unchanged"
    typer.echo(f"policies of {name} in env {env} {said}: {deploy.describe_policies(dep.policies)}")


def _names(raw: str) -> list[str] | None:
    raw = raw.strip()
    if raw == "*":
        return None
    if raw.lower() in ("", "none"):
        return []
    return sorted({part.strip() for part in raw.split(",") if part.strip()})


def _missing(name: str, env: str) -> str:
    return f"there is no deployment {name} in env {env}; `petribus deployments list` shows those there are"


def _actor() -> str:
    return os.environ.get("USER") or os.environ.get("USERNAME") or "cli"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _check(check: Callable[[], object]) -> None:
    from petribus.deploy import InvalidDeploy

    try:
        check()
    except InvalidDeploy as exc:
        _fail(exc.message, EXIT_BAD_INPUT)


def _run(nats_url: str | None, action: Callable[[Any, int], Awaitable[T]]) -> T:
    """Connect, do ``action(jetstream, replicas)``, close; each failure becomes one message and an exit code."""
    from pydantic import ValidationError

    from petribus import bus, deploy
    from petribus.settings import Settings

    settings = Settings()
    url = nats_url or settings.nats_url

    async def main() -> T:
        nc = await bus.connect(url, name="petribus-deploy", timeout=CONNECT_TIMEOUT_S, reconnect=False)
        try:
            js = nc.jetstream()
            await deploy.bucket(js, replicas=settings.replicas)  # the first to need it makes it, replicated
            return await action(js, settings.replicas)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except deploy.InvalidDeploy as exc:
        _fail(exc.message, EXIT_BAD_INPUT)
    except ValidationError as exc:  # policies the model refuses
        _fail(f"invalid policies: {exc.errors(include_url=False)[0]['msg']}", EXIT_BAD_INPUT)
    except BusError as exc:
        _fail(exc.message, EXIT_NO_NATS)
    except PetribusError as exc:
        _fail(exc.message, EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001  (nats' own errors: no JetStream, a timeout)
        _fail(f"could not reach the deployments bucket at {bus.redact_url(url)}: {type(exc).__name__}: {exc}",
              EXIT_FAILED)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)
