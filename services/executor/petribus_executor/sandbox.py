"""What a worker is allowed: the limits, environment and devices of the firings it runs.

Every worker process runs under one :class:`Profile`, fixed when it boots: its memory budget, the CPUs
it may use, its open-file limit, the environment its transitions see (an allow-list of the executor's
variables, plus the secrets they name and the GPUs they were given) and how it is isolated (a plain
process, or a container). Firings only go to a worker whose profile is theirs, so one transition's
limits or secrets never apply to, or show in, another's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# What a sandboxed transition sees of the executor's environment; everything else (API keys, NATS
# credentials, the executor's own settings) stays out. Secrets and devices are added per profile.
ENV_ALLOWED = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED",
               "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "SSL_CERT_FILE", "SSL_CERT_DIR")


@dataclass(frozen=True)
class Profile:
    """A worker's limits and environment. Equal profiles share workers; different ones never do."""

    memory_mib: int = 128  # memory= : the worker's data (heap) may grow this much past what it used at boot
    cpus: int = 1  # cpu= rounded up: a container's CPU quota (a process sandbox does not cap CPU share)
    max_files: int = 1024  # open files, the worker's own included
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # secrets: never in a repr or a log
    secret_names: tuple[str, ...] = ()  # the names of the secrets in env (what logs may show)
    devices: tuple[str, ...] = ()  # GPUs (CUDA_VISIBLE_DEVICES) the worker's firings have to themselves
    kind: str = "process"  # "process" or "container"
    image: str | None = None  # the container image (a built tag); None for a process sandbox
    network: bool = False  # containers only: a process sandbox shares the executor's network
    volumes: tuple[tuple[str, str], ...] = ()  # (folder on this machine, mount path) pairs
    transition: str | None = None  # containers are kept warm per transition; None for process workers

    def describe(self) -> str:
        """For logs and errors: everything but the secret values."""
        parts = [f"{self.kind}", f"memory={self.memory_mib}MiB", f"cpus={self.cpus}", f"files={self.max_files}"]
        if self.secret_names:
            parts.append(f"secrets={list(self.secret_names)}")
        if self.devices:
            parts.append(f"gpus={list(self.devices)}")
        if self.image:
            parts.append(f"image={self.image}")
        return " ".join(parts)

    def environment(self, inherited: dict[str, str], passed: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
        """The environment a worker of this profile runs with, from the executor's ``inherited`` one and
        the names ``passed`` on to sandboxes (``passed_names``)."""
        env = {k: v for k, v in inherited.items() if k in ENV_ALLOWED or k.startswith("LC_") or k in passed}
        env.update(self.env)
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(self.devices)
        elif self.kind == "process":
            env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU asked for: none visible, not every one
        return env


def passed_names(extra: str = "") -> frozenset[str]:
    """The executor's variables its sandboxes see besides ``ENV_ALLOWED``: those the apps read when they
    were imported (``petribus.loader.env_read``: the workers must build the same nets) and the names
    in ``PETRIBUS_SANDBOX_ENV`` (``extra``). Never petribus's own settings or the model key."""
    from petribus.loader import env_read
    from petribus.settings import Settings

    secret = {str(f.validation_alias) for f in Settings.model_fields.values() if f.validation_alias is not None}
    names = set(env_read()) | {n.strip() for n in extra.split(",") if n.strip()}
    return frozenset(n for n in names if not n.startswith("PETRIBUS_") and n not in secret)


def cpus_for(cpu: float) -> int:
    """``cpu=0.5`` still needs one CPU to run on; ``cpu=2.5`` gets three."""
    return max(1, math.ceil(cpu))


def as_dict(profile: Profile) -> dict[str, Any]:
    """What crosses the pipe to a worker at boot (secret values included: the worker needs them)."""
    return {
        "memory_mib": profile.memory_mib, "cpus": profile.cpus,
        "max_files": profile.max_files, "env": list(profile.env), "secret_names": list(profile.secret_names),
        "devices": list(profile.devices), "kind": profile.kind, "image": profile.image,
        "network": profile.network, "volumes": list(profile.volumes), "transition": profile.transition,
    }


def from_dict(data: dict[str, Any]) -> Profile:
    return Profile(
        memory_mib=data["memory_mib"], cpus=data["cpus"],
        max_files=data["max_files"], env=tuple(tuple(kv) for kv in data["env"]),  # type: ignore[misc]
        secret_names=tuple(data["secret_names"]), devices=tuple(data["devices"]), kind=data["kind"],
        image=data["image"], network=data["network"],
        volumes=tuple(tuple(v) for v in data["volumes"]),  # type: ignore[misc]
        transition=data["transition"],
    )


def profile_for(t: Any, *, kind: str, max_files: int, env: tuple[tuple[str, str], ...] = (),
                devices: tuple[str, ...] = (), image: str | None = None,
                volumes: tuple[tuple[str, str], ...] = ()) -> Profile:
    """The profile a firing of transition ``t`` (a ``TransitionDef``) runs under.

    Process workers are shared by every transition with the same limits, secrets and devices; containers
    are kept per transition and image.
    """
    container = kind == "container"
    profile = Profile(
        memory_mib=int(t.memory), cpus=cpus_for(t.cpu), max_files=max_files, env=env,
        secret_names=tuple(name for name, _ in env), devices=devices, kind=kind,
        image=image if container else None, network=bool(t.network) if container else False,
        volumes=volumes, transition=t.name if container else None,
    )
    if env:
        return profile  # not kept: it holds secrets' values, which may be rotated
    # One object per distinct profile: a worker is matched to a firing by its profile, and the same
    # object compares by identity (``placement``) instead of field by field, a few times per firing.
    known = _PROFILES.setdefault(profile, profile)
    if len(_PROFILES) > 4096:  # profiles come from transitions: a handful; bound it anyway
        _PROFILES.clear()
    return known


_PROFILES: dict[Profile, Profile] = {}
