"""Imported once by the fork server when it starts: every worker forked from it has the apps already.

The apps come from ``PETRIBUS_EXECUTOR_PRELOAD`` (specs joined by ``os.pathsep``), set by the pool just
for the fork server's start. Preloading is an optimisation only: a worker imports whatever is missing,
so a failure here is ignored (the worker reports it properly when it boots).

The main module is imported here too (path in ``PETRIBUS_EXECUTOR_MAIN``), as ``multiprocessing`` does
for each child. Its fork server is meant to do that once when ``"__main__"`` is preloaded, but Python
3.11 never hands it the path, so every worker re-ran the main script's imports (under the tests, all of
pytest: ~45 ms of CPU per worker).
"""

from __future__ import annotations

import os

import petribus_executor.worker  # noqa: F401  (petribus, pydantic and the worker code, imported once)
from petribus.service import settle_collector

ENV = "PETRIBUS_EXECUTOR_PRELOAD"
MAIN_ENV = "PETRIBUS_EXECUTOR_MAIN"


def _preload() -> None:
    from multiprocessing import process, spawn

    from petribus.loader import load_bot

    main_path = os.environ.get(MAIN_ENV)
    if main_path:
        me: object = process.current_process()
        me._inheriting = True  # type: ignore[attr-defined]  # as forkserver.main does for "__main__"
        try:
            spawn.import_main_path(main_path)
        except Exception:  # an unguarded script refuses (RuntimeError); each worker then says so itself
            pass
        finally:
            del me._inheriting  # type: ignore[attr-defined]
    for spec in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        try:
            load_bot(spec).net()
        except Exception:  # the fork server must survive a broken app; the worker will say what is wrong
            pass
    # Workers inherit it frozen: their collections never walk what was loaded here (nor touch its pages).
    settle_collector()


_preload()
