"""The process sandbox: limits from each transition, enforced; a scrubbed environment; private folders.

Real executor processes (``python -m petribus_executor``), a real nats-server and the scheduler; the
transitions in ``tests/apps/sandbox.py`` report what they see from inside, or go over a limit.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from petribus.settings import Settings
from petribus_executor.placement import Host, Placement
from petribus_executor.sandbox import ENV_ALLOWED, Profile

from .conftest import app
from .harness import Stack
from .test_executor import ExecutorProcess, SessionLog, spawn_executor  # noqa: F401  (a fixture)

SANDBOX = app("sandbox")
LEAKY = "sk-must-never-reach-a-transition-4f1e"


@pytest.fixture
def executor(settings: Settings, spawn_executor: Callable[..., Any]) -> Callable[..., Any]:  # noqa: F811
    """Start an executor for the sandbox app with ``env`` added; it has a model key it must not hand on."""

    async def start(**env: str) -> ExecutorProcess:
        ex = await spawn_executor(settings, [SANDBOX], OPENAI_API_KEY=LEAKY, PETRIBUS_SANDBOX_MAX_FILES="64", **env)
        async with asyncio.timeout(60):
            await ex.ready.wait()
        return ex

    return start


async def test_a_firing_over_its_memory_fails_clearly_its_marker_returns_and_a_sibling_completes(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    ex = await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        hog, sip = await log.add_many("Meal", [{"mib": 256}, {"mib": 8}])  # 4x its memory=64, and a sip
        failed = (await log.until("transition_failed"))[0]
        done = (await log.until("transition_completed"))[0]
        # The worker it broke is not used again; the next meal runs in a fresh one.
        await log.add("Meal", mib=4)
        await log.until("transition_completed", count=2)
        state = await log.state()

    assert failed.final and not failed.retryable and failed.error_type == "MemoryLimitExceeded"
    assert "memory=64 MiB" in failed.error and "Raise memory=" in failed.error, failed.error
    assert [m.id for m in state.marking()["Meal"]] == [hog.id]  # it came back to its place
    assert done.outputs[0].data["mib"] == 8
    assert sorted(m.data["mib"] for m in state.marking()["Fed"]) == [4, 8]
    assert any("worker retired" in line for line in ex.lines)


async def test_a_transition_sees_only_its_sandbox(settings: Settings, nc: Any, executor: Callable[..., Any]) -> None:
    await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Probe")
        seen = (await log.until("transition_completed"))[0].outputs[0].data

    env = seen["env"]
    assert LEAKY not in str(env) and "OPENAI_API_KEY" not in env
    assert not [k for k in env if k.startswith(("PETRIBUS_", "NATS"))], env
    assert set(env) <= {*ENV_ALLOWED, "HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES"} | {k for k in env if k.startswith("LC_")}
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # it asked for no GPU: it sees none
    # Not even the process it was forked from holds the key.
    assert LEAKY not in seen["parent_env"] and not seen["parent_env"].startswith("unreadable"), seen["parent_env"]
    # Its own folder, its working directory and temp folder while it ran, emptied once it returned.
    assert seen["cwd"] == seen["workdir"] == seen["tmp"] and seen["cwd_existed"]
    assert seen["cwd"].startswith(env["HOME"] + os.sep) and os.path.basename(env["HOME"]).startswith("petribus-")
    assert not os.path.exists(os.path.join(seen["cwd"], "scratch.txt"))
    # Its limits: a data segment bounded (memory=256), 64 open files.
    assert 256 * 2**20 < seen["data_limit"] < 2**40 and seen["nofile"] == 64
    assert not seen["imported_here"]  # the app was preloaded in the fork server


async def test_with_preloading_off_each_worker_imports_the_app_itself(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor(PETRIBUS_PRELOAD="0")
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Probe")
        seen = (await log.until("transition_completed"))[0].outputs[0].data
    # So what an app does at import (initialising CUDA, say) happens in a worker, never in the fork server.
    assert seen["imported_here"]


async def test_send_file_refuses_paths_and_symlinks_outside_the_firings_folder(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Escape", path="/etc/passwd")
        done = (await log.until("transition_completed"))[0]
        files = log.of("output_file")

    refused = {m.data["what"]: m.data["message"] for m in done.outputs if m.location == "Refused"}
    assert set(refused) == {"path", "symlink"}
    assert "'/etc/passwd') refused" in refused["path"] and "its own folder" in refused["path"]
    assert "'innocent.txt') refused" in refused["symlink"] and "resolves to '/etc/passwd'" in refused["symlink"]
    assert [f.name for f in files] == ["mine.txt"]  # what it made in its folder went out; nothing else


async def test_open_files_over_the_limit_fail_the_firing_with_the_limit(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Hoard", files=200)
        failed = (await log.until("transition_failed"))[0]
        await log.add("Hoard", files=10)
        done = (await log.until("transition_completed"))[0]
    assert failed.error_type == "OpenFilesExceeded" and "(64, PETRIBUS_SANDBOX_MAX_FILES)" in failed.error
    assert done.outputs[0].data["mib"] == 10


async def test_a_def_firing_past_its_cpu_time_is_stopped(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor(PETRIBUS_SANDBOX_CPU_SECONDS="1")
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Spin")
        failed = (await log.until("transition_failed", timeout=60))[0]
    assert failed.final and failed.error_type == "CpuTimeExceeded", failed
    assert "more than its 1s of CPU time" in failed.error


async def test_transitions_with_different_limits_never_share_a_worker(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        pids: dict[str, list[int]] = {"look": [], "eat": []}
        for n, (location, data) in enumerate([("Probe", {}), ("Meal", {"mib": 1}), ("Probe", {}),
                                              ("Meal", {"mib": 1})]):
            await log.add(location, **data)
            done = (await log.until("transition_completed", count=n + 1))[n]
            pids[done.transition].append(done.outputs[0].data["pid"])
    assert not set(pids["look"]) & set(pids["eat"]), pids  # memory=256 and memory=64: never one process


def test_placement_keeps_keys_apart_and_evicts_idle_workers_of_other_keys() -> None:
    small, big = Profile(memory_mib=64), Profile(memory_mib=512)
    evicted: list[Host] = []
    placed: Placement[Host] = Placement(2, 4, on_evict=evicted.append)
    a, b = Host(small), Host(small)
    for host in (a, b):
        placed.reserve_start(small)
        placed.add(host)
    assert placed.take(asynchronous=False, key=big) is None  # no worker of its profile
    held = placed.take(asynchronous=False, key=small)
    assert held is not None and held.host.key == small
    # Full, but the other small worker is idle: it makes room for a big one.
    assert placed.reserve_start(big) and evicted == [b] and placed.hosts == [a]
    c = Host(big)
    placed.add(c)
    assert placed.take(asynchronous=True, key=big).host is c  # type: ignore[union-attr]
    assert not placed.reserve_start(small)  # nothing idle left to evict: a is busy, c holds a lease


def test_the_model_key_reaches_no_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """``petribus serve``'s executor child and compose.yml's executors get no model key to hand on."""
    from pathlib import Path

    from petribus.child import child_environ

    monkeypatch.setenv("OPENAI_API_KEY", LEAKY)
    assert "OPENAI_API_KEY" not in child_environ() and LEAKY not in child_environ().values()
    compose = (Path(__file__).parent.parent / "compose.yml").read_text()
    services = compose.split("\nservices:\n", 1)[1]
    assert len([line for line in services.splitlines() if "OPENAI_API_KEY" in line]) == 1  # the llm's
    llm_block = services.split("\n  llm:\n", 1)[1].split("\n  gateway:\n", 1)[0]
    assert "OPENAI_API_KEY" in llm_block


async def test_a_volume_is_shared_by_sessions_and_its_files_may_be_sent(
    settings: Settings, nc: Any, executor: Callable[..., Any], tmp_path: Any
) -> None:
    volumes = tmp_path / "volumes"
    await executor(PETRIBUS_VOLUMES_DIR=str(volumes))
    async with Stack(settings, [SANDBOX], parts=("scheduler",)):
        for text in ("first", "second"):  # one session each
            async with SessionLog(nc, "sandbox") as log:
                await log.add("Note", text=text)
                notes = (await log.until("transition_completed"))[0].outputs[0].data["texts"]
                assert [f.name for f in await log.until("output_file")] == [f"{text}.txt"]
    assert notes == ["first", "second"]  # the second session saw the first one's note
    assert sorted(p.name for p in (volumes / "notebook").iterdir()) == ["first.txt", "second.txt"]


async def test_a_firing_queued_past_its_ttl_expires_without_running(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        late = await log.add("Late")
        await log.until("transition_fired")
        await asyncio.sleep(1.5)  # no executor yet: the work waits in PB_WORK past its ttl of 1s
        await executor()
        failed = (await log.until("transition_failed"))[0]
        state = await log.state()
    assert failed.final and failed.error_type == "FiringExpired" and "ttl allows" in failed.error
    assert not log.of("transition_started")  # it never ran
    assert [m.id for m in state.marking()["Late"]] == [late.id]


async def test_each_outcome_is_posted_to_the_callback_url(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        received.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        arrived.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await executor(SANDBOX_HOOK_URL=f"http://127.0.0.1:{port}/hook")
        async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
            await log.add_many("Hook", [{"fail": False}, {"fail": True}])
            await log.until("transition_completed")
            await log.until("transition_failed")
            async with asyncio.timeout(30):
                while len(received) < 2:
                    arrived.clear()
                    await arrived.wait()
    bodies = sorted((r.get("data", r) for r in received), key=lambda b: b["status"])
    assert [b["status"] for b in bodies] == ["completed", "failed"]
    assert bodies[0]["outputs"]["Fed"][0]["mib"] == 0 and bodies[0]["session_id"] == log.session_id
    assert "asked to fail" in bodies[1]["error"]["message"] and bodies[1]["error"]["code"] == "ValueError"


async def test_an_async_firing_over_its_memory_fails_alone_and_its_shared_worker_is_retired(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    ex = await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        await log.add("Nap", seconds=2.0)
        await log.until("transition_started")
        await log.add("Gulp", mib=256)  # shares the napping worker (same profile), and goes over its memory
        failed = (await log.until("transition_failed"))[0]
        napped = (await log.until("transition_completed", transition="nap"))[0]
        await log.add("Nap", seconds=0.0)
        again = (await log.until("transition_completed", transition="nap", count=2))[1]

    assert failed.transition == "gulp" and failed.error_type == "MemoryLimitExceeded", failed
    pid = napped.outputs[0].data["pid"]
    # The neighbour finished on the worker the gulp broke; that worker then left, and the next nap ran elsewhere.
    assert any("worker retired" in line and f"pid={pid}" in line for line in ex.lines), ex.lines[-5:]
    assert again.outputs[0].data["pid"] != pid


async def test_python_packages_missing_from_a_process_sandbox_fail_the_firing_saying_which(
    settings: Settings, nc: Any, executor: Callable[..., Any]
) -> None:
    await executor()
    async with Stack(settings, [SANDBOX], parts=("scheduler",)), SessionLog(nc, "sandbox") as log:
        needy = await log.add("Needy")
        failed = (await log.until("transition_failed"))[0]
        state = await log.state()
    assert failed.final and "['petribus-no-such-package>=1']" in failed.error and "sandbox='container'" in failed.error
    assert not log.of("transition_started")
    assert [m.id for m in state.marking()["Needy"]] == [needy.id]


def test_a_runner_driven_outside_a_worker_never_limits_its_process() -> None:
    """Only a worker process confines itself: a Runner (or Sandbox) used elsewhere leaves the process be."""
    import resource

    from petribus_executor.limits import Sandbox

    before = (resource.getrlimit(resource.RLIMIT_DATA), resource.getrlimit(resource.RLIMIT_CPU), os.getcwd())
    sandbox = Sandbox(None)
    sandbox.limit_memory()
    sandbox.begin_sync()
    sandbox.arm_cpu(1.0)
    sandbox.disarm_cpu()
    sandbox.end_sync()
    sandbox.exit()
    assert (resource.getrlimit(resource.RLIMIT_DATA), resource.getrlimit(resource.RLIMIT_CPU), os.getcwd()) == before


def test_a_worker_cannot_widen_where_files_may_be_sent_from() -> None:
    """The folder a file call names is trusted only if it is the run's own: a worker that says "/" (or
    another run's folder) gets no folder at all, and every path is then refused."""
    from types import SimpleNamespace

    from petribus.errors import PetribusError
    from petribus_executor.interact import _inside
    from petribus_executor.pool import WorkerPool

    worker = SimpleNamespace(root="/tmp/petribus-worker-x", host_path=lambda path: path,
                             profile=Profile(volumes=(("/srv/volumes/notes", "./notes"),)))
    job = SimpleNamespace(id=7)
    own = WorkerPool._files_payload(worker, job, {"dir": "/tmp/petribus-worker-x/run-7", "path": "a.txt"})
    assert own["host_dir"] == "/tmp/petribus-worker-x/run-7" and own["allowed"] == ["/srv/volumes/notes"]
    for claimed in ("/", "/tmp/petribus-worker-x", "/tmp/petribus-worker-x/run-8"):
        payload = WorkerPool._files_payload(worker, job, {"dir": claimed, "path": "/etc/passwd"})
        assert payload["host_dir"] is None
        with pytest.raises(PetribusError, match="refused"):
            _inside(payload["path"], "/etc/passwd", payload["host_dir"], ())


async def test_a_worker_between_def_and_async_runs_hands_each_its_own_folder_and_cpu_bound() -> None:
    """A def run's CPU bound and folder stay set in its worker after it returns (limits.py: setting and
    lifting them around every run was most of a no-op's cost): each def run still starts in its own
    empty folder under a bound of its own, wherever the last one left the process, and an async run on
    the same worker runs in the worker's folder with no bound at all."""
    import resource
    import uuid

    from petribus_executor import protocol as p
    from petribus_executor.pool import WorkerPool

    def request(transition: str, location: str, cpu_seconds: float | None, **data: Any) -> p.Request:
        return p.Request(bot="worker_state", session_id="s", firing_id=uuid.uuid4().hex, transition=transition,
                         attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, location, data),),
                         cpu_seconds=cpu_seconds)

    async def no_calls(kind: str, payload: Any, timeout: float | None) -> Any:
        raise AssertionError(f"unexpected context.{kind}")

    async def state(req: p.Request) -> dict[str, Any]:
        outcome = await pool.run(req, on_event=lambda kind, payload: None, on_call=no_calls, timeout=30,
                                 asynchronous=req.transition == "look_async")
        assert outcome.ok, (outcome.error_type, outcome.error, outcome.traceback)
        [(location, data)] = outcome.outputs
        assert location == "State"
        return data

    pool = WorkerPool([app("worker_state")], 1)  # one worker: every run below is in the same process
    await pool.start()
    try:
        first = await state(request("look", "Look", 50.0, leave_file=True, wander=True))
        second = await state(request("look", "Look", 50.0))
        shared = await state(request("look_async", "AsyncLook", None))
        third = await state(request("look", "Look", None))
        fourth = await state(request("look", "Look", 50.0))
    finally:
        await pool.close()

    assert len({s["pid"] for s in (first, second, shared, third, fourth)}) == 1
    run_dir = first["cwd"]
    root = os.path.dirname(run_dir)
    assert os.path.basename(run_dir) == "run" and first["tmpdir"] == run_dir and first["found"] == []
    # The first run chdir'd to / and left a file: the second starts back in its folder, emptied.
    assert second["cwd"] == run_dir and second["found"] == [] and second["tmpdir"] == run_dir
    unbounded = resource.RLIM_INFINITY if first["cpu_hard"] == resource.RLIM_INFINITY else first["cpu_hard"]
    for bounded in (first, second, fourth):
        assert bounded["cpu_soft"] != unbounded and bounded["cpu_soft"] >= 50, bounded
    # After two bounded def runs, the async run shares the process: the worker's folder, no bound.
    assert shared["cwd"] == root and shared["tmpdir"] == os.path.join(root, ".tmp"), shared
    assert shared["cpu_soft"] == unbounded, shared
    # A def run with no bound gets none, though the run before it had one; the next bounded one is bounded.
    assert third["cwd"] == run_dir and third["cpu_soft"] == unbounded, third
    assert fourth["cwd"] == run_dir and fourth["found"] == [], fourth
