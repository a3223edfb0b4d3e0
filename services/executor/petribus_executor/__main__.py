"""``python -m petribus_executor --nats-url URL [--pool NAME]... [--gpus N|TYPE:N] [--label K=V]...
[--workers N] [--lifeline] APP...``

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
from petribus.errors import PetribusError
from petribus.settings import Settings
from petribus_executor.app import Executor, parse_labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m petribus_executor",
                                     description="Run a petribus executor for the given bot apps.")
    parser.add_argument("apps", nargs="+", metavar="APP", help="a bot app, e.g. examples/order_bot.py:bot")
    parser.add_argument("--nats-url", help="NATS server URL (default: $PETRIBUS_NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--pool", action="append", dest="pools", metavar="POOL",
                        help="a pool to serve, repeatable (default: $PETRIBUS_POOL, else cpu, or gpu and "
                        "gpu-<type> on a machine with GPUs)")
    parser.add_argument("--gpus", help="simulated GPUs: a count or TYPE:COUNT (default: $PETRIBUS_GPUS, else "
                        "what nvidia-smi lists)")
    parser.add_argument("--label", action="append", dest="labels", metavar="KEY=VALUE", default=[],
                        help="a label shown in GET /pools, repeatable")
    parser.add_argument("--workers", type=int,
                        help="warm worker processes (default: $PETRIBUS_WORKERS or 16)")
    parser.add_argument("--instance",
                        help="this executor's id in the log (default: executor-POOL@HOST:PID.RANDOM)")
    parser.add_argument("--scoped", action="store_true",
                        help="take only this one bot's work, on consumers of its own (a deployed version)")
    parser.add_argument("--lifeline", action="store_true",
                        help="run as a child: say 'ready' on stdout when serving, stop when stdin ends")
    args = parser.parse_args(argv)
    given = {"nats_url": args.nats_url, "workers": args.workers, "gpus": args.gpus}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    logs.configure(settings.log_level, settings.log_format)
    try:
        labels = parse_labels(args.labels)
        executor = Executor(settings, args.apps, pools=args.pools, labels=labels, instance=args.instance,
                            scoped=args.scoped)
    except PetribusError as exc:
        parser.exit(2, f"error: {exc.message}\n")
    if args.lifeline:
        asyncio.run(_run_as_child(executor))
    else:
        asyncio.run(executor.run())


async def _run_as_child(executor: Executor) -> None:
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
