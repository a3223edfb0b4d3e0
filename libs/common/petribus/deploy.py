"""Deployments: immutable, content-addressed versions of an app, and which one each environment runs.

A *version* is an app's source folder packed as a deterministic tar.gz (sorted names, mtime 0, no
owners, gzip without a time), with a small manifest naming the deployment and the app, so the same
content deployed under the same name always has the same sha256 (``digest``) and the same ``version``
(its first 10 hex digits). The archive lives in the ``PB_APPS`` object store under the version, its
record (:class:`Version`) in the ``PB_DEPLOY`` KV bucket under ``version.<version>``. A version runs
under a bot name of its own, ``<name>--<version>``: two versions of an app run side by side, and a
session stays on the version it started on, since its subjects carry that name.

A *deployment* (:class:`Deployment`, key ``env.<env>.<name>``) says which version an environment runs,
whether it is deactivated, the policies a version must keep to run there, and what was done to it. Every
change reads the record, edits it, and writes it on the condition that the revision read is still the
last (KV ``update``); a write that lost that race reads again and redoes its edit, so two operators
acting at once both land and neither undoes the other. A change that would leave the active version
breaking the environment's policies is refused whole, with every breach listed.

Services follow the bucket with :class:`Catalog` (a KV watch) and run the versions it wants with
:func:`fetch` (download, check the digest, extract safely) and :func:`load` (import the app so that its
modules stay private to its version: two versions' ``helper.py`` never mix in one process).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import importlib
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    DigestMismatchError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from petribus import logs, subjects
from petribus.bot import NAME_RE
from petribus.errors import AppLoadError, NetDefinitionError, PetribusError
from petribus.kv_mirror import KvMirror, load_stored
from petribus.loader import load_bot
from petribus.net import Net, TransitionDef

BUCKET = subjects.DEPLOY_BUCKET
APPS = subjects.APPS_BUCKET
DEFAULT_ENV = "default"
SEPARATOR = "--"
VERSION_LEN = 10
MAX_NAME_LEN = 64 - len(SEPARATOR) - VERSION_LEN  # the internal name is a bot name: 64 chars at most
MAX_APP_BYTES = 64 * 1024 * 1024
MAX_HISTORY = 200
MANIFEST = ".petribus-version.json"  # in the archive only; a source folder's own dot-files are never packed
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
VERSION_RE = re.compile(r"^[0-9a-f]{10}$")
UPDATE_ATTEMPTS = 50

Action = Literal["deploy", "release", "activate", "deactivate", "rollback", "policies"]
MOVES = ("deploy", "release", "rollback")  # the actions that change which version is active

log = logs.get("petribus.deploy")


class DeployError(PetribusError):
    """A deployment could not be made, changed or run; ``code`` says which case."""

    code = "deploy"


class InvalidDeploy(DeployError, ValueError):
    """Bad input: a name or env, an app that does not load, an invalid net, too big a folder."""

    code = "invalid_deploy"


class PolicyBreach(DeployError):
    """A version breaks the policies of the environment it would run in. ``breaches`` lists each one."""

    code = "policy_breach"

    def __init__(self, version: str, env: str, breaches: list[str], *, hint: str = "") -> None:
        self.breaches = list(breaches)
        lines = "\n".join(f"  - {b}" for b in self.breaches)
        super().__init__(f"version {version} breaks {len(self.breaches)} policy rule(s) of env {env!r}; nothing "
                         f"was changed:\n{lines}" + (f"\n{hint}" if hint else ""))


# --- names -----------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if (not isinstance(name, str) or not NAME_RE.match(name) or SEPARATOR in name
            or len(name) > MAX_NAME_LEN):
        raise InvalidDeploy(
            f"{name!r} is not a deployment name: use letters, digits, '_' and '-', not starting with a digit or "
            f"'-', without '{SEPARATOR}', at most {MAX_NAME_LEN} chars (e.g. support-bot)", code="invalid_name")
    return name


def check_env(env: str) -> str:
    if not isinstance(env, str) or not NAME_RE.match(env):
        raise InvalidDeploy(f"{env!r} is not an environment name: use letters, digits, '_' and '-', not starting "
                            "with a digit or '-', at most 64 chars (e.g. prod)", code="invalid_env")
    return env


def internal_bot(name: str, version: str) -> str:
    """The bot name a version runs under: ``<name>--<version>``."""
    return f"{name}{SEPARATOR}{version}"


def split_internal(bot: str) -> tuple[str, str] | None:
    """(name, version) of a version's internal bot name; None for any other bot name."""
    name, sep, version = bot.rpartition(SEPARATOR)
    if not sep or not VERSION_RE.match(version) or not NAME_RE.match(name) or SEPARATOR in name:
        return None
    return name, version


# --- records ---------------------------------------------------------------------------------------

# Stored records ignore fields they do not know: a service of an older petribus keeps reading the
# bucket that a newer command line writes to.
_RECORD = ConfigDict(extra="ignore")


class Need(BaseModel):
    """What one transition needs of the executor that runs it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pool: str = Field(description="The executor pool its work goes to.")
    gpus: list[str] = Field(default_factory=list, description="GPU types it may run on; ['any'] for a GPU of "
                            "any type; [] for none.")


class Version(BaseModel):
    """An immutable package of an app, named by its content."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str = Field(description="The first 10 hex digits of ``digest``.")
    name: str = Field(description="The deployment name it was deployed under.")
    bot: str = Field(description="The bot name it runs under: <name>--<version>.")
    app: str = Field(description="The app in the package, as file:attribute (e.g. app.py:bot).")
    digest: str = Field(description="Hex sha256 of the tar.gz archive in PB_APPS.")
    size: int = Field(description="Bytes of the archive.")
    files: list[str] = Field(description="The packaged files, relative to the package root, sorted.")
    requirements: list[str] = Field(default_factory=list, description="requirements.txt's lines (recorded, "
                                    "not installed).")
    pools: list[str] = Field(default_factory=list, description="The pools its transitions' work goes to.")
    gpus: list[str] = Field(default_factory=list, description="GPU types its transitions name ('any': any).")
    model: str | None = Field(default=None, description="The bot's model; None: the LLM service's default.")
    transitions: list[str] = Field(default_factory=list)
    needs: dict[str, Need] = Field(default_factory=dict, description="Per transition: its pool and GPU types.")
    created: float = Field(default_factory=time.time)
    created_by: str = "cli"


class Policies(BaseModel):
    """What a version must keep to to run in an environment. None everywhere: anything goes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pools: list[str] | None = Field(default=None, description="Pools its transitions may use; None: any.")
    gpus: list[str] | None = Field(default=None, description="GPU types they may use ('any' allows a GPU of any "
                                   "type); None: any; []: no GPU.")
    max_concurrent_firings: int | None = Field(default=None, ge=1, description="Firings at once per session "
                                               "(the scheduler enforces it); None: no limit.")
    models: list[str] | None = Field(default=None, description="Models the bot may name; None: any.")
    authorized: bool | None = Field(default=None, description="Whether callers need a key; None: the bot's own.")


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    action: Action
    version: str | None = Field(default=None, description="The active version after the action.")
    at: float = Field(default_factory=time.time)
    actor: str = "cli"
    detail: str = ""


class Deployment(BaseModel):
    """Which version of ``name`` runs in ``env``, under which policies, and what was done to it."""

    model_config = _RECORD

    env: str
    name: str
    active: str | None = Field(default=None, description="The version new sessions go to; None: none yet.")
    state: Literal["active", "deactivated"] = "active"
    policies: Policies = Field(default_factory=Policies)
    history: list[HistoryEntry] = Field(default_factory=list, description=f"The last {MAX_HISTORY} actions.")
    # What the call that returned this record did (not stored): whether it wrote, and what was active before.
    _changed: bool = PrivateAttr(default=True)
    _before: str | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:  # by what is stored, not by what the last call did
        return isinstance(other, Deployment) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  (mutable)

    @property
    def changed(self) -> bool:
        """False when the call that returned this record found nothing to do (and wrote nothing)."""
        return self._changed

    @property
    def before(self) -> str | None:
        """The version that was active before the call that returned this record."""
        return self._before

    @property
    def bot(self) -> str | None:
        """The internal bot name of the active version."""
        return internal_bot(self.name, self.active) if self.active else None

    def previous_version(self) -> str | None:
        """The version that was active before the current one (what a rollback goes back to)."""
        for entry in reversed(self.history):
            if entry.action in MOVES and entry.version and entry.version != self.active:
                return entry.version
        return None

    def since(self) -> float | None:
        """When the active version was made active."""
        for entry in reversed(self.history):
            if entry.action in MOVES and entry.version == self.active:
                return entry.at
        return None

    def did(self, action: Action, version: str | None, actor: str, detail: str = "") -> Deployment:
        """This record with ``version`` active (as ``action`` left it) and the action in its history."""
        entry = HistoryEntry(action=action, version=version, actor=actor, detail=detail)
        return self.model_copy(update={"active": version, "history": [*self.history, entry][-MAX_HISTORY:]})


def parse_record(key: str, value: bytes) -> Version | Deployment | None:
    """The record stored under ``key``; None (logged) for a key or value this petribus cannot read."""
    try:
        if key.startswith("version."):
            return Version.model_validate_json(value)
        if key.startswith("env."):
            return Deployment.model_validate_json(value)
    except ValidationError as exc:
        log.warning("unreadable record", bucket=BUCKET, key=key, error=str(exc).splitlines()[0])
        return None
    return None


def version_key(version: str) -> str:
    return f"version.{version}"


def deployment_key(env: str, name: str) -> str:
    return f"env.{env}.{name}"


# --- policies --------------------------------------------------------------------------------------


def breaches(version: Version, policies: Policies) -> list[str]:
    """Every way ``version`` breaks ``policies``: which transition, which value, what is allowed."""
    found: list[str] = []
    gpus_allowed = None if policies.gpus is None else {g.casefold() for g in policies.gpus}
    for name in version.transitions:
        need = version.needs.get(name)
        if need is None:
            continue
        if policies.pools is not None and need.pool not in policies.pools:
            found.append(f"transition {name!r} runs in pool {need.pool!r}; allowed pools: {_listing(policies.pools)}")
        if gpus_allowed is not None:
            for gpu in need.gpus:
                if gpu.casefold() not in gpus_allowed:
                    found.append(f"transition {name!r} needs a GPU of type {gpu!r}; allowed GPU types: "
                                 f"{_listing(policies.gpus or [])}")
    if policies.models is not None and version.model is not None and version.model not in policies.models:
        found.append(f"the bot's model {version.model!r} is not allowed; allowed models: {_listing(policies.models)}")
    return found


def _refuse_breaches(version: Version, policies: Policies, env: str, name: str) -> None:
    if found := breaches(version, policies):
        raise PolicyBreach(version.version, env, found, hint=(
            f"Change the app, or the policies: petribus deployments policies {name} --env {env} ..."))


def _listing(values: list[str]) -> str:
    return ", ".join(values) if values else "none"


def describe_policies(policies: Policies) -> str:
    def one(values: list[str] | None) -> str:
        return "any" if values is None else _listing(values)

    authorized = "the bot's own" if policies.authorized is None else str(policies.authorized).lower()
    limit = policies.max_concurrent_firings or "no limit"
    return (f"pools: {one(policies.pools)}; gpus: {one(policies.gpus)}; models: {one(policies.models)}; "
            f"max concurrent firings per session: {limit}; authorized: {authorized}")


# --- packaging -------------------------------------------------------------------------------------


def package(spec: str, name: str | None = None, *, actor: str | None = None) -> tuple[bytes, Version]:
    """The archive and record of the app ``spec`` (``path/to/app.py:bot``) deployed as ``name`` (default: the
    bot's name). Loads the bot and validates its net; touches no NATS. Raises :class:`InvalidDeploy`."""
    if name is not None:
        check_name(name)
    app_file, attr = _app_file(spec)
    root = app_file.parent
    files = _collect(root)
    with _private_imports(root):
        try:
            bot = load_bot(f"{app_file}:{attr}")
        except AppLoadError as exc:
            raise InvalidDeploy(f"{exc.message}; nothing was stored", code="app_load") from None
        name = check_name(name if name is not None else bot.name or "")
        try:
            net = bot.net(name=name)
        except NetDefinitionError as exc:
            raise InvalidDeploy(f"{spec}: {exc.message}\nFix these in the bot's definition and deploy again; "
                                "nothing was stored.", code="invalid_net") from None
    requirements = _requirements(root / "requirements.txt")
    app = f"{app_file.name}:{attr}"
    manifest = json.dumps({"name": name, "app": app, "requirements": requirements}, sort_keys=True).encode()
    data = _archive([*files, (MANIFEST, manifest)])
    digest = hashlib.sha256(data).hexdigest()
    version = digest[:VERSION_LEN]
    needs = {t.name: Need(pool=t.pool, gpus=_gpu_types(t)) for t in net.transitions}
    record = Version(
        version=version, name=name, bot=internal_bot(name, version), app=app, digest=digest, size=len(data),
        files=[rel for rel, _ in files], requirements=requirements,
        pools=sorted({n.pool for n in needs.values()}), gpus=sorted({g for n in needs.values() for g in n.gpus}),
        model=net.model, transitions=[t.name for t in net.transitions], needs=needs,
        created_by=actor or os.environ.get("USER") or "cli",
    )
    return data, record


def _app_file(spec: str) -> tuple[Path, str]:
    module, sep, attr = spec.rpartition(":")
    if not sep:
        module, attr = spec, "bot"
    path = Path(module)
    if path.suffix != ".py" or not path.is_file():
        raise InvalidDeploy(f"{spec!r} does not name an app file: give path/to/app.py:bot, the .py file that "
                            "defines the bot; its folder is what gets packaged", code="app_load")
    if not attr.isidentifier():
        raise InvalidDeploy(f"{spec!r}: {attr!r} is not a Python name; write path/to/app.py:NAME", code="app_load")
    return path.resolve(), attr


def _collect(root: Path) -> list[tuple[str, bytes]]:
    """(path relative to ``root``, content) of every file to pack, sorted by path; refuses too big a folder
    and links that lead out of it."""
    picked: list[tuple[str, Path, int]] = []
    total = 0
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        for d in list(dirs):
            if d in SKIPPED_DIRS or d.startswith("."):
                dirs.remove(d)
            elif (here / d).is_symlink():
                raise InvalidDeploy(f"{here / d} is a link to a folder; packaging does not follow linked folders: "
                                    "copy it in or move it out of the app's folder", code="app_link")
        for n in names:
            if n.startswith(".") or n.endswith(SKIPPED_SUFFIXES):
                continue
            path = here / n
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise InvalidDeploy(f"{path} links to {path.resolve()}, outside the app's folder {root}; copy the "
                                    "file in or remove the link", code="app_link")
            if not path.is_file():
                continue
            size = path.stat().st_size
            total += size
            picked.append((path.relative_to(root).as_posix(), path, size))
        if total > MAX_APP_BYTES:
            biggest = ", ".join(f"{rel} ({size // 1024} KiB)" for rel, _, size in
                                sorted(picked, key=lambda p: -p[2])[:3])
            raise InvalidDeploy(f"the app's folder {root} holds more than {MAX_APP_BYTES // 2**20} MiB to package "
                                f"(the biggest: {biggest}); move data out of it, or into a dot-folder, which is "
                                "never packaged", code="too_large")
    picked.sort(key=lambda p: p[0])
    return [(rel, path.read_bytes()) for rel, path, _ in picked]


def _archive(files: list[tuple[str, bytes]]) -> bytes:
    """A tar.gz of ``files`` in which nothing but their names and contents varies."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, data in sorted(files):
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def _requirements(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(errors="replace").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _gpu_types(t: TransitionDef) -> list[str]:
    if t.gpu:
        return t.gpu.split(",")
    return ["any"] if t.gpu_count else []


# --- the bucket and the object store ----------------------------------------------------------------


async def bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The deployments bucket, made if it is not there yet (by whichever process comes first)."""
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            description="petribus deployments: version.<version> and env.<env>.<name> records",
        ))
    except Exception:  # noqa: BLE001  (another process made it first, with its own settings: use that one)
        return await js.key_value(BUCKET)


async def objects(js: JetStreamContext, *, replicas: int = 1) -> ObjectStore:
    """The object store of the versions' archives, made if it is not there yet."""
    try:
        return await js.object_store(APPS)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_object_store(APPS, ObjectStoreConfig(
            bucket=APPS, storage=StorageType.FILE, replicas=replicas,
            description="petribus app versions: <version> -> tar.gz"))
    except Exception:  # noqa: BLE001  (made meanwhile by another process)
        return await js.object_store(APPS)


def _nats_digest(hex_digest: str) -> str:
    """The object store's spelling of a sha256."""
    return "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).decode()


async def _store(js: JetStreamContext, data: bytes, version: Version, replicas: int) -> Version:
    """Put the archive (unless it is there with this digest) and the record (unless it is there); the
    stored record, which keeps its first ``created``, is returned."""
    obs = await objects(js, replicas=replicas)
    try:
        info = await obs.get_info(version.version)
        present = info.size == version.size and info.digest == _nats_digest(version.digest)
    except ObjectNotFoundError:
        present = False
    if not present:
        await obs.put(version.version, data)
    kv = await bucket(js, replicas=replicas)
    try:
        await kv.create(version_key(version.version), version.model_dump_json().encode())
        return version
    except KeyWrongLastSequenceError:
        stored = await get_version(js, version.version)
    if stored is None or stored.digest != version.digest:
        raise DeployError(f"version {version.version} is stored already for another archive (sha256 "
                          f"{stored.digest if stored else '?'}, not {version.digest}); change any file and deploy "
                          "again", code="version_clash")
    return stored


# --- changes ---------------------------------------------------------------------------------------

Edit = Callable[[Deployment | None], Awaitable[Deployment | None]]


async def _change(js: JetStreamContext, env: str, name: str, edit: Edit, *, replicas: int = 1) -> Deployment:
    """Apply ``edit`` to the stored deployment, optimistically: it gets the record as read (None: there is
    none) and returns the new one, or None for nothing to do; a write that finds the record changed since
    it was read reads it again and edits anew."""
    kv = await bucket(js, replicas=replicas)
    key = deployment_key(env, name)
    for attempt in range(UPDATE_ATTEMPTS):
        entry = await _read(kv, key)
        current = Deployment.model_validate_json(entry.value) if entry is not None and entry.value else None
        new = await edit(current)
        if new is None:
            if current is None:
                raise AssertionError("an edit of a missing deployment must make one or refuse")
            current._changed, current._before = False, current.active
            return current
        data = new.model_dump_json().encode()
        try:
            if entry is None:
                await kv.create(key, data)
            else:
                await kv.update(key, data, last=entry.revision)
        except KeyWrongLastSequenceError:
            log.info("deployment changed meanwhile; editing again", env=env, name=name, attempt=attempt + 1)
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
            continue
        new._changed, new._before = True, current.active if current else None
        return new
    raise DeployError(f"the deployment {name} in env {env} kept changing under this command ({UPDATE_ATTEMPTS} "
                      "tries); run it again", code="conflict", retryable=True)


async def _read(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    try:
        return await kv.get(key)
    except NotFoundError:  # (also a deleted key)
        return None


def _existing(dep: Deployment | None, name: str, env: str) -> Deployment:
    if dep is None:
        raise DeployError(f"there is no deployment {name} in env {env}; `petribus deployments list` shows those "
                          f"there are, `petribus deploy APP --name {name} --env {env}` makes it", code="no_deployment")
    return dep


async def _version_of(js: JetStreamContext, version: str) -> Version:
    found = await get_version(js, version)
    if found is None:
        raise DeployError(f"version {version} has no record in bucket {BUCKET}; deploy the app again",
                          code="no_version")
    return found


async def deploy(js: JetStreamContext, spec: str, name: str, *, env: str = DEFAULT_ENV, actor: str = "cli",
                 replicas: int = 1) -> tuple[Version, Deployment]:
    """Package ``spec``, store it (once per digest) and make it ``name``'s active version in ``env``. Deploying
    the active version again changes nothing (``Deployment.changed`` is False). An app that does not load,
    an invalid net, or a breach of ``env``'s policies stores nothing."""
    check_name(name)
    check_env(env)
    data, version = package(spec, name, actor=actor)
    await bucket(js, replicas=replicas)  # made here, replicated, if this is the first deployment
    if (before := await get_deployment(js, name, env)) is not None and before.active != version.version:
        _refuse_breaches(version, before.policies, env, name)  # before storing anything
    version = await _store(js, data, version, replicas)

    async def edit(dep: Deployment | None) -> Deployment | None:
        dep = dep or Deployment(env=env, name=name)
        if dep.active == version.version:
            return None
        _refuse_breaches(version, dep.policies, env, name)
        return dep.did("deploy", version.version, actor).model_copy(update={"state": "active"})

    return version, await _change(js, env, name, edit, replicas=replicas)


async def release(js: JetStreamContext, name: str, *, src: str, dst: str, with_policies: bool = False,
                  actor: str = "cli", replicas: int = 1) -> Deployment:
    """Make ``src``'s active version ``dst``'s too (``src`` is left as it is); ``with_policies`` copies
    ``src``'s policies along. Refused when ``src`` has no active version or it breaks ``dst``'s policies."""
    check_name(name)
    check_env(src)
    check_env(dst)
    if src == dst:
        raise InvalidDeploy(f"--from and --to are both {src!r}; release copies a version from one env to another",
                            code="same_env")
    await bucket(js, replicas=replicas)
    origin = await get_deployment(js, name, src)
    if origin is None or origin.active is None:
        raise DeployError(f"{name} has no active version in env {src} to release; deploy one there first: "
                          f"petribus deploy APP --name {name} --env {src}", code="nothing_to_release")
    version = await _version_of(js, origin.active)

    async def edit(dep: Deployment | None) -> Deployment | None:
        dep = dep or Deployment(env=dst, name=name)
        policies = origin.policies if with_policies else dep.policies
        if dep.active == version.version and policies == dep.policies:
            return None
        _refuse_breaches(version, policies, dst, name)
        detail = f"from {src}" + (" with its policies" if with_policies else "")
        return dep.did("release", version.version, actor, detail).model_copy(
            update={"state": "active", "policies": policies})

    return await _change(js, dst, name, edit, replicas=replicas)


async def deactivate(js: JetStreamContext, name: str, *, env: str = DEFAULT_ENV, actor: str = "cli",
                     replicas: int = 1) -> Deployment:
    """Stop sending new sessions to ``name`` in ``env``; its version stays, to ``activate`` again."""
    return await _set_state(js, name, env, "deactivated", actor, replicas)


async def activate(js: JetStreamContext, name: str, *, env: str = DEFAULT_ENV, actor: str = "cli",
                   replicas: int = 1) -> Deployment:
    """Send new sessions to ``name``'s active version in ``env`` again, after ``deactivate``."""
    return await _set_state(js, name, env, "active", actor, replicas)


async def _set_state(js: JetStreamContext, name: str, env: str, state: Literal["active", "deactivated"],
                     actor: str, replicas: int) -> Deployment:
    check_name(name)
    check_env(env)

    async def edit(dep: Deployment | None) -> Deployment | None:
        dep = _existing(dep, name, env)
        if dep.state == state:
            return None
        action: Action = "activate" if state == "active" else "deactivate"
        return dep.did(action, dep.active, actor).model_copy(update={"state": state})

    return await _change(js, env, name, edit, replicas=replicas)


async def rollback(js: JetStreamContext, name: str, *, env: str = DEFAULT_ENV, actor: str = "cli",
                   replicas: int = 1) -> Deployment:
    """Make the version active before the current one active again (``Deployment.previous_version``)."""
    check_name(name)
    check_env(env)

    async def edit(dep: Deployment | None) -> Deployment | None:
        dep = _existing(dep, name, env)
        previous = dep.previous_version()
        if previous is None:
            raise DeployError(f"{name} in env {env} has no earlier version to roll back to (active: "
                              f"{dep.active or 'none'}); `petribus deployments history {name} --env {env}` shows "
                              "what was done", code="no_previous")
        _refuse_breaches(await _version_of(js, previous), dep.policies, env, name)
        return dep.did("rollback", previous, actor, f"from {dep.active}").model_copy(update={"state": "active"})

    return await _change(js, env, name, edit, replicas=replicas)


async def set_policies(js: JetStreamContext, name: str, *, env: str = DEFAULT_ENV, policies: Policies,
                       actor: str = "cli", replicas: int = 1) -> Deployment:
    """Replace ``name``'s policies in ``env`` (a deployment with no version yet is made to hold them).
    Refused when the active version breaks them."""
    return await amend_policies(js, name, env=env, actor=actor, replicas=replicas, change=lambda _: policies)


async def amend_policies(js: JetStreamContext, name: str, *, env: str = DEFAULT_ENV,
                         change: Callable[[Policies], Policies], actor: str = "cli", replicas: int = 1) -> Deployment:
    """Set ``name``'s policies in ``env`` to ``change(current policies)``, within the optimistic edit, so a
    concurrent change to another policy is kept (what ``petribus deployments policies`` uses)."""
    check_name(name)
    check_env(env)

    async def edit(dep: Deployment | None) -> Deployment | None:
        dep = dep or Deployment(env=env, name=name)
        policies = change(dep.policies)
        if policies == dep.policies and dep.history:
            return None
        if dep.active is not None:
            _refuse_breaches(await _version_of(js, dep.active), policies, env, name)
        return dep.did("policies", dep.active, actor, describe_policies(policies)).model_copy(
            update={"policies": policies})

    return await _change(js, env, name, edit, replicas=replicas)


# --- reading ---------------------------------------------------------------------------------------


async def get_version(js: JetStreamContext, version: str) -> Version | None:
    entry = await _read(await bucket(js), version_key(version))
    return Version.model_validate_json(entry.value) if entry is not None and entry.value else None


async def get_deployment(js: JetStreamContext, name: str, env: str = DEFAULT_ENV) -> Deployment | None:
    entry = await _read(await bucket(js), deployment_key(env, name))
    return Deployment.model_validate_json(entry.value) if entry is not None and entry.value else None


async def versions(js: JetStreamContext, name: str | None = None) -> list[Version]:
    """Every version (of ``name``, if given), oldest first."""
    found = [r for r in (await _load_all(js)).values() if isinstance(r, Version)]
    return sorted((v for v in found if name is None or v.name == name), key=lambda v: (v.created, v.version))


async def deployments(js: JetStreamContext) -> list[Deployment]:
    """Every deployment, by env then name."""
    found = [r for r in (await _load_all(js)).values() if isinstance(r, Deployment)]
    return sorted(found, key=lambda d: (d.env, d.name))


async def _load_all(js: JetStreamContext) -> dict[str, Version | Deployment]:
    kv = await bucket(js)
    watcher = await kv.watchall()
    found: dict[str, Version | Deployment] = {}

    def apply(entry: KeyValue.Entry) -> None:
        record = parse_record(entry.key, entry.value or b"") if entry.value else None
        if record is None:
            found.pop(entry.key, None)
        else:
            found[entry.key] = record

    try:
        await load_stored(kv, watcher, apply, timeout_s=10.0)
    finally:
        await watcher.stop()
    return found


class Catalog(KvMirror[Version | Deployment]):
    """The deployments bucket in memory, kept up to date by a watch: what services run.

    ``on_change(catalog)`` is called once the catalog has loaded and after the changes the watch delivers
    (several close together may give one call: read the catalog, don't count calls). It is called
    synchronously and must not block; schedule async work from it.
    """

    def __init__(self, nc: NATS, *, replicas: int = 1,
                 on_change: Callable[[Catalog], None] | None = None) -> None:
        super().__init__(nc, lambda: bucket(nc.jetstream(), replicas=replicas), parse_record, what="deployments")
        self._on_change = on_change
        self._notifier: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        if self._on_change is not None:
            self._notifier = asyncio.create_task(self._notify(self._on_change), name="deployments-on-change")

    async def _notify(self, on_change: Callable[[Catalog], None]) -> None:
        # No await between the call and the next wait: a change can't slip in unseen.
        while True:
            try:
                on_change(self)
            except Exception:  # a faulty callback must not end the catalog's notifications
                log.exception("on_change failed")
            await self.changed()

    async def close(self) -> None:
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None
        await super().close()

    def versions(self) -> dict[str, Version]:
        return {r.version: r for r in self.items.values() if isinstance(r, Version)}

    def deployments(self) -> dict[tuple[str, str], Deployment]:
        """(env, name) -> deployment."""
        return {(r.env, r.name): r for r in self.items.values() if isinstance(r, Deployment)}

    def wanted(self) -> list[Version]:
        """Every version that is or was active in an env (within its kept history), oldest first: the
        versions a service loads, so sessions pinned to an older one keep running."""
        known = self.versions()
        ids: set[str] = set()
        for dep in self.deployments().values():
            if dep.active:
                ids.add(dep.active)
            ids.update(e.version for e in dep.history if e.version)
        return sorted((known[v] for v in ids if v in known), key=lambda v: (v.created, v.version))

    def active(self, name: str, env: str = DEFAULT_ENV) -> Version | None:
        """The version new sessions of ``name`` in ``env`` go to; None when there is none or it is deactivated."""
        dep = self.deployments().get((env, name))
        if dep is None or dep.state != "active" or dep.active is None:
            return None
        return self.versions().get(dep.active)


# --- running a version -----------------------------------------------------------------------------


async def fetch(js: JetStreamContext, version: Version, cache_dir: Path) -> Path:
    """The folder ``cache_dir/<version>`` holding the version's files: reused when it is there and complete,
    else downloaded, checked against the record's digest (a changed archive is refused), and extracted
    safely (no absolute paths, no '..', no links or devices) into a temporary folder renamed into place."""
    target = Path(cache_dir) / version.version
    if _complete(target, version):
        return target
    try:
        result = await (await objects(js)).get(version.version)
    except ObjectNotFoundError:
        raise DeployError(f"the archive of version {version.version} ({version.name}) is not in {APPS}; deploy "
                          "the app again to store it", code="no_archive") from None
    except DigestMismatchError:
        raise DeployError(f"the archive of version {version.version} in {APPS} does not match its own checksum: "
                          "it is damaged; deploy the app again", code="tampered") from None
    got = hashlib.sha256(result.data or b"").hexdigest()
    if got != version.digest or not version.digest.startswith(version.version):
        raise DeployError(f"the archive of version {version.version} in {APPS} has sha256 {got}, not the "
                          f"{version.digest} its record names: it was changed after it was deployed. Refusing to "
                          "run it; deploy the app again to store it anew", code="tampered")
    return await asyncio.to_thread(_extract, result.data or b"", version, Path(cache_dir))


def _complete(folder: Path, version: Version) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in version.files)


def _extract(data: bytes, version: Version, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / version.version
    tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}-", dir=cache_dir))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                rel = _safe_path(member, version)
                dest = tmp / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with open(dest, "xb") as out:
                    shutil.copyfileobj(source, out)
        if missing := [f for f in version.files if not (tmp / f).is_file()]:
            raise DeployError(f"the archive of version {version.version} lacks {', '.join(missing[:5])}",
                              code="bad_archive")
        try:
            os.rename(tmp, target)
        except OSError:  # there already: another process's copy, or an incomplete one left behind
            if not _complete(target, version):
                stale = cache_dir / f".{version.version}-stale-{uuid.uuid4().hex[:8]}"
                os.rename(target, stale)
                os.rename(tmp, target)
                shutil.rmtree(stale, ignore_errors=True)
        return target
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DeployError(f"cannot extract version {version.version} into {cache_dir}: {type(exc).__name__}: "
                          f"{exc}", code="bad_archive") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_path(member: tarfile.TarInfo, version: Version) -> Path:
    path = PurePosixPath(member.name)
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or ".." in parts or not parts or "\\" in member.name:
        raise DeployError(f"the archive of version {version.version} holds the path {member.name!r}, which would "
                          "land outside its folder; refusing to extract it", code="unsafe_archive")
    if not (member.isfile() or member.isdir()):
        raise DeployError(f"the archive of version {version.version} holds {member.name!r}, a link or device; "
                          "refusing to extract it", code="unsafe_archive")
    return Path(*parts)


_LOADING = threading.Lock()  # loads swap modules in and out of sys.modules: never two at once (threads)


def load(folder: Path, version: Version) -> Net:
    """Import the app of ``version`` from its extracted ``folder`` and return its net, named ``version.bot``.

    The app's module and every module it imports from the folder are private to this call: modules of the
    same names loaded before are hidden while it runs and put back after, and what it imported from the
    folder is taken out of ``sys.modules`` (the net's functions keep them alive), so another version of the
    app imports its own copies. Imports that run later, inside a transition, see no folder: import at the
    top of the module."""
    folder = Path(folder).resolve()
    file, _, attr = version.app.rpartition(":")
    app_file = (folder / file).resolve()
    if not app_file.is_relative_to(folder) or not app_file.is_file():
        raise DeployError(f"version {version.version}: its app {version.app!r} is not a file in {folder}",
                          code="bad_archive")
    with _LOADING, _private_imports(folder):  # sys.modules is the process's: one load at a time
        try:
            bot = load_bot(f"{app_file}:{attr}")
            return bot.net(name=version.bot)
        except (AppLoadError, NetDefinitionError) as exc:
            raise DeployError(f"version {version.version} of {version.name}: {exc.message}", code="app_load") from None


@contextlib.contextmanager
def _private_imports(root: Path) -> Iterator[None]:
    """Imports from ``root`` made inside this block are private to it (see :func:`load`)."""
    root = root.resolve()
    local = _local_names(root)

    def own(name: str, module: Any) -> bool:
        return name.partition(".")[0] in local or _under(module, root)

    hidden = {n: m for n, m in list(sys.modules.items()) if own(n, m)}
    for n in hidden:
        del sys.modules[n]
    before_modules = set(sys.modules)
    before_path = set(sys.path)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for n in set(sys.modules) - before_modules:
            if own(n, sys.modules[n]):
                del sys.modules[n]
        sys.path[:] = [p for p in sys.path if p in before_path or not _is_under(p, root)]
        for n, m in hidden.items():
            sys.modules.setdefault(n, m)


def _local_names(root: Path) -> set[str]:
    """The top-level module names files in ``root`` provide: ``helper`` for helper.py or helper/."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if entry.suffix == ".py" or (entry.is_dir() and entry.name.isidentifier()):
                names.add(entry.stem if entry.suffix == ".py" else entry.name)
    return names


def _under(module: Any, root: Path) -> bool:
    places = [getattr(module, "__file__", None)]
    with contextlib.suppress(Exception):  # a namespace package's __path__ is computed, and may fail
        places.extend(getattr(module, "__path__", None) or [])
    return any(isinstance(p, str) and _is_under(p, root) for p in places)


def _is_under(path: str, root: Path) -> bool:
    # A string test, not realpath: it runs over every module loaded, and the loader imports from the
    # resolved folder, so what came from there carries its resolved path.
    path = os.path.abspath(path)
    return path == str(root) or path.startswith(str(root) + os.sep)
