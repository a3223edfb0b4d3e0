"""``python -m petribus_executor --nats-url URL [--pool cpu] [--workers N] APP...``

Settings come from the environment (``PETRIBUS_*``); the flags given here override them.
"""

from __future__ import annotations

import argparse
import asyncio

from petribus import logs
from petribus.settings import Settings
from petribus_executor.app import run


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
    args = parser.parse_args(argv)
    given = {"nats_url": args.nats_url, "pool": args.pool, "workers": args.workers}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run(settings, args.apps, instance=args.instance))


if __name__ == "__main__":
    main()
