"""Beam's resource options, with Beam's names: ``Image``, ``Volume``, ``TaskPolicy``; which pool a
transition's work goes to; and the judge of a transition's resource options.

The classes only describe. ``Bot.net()`` hands each transition's options to :func:`judge`, which
appends one problem per bad option (naming the option, its value and what to do) and returns the
``TransitionDef`` fields they set; the executor acts on them (``docs/sandboxes.md``, ``docs/secrets.md``).
Beam's spellings are accepted where Beam has them: ``cpu="500m"``, ``memory="2Gi"``, ``gpu="a10g"``,
``gpu=["A10G", "T4"]``, ``TaskPolicy(timeout=0)`` meaning "not set".
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Image:
    """A container image for a transition: a base, a Python, packages and build commands.

    Petribus builds it once per content (the tag is a hash of these fields) and caches it. Unlike
    Beam's, an ``Image`` is immutable: ``add_python_packages`` and the other builders return a new one,
    so write ``image = image.add_commands([...])``.
    """

    python_version: str = "python3.11"
    python_packages: tuple[str, ...] | list[str] = ()
    commands: tuple[str, ...] | list[str] = ()
    base_image: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    base_image_creds: Any = None  # Beam's registry credentials: refused by the validator, never stored

    def add_python_packages(self, packages: list[str] | tuple[str, ...]) -> Image:
        return dataclasses.replace(self, python_packages=(*self.python_packages, *packages))

    def add_commands(self, commands: list[str] | tuple[str, ...]) -> Image:
        return dataclasses.replace(self, commands=(*self.commands, *commands))

    def with_envs(self, env_vars: dict[str, str] | list[str] | str) -> Image:
        return dataclasses.replace(self, env_vars={**self.env_vars, **_env_dict(env_vars)})

    @classmethod
    def from_registry(cls, image: str, **kwargs: Any) -> Image:
        """Beam's way to start from an existing image: ``Image.from_registry("nvcr.io/nvidia/pytorch:24.01-py3")``."""
        return cls(base_image=image, **kwargs)

    def __getattr__(self, name: str) -> Any:
        hint = _BEAM_IMAGE_METHODS.get(name)
        if hint is None:
            raise AttributeError(f"'Image' object has no attribute {name!r}")
        raise AttributeError(f"Image.{name} is Beam's and not supported by petribus: {hint}")

    def __hash__(self) -> int:  # env_vars is a dict; an Image is still a value
        return hash((self.python_version, tuple(self.python_packages), tuple(self.commands), self.base_image,
                     tuple(sorted(self.env_vars.items())) if isinstance(self.env_vars, dict) else None))

    def __repr__(self) -> str:
        # env_vars are build-time settings, not secrets, but keep reprs short and value-free anyway.
        return (f"Image(python_version={self.python_version!r}, python_packages={list(self.python_packages)!r}, "
                f"commands={len(self.commands)}, base_image={self.base_image!r}, env_vars={sorted(self.env_vars)!r})")


_BEAM_IMAGE_METHODS = {
    "with_secrets": "name the secrets on the transition, secrets=['NAME'] (they are never baked into an image)",
    "from_dockerfile": "build the image yourself and give its tag: image='my-image:1'",
    "from_id": "give the image's tag: image='my-image:1'",
    "add_local_path": "put the files in a volume, or bake them in with commands=[...]",
    "micromamba": "install with python_packages=[...] or commands=[...]",
    "add_micromamba_packages": "install with python_packages=[...] or commands=[...]",
    "build_with_gpu": "images are built without a GPU; do GPU set-up at run time",
    "with_docker": "docker inside a transition is not supported",
    "add_python_version": "give python_version= to Image(...)",
}


@dataclass(frozen=True)
class Volume:
    """A named persistent folder, mounted at ``mount_path`` into every transition of the bot.

    The folder is ``<volumes_dir>/<name>`` on the executor's machine (``PETRIBUS_VOLUMES_DIR``, default
    ``DATA_DIR/volumes``): shared by sessions and executors on one machine, not across machines.
    """

    name: str
    mount_path: str


@dataclass(frozen=True)
class TaskPolicy:
    """Beam's per-transition policy: retries, a run's time limit, and how long a queued firing may wait.

    As in Beam, ``0`` (or ``None``) means "not set" for ``timeout`` and ``ttl``, and ``timeout=-1``
    means no time limit.
    """

    max_retries: int | None = None
    timeout: float | None = None
    ttl: float | None = None


# Beam's GpuType values (beta9 sdk/src/beta9/type.py), in Beam's spelling. "any" is any type.
GPU_TYPES = (
    "T4", "L4", "L40", "A10", "A10G", "A100", "A100-40", "A100-80", "A16", "A30", "A40", "H100", "H200",
    "GH200", "B200", "B300", "GAUDI2", "A4000", "A5000", "A6000", "RTX4000Ada", "RTX4090", "RTX5090",
    "RTX6000", "RTX6000Ada", "RTXPro6000", "L40S", "V100", "V100-32",
)
_GPU_BY_KEY = {t.upper(): t for t in GPU_TYPES}
# A name becomes an environment variable in the worker; these would replace what the worker runs with.
RESERVED_SECRET_NAMES = frozenset({"PATH", "PYTHONPATH", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH",
                                   "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HOME"})
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
POOL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a NATS subject token: pb.work.<pool>.…
VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
IMAGE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
PYTHON_VERSION_RE = re.compile(r"^python3(\.\d{1,2})?$")
_MEMORY_UNITS = {"": 1, "m": 1, "mb": 1, "mi": 1, "mib": 1, "g": 1000, "gb": 1000, "gi": 1024, "gib": 1024}
MAX_TTL_S = 7 * 24 * 3600.0


def pool_for(pool: str | None, gpu: str | None, gpu_count: int) -> str:
    """The executor pool a transition's work goes to: its own ``pool=``; else ``gpu-<type>`` for one named
    GPU type, ``gpu`` for GPUs of any type or of one of several types (``gpu="A10G,T4"``); else ``cpu``."""
    if pool:
        return pool
    if gpu_count:
        return f"gpu-{gpu.lower()}" if gpu and "," not in gpu else "gpu"
    return "cpu"


def judge(opts: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """The ``TransitionDef`` fields set by a transition's resource options; a problem for each bad one.

    ``opts`` holds what ``@bot.transition`` recorded: cpu, memory, gpu, gpu_count, pool, image,
    python_packages, secrets, network, callback_url, task_policy, timeout, retries, sandbox.
    """
    fields: dict[str, Any] = {}
    fields["cpu"] = _cpu(opts["cpu"], where, problems)
    fields["memory"] = _memory(opts["memory"], where, problems)
    gpu, gpu_count = _gpu(opts["gpu"], opts["gpu_count"], where, problems)
    fields["gpu"], fields["gpu_count"] = gpu, gpu_count
    pool = opts["pool"]
    if pool is not None and not (isinstance(pool, str) and POOL_RE.match(pool)):
        problems.append(f"{where}: pool={pool!r} is not a pool name; use letters, digits, '_' or '-' (1-64 "
                        "chars), e.g. pool='gpu-a10g', or leave it out to pick one from gpu=")
        pool = None
    fields["pool"] = pool_for(pool, gpu, gpu_count)
    fields["image"], fields["python_packages"] = _image(opts["image"], opts["python_packages"], where, problems)
    fields["sandbox"] = _sandbox(opts["sandbox"], fields["image"], where, problems)
    if fields["sandbox"] == "container" and fields["image"] is None and fields["python_packages"]:
        # A container has only what its image holds: the packages go into the (default) image.
        fields["image"] = Image(python_packages=fields["python_packages"])
    fields["secrets"] = _secrets(opts["secrets"], where, problems)
    if not isinstance(opts["network"], bool):
        problems.append(f"{where}: network={opts['network']!r}; it must be True or False")
    fields["network"] = opts["network"] is True
    fields["callback_url"] = _callback_url(opts["callback_url"], where, problems)
    fields.update(_policy(opts["task_policy"], opts["timeout"], opts["retries"], where, problems))
    return fields


def judge_volumes(volumes: Any, problems: list[str]) -> tuple[Volume, ...]:
    """``Bot(volumes=[...])``, checked: each a ``Volume`` with a usable name and mount path, no path twice."""
    if volumes is None:
        return ()
    if not isinstance(volumes, (list, tuple)):
        problems.append(f"Bot(volumes={volumes!r}): give a list, e.g. volumes=[Volume(name='weights', "
                        "mount_path='./weights')]")
        return ()
    kept: list[Volume] = []
    paths: set[str] = set()
    for i, vol in enumerate(volumes):
        where = f"Bot(volumes=...)[{i}]"
        if not isinstance(vol, Volume):
            problems.append(f"{where} is {vol!r}, not a petribus Volume: write Volume(name=..., mount_path=...)")
            continue
        ok = True
        if not (isinstance(vol.name, str) and VOLUME_NAME_RE.match(vol.name)) or vol.name in (".", ".."):
            problems.append(f"{where}: name={vol.name!r} is not a volume name; use letters, digits, '_', '.' or "
                            "'-' (1-64 chars, not starting with '.' or '-')")
            ok = False
        path = vol.mount_path
        parts = path.replace("\\", "/").split("/") if isinstance(path, str) else []
        if not isinstance(path, str) or path.strip() in ("", ".", "/", "./") or ".." in parts or "\x00" in path:
            problems.append(f"{where}: mount_path={path!r} cannot be mounted; give a folder such as "
                            "'./weights' (in the firing's working folder) or '/data/weights', without '..'")
            ok = False
        elif path.rstrip("/") in paths:
            problems.append(f"{where}: mount_path={path!r} is used by another volume; give each its own")
            ok = False
        if ok:
            paths.add(path.rstrip("/"))
            kept.append(vol)
    return tuple(kept)


# ------------------------------------------------------------------------------------------------


def _number(val: Any) -> bool:
    return not isinstance(val, bool) and isinstance(val, (int, float)) and math.isfinite(val)


def _cpu(val: Any, where: str, problems: list[str]) -> float:
    cores: float | None = None
    if _number(val) and val > 0:
        cores = float(val)
    elif isinstance(val, str) and re.fullmatch(r"\d+m", val.strip()) and int(val.strip()[:-1]) > 0:
        cores = int(val.strip()[:-1]) / 1000  # Beam's millicores
    if cores is None:
        problems.append(f"{where}: cpu={val!r} is not allowed; it must be a positive number of cores "
                        "(cpu=2, cpu=0.5) or millicores as a string (cpu='500m')")
        return 1.0
    return cores


def _memory(val: Any, where: str, problems: list[str]) -> int:
    mib: int | None = None
    if _number(val) and val >= 1 and val == int(val):
        mib = int(val)
    elif isinstance(val, str):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", val.strip().lower())
        if m and m.group(2) in _MEMORY_UNITS:
            mib = math.ceil(float(m.group(1)) * _MEMORY_UNITS[m.group(2)]) or None
    if mib is None:
        problems.append(f"{where}: memory={val!r} is not allowed; it must be a whole number of MiB >= 1 "
                        "(memory=512) or a size string (memory='512Mi', '2Gi', '1GB')")
        return 128
    return mib


def _gpu_type(name: Any) -> str | None:
    """Beam's spelling of a GPU type name, ``"any"`` for any type, ``""`` for none; None if unknown."""
    if not isinstance(name, str):
        return None
    key = name.strip().upper()
    for prefix in ("NVIDIA ", "NVIDIA-"):
        key = key.removeprefix(prefix)
    if key in ("", "ANY"):
        return key.lower()
    return _GPU_BY_KEY.get(key)


def _gpu(gpu: Any, gpu_count: Any, where: str, problems: list[str]) -> tuple[str | None, int]:
    """(type or "A,B" or None for any type, count). Beam's rule: a named type with no count gets one GPU."""
    count_given = gpu_count is not None
    if count_given and (isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 0):
        problems.append(f"{where}: gpu_count={gpu_count!r}; it must be a whole number >= 0")
        gpu_count, count_given = None, False
    if gpu is None:
        return None, gpu_count or 0  # gpu_count alone: GPUs of any type
    if isinstance(gpu, int) and not isinstance(gpu, bool):  # petribus's older gpu=<count>
        if gpu < 0:
            problems.append(f"{where}: gpu={gpu!r}; a GPU count must be >= 0 (or name a type: gpu='A10G')")
            return None, 0
        if count_given and gpu_count != gpu:
            problems.append(f"{where}: gpu={gpu!r} and gpu_count={gpu_count!r} disagree; give the count once "
                            "(gpu_count=) and the type as gpu='A10G' or gpu='any'")
        return None, gpu
    names = [gpu] if isinstance(gpu, str) else list(gpu) if isinstance(gpu, (list, tuple)) else None
    if names is None:
        problems.append(f"{where}: gpu={gpu!r}; give a GPU type ('A10G'), 'any', a list of types, or a count")
        return None, 0
    types: list[str] = []
    for name in names:
        t = _gpu_type(name)
        if t is None:
            problems.append(f"{where}: gpu={name!r} is not a GPU type; use 'any' or one of: {', '.join(GPU_TYPES)}")
            return None, 0
        if t and t not in types:
            types.append(t)
    if not types:  # gpu="" (Beam's GpuType.NoGPU) or []
        if count_given and gpu_count:
            problems.append(f"{where}: gpu_count={gpu_count!r} with gpu={gpu!r} (no GPU); drop one of them")
        return None, 0
    count = gpu_count if count_given and gpu_count else 1
    if "any" in types:
        return None, count
    return ",".join(types), count


def _image(image: Any, packages: Any, where: str, problems: list[str]) -> tuple[Any, tuple[str, ...]]:
    extra = _strings(packages, f"{where}: python_packages", "python_packages=['requests']", problems)
    if image is None:
        return None, extra
    if isinstance(image, str):
        if not IMAGE_REF_RE.match(image):
            problems.append(f"{where}: image={image!r} is not an image reference; give a tag such as "
                            "'python:3.11-slim', or an Image(...)")
            return None, extra
        return image, extra
    if not isinstance(image, Image):
        problems.append(f"{where}: image={image!r}; give a petribus Image(...) or an image tag (a string)")
        return None, extra
    at = f"{where}: Image"
    ok = True
    if not (isinstance(image.python_version, str) and PYTHON_VERSION_RE.match(image.python_version)):
        problems.append(f"{at}(python_version={image.python_version!r}); use 'python3' or 'python3.N', e.g. "
                        "'python3.11'")
        ok = False
    if isinstance(image.python_packages, str):
        problems.append(f"{at}(python_packages={image.python_packages!r}): petribus does not read requirements "
                        "files; give the packages as a list, e.g. python_packages=['requests==2.32.3']")
        ok = False
        own: tuple[str, ...] = ()
    else:
        own = _strings(image.python_packages, f"{at}(python_packages=...)", "['requests']", problems)
    commands = _strings(image.commands, f"{at}(commands=...)", "['apt-get install -y ffmpeg']", problems)
    if image.base_image is not None and not (isinstance(image.base_image, str) and IMAGE_REF_RE.match(image.base_image)):
        problems.append(f"{at}(base_image={image.base_image!r}) is not an image reference, e.g. 'python:3.11-slim'")
        ok = False
    if image.base_image_creds is not None:
        problems.append(f"{at}(base_image_creds=...): registry credentials are not supported; log the "
                        "executor's container engine in to the registry (docker login) instead")
        ok = False
    try:
        env = _env_dict(image.env_vars)
    except ValueError as exc:
        problems.append(f"{at}(env_vars=...): {exc}")
        env, ok = {}, False
    merged = tuple(dict.fromkeys((*own, *extra)))
    if not ok:
        return None, merged
    return dataclasses.replace(image, python_packages=merged, commands=commands, env_vars=env), merged


def _env_dict(env: Any) -> dict[str, str]:
    """Beam's env_vars forms ('K=V', ['K=V'], {'K': 'V'}) as a dict; ValueError naming a bad one."""
    items: list[tuple[Any, Any]]
    if env is None:
        return {}
    if isinstance(env, dict):
        items = list(env.items())
    elif isinstance(env, (str, list, tuple)):
        items = []
        for entry in [env] if isinstance(env, str) else env:
            if not isinstance(entry, str) or "=" not in entry:
                raise ValueError(f"{entry!r} is not 'NAME=value'")
            items.append(tuple(entry.split("=", 1)))  # type: ignore[arg-type]
    else:
        raise ValueError(f"{env!r}; give a dict {{'NAME': 'value'}} or a list of 'NAME=value'")
    out: dict[str, str] = {}
    for k, v in items:
        if not (isinstance(k, str) and SECRET_NAME_RE.match(k)) or not isinstance(v, str):
            raise ValueError(f"{k!r} is not a variable name with a string value")
        out[k] = v
    return out


def _strings(val: Any, what: str, example: str, problems: list[str]) -> tuple[str, ...]:
    if isinstance(val, (list, tuple)) and all(isinstance(s, str) and s.strip() for s in val):
        return tuple(val)
    problems.append(f"{what}={val!r}; give a list of non-empty strings, e.g. {example}")
    return ()


def _sandbox(sandbox: Any, image: Any, where: str, problems: list[str]) -> str:
    if sandbox is None:
        return "container" if image is not None else "process"  # an image only exists in a container
    if sandbox not in ("process", "container"):
        problems.append(f"{where}: sandbox={sandbox!r}; use 'process' or 'container'")
        return "process"
    if sandbox == "process" and image is not None:
        problems.append(f"{where}: image= needs a container, but sandbox='process' runs in the executor's own "
                        "Python; drop sandbox='process' (an image implies 'container') or drop the image")
    return sandbox


def _secrets(val: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if val is None:
        return ()
    if not isinstance(val, (list, tuple)):
        problems.append(f"{where}: secrets={val!r}; give a list of secret names, e.g. secrets=['API_TOKEN']")
        return ()
    names: list[str] = []
    for name in val:
        if not (isinstance(name, str) and SECRET_NAME_RE.match(name)):
            problems.append(f"{where}: secrets: {name!r} is not a secret name; a name is an environment variable "
                            "name: letters, digits and '_', not starting with a digit (e.g. 'API_TOKEN')")
        elif name in RESERVED_SECRET_NAMES or name.startswith("PETRIBUS_"):
            problems.append(f"{where}: secrets: {name!r} would replace a variable the worker itself needs; "
                            "store the secret under another name")
        elif name in names:
            problems.append(f"{where}: secrets: {name!r} is listed twice; list each secret once")
        else:
            names.append(name)
    return tuple(names)


def _callback_url(val: Any, where: str, problems: list[str]) -> str | None:
    if val is None or val == "":  # Beam sends "" for none
        return None
    parts = urlsplit(val) if isinstance(val, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in val):
        problems.append(f"{where}: callback_url={val!r} is not an http(s) URL; give one such as "
                        "'https://example.com/hook'")
        return None
    return val


def _policy(policy: Any, timeout: Any, retries: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """retries, timeout and ttl from ``task_policy=`` and the explicit ``retries=`` / ``timeout=``."""
    if timeout is not None and not (_number(timeout) and timeout > 0):
        problems.append(f"{where}: timeout={timeout!r}; it must be a positive number of seconds or None")
        timeout = None
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        problems.append(f"{where}: retries={retries!r}; it must be a whole number >= 0")
        retries = None
    out: dict[str, Any] = {"timeout": timeout, "retries": retries or 0, "ttl": None}
    if policy is None or policy == "":  # Beam sends "" for none
        return out
    if not isinstance(policy, TaskPolicy):
        problems.append(f"{where}: task_policy={policy!r}; give TaskPolicy(max_retries=..., timeout=..., ttl=...)")
        return out
    mr, pt, ttl = policy.max_retries, policy.timeout, policy.ttl
    if mr is not None:
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 0:
            problems.append(f"{where}: task_policy max_retries={mr!r}; it must be a whole number >= 0")
        elif retries is not None and retries != mr:
            problems.append(f"{where}: retries={retries!r} and task_policy max_retries={mr!r} disagree; "
                            "give the number of retries once")
        else:
            out["retries"] = mr
    if pt is not None and pt != 0:
        if not _number(pt) or (pt < 0 and pt != -1):
            problems.append(f"{where}: task_policy timeout={pt!r}; it must be seconds > 0, 0 (not set) or "
                            "-1 (no time limit)")
        elif timeout is not None and (pt == -1 or pt != timeout):
            problems.append(f"{where}: timeout={timeout!r} and task_policy timeout={pt!r} disagree; "
                            "give the time limit once")
        else:
            out["timeout"] = None if pt == -1 else pt
    if ttl is not None and ttl != 0:
        if not _number(ttl) or ttl < 0 or ttl > MAX_TTL_S:
            problems.append(f"{where}: task_policy ttl={ttl!r}; it must be seconds > 0 (at most {MAX_TTL_S:g}) "
                            "a queued firing may wait for an executor, or 0 (not set)")
        else:
            out["ttl"] = float(ttl)
    return out
