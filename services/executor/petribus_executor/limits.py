"""The worker's side of its sandbox: what it sets up once at boot, and around each run.

At boot (``Sandbox.enter``), after the apps are imported and before the worker says ``ready``:

- **Environment**: only ``sandbox.ENV_ALLOWED`` of what the worker inherited and the variables the apps
  read at import (``sandbox.passed_names``), plus the secrets its profile names and the GPUs it was
  given; ``HOME`` and ``TMPDIR`` point into its own folder.
- **Folder**: a private temporary folder (``root``), removed when the worker exits (the executor removes
  it when the worker is killed). Each run has a folder of its own inside it. A ``def`` run (alone in
  its process) has it as its working directory and its temporary files go there (``TMPDIR``); it is
  emptied after the run if the run left anything. The worker stays in it between ``def`` runs and goes
  back to its own folder when an ``async def`` run starts (``leave_sync``). An ``async def`` run (which
  shares the process) gets one made on first use of ``context.workdir`` or a file call, and removed after
  the run. Making and removing a folder for every run cost 0.2-0.6 ms each (most runs write nothing).
  Volumes with relative mount paths appear in them as links.
- **CPUs**: not capped (a container is: ``cpu=`` becomes its CPU quota). Pinning each worker to
  ``cpu=`` CPUs was tried: 1,000 async no-op firings took 3-5x longer (``bench/bench_pool.py``), as
  busy workers could not move to an idle core.
- **Memory**: ``RLIMIT_DATA`` at what the worker holds after boot plus ``memory=`` MiB; an allocation
  past it fails with ``MemoryError``, which the run reports as ``MemoryLimitExceeded`` (the limit, what
  the worker held, its peak), and the worker is retired. Thread stacks count, so threads started here
  get 4 MiB stacks instead of 8.
- **Open files**: ``RLIMIT_NOFILE``, ``PETRIBUS_SANDBOX_MAX_FILES``.
- **CPU time** (``def`` runs): ``RLIMIT_CPU`` is set before each run at what the process has used plus
  the run's allowance. Past it, ``SIGXCPU`` raises ``CpuTimeExceeded`` in the run; a run that carries on
  (stuck in C code, or catching it) gets the signal's default action a second later: the worker dies.
  The limit stays set after the run (an idle worker uses next to no CPU, and the next ``def`` run sets it
  anew); it is lifted when an ``async def`` run starts, or a ``def`` run with no bound. Setting and
  lifting it around every run, with the folder changes, was most of a no-op run's cost in the worker.

Hard limits stay where they are, so a transition could raise its own soft limits: a process sandbox
bounds mistakes, not hostile code (docs/sandboxes.md).
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from petribus_executor import failures
from petribus_executor import protocol as p
from petribus_executor.sandbox import Profile, from_dict

MIB = 1024 * 1024
THREAD_STACK_BYTES = 4 * MIB
PASSED_MASKED_FROM = 8  # characters: shorter values of passed variables are not masked


class CpuTimeExceeded(Exception):
    """Raised in a ``def`` run that used up its CPU time."""


class Sandbox:
    def __init__(self, boot: dict[str, Any] | None) -> None:
        boot = boot or {}
        self.profile: Profile = from_dict(boot["profile"]) if boot.get("profile") else Profile()
        self.root = boot.get("root") or tempfile.mkdtemp(prefix="petribus-worker-")
        self.owns_root = not boot.get("root")
        self.passed = frozenset(boot.get("passed") or ())
        self.confined = False  # limits, environment and folders applied to this process (``enter``)
        self.baseline_mib = 0.0
        self.data_limit_mib: float | None = None
        self.cpu_seconds: float | None = None  # the running def's allowance, while it runs
        self._cpu_hard = resource.RLIM_INFINITY  # RLIMIT_CPU's hard limit, read at boot
        self._cpu_armed = False  # a def run's soft RLIMIT_CPU is in place
        self._sync_made = False  # the def runs' folder exists (made on the first, again after a removal)
        self._in_sync = False  # the working directory and TMPDIR are the def runs' folder
        self._links = frozenset(os.path.normpath(m).split(os.sep)[0] for _, m in self.profile.volumes
                                if not os.path.isabs(m))

    # ------------------------------------------------------------ boot

    def enter(self) -> None:
        """Apply the profile to this process (the apps are imported; the threads not started yet).

        Only a worker process does: a ``Runner`` driven in another process (a test) never limits it."""
        self.confined = True
        failures.hide(hidden_values(self.profile.env, os.environ, self.passed))
        threading.stack_size(THREAD_STACK_BYTES)
        env = self.profile.environment(dict(os.environ), self.passed)
        tmp = os.path.join(self.root, ".tmp")
        os.makedirs(tmp, exist_ok=True)
        env.update(HOME=self.root, TMPDIR=tmp)
        os.environ.clear()
        os.environ.update(env)
        tempfile.tempdir = None  # read TMPDIR again
        os.chdir(self.root)
        self._link_volumes(self.root)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = self.profile.max_files if hard == resource.RLIM_INFINITY else min(self.profile.max_files, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        self._cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        _install_sigxcpu()

    def limit_memory(self) -> None:
        """Cap the data segment at what the worker holds now plus ``memory=`` (after its threads started)."""
        if not self.confined:
            return
        self.baseline_mib = _status_mib("VmData")
        limit = self.baseline_mib + self.profile.memory_mib
        self.data_limit_mib = limit
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit * MIB), resource.getrlimit(resource.RLIMIT_DATA)[1]))

    def exit(self) -> None:
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ runs

    @property
    def sync_dir(self) -> str:
        """The folder of the worker's def runs: one at a time, each starting with it empty."""
        return os.path.join(self.root, "run")

    def begin_sync(self) -> str:
        """Before a def run: its folder is the working directory, and temporary files go there too."""
        folder = self.sync_dir
        if not self._sync_made:
            if not os.path.isdir(folder):
                os.makedirs(folder)
                self._link_volumes(folder)
            self._sync_made = True
        if not self.confined:
            return folder
        os.chdir(folder)  # every time: the last run may have gone elsewhere
        if os.environ.get("TMPDIR") != folder:
            os.environ["TMPDIR"] = folder
        tempfile.tempdir = folder
        self._in_sync = True
        return folder

    def end_sync(self) -> None:
        """After a def run: its folder is emptied if it left anything. The worker stays in it until an async
        run starts (``leave_sync``): most runs come after another def run, which would come straight back."""
        folder = self.sync_dir
        try:
            left = set(os.listdir(folder))
        except OSError:
            self._sync_made = False
            return
        if left - self._links:  # a listing costs microseconds; a removal and a mkdir, a hundred
            shutil.rmtree(folder, ignore_errors=True)
            self._sync_made = False

    def leave_sync(self) -> None:
        """Before async runs (from any thread): the worker's own folder and temporary files, no CPU bound."""
        self.disarm_cpu()
        if self._in_sync:
            self._in_sync = False
            os.chdir(self.root)
            os.environ["TMPDIR"] = tempfile.tempdir = os.path.join(self.root, ".tmp")

    def async_dir(self, job: int) -> str:
        """An async run's own folder, made when it first asks for it (most never do)."""
        path = os.path.join(self.root, f"run-{job}")
        os.makedirs(path, exist_ok=True)
        self._link_volumes(path)
        return path

    def end_async(self, path: str | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def arm_cpu(self, seconds: float | None) -> None:
        """Before a def run (main thread): allow it ``seconds`` more of CPU time (None: no bound)."""
        self.cpu_seconds = seconds
        if not self.confined:
            return
        if seconds is None:
            self.disarm_cpu()
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime + seconds)
        hard = self._cpu_hard
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        if _sigxcpu_spent:
            _install_sigxcpu()  # the last run was stopped by it, and the run carried on
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except ValueError:  # a run lowered the hard limit itself
            self._cpu_hard = hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))
        self._cpu_armed = True

    def disarm_cpu(self) -> None:
        """No CPU bound (any thread): before async runs, which share the process, and unbounded def runs."""
        self.cpu_seconds = None
        if not self._cpu_armed:
            return
        self._cpu_armed = False
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))

    def explain(self, request: p.Request, outcome: p.Outcome, cpu_seconds: float | None = None) -> p.Outcome:
        """An outcome that went over a limit, said as such: which limit, its value, what was used."""
        if outcome.ok:
            return outcome
        if outcome.error_type == "MemoryError" and self.data_limit_mib is not None:
            held = _status_mib("VmData")
            peak = _status_mib("VmHWM")
            return p.Outcome(
                ok=False, error_type="MemoryLimitExceeded", retryable=False, replace_worker=True,
                duration_ms=outcome.duration_ms, traceback=outcome.traceback,
                error=(f"transition {request.transition!r} went over its memory limit: memory="
                       f"{self.profile.memory_mib} MiB on top of the {self.baseline_mib:.0f} MiB its worker "
                       f"held at boot (RLIMIT_DATA {self.data_limit_mib:.0f} MiB); an allocation failed "
                       f"({outcome.error}) with {held:.0f} MiB in use, peak resident {peak:.0f} MiB. "
                       "Raise memory= on the transition, or use less"),
            )
        if outcome.error_type == "CpuTimeExceeded":
            return p.Outcome(
                ok=False, error_type="CpuTimeExceeded", retryable=False, replace_worker=True,
                duration_ms=outcome.duration_ms, traceback=outcome.traceback,
                error=(f"transition {request.transition!r} used more than its {cpu_seconds:g}s of CPU "
                       "time (PETRIBUS_SANDBOX_CPU_SECONDS, or timeout= times cpu= when shorter) and was "
                       "stopped; raise timeout= or the setting if it needs longer"),
            )
        if outcome.error_type in ("OSError", "FileNotFoundError") and "Too many open files" in outcome.error:
            return p.Outcome(
                ok=False, error_type="OpenFilesExceeded", retryable=False, replace_worker=True,
                duration_ms=outcome.duration_ms, traceback=outcome.traceback,
                error=(f"transition {request.transition!r} went over the open-files limit of its sandbox "
                       f"({self.profile.max_files}, PETRIBUS_SANDBOX_MAX_FILES): {outcome.error}. Close "
                       "files when done, or raise the setting"),
            )
        return outcome

    def _link_volumes(self, folder: str) -> None:
        for host_dir, mount_path in self.profile.volumes:
            if os.path.isabs(mount_path):
                continue  # refused before any run (firing.py): a process cannot mount at an absolute path
            link = os.path.normpath(os.path.join(folder, mount_path))
            if not link.startswith(folder + os.sep) or os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(host_dir, link)


_sigxcpu_spent = False  # the handler ran and left SIGXCPU at its default action


def _install_sigxcpu() -> None:
    global _sigxcpu_spent
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    _sigxcpu_spent = False


def _on_sigxcpu(signum: int, frame: Any) -> None:
    # The next SIGXCPU (a second later, if the run carries on) takes the default action: the worker dies.
    global _sigxcpu_spent
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    _sigxcpu_spent = True
    raise CpuTimeExceeded("the run used up its CPU time")


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` size (VmData, VmHWM, ...) in MiB; 0 where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def hidden_values(secrets: Iterable[tuple[str, str]], environ: Mapping[str, str],
                  passed: Iterable[str]) -> list[str]:
    """What a worker's tracebacks must never show: its secrets' values, and the values of the variables
    passed into its sandbox (an operator passes credentials that way too), but not those shorter than
    ``PASSED_MASKED_FROM`` characters, which would garble the text ("1", "en")."""
    names = set(passed)
    return [*(value for _, value in secrets),
            *(v for n, v in environ.items() if n in names and len(v) >= PASSED_MASKED_FROM)]
