"""Load a bot from ``path/to/app.py:bot`` or ``package.module:bot``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from petribus.bot import Bot
from petribus.errors import AppLoadError
from petribus.net import Net


_env_read: set[str] = set()


def env_read() -> frozenset[str]:
    """Names of the environment variables the apps loaded so far looked up while they were imported.

    An app configured at import (``N = int(os.environ["FANOUT_N"])``) builds its net from them, so every
    process that loads it must see the same values: the executor hands these (and only these, besides
    the basics) on to its sandboxed workers (``docs/sandboxes.md``).
    """
    return frozenset(_env_read)


class _Recording(MutableMapping[str, str]):
    """``os.environ`` while an app is imported: every variable looked up by name is noted."""

    def __init__(self, real: MutableMapping[str, str]) -> None:
        self._real = real

    def __getitem__(self, key: str) -> str:
        _env_read.add(key)
        return self._real[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            _env_read.add(key)
        return key in self._real

    def __setitem__(self, key: str, value: str) -> None:
        self._real[key] = value

    def __delitem__(self, key: str) -> None:
        del self._real[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._real)

    def __len__(self) -> int:
        return len(self._real)

    def copy(self) -> dict[str, str]:
        return dict(self._real)


@contextlib.contextmanager
def _noting_env() -> Iterator[None]:
    real = os.environ
    os.environ = _Recording(real)  # type: ignore[assignment]  # os.getenv looks it up here too
    try:
        yield
    finally:
        os.environ = real


def load_bot(spec: str) -> Bot:
    """Import the module named by ``spec`` and return its ``Bot``. A bot with no name takes the file's stem.

    ``path/app.py:bot@NAME`` runs the bot under the name NAME whatever its code calls it: a deployed
    version runs as ``<deployment>--<version>`` (``petribus.deploy``), in every process that loads it,
    the executor's workers included."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part:
        module_part, attr = spec, "bot"
    attr, _, renamed = attr.partition("@")
    path = Path(module_part)
    try:
        if module_part.endswith(".py") or path.exists():
            if path.is_dir():
                raise AppLoadError(f"{module_part!r} is a folder, not a Python module (from {spec!r}): name the "
                                   ".py file in it that defines the bot, as path/to/app.py:bot")
            if not path.is_file():
                raise AppLoadError(f"app file {module_part!r} does not exist (from {spec!r})")
            if path.suffix != ".py":
                raise AppLoadError(f"{module_part!r} is not a Python module (from {spec!r}): name the .py file "
                                   "that defines the bot, as path/to/app.py:bot")
            mod_name = _module_name(path)
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
                try:
                    with _noting_env():
                        loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]  # half run: the next load runs the file again
                    raise
            stem = path.stem
        else:
            with _noting_env():
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
    if renamed:
        bot.name = renamed
    elif bot.name is None:
        bot.name = stem
    return bot


def _module_name(path: Path) -> str:
    """The module name an app file is imported under: ``petribus_app_<stem>``, unless another file of
    that stem took it in this process (two apps named ``bot.py`` in different folders), then with a
    digest of the file's path, so each file is its own module."""
    resolved = path.resolve()
    name = f"petribus_app_{path.stem}"
    taken = sys.modules.get(name)
    if taken is None or Path(getattr(taken, "__file__", "") or "").resolve() == resolved:
        return name
    return f"{name}_{hashlib.blake2s(str(resolved).encode(), digest_size=4).hexdigest()}"


def load_net(spec: str) -> Net:
    return load_bot(spec).net()
