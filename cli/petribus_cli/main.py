"""The command line: ``petribus serve app.py:bot`` runs everything; one command per service scales out.

``serve`` starts an embedded nats-server (unless given ``--nats-url``) with its store under the data
folder, so sessions survive a restart, then the scheduler, an executor, the LLM service and the
gateway in this process, and opens a chat in the terminal (``--no-chat`` runs headless until SIGINT or
SIGTERM). ``scheduler``, ``executor``, ``gateway`` and ``llm`` each run one service against a NATS
server, so more of any of them can join a running deployment.

The embedded server is a closed bus (docs/closed-bus.md): a NATS user per service role, with passwords
made on the first start under ``DATA_DIR/nats/auth`` and kept after; each service connects as its own,
and the other commands find the admin's there. ``credentials`` makes the same for a production server.

Services live in their own packages; they are imported only when a command runs them, so importing
``petribus`` never pulls a service in.

Exit codes: 0 after a clean stop, 1 when something failed while running, 2 for a bad APP or an invalid
net, 3 when NATS cannot be reached. Each failure prints one message saying what was wrong, with
which value, and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO

import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from petribus import logs
from petribus.errors import AppLoadError, BusError, NetDefinitionError, PetribusError
from petribus.net import Net
from petribus.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_APP = 2
EXIT_NO_NATS = 3
PROBE_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 5.0

app = typer.Typer(
    name="petribus", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Run AI agents as Petri nets on NATS JetStream.",
)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        print(f"petribus {version('petribus')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print petribus's version and exit.")] = False) -> None:
    """Run AI agents as Petri nets on NATS JetStream."""
out = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)


class CliError(Exception):
    """A failure the user can fix: printed as one message, then exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    console = "console"
    json = "json"


AppsArg = Annotated[list[str], typer.Argument(
    metavar="APP...", help="Bots to run: path/to/app.py:bot or package.module:bot.")]
OptionalApps = Annotated[list[str] | None, typer.Argument(
    metavar="[APP...]", help="Bots to run: path/to/app.py:bot or package.module:bot (none with --deployments).")]
DeploymentsOpt = Annotated[bool, typer.Option(
    "--deployments", help="Run what `petribus deploy` deployed, every version side by side, picking up new "
    "ones while running (docs/deployments.md).")]
NatsUrl = Annotated[str | None, typer.Option(
    "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
    help="NATS server URL (comma-separated for a cluster).")]
LevelOpt = Annotated[LogLevel, typer.Option("--log-level", help="Least severe log event to write.")]
FormatOpt = Annotated[LogFormat, typer.Option(
    "--log-format", help="console (key=value) or json, one event a line.")]
HostOpt = Annotated[str, typer.Option("--host", envvar="PETRIBUS_HOST", show_envvar=True,
                                      help="Gateway address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", envvar="PETRIBUS_PORT", show_envvar=True, min=0, max=65535,
                                      help="Gateway port (0 picks a free one).")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="Listen on a non-loopback --host with no API key (anyone who reaches it may use every "
    "session; docs/security.md). Also $PETRIBUS_INSECURE.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Executor worker processes; a sync (def) firing has one to itself "
    "(default 16, or $PETRIBUS_WORKERS).")]
ConcurrencyOpt = Annotated[int | None, typer.Option(
    "--worker-concurrency", min=1, help="Async (async def) firings one worker process runs at once "
    "(default 256, or $PETRIBUS_WORKER_CONCURRENCY).")]


# ---------------------------------------------------------------- serve


@app.command()
def serve(
    app_spec: Annotated[str, typer.Argument(
        metavar="APP", help="The bot: path/to/app.py:bot (name defaults to the file stem).")],
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    insecure: InsecureOpt = False,
    nats_url: Annotated[str | None, typer.Option(
        "--nats-url", envvar="PETRIBUS_NATS_URL", show_envvar=True,
        help="Use this NATS server instead of starting an embedded one.")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Run headless until SIGINT/SIGTERM.")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Where the embedded NATS keeps its store, and chat-mode logs go "
        "(default: $XDG_DATA_HOME/petribus).")] = None,
    workers: WorkersOpt = None,
    worker_concurrency: ConcurrencyOpt = None,
    session: Annotated[str | None, typer.Option("--session", help="Resume this session in the chat.")] = None,
    reload: Annotated[bool, typer.Option(
        "--reload", help="Run the services anew when a .py file under the app's folder changes; sessions "
        "and the chat stay (docs/debugging.md).")] = False,
    lifeline: Annotated[bool, typer.Option(
        "--lifeline", hidden=True, help="Run as the services of serve --reload: stop when stdin closes, "
        "say 'ready' on stdout once serving.")] = False,
    log_level: LevelOpt = LogLevel.info,
    log_format: FormatOpt = LogFormat.console,
) -> None:
    """Run a bot: embedded NATS, scheduler, executor, LLM service and gateway, and a chat in the terminal."""

    def body() -> int:
        settings = _settings(host=host, port=port, data_dir=data_dir, workers=workers, insecure=insecure or None,
                             worker_concurrency=worker_concurrency, nats_url=nats_url,
                             log_level=log_level.value, log_format=log_format.value)
        chat = not no_chat
        log_file = settings.data_dir / "logs" / "petribus.log" if chat else None
        with _logging(settings, log_file), contextlib.ExitStack() as stack:
            [net] = _load([app_spec])
            spec = _absolute(app_spec)
            embedded = nats_url is None
            if embedded:
                from petribus.bus_auth import Credentials, local_auth_dir
                from petribus.embedded import NatsServer

                stack.enter_context(_exclusive(settings.data_dir / "nats"))
                # A closed bus: a user per service, passwords made on the first start and kept after.
                credentials = Credentials.load_or_create(local_auth_dir(settings.data_dir))
                server = NatsServer(settings.data_dir / "nats", port=-1, sync_interval=settings.sync_interval,
                                    auth=credentials)
                server.start()
                stack.callback(server.stop)  # runs before the store's lock is let go
                settings = settings.model_copy(update={"nats_url": server.url, "nats_auth_dir": credentials.folder})
                # As admin, before the services (which may create the streams but not change them): a
                # stream whose settings changed since the last start is brought to the new ones.
                asyncio.run(_prepare_streams(settings))
            else:
                asyncio.run(_probe(settings))
            if reload:
                return asyncio.run(_serve_reloading(settings, spec, net, chat=chat, session=session,
                                                    embedded=embedded, log_file=log_file))
            from petribus.service import settle_collector

            settle_collector()
            return asyncio.run(_serve(settings, spec, net, chat=chat and not lifeline, session=session,
                                      embedded=embedded, log_file=log_file, lifeline=lifeline))

    _run(body)


async def _serve(settings: Settings, spec: str, net: Net, *, chat: bool, session: str | None, embedded: bool,
                 log_file: Path | None, lifeline: bool = False) -> int:
    from petribus_gateway.app import Gateway
    from petribus_llm.app import LLMService
    from petribus_scheduler.app import Scheduler

    from petribus import metrics
    from petribus.chat import Chat, stdin_lines
    from petribus.child import ChildService, say_ready, watch_lifeline

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if lifeline:
        watch_lifeline()  # after the handlers: the end of stdin is a SIGTERM, a graceful stop
    makers: list[Callable[[], Any]] = [
        # The executor in a process of its own: a core for it, not turns with the others (petribus.child);
        # its metrics are read from a loopback port of its own and reported with this process's.
        lambda: Scheduler(settings, [net]),
        lambda: ChildService("executor", "petribus_executor", [spec], metrics.for_child(settings)),
        lambda: LLMService(settings, [net]), lambda: Gateway(settings, [net]),
    ]
    services: list[Any] = []
    waiting: list[asyncio.Task[Any]] = []
    talk: Chat | None = None
    chat_task: asyncio.Task[Any] | None = None
    try:
        for make in makers:
            svc = make()
            try:
                await svc.start()
            except BaseException:
                await _stop_quietly(svc)
                raise
            services.append(svc)
        gateway = services[-1]
        ws_base = gateway.url.replace("http://", "ws://", 1)
        if lifeline:
            say_ready()
            sys.stdout.buffer.flush()
        else:
            _banner(settings, spec, net, gateway.url, ws_base, embedded=embedded, log_file=log_file, chat=chat)

        waiting = [asyncio.create_task(svc.wait(), name=f"wait:{svc.name}") for svc in services]
        stopper = asyncio.create_task(stop.wait(), name="signal")
        waiting.append(stopper)
        if chat:
            talk = Chat(ws_base, net.bot, session_id=session, console=out,
                        download_dir=settings.data_dir / "downloads")
            chat_task = asyncio.create_task(talk.run(stdin_lines()), name="chat")
            waiting.append(chat_task)
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is chat_task:
                _chat_ended(task)
            elif task is not stopper:
                name = task.get_name().removeprefix("wait:")
                raise CliError(f"the {name} service failed: {task.exception()!r}; its log has the details"
                               + (f" ({log_file})" if log_file else ""))
        return 0
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        if talk is not None and talk.session_id and talk.last_seq is not None:
            out.print(f"Session {talk.session_id}. Resume it with: "
                      f"petribus serve {spec} --session {talk.session_id}")
        for svc in reversed(services):
            await _stop_quietly(svc)
        if services:
            out.print("petribus stopped.")


async def _serve_reloading(settings: Settings, spec: str, net: Net, *, chat: bool, session: str | None,
                           embedded: bool, log_file: Path | None) -> int:
    """``serve --reload``: NATS and the chat here, the services in a child run anew on change (reload.py)."""
    from petribus.chat import Chat, stdin_lines
    from petribus.child import settings_env
    from petribus_cli.reload import Reloader

    port = settings.port or _free_port(settings.host)  # fixed now, so that every child serves where the chat is
    settings = settings.model_copy(update={"port": port})
    argv = ["serve", spec, "--lifeline", "--no-chat", "--nats-url", settings.nats_url, "--host", settings.host,
            "--port", str(port), "--log-level", settings.log_level, "--log-format", settings.log_format]
    reloader = Reloader(spec, argv, {**os.environ, **settings_env(settings)}, say=_say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiting: list[asyncio.Task[Any]] = []
    talk: Chat | None = None
    try:
        await reloader.watch(stop)
        if (why := await reloader.start()) is not None:
            raise CliError(f"the services did not start: {why}")
        http = f"http://{settings.host}:{port}"
        ws_base = http.replace("http://", "ws://", 1)
        _banner(settings, spec, net, http, ws_base, embedded=embedded, log_file=log_file, chat=chat,
                reload=reloader.folder)
        stopper = asyncio.create_task(stop.wait(), name="signal")
        waiting = [stopper, asyncio.create_task(reloader.run(), name="reload")]
        chat_task: asyncio.Task[Any] | None = None
        if chat:
            talk = Chat(ws_base, net.bot, session_id=session, console=out,
                        download_dir=settings.data_dir / "downloads")
            chat_task = asyncio.create_task(talk.run(stdin_lines()), name="chat")
            waiting.append(chat_task)
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is chat_task:
                _chat_ended(task)
            elif task is not stopper:
                task.result()  # the watcher failed: say why
        return 0
    finally:
        stop.set()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        if talk is not None and talk.session_id and talk.last_seq is not None:
            out.print(f"Session {talk.session_id}. Resume it with: "
                      f"petribus serve {spec} --session {talk.session_id}")
        await reloader.close()
        out.print("petribus stopped.")


def _say(line: str) -> None:
    out.print(Text(line))
    out.file.flush()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _chat_ended(task: asyncio.Task[Any]) -> None:
    """Raise the chat's failure as one message; a chat that was left normally is not an error."""
    from petribus.chat import ChatError

    try:
        task.result()
    except ChatError as exc:
        raise CliError(f"the chat ended: {exc}") from None


def _banner(settings: Settings, spec: str, net: Net, http: str, ws_base: str, *, embedded: bool,
            log_file: Path | None, chat: bool, reload: Path | None = None) -> None:
    from petribus.bus import redact_url

    where = f"embedded, store in {settings.data_dir / 'nats'}" if embedded else "external"
    url = redact_url(settings.nats_url)
    # Where the passwords are, never what they are.
    join = f"PETRIBUS_NATS_AUTH_DIR={settings.nats_auth_dir} " if embedded and settings.nats_auth_dir else ""
    lines = [
        f"petribus is serving bot {net.bot!r}",
        f"  Dashboard  {http}/",
        f"  WebSocket  {ws_base}/bots/{net.bot}/ws",
        f"  REST API   {http}/docs",
        f"  NATS       {url} ({where})",
    ]
    if join:
        lines.append(f"  NATS users {settings.nats_auth_dir} (a password per service; docs/closed-bus.md)")
    lines.append(f"  more executors can join: {join}petribus executor {spec} --nats-url {url}")
    if log_file is not None:
        lines.append(f"  logs       {log_file}")
    if reload is not None:
        lines.append(f"  reload     on every change to a .py file under {reload}")
    lines.append("Type a message, /add LOCATION {json}, /help, or /quit." if chat
                 else "Ctrl-C (SIGINT) or SIGTERM stops it.")
    for line in lines:
        out.print(Text(line))
    out.file.flush()


async def _stop_quietly(svc: Any) -> None:
    try:
        await svc.stop(timeout=STOP_TIMEOUT_S)
    except Exception as exc:  # shutting down anyway; say so in the log
        logs.get("petribus_cli").warning("service did not stop cleanly", service=svc.name, error=repr(exc))


# ---------------------------------------------------------------- one service each


@app.command()
def scheduler(apps: OptionalApps = None, nats_url: NatsUrl = None, log_level: LevelOpt = LogLevel.info,
              log_format: FormatOpt = LogFormat.console, deployments: DeploymentsOpt = False) -> None:
    """Run a scheduler: folds sessions and fires transitions. Run several for throughput and failover."""

    async def start(settings: Settings, nets: list[Net], specs: list[str]) -> None:
        from petribus_scheduler.app import Scheduler

        svc = Scheduler(settings, nets)
        svc.deployments = deployments
        await svc.run()

    apps = _apps_or_deployments(apps, deployments)

    _service(start, apps, "scheduler", nats_url=nats_url, log_level=log_level.value, log_format=log_format.value)


@app.command()
def executor(
    apps: OptionalApps = None, nats_url: NatsUrl = None,
    pool: Annotated[list[str] | None, typer.Option(
        "--pool", help="A pool to serve (repeatable): cpu, gpu, gpu-a10g, or a name of your own. Default: "
        "$PETRIBUS_POOL, else cpu, plus gpu and gpu-<type> on a machine with GPUs.")] = None,
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="Simulated GPUs, a count or TYPE:COUNT (tests; default: what nvidia-smi lists, "
        "or $PETRIBUS_GPUS).")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="key=value, shown in GET /pools (repeatable; also $PETRIBUS_LABELS).")] = None,
    workers: WorkersOpt = None, worker_concurrency: ConcurrencyOpt = None,
    log_level: LevelOpt = LogLevel.info, log_format: FormatOpt = LogFormat.console,
    scoped: Annotated[bool, typer.Option(
        "--scoped", hidden=True, help="Take only this one bot's work, on consumers of its own (how "
        "--deployments runs each version).")] = False,
    deployments: DeploymentsOpt = False,
) -> None:
    """Run an executor: runs transitions of its pools in sandboxes. Add more to add throughput."""

    async def start(settings: Settings, nets: list[Net], specs: list[str]) -> None:
        from petribus_executor.app import Executor, parse_labels

        if deployments:
            from petribus_executor.deployed import DeployedExecutors

            await DeployedExecutors(settings, pools=pool, labels=label).run()
            return
        try:
            svc = Executor(settings, specs, pools=pool, labels=parse_labels(label), scoped=scoped)
        except PetribusError as exc:
            raise CliError(exc.message, EXIT_BAD_APP) from None
        await svc.run()

    apps = _apps_or_deployments(apps, deployments)
    _service(start, apps, "executor", nats_url=nats_url, gpus=gpus, workers=workers,
             worker_concurrency=worker_concurrency, log_level=log_level.value, log_format=log_format.value)


@app.command()
def gateway(apps: OptionalApps = None, nats_url: NatsUrl = None, host: HostOpt = "127.0.0.1", port: PortOpt = 8000,
            insecure: InsecureOpt = False, log_level: LevelOpt = LogLevel.info,
            log_format: FormatOpt = LogFormat.console, deployments: DeploymentsOpt = False) -> None:
    """Run a gateway: WebSocket sessions and the REST API."""

    async def start(settings: Settings, nets: list[Net], specs: list[str]) -> None:
        from petribus_gateway.app import Gateway

        svc = Gateway(settings, nets)
        svc.deployments = deployments
        await svc.run()

    apps = _apps_or_deployments(apps, deployments)
    _service(start, apps, "gateway", nats_url=nats_url, host=host, port=port, insecure=insecure or None,
             log_level=log_level.value, log_format=log_format.value)


@app.command()
def llm(apps: OptionalApps = None, nats_url: NatsUrl = None, log_level: LevelOpt = LogLevel.info,
        log_format: FormatOpt = LogFormat.console, deployments: DeploymentsOpt = False) -> None:
    """Run an LLM service: answers user messages (offline until a model is configured)."""

    async def start(settings: Settings, nets: list[Net], specs: list[str]) -> None:
        from petribus_llm.app import LLMService

        svc = LLMService(settings, nets)
        svc.deployments = deployments
        await svc.run()

    apps = _apps_or_deployments(apps, deployments)
    _service(start, apps, "llm", nats_url=nats_url, log_level=log_level.value, log_format=log_format.value)


def _service(start: Callable[[Settings, list[Net], list[str]], Coroutine[Any, Any, None]], specs: list[str],
             role: str, **overrides: Any) -> None:
    def body() -> int:
        settings = _settings(**overrides)
        with _logging(settings, None):
            nets = _load(specs)
            asyncio.run(_probe(settings, role))
            from petribus.service import settle_collector

            settle_collector()
            asyncio.run(start(settings, nets, [_absolute(s) for s in specs]))
        return 0

    _run(body)


@app.command()
def credentials(
    folder: Annotated[Path, typer.Argument(help="Where to write them (made 0700 if missing).")],
) -> None:
    """Make a NATS password per service role and the nats-server users that check them (docs/closed-bus.md).

    Writes FOLDER/<role>.password (0600) for admin, scheduler, executor, llm and gateway, once: an existing
    one is kept. Writes FOLDER/users.conf anew: the authorization block to include in a production
    nats-server config. Give each service its own password file only (PETRIBUS_NATS_AUTH_DIR).
    """

    def body() -> int:
        from petribus.bus_auth import Credentials

        try:
            made = Credentials.load_or_create(folder)
            block = made.write_server_block()
        except OSError as exc:
            raise CliError(f"cannot write the credentials in {folder} ({exc}); pass a writable folder.") from None
        out.print(Text(f"passwords in {made.folder} (one <role>.password each); nats-server users in {block}"))
        return 0

    _run(body)


@app.command()
def streams(nats_url: NatsUrl = None) -> None:
    """Create the streams and buckets, or bring them to the current settings (replicas, limits), as admin.

    Services create what is missing but may not change a stream on a closed bus (docs/closed-bus.md): run
    this after an upgrade or a change of PETRIBUS_REPLICAS or the limits. serve does it at every start.
    """

    def body() -> int:
        settings = _settings(nats_url=nats_url)
        asyncio.run(_probe(settings))
        asyncio.run(_prepare_streams(settings))
        from petribus.bus import redact_url

        out.print(Text(f"streams ready at {redact_url(settings.nats_url)}"))
        return 0

    _run(body)


# ---------------------------------------------------------------- shared


def _run(body: Callable[[], int]) -> None:
    """Run a command's body; turn what a user can fix into one message and an exit code."""
    try:
        code = body()
    except CliError as exc:
        _error(exc.message)
        code = exc.code
    except PetribusError as exc:
        _error(exc.message)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _apps_or_deployments(apps: list[str] | None, deployments: bool) -> list[str]:
    """The apps named, or none with ``--deployments``; one of the two, with a message saying so."""
    if not apps and not deployments:
        _error("name the app(s) to run, as path/to/app.py:bot, or run what is deployed with --deployments")
        raise typer.Exit(EXIT_BAD_APP)
    return list(apps or [])


def _error(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message))


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors(include_url=False))
        raise CliError(f"invalid setting: {problems}. Fix the option or its PETRIBUS_* environment variable.",
                       EXIT_BAD_APP) from None


def _load(specs: list[str]) -> list[Net]:
    from petribus.loader import load_net

    nets: dict[str, Net] = {}
    for spec in specs:
        try:
            net = load_net(spec)
        except NetDefinitionError as exc:
            raise CliError(f"{spec}: {exc.message}\nFix these in the bot's definition and run again.",
                           EXIT_BAD_APP) from None
        except AppLoadError as exc:
            hint = "" if "Bot(" in exc.message else (
                ". APP is path/to/app.py:NAME or package.module:NAME, where NAME = Bot(...)")
            raise CliError(f"{exc.message}{hint}", EXIT_BAD_APP) from None
        if net.bot in nets:
            raise CliError(f"{spec}: another APP also defines a bot named {net.bot!r}; "
                           "give one of them Bot(name=...).", EXIT_BAD_APP)
        nets[net.bot] = net
    return list(nets.values())


@contextlib.contextmanager
def _exclusive(store: Path) -> Iterator[None]:
    """Hold the store for this process: two nats-servers writing one store would corrupt it.

    An ``flock``: the kernel releases it when the process dies, however it dies.
    """
    import fcntl

    try:
        store.mkdir(parents=True, exist_ok=True)
        lock = open(store / "petribus.lock", "a+")
    except OSError as exc:
        raise CliError(f"cannot use the data folder {store.parent} ({exc}); "
                       "pass a writable --data-dir.") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CliError(f"the data folder {store.parent} is in use by petribus serve ({holder}); stop "
                           "that one, or pass another --data-dir (or --nats-url to join its NATS).") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield


def _absolute(spec: str) -> str:
    """``spec`` with its file made absolute, so processes started elsewhere load the same file."""
    module, sep, attr = spec.rpartition(":")
    if not sep:
        module, attr = spec, "bot"
    path = Path(module)
    if module.endswith(".py") or path.exists():
        return f"{path.resolve()}:{attr}"
    return f"{module}:{attr}"


async def _probe(settings: Settings, role: str = "admin") -> None:
    """Fail fast, with a message and no retries, when NATS (with JetStream) is not there or refuses the
    credentials of ``role``."""
    from petribus import bus
    from petribus.bus_auth import ClientAuth

    url = bus.redact_url(settings.nats_url)
    try:
        auth = ClientAuth.from_settings(settings, role, local_admin=True)
    except BusError as exc:  # a credentials folder without this role's password
        raise CliError(exc.message, EXIT_NO_NATS) from None
    try:
        nc = await bus.connect(settings.nats_url, "petribus-cli-probe", auth=auth, timeout=PROBE_TIMEOUT_S * 3,
                               reconnect=False)
    except BusError as exc:
        if exc.code == "nats_unauthorized":
            raise CliError(exc.message, EXIT_NO_NATS) from None
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        raise CliError(f"cannot reach NATS at {url} ({_describe(cause)}). Start nats-server with JetStream "
                       "there (nats-server -js), fix --nats-url, or run serve without --nats-url to use an "
                       "embedded server.", EXIT_NO_NATS) from None
    try:
        await nc.jetstream().account_info()
    except Exception as exc:
        raise CliError(f"NATS at {url} has no JetStream ({_describe(exc)}); start nats-server with -js.",
                       EXIT_NO_NATS) from None
    finally:
        await nc.close()


async def _prepare_streams(settings: Settings) -> None:
    """Create the streams, or bring them to these settings, as admin."""
    from petribus import bus
    from petribus.bus_auth import ClientAuth

    from petribus.migrate import migrate

    auth = ClientAuth.from_settings(settings, local_admin=True)
    nc = await bus.connect(settings.nats_url, "petribus-streams", auth=auth, reconnect=False)
    try:
        await bus.ensure_streams(nc.jetstream(), duplicate_window_s=settings.duplicate_window_s,
                                 replicas=settings.replicas, legacy_ok=True)
        # Sessions an older petribus stored under one subject each move to a subject per kind of event.
        moved = await migrate(bus.EventLog(nc), progress=lambda subject, n: err.print(Text(
            f"moved {n} events of {subject} to the current layout (a subject per kind of event)")))
        if moved:
            err.print(Text(f"{moved} events moved to the current layout; their sequences are new"))
    finally:
        await nc.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _logging(settings: Settings, log_file: Path | None) -> Iterator[None]:
    """Service logs to stderr, or to ``log_file`` (chat mode) so they never interleave with the chat.

    In chat mode file descriptor 2 itself points at the log file, so what executor worker processes
    and libraries write to stderr lands there too; CLI errors still reach the terminal.
    """
    if log_file is None:
        _configure_logs(settings, sys.stderr)
        yield
        return
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        stream: TextIO = open(log_file, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write the log file {log_file} ({exc}); pass a writable --data-dir.") from None
    terminal = os.dup(2)
    err.file = open(terminal, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr.flush()
    os.dup2(stream.fileno(), 2)
    try:
        _configure_logs(settings, stream)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        err.file.flush()
        err.file = sys.stderr
        os.close(terminal)
        _configure_logs(settings, sys.stderr)  # off the file before it closes
        stream.close()


def _configure_logs(settings: Settings, stream: TextIO) -> None:
    """structlog for our events, and the same one-line format for libraries' logging (uvicorn, nats)."""
    logs.configure(settings.log_level, settings.log_format, stream=stream)
    renderer: Any = (
        structlog.processors.JSONRenderer() if settings.log_format == "json"
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO), handlers=[handler],
                        force=True)


# After app: their commands hang off it.
from petribus_cli.deploy import register as register_deploy  # noqa: E402
from petribus_cli.graph import graph_app  # noqa: E402
from petribus_cli.keys import keys_app  # noqa: E402
from petribus_cli.replay import replay_app  # noqa: E402
from petribus_cli.secrets import secrets_app  # noqa: E402
from petribus_cli.sessions import sessions_app  # noqa: E402

app.add_typer(secrets_app, name="secrets")
app.add_typer(sessions_app, name="sessions")
app.add_typer(replay_app, name="replay")
app.add_typer(keys_app, name="keys")
app.add_typer(graph_app, name="graph")
register_deploy(app)  # deploy, release, activate, deactivate, rollback, deployments


def main() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a terminal or pipe that can't encode 🤖 gets '?', not a crash
            stream.reconfigure(errors="replace")
    app()


if __name__ == "__main__":
    main()
