"""Container workers: a worker process in a container of its own, started through a Docker-API engine.

A container worker is the same worker (``worker.main``) as a forked one, behind a unix socket instead of
a pipe. The launcher binds the socket in the container's scratch folder, starts the container (its
entry, ``contained.py``, connects to it) and hands the pool the connected socket's fd and a
:class:`ContainerProcess` that answers what the pool asks of a ``multiprocessing.Process``: alive?
exited how? kill. A network-disabled container still reaches a bind-mounted unix socket.

What a container gets (``docs/containers.md``):

- **Its image's files, not the host's.** The root is the image's, read-only; ``/tmp`` is a tmpfs. The
  executor's interpreter, its venv, petribus's and the apps' sources and the system libraries they
  load (``/lib``, ``/lib64``, ``/usr/lib``) are bind-mounted read-only at their own paths, so the worker
  runs the executor's code. The scratch folder (socket, boot file, the work folder) is mounted
  read-write at ``/petribus``; the bot's volumes at their absolute mount paths, or at their host path
  for a relative one (the worker links it into its work folders, as a process worker does).
- **Its profile's limits.** ``mem_limit`` is the profile's memory plus ``INTERPRETER_MIB`` for what the
  worker holds before any firing (a worker's ``memory=`` is what its firings may add; measured below),
  no swap; ``nano_cpus`` its CPUs; a pids limit; the open-file limit; no capabilities.
- **No network** unless the profile says ``network``: only loopback.
- **Secrets only through the boot file**: a 0600 file in the scratch folder that the entry reads and
  deletes before it imports the apps. The other variables the apps read (``boot["passed"]``) travel
  there too. The container's environment, labels and command line, which
  ``inspect`` shows, carry no secret value.

Warm spares: after each ``launch`` one more container of the same profile and boot is started in the
background, up to ``container_warm`` idle ones per profile (a profile holds the transition and the
image), and counted as a spare once its ``ready`` has arrived (left in the socket for the pool to
read). The next ``launch`` of that profile hands one out at once instead of a 0.4-0.8 s start.

Each container is labelled with its executor (``petribus.executor``: host and pid). ``close`` removes
every container the launcher started; a new launcher removes those of executors on this host that are
dead (a ``kill -9`` leaves its containers behind: their worker exits when its socket closes, but the
stopped container and its scratch folder remain).

Blocking engine calls run in threads. Each container has one thread blocked in the engine's ``wait``;
when it returns, the exit status is recorded and a pipe is written: that pipe is the ``sentinel``
the pool's event loop watches.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from petribus import logs
from petribus.errors import PetribusError, SandboxCrashed
from petribus_executor import sandbox
from petribus_executor.images import client, ensure_image

log = logs.get("petribus.executor.container")

# What a booted container worker uses before its first firing (interpreter, petribus, pydantic, the
# apps, the page cache of the files it read): measured with the engine's stats on this machine as
# 21-22 MiB (Python 3.11, tests/apps/contained.py, after a firing too); 64 leaves room for heavier apps'
# imports. mem_limit = memory= plus this.
INTERPRETER_MIB = 64
PIDS_LIMIT = 1024
BOOT_TIMEOUT_S = 60.0
SCRATCH = "/petribus"  # the scratch folder, inside the container
ROOT = f"{SCRATCH}/work"  # the worker's work folder, inside the container
SOCKET = f"{SCRATCH}/worker.sock"
BOOT_FILE = f"{SCRATCH}/boot.json"
LABEL = "petribus.executor"  # "<host>:<pid>" of the executor that started it
SYSTEM_DIRS = ("/lib", "/lib64", "/usr/lib")
_SOURCES = ("petribus", "petribus_executor")  # what a worker imports besides the apps


class ContainerProcess:
    """A container worker, as the pool sees a process: ``pid``, ``sentinel``, ``exitcode``, kill, join."""

    def __init__(self, launcher: ContainerLauncher, container_id: str, name: str, scratch: Path,
                 memory_mib: int) -> None:
        self.id = container_id
        self.pid = container_id[:12]
        self.name = name
        self.scratch = scratch
        self.host_root = str(scratch / "work")
        self.root = ROOT
        self.memory_mib = memory_mib
        self._launcher = launcher
        self._status: int | None = None
        self._oom = False
        self._killed = False
        self._exited = threading.Event()
        self._r, self._w = os.pipe()
        self.sentinel = self._r
        threading.Thread(target=self._wait, name=f"petribus-container-{self.pid}", daemon=True).start()

    def watch_memory(self, host_pid: int) -> None:
        """Learn of an OOM kill from the container's memory cgroup (cgroups v1), where the engine does not
        report it: podman 4.3 on cgroups v1 says ``OOMKilled: false`` for a container the kernel killed."""
        try:
            with open(f"/proc/{host_pid}/cgroup") as f:
                path = next(line.strip().split(":", 2)[2] for line in f if ":memory:" in line)
            folder = f"/sys/fs/cgroup/memory{path}"
            control = os.open(f"{folder}/memory.oom_control", os.O_RDONLY)
        except (OSError, StopIteration):
            return  # cgroups v2, or an engine on another machine: its own OOMKilled is all there is
        events = os.eventfd(0)
        try:
            with open(f"{folder}/cgroup.event_control", "w") as f:
                f.write(f"{events} {control}")
        except OSError:
            os.close(events)
            os.close(control)
            return
        threading.Thread(target=self._watch_oom, args=(events, control), daemon=True,
                         name=f"petribus-oom-{self.pid}").start()

    def _watch_oom(self, events: int, control: int) -> None:
        # The eventfd is signalled when the cgroup goes into OOM and when it is removed; only in the
        # first case can its oom_control still be read. The kill is counted just after the signal.
        try:
            while True:
                os.read(events, 8)
                for _ in range(100):
                    try:
                        text = os.pread(control, 4096, 0).decode()
                    except OSError:
                        return  # removed: the container is gone
                    if any(line.split()[-1] != "0" for line in text.splitlines()
                           if line.startswith("oom_kill ")):
                        self._oom = True
                        return
                    time.sleep(0.01)
        finally:
            os.close(events)
            os.close(control)

    def _wait(self) -> None:
        api = self._launcher.waiter.api
        try:
            self._status = int(api.wait(self.id, timeout=None)["StatusCode"])
            self._oom = self._oom or bool(api.inspect_container(self.id)["State"].get("OOMKilled"))
        except Exception as exc:  # the engine went away, or the container was removed (closing)
            if self._status is None:
                log.warning("lost track of a container", container=self.name, error=repr(exc))
                self._status = 137
        finally:
            self._exited.set()
            try:
                os.write(self._w, b"x")
            except OSError:
                pass

    @property
    def exitcode(self) -> int | None:
        """``multiprocessing``'s convention: the exit status, or minus the signal that killed it."""
        if not self._exited.is_set():
            return None
        code = self._status if self._status is not None else 137
        return -(code - 128) if 128 < code <= 128 + 64 else code

    def exit_reason(self) -> str:
        """How it ended, for the errors a user sees: the memory limit when that is what killed it."""
        if not self._exited.is_set():
            return "running"
        if self._oom:
            return (f"killed: over its memory limit of {self.memory_mib} MiB (mem_limit, plus "
                    f"{INTERPRETER_MIB} MiB for the interpreter)")
        code = self.exitcode
        if self._killed:
            return "killed by its executor"
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    def kill(self) -> None:
        """Kill the container (returns at once; ``sentinel`` turns readable once it is gone)."""
        if self._exited.is_set():
            return
        self._killed = True
        self._launcher.background(self._launcher.kill_now, self.id)

    def join(self, timeout: float | None = None) -> None:
        self._exited.wait(timeout)

    def close(self) -> None:
        """Release the sentinel and remove the container and its scratch folder (in the background)."""
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1
        self._launcher.forget(self)


class ContainerLauncher:
    """Starts container workers for the pool and removes them all on ``close``."""

    def __init__(self, settings: Any, apps: list[str]) -> None:
        self.settings = settings
        self.apps = [_absolute_app(spec) for spec in apps]
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}"
        self._token = secrets.token_hex(3)
        self._scratch = Path(tempfile.gettempdir()) / "petribus-containers" / f"{os.getpid()}-{self._token}"
        self._names = itertools.count(1)
        self._client: Any = None
        self.waiter: Any = None  # a client for the threads blocked in wait: they hold a connection each
        self._live: dict[str, ContainerProcess] = {}
        self._threads: set[threading.Thread] = set()
        self._image_env: dict[str, list[str]] = {}
        self._mounts: list[Any] | None = None
        self._started = asyncio.Lock()
        self._spares: dict[str, list[tuple[ContainerProcess, int]]] = {}  # warm, ready, not yet handed out
        self._starting: dict[str, int] = {}
        self._warming: set[asyncio.Task[None]] = set()
        self._closed = False

    async def launch(self, profile: sandbox.Profile, boot: dict[str, Any]) -> tuple[ContainerProcess, int]:
        """A container worker for ``profile``: its process and the fd of its connected socket. A warm
        spare of the same profile and boot when there is one (its ``ready`` waits in the socket),
        else a new one; either way one more spare is started in the background, up to
        ``container_warm`` of them per profile."""
        key = json.dumps([sandbox.as_dict(profile), boot], sort_keys=True, default=str)
        spares = self._spares.setdefault(key, [])
        while spares:
            proc, fd = spares.pop()
            if proc.is_alive():
                self._top_up(key, profile, boot)
                return proc, fd
            os.close(fd)
            proc.close()
        proc, fd = await self._launch(profile, boot)
        self._top_up(key, profile, boot)
        return proc, fd

    def _top_up(self, key: str, profile: sandbox.Profile, boot: dict[str, Any]) -> None:
        warm = int(getattr(self.settings, "container_warm", 0) or 0)
        if self._closed or len(self._spares[key]) + self._starting.get(key, 0) >= warm:
            return
        self._starting[key] = self._starting.get(key, 0) + 1
        task = asyncio.ensure_future(self._start_spare(key, profile, boot))
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _start_spare(self, key: str, profile: sandbox.Profile, boot: dict[str, Any]) -> None:
        spare = None
        try:
            spare = await self._launch(profile, boot)
            await _readable(spare[1])  # its ready (or its failure) has arrived: a spare is up, not booting
        except Exception as exc:
            log.warning("a warm container did not start", transition=profile.transition, error=repr(exc))
            if spare is not None:
                os.close(spare[1])
                spare[0].kill()
            return
        finally:
            self._starting[key] -= 1
        if self._closed:
            os.close(spare[1])
        else:
            self._spares[key].append(spare)

    async def warmed(self) -> None:
        """Until the spares being started are up (for tests and benchmarks)."""
        while self._warming:
            await asyncio.wait(list(self._warming))

    async def _launch(self, profile: sandbox.Profile, boot: dict[str, Any]) -> tuple[ContainerProcess, int]:
        async with self._started:
            if self._client is None:
                await asyncio.to_thread(self._connect)
        image = await ensure_image(profile.image or getattr(self.settings, "container_image", None),
                                   settings=self.settings, progress=lambda line: log.info("image", line=line))
        name = f"petribus-{os.getpid()}-{self._token}-{next(self._names)}"
        scratch = self._scratch / name
        (scratch / "work").mkdir(parents=True, mode=0o700)
        os.chmod(scratch, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(scratch / "worker.sock"))
            listener.listen(1)
            listener.setblocking(False)
            # The variables the apps read (boot["passed"]) may hold credentials too: boot file only.
            passed = {k: v for k, v in os.environ.items() if k in set(boot.get("passed") or ())}
            _write_private(scratch / "boot.json", json.dumps(
                {**boot, "profile": sandbox.as_dict(profile), "root": ROOT, "exit_on_eof": True,
                 "environ": passed}))
            proc = await asyncio.to_thread(self._start, name, image, scratch, profile, boot.get("cpus"))
            fd = await self._accept(listener, proc)
        except BaseException:
            listener.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        listener.close()
        os.unlink(scratch / "worker.sock")
        log.debug("container started", container=name, image=image, profile=profile.describe())
        return proc, fd

    async def _accept(self, listener: socket.socket, proc: ContainerProcess) -> int:
        loop = asyncio.get_running_loop()
        accepted = asyncio.ensure_future(loop.sock_accept(listener))
        exited = loop.create_future()
        loop.add_reader(proc.sentinel, lambda: exited.done() or exited.set_result(None))
        try:
            done, _ = await asyncio.wait({accepted, exited}, timeout=BOOT_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            accepted.cancel()
            proc.kill()
            raise
        finally:
            loop.remove_reader(proc.sentinel)
        if accepted in done:
            conn, _ = accepted.result()
            conn.setblocking(True)
            return conn.detach()
        accepted.cancel()
        if exited in done:
            logs_tail = await asyncio.to_thread(self._logs, proc.id)
            raise SandboxCrashed(f"container {proc.name} exited before its worker connected "
                                 f"({proc.exit_reason()}); its output:\n{logs_tail}", retryable=False)
        proc.kill()
        raise SandboxCrashed(f"container {proc.name}'s worker did not connect within {BOOT_TIMEOUT_S:g}s")

    async def close(self) -> None:
        """Kill and remove every container this launcher started, and their scratch folders."""
        self._closed = True
        # Not cancelled: a start cancelled mid-way could leave its container created after the removal.
        await asyncio.gather(*self._warming, return_exceptions=True)
        for spares in self._spares.values():
            for _, fd in spares:
                os.close(fd)
        self._spares.clear()
        # Kills and removals under way first: two removals of one container race in the engine.
        for thread in list(self._threads):
            await asyncio.to_thread(thread.join)
        if self._client is not None:
            await asyncio.to_thread(self._remove_all)  # forced: running ones are killed
        shutil.rmtree(self._scratch, ignore_errors=True)
        for c in (self._client, self.waiter):
            if c is not None:
                c.close()
        self._client = self.waiter = None

    # ------------------------------------------------------------ engine calls (in threads)

    def _connect(self) -> None:
        import docker

        self._client = client()
        self.waiter = client(timeout=None)
        try:
            self._sweep()
        except docker.errors.DockerException as exc:  # leftovers stay; the next launcher tries again
            log.warning("could not remove dead executors' containers", error=str(exc))

    def _sweep(self) -> None:
        """Remove the containers and scratch folders of dead executors on this host."""
        import docker

        for c in self._client.api.containers(all=True, filters={"label": LABEL}):
            labels = c.get("Labels") or {}
            host, _, pid = labels.get(LABEL, "").rpartition(":")
            if host == self.host and pid.isdigit() and not _alive(int(pid)):
                log.info("removing a dead executor's container", container=c.get("Names"), executor=pid)
                try:
                    self._client.api.remove_container(c["Id"], force=True)
                except docker.errors.NotFound:
                    pass
                if labels.get("petribus.scratch"):
                    shutil.rmtree(labels["petribus.scratch"], ignore_errors=True)
        parent = self._scratch.parent
        for folder in parent.glob("*-*") if parent.exists() else ():
            pid = folder.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def _start(self, name: str, image: str, scratch: Path, profile: sandbox.Profile,
               cpus: list[int] | None) -> ContainerProcess:
        import docker
        from docker.types import DeviceRequest, Mount, Ulimit

        files = min(profile.max_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        mounts = [*self._code_mounts(), Mount(SCRATCH, str(scratch), type="bind", read_only=False)]
        for host_dir, mount_path in profile.volumes:
            # A relative mount path is the worker's to link into its folders (limits.Sandbox), to the
            # volume at its host path, as for a process worker: mounted there.
            target = mount_path if mount_path.startswith("/") else str(host_dir)
            mounts.append(Mount(target, str(host_dir), type="bind", read_only=False))
        try:
            environment = self._env(profile, image)
        except docker.errors.APIError as exc:
            raise SandboxCrashed(f"the engine could not describe image {image}: {exc.explanation or exc}") from None
        options: dict[str, Any] = dict(
            name=name, command=self._command(), detach=True, mounts=mounts, environment=environment,
            working_dir=ROOT, user="0:0", read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,size=256m"},
            mem_limit=f"{profile.memory_mib + INTERPRETER_MIB}m",
            memswap_limit=f"{profile.memory_mib + INTERPRETER_MIB}m",
            nano_cpus=int(profile.cpus * 1e9), pids_limit=PIDS_LIMIT,
            # Both, always: podman replaces its default ulimits with what is given, and one left at its
            # built-in default (above what a process may have here) fails the start.
            ulimits=[Ulimit(name="nofile", soft=files, hard=files),
                     Ulimit(name="nproc", soft=PIDS_LIMIT, hard=PIDS_LIMIT)],
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            # network_disabled is ignored by podman 4.3's Docker API (the container gets eth0): a "none"
            # network leaves only loopback, under any engine.
            **({} if profile.network else {"network_mode": "none"}),
            labels={LABEL: self.owner, "petribus.transition": profile.transition or "",
                    "petribus.image": image, "petribus.scratch": str(scratch)},
        )
        if cpus:
            options["cpuset_cpus"] = ",".join(str(c) for c in cpus)
        if profile.devices:
            options["device_requests"] = [DeviceRequest(device_ids=list(profile.devices), capabilities=[["gpu"]])]
        try:
            container = self._client.containers.run(image, **options)
        except docker.errors.APIError as exc:
            raise SandboxCrashed(f"the engine could not start a container of {image} for "
                                 f"{profile.transition or 'a worker'}: {exc.explanation or exc}") from None
        proc = ContainerProcess(self, container.id, name, scratch, profile.memory_mib)
        self._live[container.id] = proc
        try:
            host_pid = int(self._client.api.inspect_container(container.id)["State"].get("Pid") or 0)
        except docker.errors.APIError:
            host_pid = 0
        if host_pid:
            proc.watch_memory(host_pid)
        return proc

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "petribus_executor.contained", "--socket", SOCKET, "--boot", BOOT_FILE,
                *self.apps]

    def _env(self, profile: sandbox.Profile, image: str) -> dict[str, str]:
        # Secrets go through the boot file only; the image's PYTHONPATH (its packages) comes first.
        env = profile.environment(dict(os.environ))
        for key, _ in profile.env:
            env.pop(key, None)
        paths = [*self._image_pythonpath(image), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        env.pop("PYTHONPATH", None)
        if paths:
            env["PYTHONPATH"] = ":".join(paths)
        env.update({"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"})
        return env

    def _image_pythonpath(self, image: str) -> list[str]:
        if image not in self._image_env:
            config_env = self._client.api.inspect_image(image).get("Config", {}).get("Env") or []
            value = next((e.split("=", 1)[1] for e in config_env if e.startswith("PYTHONPATH=")), "")
            self._image_env[image] = [p for p in value.split(":") if p]
        return self._image_env[image]

    def _code_mounts(self) -> list[Any]:
        """Read-only mounts of everything the worker runs, at the paths the executor has them."""
        if self._mounts is None:
            from docker.types import Mount

            paths: list[str] = [d for d in SYSTEM_DIRS if os.path.isdir(d)]
            paths += [sys.base_prefix, sys.prefix]
            for name in _SOURCES:
                spec = importlib.util.find_spec(name)
                if spec is not None and spec.origin:
                    paths.append(str(Path(spec.origin).resolve().parent.parent))
            for app in self.apps:
                paths.append(_app_dir(app))
            paths += [p for p in os.environ.get("PYTHONPATH", "").split(":") if p and os.path.isdir(p)]
            # At the path the executor uses, from where it leads: /lib is a link to /usr/lib on a
            # merged-/usr system, and the interpreter asks for /lib64/ld-linux-x86-64.so.2.
            chosen: list[str] = []
            for path in sorted({os.path.abspath(p) for p in paths}, key=len):
                if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in chosen):
                    chosen.append(path)
            self._mounts = [Mount(p, os.path.realpath(p), type="bind", read_only=True) for p in chosen]
        return self._mounts

    def kill_now(self, container_id: str) -> None:
        import docker

        try:
            self._client.api.kill(container_id)
        except docker.errors.APIError:
            pass  # it exited (or was removed) already

    def background(self, fn: Any, *args: Any) -> None:
        thread = threading.Thread(target=self._run_and_forget, args=(fn, *args), daemon=True)
        self._threads.add(thread)
        thread.start()

    def _run_and_forget(self, fn: Any, *args: Any) -> None:
        try:
            if self._client is not None:
                fn(*args)
        except Exception as exc:
            log.warning("a container call failed", call=getattr(fn, "__name__", "?"), error=repr(exc))
        finally:
            self._threads.discard(threading.current_thread())

    def forget(self, proc: ContainerProcess) -> None:
        """``proc`` has been reaped: remove its container and scratch folder."""
        if self._live.pop(proc.id, None) is not None:
            self.background(self._remove_one, proc.id, proc.scratch)

    def _remove_one(self, container_id: str, scratch: Path) -> None:
        import docker

        try:
            self._client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("a container could not be removed", container=container_id[:12], error=str(exc))
        shutil.rmtree(scratch, ignore_errors=True)

    def _remove_all(self) -> None:
        import docker

        for c in self._client.api.containers(all=True, filters={"label": f"{LABEL}={self.owner}"}):
            try:
                self._client.api.remove_container(c["Id"], force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:  # e.g. a removal already in progress
                log.warning("a container could not be removed", container=c.get("Names"), error=str(exc))
        self._live.clear()

    def _logs(self, container_id: str) -> str:
        try:
            return self._client.api.logs(container_id, tail=30).decode(errors="replace")
        except Exception as exc:
            return f"(no output: {exc!r})"


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait_for(readable, BOOT_TIMEOUT_S)
    finally:
        loop.remove_reader(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _absolute_app(spec: str) -> str:
    module_part, sep, attr = spec.rpartition(":")
    if module_part and (module_part.endswith(".py") or os.path.exists(module_part)):
        return f"{os.path.abspath(module_part)}{sep}{attr}"
    return spec


def _app_dir(spec: str) -> str:
    module_part = spec.rpartition(":")[0] or spec
    if module_part.endswith(".py") or os.path.exists(module_part):
        return os.path.dirname(os.path.abspath(module_part))
    found = importlib.util.find_spec(module_part.split(".")[0])
    if found is None or not found.origin:
        raise PetribusError(f"app {spec!r} cannot be found to mount into its containers")
    origin = Path(found.origin).resolve()
    return str(origin.parent.parent if origin.name == "__init__.py" else origin.parent)
