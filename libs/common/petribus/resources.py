"""Beam's resource options, with Beam's names: ``Image``, ``Volume``, ``TaskPolicy``; and which pool a
transition's work goes to.

They only describe; ``Bot.net()`` checks them with the rest of the net, and the executor acts on them
(``docs/sandboxes.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Image:
    """A container image for a transition: a base, a Python, packages and build commands.

    Petribus builds it once per content (the tag is a hash of these fields) and caches it.
    """

    python_version: str = "python3.11"
    python_packages: tuple[str, ...] | list[str] = ()
    commands: tuple[str, ...] | list[str] = ()
    base_image: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    """A named persistent folder, mounted at ``mount_path`` into every transition of the bot."""

    name: str
    mount_path: str


@dataclass(frozen=True)
class TaskPolicy:
    """Beam's per-transition policy: retries, a run's time limit, and how long a queued firing may wait."""

    max_retries: int | None = None
    timeout: float | None = None
    ttl: float | None = None


def pool_for(pool: str | None, gpu: str | None, gpu_count: int) -> str:
    """The executor pool a transition's work goes to: its own ``pool=``; else ``gpu-<type>`` for a named
    GPU type, ``gpu`` for GPUs of any type; else ``cpu``."""
    if pool:
        return pool
    if gpu_count:
        return f"gpu-{gpu.lower()}" if gpu else "gpu"
    return "cpu"
