"""Load a bot from ``path/to/app.py:bot`` or ``package.module:bot``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from petribus.bot import Bot
from petribus.errors import AppLoadError
from petribus.net import Net


def load_bot(spec: str) -> Bot:
    """Import the module named by ``spec`` and return its ``Bot``. A bot with no name takes the file's stem."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part:
        module_part, attr = spec, "bot"
    path = Path(module_part)
    try:
        if module_part.endswith(".py") or path.exists():
            if not path.is_file():
                raise AppLoadError(f"app file {module_part!r} does not exist (from {spec!r})")
            mod_name = f"petribus_app_{path.stem}"
            if mod_name in sys.modules:
                module = sys.modules[mod_name]
            else:
                parent = str(path.resolve().parent)
                if parent not in sys.path:
                    sys.path.insert(0, parent)
                loader_spec = importlib.util.spec_from_file_location(mod_name, path.resolve())
                assert loader_spec and loader_spec.loader
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
            stem = path.stem
        else:
            module = importlib.import_module(module_part)
            stem = module_part.rsplit(".", 1)[-1]
    except AppLoadError:
        raise
    except Exception as exc:
        raise AppLoadError(f"cannot import {module_part!r} (from {spec!r}): {type(exc).__name__}: {exc}") from exc
    bot = getattr(module, attr, None)
    if not isinstance(bot, Bot):
        raise AppLoadError(
            f"{spec!r}: {attr!r} is {type(bot).__name__ if bot is not None else 'missing'}, not a petribus Bot; "
            "write APP.py:NAME where NAME = Bot(...)"
        )
    if bot.name is None:
        bot.name = stem
    return bot


def load_net(spec: str) -> Net:
    return load_bot(spec).net()
