"""Container images for the container sandbox: the default local base, and Beam's ``Image`` built once.

No image is pulled for petribus's own use. The default base is made on this machine: a static busybox
and a few empty folders, imported into the engine as ``localhost/petribus-base:<hash>`` (2 MB). Python
is not in any image: the executor's own interpreter, its venv and the apps' sources are bind-mounted
read-only at their own paths when a container starts (``container.py``), so a container runs exactly
the code the executor runs.

An :class:`~petribus.resources.Image` is built once per content: its tag is a hash of its fields
(``localhost/petribus-img:<sha256[:12]>``), so equal images share one build and a changed one gets a new
tag; a tag the engine already has is not built again. ``python_packages`` are installed on this machine
by the executor's interpreter (``pip install --target``, with this machine's package index settings,
since a build may have no network) into a folder baked into the image and put on ``PYTHONPATH``: the
bind-mounted interpreter imports them. ``commands`` run in the build with the base's ``/bin/sh``.
``base_image`` replaces the local base; the engine pulls it when it has no copy (a registry must be
reachable then). Builds of one tag are serialised within a process; concurrent builds in two
processes produce the same image.

Every build step's output goes to ``progress``, line by line. A failed build raises ``ImageBuildFailed``
with the image, the failing step and the tail of its log.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petribus.errors import PetribusError
from petribus.resources import Image

BASE_REPO = "localhost/petribus-base"
IMAGE_REPO = "localhost/petribus-img"
SITE = "/opt/petribus/site"  # python_packages, baked into the image
BUSYBOX = "/bin/busybox"
_FORMAT = "1"  # bump when what an Image's build produces changes: its tags change with it
_LOG_TAIL = 25

Progress = Callable[[str], None]

_locks: dict[str, asyncio.Lock] = {}
_ready: set[tuple[str, str]] = set()  # (engine, tag) known to exist


class ImageBuildFailed(PetribusError, RuntimeError):
    """An image could not be made: which, at which step, and the tail of the build's log."""

    code = "image_build_failed"


class ImageNotFound(PetribusError, LookupError):
    code = "image_not_found"


def client(timeout: int | None = 120) -> Any:
    """A Docker-API client for ``DOCKER_HOST``, or an error saying how to get an engine."""
    import docker

    try:
        return docker.from_env(timeout=timeout)
    except docker.errors.DockerException as exc:
        raise PetribusError(
            f"no container engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')}: {exc}. "
            "Start one (scripts/engine starts podman's Docker-API service) and export DOCKER_HOST",
            code="engine_unavailable", retryable=True,
        ) from None


def image_tag(image: Image) -> str:
    """The content-addressed tag of ``image``: equal fields, equal tag."""
    fields = {
        "format": _FORMAT, "python_version": image.python_version,
        "python_packages": list(image.python_packages), "commands": list(image.commands),
        "base_image": image.base_image, "env_vars": sorted(image.env_vars.items()),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{IMAGE_REPO}:{digest[:12]}"


def base_tag() -> str:
    """The default base's tag: a hash of the busybox it holds and of this module's layout."""
    h = hashlib.sha256(_FORMAT.encode())
    with open(BUSYBOX, "rb") as f:
        h.update(f.read())
    return f"{BASE_REPO}:{h.hexdigest()[:12]}"


async def ensure_image(image: Image | str | None, *, settings: Any = None,
                       progress: Progress | None = None) -> str:
    """The tag of a local image for ``image``, made or built first if the engine lacks it.

    ``None``: the default local base. A ``str``: an image the engine must already have. An ``Image``:
    built once per content.
    """
    say = progress or (lambda line: None)
    if image is None:
        return await _once(_base_maker(say))
    if isinstance(image, str):
        return await _once(("given", image, lambda c: _must_exist(c, image)))
    return await _once(("image", image_tag(image), lambda c: _build(c, image, say)))


def _base_maker(say: Progress) -> tuple[str, str, Callable[[Any], None]]:
    if not os.path.exists(BUSYBOX):
        raise ImageBuildFailed(
            f"the default container image needs a static busybox at {BUSYBOX} and there is none: "
            "install busybox-static (scripts/engine does), or set PETRIBUS_CONTAINER_IMAGE to an image "
            "the engine has", code="image_build_failed")
    tag = base_tag()
    return ("base", tag, lambda c: _make_base(c, tag, say))


async def _once(job: tuple[str, str, Callable[[Any], None]]) -> str:
    _, tag, make = job
    engine = os.environ.get("DOCKER_HOST", "")
    if (engine, tag) in _ready:
        return tag
    # Per event loop: an asyncio.Lock waited on in one loop cannot be waited on in another.
    lock = _locks.setdefault(f"{id(asyncio.get_running_loop())}:{tag}", asyncio.Lock())
    import docker

    async with lock:
        if (engine, tag) not in _ready:
            try:
                await asyncio.to_thread(_make_if_missing, tag, make)
            except docker.errors.DockerException as exc:
                raise PetribusError(f"the container engine failed while looking for or making image {tag}: "
                                    f"{exc}", code="engine_error", retryable=True) from None
            _ready.add((engine, tag))
    return tag


def _make_if_missing(tag: str, make: Callable[[Any], None]) -> None:
    import docker

    c = client()
    try:
        try:
            c.images.get(tag)
            return
        except docker.errors.ImageNotFound:
            pass
        make(c)
    finally:
        c.close()


def _must_exist(c: Any, tag: str) -> None:
    raise ImageNotFound(
        f"container image {tag!r} is not in the engine at {os.environ.get('DOCKER_HOST', '(unset)')}: "
        "petribus does not pull images by name. Build or load it there (podman build/load), or give "
        "the transition an Image(...) for petribus to build"
    )


# ------------------------------------------------------------ the default base

def _make_base(c: Any, tag: str, say: Progress) -> None:
    """Import a rootfs of a static busybox: ``/bin/sh`` and the usual tools, folders for the mounts."""
    say(f"making the default container image {tag} from {BUSYBOX}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555),
                           ("dev", 0o755), ("root", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
                           ("var", 0o755), ("var/tmp", 0o1777), ("opt", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for tool in ("sh", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "env", "id", "true", "false",
                     "sleep", "wget", "ping", "touch", "chmod", "ln", "grep", "sed", "tar", "test", "head"):
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    try:
        result = c.api.import_image_from_data(buf.getvalue())
        image_id = json.loads(result.strip().splitlines()[-1])["id"] if isinstance(result, str) else result
    except Exception as exc:
        raise ImageBuildFailed(f"the engine refused to import the default container image {tag}: {exc}") from None
    repo, _, version = tag.rpartition(":")
    # podman's Docker-API import ignores the name it is given: tag the imported id instead.
    c.images.get(image_id).tag(repo, version)
    say(f"made {tag} ({image_id[:19]})")


# ------------------------------------------------------------ Image builds

def _build(c: Any, image: Image, say: Progress) -> None:
    tag = image_tag(image)
    want = image.python_version.removeprefix("python")
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want not in ("3", have):
        raise ImageBuildFailed(
            f"image {tag} asks for python_version={image.python_version!r}, but a container runs the "
            f"executor's own interpreter (Python {have}, bind-mounted): run this transition on an executor "
            f"with Python {want}, or ask for python{have}")
    base = image.base_image
    if base is None:
        base = _base_maker(say)[1]
        _make_if_missing(base, lambda cl: _make_base(cl, base, say))
    say(f"building {tag} from {base}")
    with tempfile.TemporaryDirectory(prefix="petribus-build-") as ctx:
        lines = [f"FROM {base}"]
        if image.python_packages:
            _install_packages(tag, list(image.python_packages), Path(ctx, "site"), say)
            lines.append(f"COPY site {SITE}")
        env = dict(image.env_vars)
        if image.python_packages:
            env["PYTHONPATH"] = SITE + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
        if env:
            lines.append("ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()))
        lines += [f"RUN {command}" for command in image.commands]
        Path(ctx, "Dockerfile").write_text("\n".join(lines) + "\n")
        _engine_build(c, tag, base, ctx, say)
    say(f"built {tag}")


def _install_packages(tag: str, packages: list[str], target: Path, say: Progress) -> None:
    say(f"installing {' '.join(packages)} for {tag} with {sys.executable} -m pip")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(target), *packages]
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            say(line.rstrip())
    if proc.returncode != 0:
        raise ImageBuildFailed(
            f"image {tag} could not be built: step 'pip install {' '.join(packages)}' failed "
            f"(exit {proc.returncode}). Its last lines:\n" + "\n".join(tail))
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts name a host path for Python


def _engine_build(c: Any, tag: str, base: str, ctx: str, say: Progress) -> None:
    import docker

    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    step = "FROM " + base
    error = None
    try:
        for chunk in c.api.build(path=ctx, tag=tag, rm=True, forcerm=True, decode=True, pull=False,
                                 labels={"petribus.image": tag}):
            if "error" in chunk:
                error = chunk.get("error") or json.dumps(chunk.get("errorDetail"))
                tail.append(error.rstrip())
                continue
            for line in str(chunk.get("stream", "")).splitlines():
                line = line.rstrip()
                if not line:
                    continue
                tail.append(line)
                say(line)
                if line.startswith("STEP ") or line.startswith("Step "):
                    step = line.partition(": ")[2] or line
    except docker.errors.APIError as exc:
        error = str(exc.explanation or exc)
        tail.append(error)
    if error is not None:
        hint = ""
        if step.startswith("FROM ") and base != _safe_base():
            hint = (f" The base image {base!r} is not in the engine and could not be pulled: a base_image "
                    "needs a registry the engine can reach (or load the image into the engine first).")
        raise ImageBuildFailed(
            f"image {tag} could not be built: step '{step}' failed: {error.strip()}.{hint} "
            "The build's last lines:\n" + "\n".join(tail))


def _safe_base() -> str:
    try:
        return base_tag()
    except OSError:
        return ""
