"""``python -m petribus_executor --nats-url URL [--pool cpu] [--workers N] [--lifeline] APP...``

Settings come from the environment (``PETRIBUS_*``); the flags given here override them. ``--lifeline``
is for a parent that runs the executor as its child (``petribus serve``, see ``petribus.child``): say
``ready`` on stdout once serving, and stop when stdin ends.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from petribus import logs
from petribus.child import say_ready, watch_lifeline
from petribus.settings import Settings
from petribus_executor.app import Executor, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m petribus_executor",
                                     description="Run a petribus executor for the given bot apps.")
    parser.add_argument("apps", nargs="+", metavar="APP", help="a bot app, e.g. examples/order_bot.py:bot")
    parser.add_argument("--nats-url", help="NATS server URL (default: $PETRIBUS_NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--pool", help="executor pool to serve (default: $PETRIBUS_POOL or cpu)")
    parser.add_argument("--workers", type=int,
                        help="warm worker processes (default: $PETRIBUS_WORKERS or 16)")
    parser.add_argument("--instance",
                        help="this executor's id in the log (default: executor-POOL@HOST:PID.RANDOM)")
    parser.add_argument("--lifeline", action="store_true",
                        help="run as a child: say 'ready' on stdout when serving, stop when stdin ends")
    args = parser.parse_args(argv)
    given = {"nats_url": args.nats_url, "pool": args.pool, "workers": args.workers}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    logs.configure(settings.log_level, settings.log_format)
    if args.lifeline:
        asyncio.run(_run_as_child(settings, args.apps, args.instance))
    else:
        asyncio.run(run(settings, args.apps, instance=args.instance))


async def _run_as_child(settings: Settings, apps: list[str], instance: str | None) -> None:
    executor = Executor(settings, apps, instance=instance)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, executor.request_stop)
    await executor.start()
    try:
        say_ready()
        watch_lifeline()
        await executor.wait()
    finally:
        await executor.stop()


if __name__ == "__main__":
    main()
