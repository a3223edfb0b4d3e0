"""Pools and placement: the device allocator, the executor registry, GET /pools, and a missing pool.

The allocator is tested alone (it is plain asyncio); everything else against a real nats-server with
real services (executors in-process or as processes).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import httpx
import pytest

from petribus import subjects
from petribus.errors import PetribusError
from petribus.registry import ExecutorInfo, Registry, Reporter, start_hint
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_executor.app import Executor, serve_pools
from petribus_gateway.pools import Pools, summary
from petribus_executor.devices import (
    BadGpuSpec,
    DeviceAllocator,
    NotEnoughDevices,
    from_nvidia_smi,
    parse_gpus,
)

from .conftest import app
from .harness import Stack
from .test_executor import SessionLog

GPU = app("gpu")
COUNTER = app("counter")


# ---------------------------------------------------------------- devices


def test_gpus_are_simulated_by_a_count_or_a_type_and_count() -> None:
    assert [d.id for d in parse_gpus("2")] == ["0", "1"]
    assert {d.type for d in parse_gpus("A10G:3")} == {"A10G"} and len(parse_gpus("a10g:3")) == 3
    assert parse_gpus("0") == []
    for bad in ("two", "A10G:", ":2", "A 10:1", "-1"):
        with pytest.raises(BadGpuSpec, match="--gpus"):
            parse_gpus(bad)


def test_nvidia_smi_output_becomes_devices_with_beams_type_names() -> None:
    out = ("0, GPU-1c2d, NVIDIA A100-SXM4-80GB, 81920 MiB\n"
           "1, GPU-3e4f, NVIDIA H100 80GB HBM3, 81559 MiB\n"
           "2, GPU-5a6b, Tesla T4, 15360 MiB\n")
    devices = from_nvidia_smi(out)
    assert [(d.id, d.type, d.uuid, d.memory_mib) for d in devices] == [
        ("0", "A100-80", "GPU-1c2d", 81920), ("1", "H100", "GPU-3e4f", 81559), ("2", "T4", "GPU-5a6b", 15360)]
    assert DeviceAllocator(devices).types == {"A100-80", "A100", "H100", "T4"}


async def test_devices_go_to_one_holder_each_and_waiters_are_served_in_order() -> None:
    alloc = DeviceAllocator(parse_gpus("2"))
    first, second = await alloc.acquire(1), await alloc.acquire(1)
    assert {first, second} == {("0",), ("1",)} and alloc.free == 0
    third = asyncio.create_task(alloc.acquire(1))
    both = asyncio.create_task(alloc.acquire(2))
    await asyncio.sleep(0)
    assert not third.done() and not both.done()
    alloc.release(first)
    assert await third == first  # the one freed, to the first in line
    await asyncio.sleep(0)
    assert not both.done()
    alloc.release(second)
    await asyncio.sleep(0)
    assert not both.done()  # one device is free, and it wants two
    alloc.release(await third)
    assert sorted(await both) == ["0", "1"] and alloc.free == 0
    alloc.release(("0",))
    with pytest.raises(PetribusError, match="released twice"):
        alloc.release(("0",))


async def test_a_request_for_two_devices_is_not_overtaken_by_later_requests_for_one() -> None:
    alloc = DeviceAllocator(parse_gpus("2"))
    held = await alloc.acquire(1)
    big = asyncio.create_task(alloc.acquire(2))
    await asyncio.sleep(0)
    small = asyncio.create_task(alloc.acquire(1))
    await asyncio.sleep(0)
    assert not big.done() and not small.done() and alloc.free == 1  # free, but not to the one behind
    alloc.release(held)
    assert len(await big) == 2
    await asyncio.sleep(0)
    assert not small.done()
    alloc.release(big.result())
    assert len(await small) == 1


async def test_a_waiter_that_gives_up_lets_the_ones_behind_it_through() -> None:
    alloc = DeviceAllocator(parse_gpus("2"))
    held = await alloc.acquire(1)
    big = asyncio.create_task(alloc.acquire(2))
    await asyncio.sleep(0)
    small = asyncio.create_task(alloc.acquire(1))
    await asyncio.sleep(0)
    big.cancel()
    assert await small == ("1",)
    alloc.release(held)
    alloc.release(small.result())
    assert alloc.free == 2


async def test_many_holders_never_share_a_device() -> None:
    alloc = DeviceAllocator(parse_gpus("3"))
    holding: set[str] = set()
    most = 0

    async def firing(i: int) -> None:
        nonlocal most
        devices = await alloc.acquire(1 + i % 3)
        assert not holding & set(devices)
        holding.update(devices)
        most = max(most, len(holding))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        holding.difference_update(devices)
        alloc.release(devices)

    await asyncio.gather(*(firing(i) for i in range(300)))
    assert alloc.free == 3 and most == 3


async def test_more_devices_than_the_executor_has_fails_at_once() -> None:
    with pytest.raises(NotEnoughDevices, match="wants 3 GPU.*has 2"):
        await DeviceAllocator(parse_gpus("2")).acquire(3)
    assert await DeviceAllocator([]).acquire(0) == ()


# ---------------------------------------------------------------- which pools an executor serves


def test_an_executor_serves_cpu_and_with_gpus_also_the_gpu_pools_of_its_types(settings: Settings) -> None:
    assert serve_pools(settings, None, DeviceAllocator([])) == ["cpu"]
    assert serve_pools(settings, None, DeviceAllocator(parse_gpus("2"))) == ["cpu", "gpu"]
    assert serve_pools(settings, None, DeviceAllocator(parse_gpus("A10G:1"))) == ["cpu", "gpu", "gpu-a10g"]
    assert serve_pools(settings, ["gpu", "gpu-a10g", "gpu"], DeviceAllocator(parse_gpus("A10G:1"))) == [
        "gpu", "gpu-a10g"]
    assert serve_pools(settings.model_copy(update={"pool": "batch,cpu"}), None, DeviceAllocator([])) == [
        "batch", "cpu"]


def test_an_executor_refuses_a_gpu_pool_it_has_no_devices_for(settings: Settings) -> None:
    with pytest.raises(PetribusError, match="cannot serve pool 'gpu'.*no GPUs.*--gpus"):
        serve_pools(settings, ["cpu", "gpu"], DeviceAllocator([]))
    with pytest.raises(PetribusError, match="cannot serve pool 'gpu-a10g': it has \\['H100'\\] GPUs, not A10G"):
        serve_pools(settings, ["gpu-a10g"], DeviceAllocator(parse_gpus("H100:2")))
    with pytest.raises(PetribusError, match="not allowed"):
        serve_pools(settings, ["gpu.a10g"], DeviceAllocator(parse_gpus("1")))


async def test_the_executor_command_refuses_a_gpu_pool_without_gpus_and_says_what_to_do(
    settings: Settings
) -> None:
    env = {**os.environ, "PETRIBUS_GPUS": "0"}  # no GPU, even where nvidia-smi would find some
    for argv in ([sys.executable, "-m", "petribus_executor", "--nats-url", settings.nats_url, "--pool", "gpu", GPU],
                 [sys.executable, "-m", "petribus_cli", "executor", GPU, "--nats-url", settings.nats_url,
                  "--pool", "cpu", "--pool", "gpu"]):
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await proc.communicate()
        assert proc.returncode == 2, err.decode()
        said = " ".join(err.decode().split())
        assert "cannot serve pool 'gpu'" in said and "no GPUs" in said and "--gpus N" in said
        assert "executor started" not in said


# ---------------------------------------------------------------- the registry


async def test_an_executor_reports_pools_labels_and_devices_and_leaves_the_registry_when_it_stops(
    settings: Settings, nc: Any
) -> None:
    registry = Registry(nc.jetstream())
    assert await registry.list() == []
    ex = Executor(settings.model_copy(update={"gpus": "A10G:2", "labels": "zone=eu,tier=gold"}), [GPU],
                  labels={"team": "ml"})
    await ex.start()
    try:
        [info] = await registry.list()
        assert info.instance == ex.instance and info.pools == ["cpu", "gpu", "gpu-a10g"]
        assert info.labels == {"zone": "eu", "tier": "gold", "team": "ml"}
        assert [(d.id, d.type, d.busy) for d in info.devices] == [("0", "A10G", False), ("1", "A10G", False)]
        assert info.workers == settings.workers and info.running == 0 and info.pid == os.getpid()
        assert info.load["gpu"].capacity == 2 and info.load["cpu"].capacity == settings.executor_inflight
        assert info.version and info.host
        # Busy devices show as busy at the next report.
        held = await ex.devices.acquire(1)
        await ex.reporter.report()
        [info] = await registry.list()
        assert [d.busy for d in info.devices] == [True, False] and info.free_devices == 1
        ex.devices.release(held)
    finally:
        await ex.stop(timeout=5)
    assert await registry.list() == []


async def test_an_executor_that_stops_reporting_drops_out_of_the_registry(nc: Any) -> None:
    js = nc.jetstream()
    joined, left = asyncio.Event(), asyncio.Event()
    view = await Registry(js, heartbeat_s=0.3).watch(
        on_change=lambda info, key: (joined if info is not None else left).set())
    try:
        info = ExecutorInfo(instance="executor-gpu@gone:1.abc", pools=["gpu"], workers=1)
        reporter = Reporter(js, lambda: info, heartbeat_s=0.3)  # reports once, never again: a kill -9
        await reporter.start()
        async with asyncio.timeout(10):
            await joined.wait()
        assert [e.instance for e in view.executors()] == [info.instance] and view.serves("gpu")
        assert [e.instance for e in await Registry(js).list()] == [info.instance]
        async with asyncio.timeout(30):
            await left.wait()  # the bucket's TTL removed it
        assert view.executors() == [] and not view.serves("gpu")
        assert await Registry(js).list() == []
    finally:
        await view.stop()


# ---------------------------------------------------------------- GET /pools


async def test_get_pools_shows_each_pool_with_executors_devices_capacity_and_queue(
    settings: Settings, nc: Any
) -> None:
    js = nc.jetstream()
    # Work queued for a pool nobody ever served: no consumer, just items.
    for i in range(3):
        item = WorkItem(bot="gpu", session_id=f"s{i}", firing_id=f"f{i}", transition="train", inputs=[], fired_seq=1)
        await js.publish(item.subject("gpu-a10g"), item.model_dump_json().encode())
    # A pool whose executor left: its consumer stays, with what was queued after.
    batch = Executor(settings.model_copy(update={"gpus": "0"}), [COUNTER], pools=["batch"])
    await batch.start()
    await batch.stop(timeout=5)
    for i in range(2):
        item = WorkItem(bot="counter", session_id=f"b{i}", firing_id=f"g{i}", transition="work", inputs=[], fired_seq=1)
        await js.publish(item.subject("batch"), item.model_dump_json().encode())

    gpu = Executor(settings.model_copy(update={"gpus": "2"}), [GPU], pools=["gpu"], labels={"rack": "7"})
    cpu = Executor(settings.model_copy(update={"gpus": "0"}), [GPU, COUNTER])
    async with Stack(settings, [GPU, COUNTER], parts=("gateway",)) as stack:
        await gpu.start()
        await cpu.start()
        try:
            async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
                resp = await http.get("/pools")
        finally:
            await cpu.stop(timeout=5)
            await gpu.stop(timeout=5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    pools = {p["name"]: p for p in body["pools"]}
    assert set(pools) == {"cpu", "gpu", "gpu-a10g", "batch", "tuning"}
    # Needed by a served bot's transition, no executor, nothing queued: still listed, with the hint.
    assert pools["tuning"]["executors"] == [] and pools["tuning"]["queued"] == 0
    assert pools["tuning"]["transitions"] == ["gpu.tune"] and "--pool tuning" in pools["tuning"]["hint"]
    assert pools["gpu"]["executors"] == [gpu.instance] and pools["gpu"]["gpu"] is True
    assert pools["gpu"]["devices"] == {"total": 2, "free": 2, "types": []}
    assert pools["gpu"]["capacity"] == 2 and pools["gpu"]["free"] == 2 and pools["gpu"]["queued"] == 0
    assert pools["gpu"]["transitions"] == ["gpu.train"] and pools["gpu"]["hint"] is None
    assert pools["cpu"]["executors"] == [cpu.instance] and pools["cpu"]["devices"]["total"] == 0
    assert pools["cpu"]["capacity"] == settings.executor_inflight
    assert pools["cpu"]["transitions"] == ["counter.join", "counter.work"]
    assert pools["gpu-a10g"]["executors"] == [] and pools["gpu-a10g"]["queued"] == 3
    assert pools["gpu-a10g"]["pending"] == 3 and pools["gpu-a10g"]["capacity"] == 0
    assert pools["gpu-a10g"]["hint"] == start_hint("gpu-a10g")
    assert pools["batch"]["executors"] == [] and pools["batch"]["queued"] == 2
    assert summary(Pools.model_validate(body)) == (
        "5 pools, 2 executors; waiting with no executor: batch (2), gpu-a10g (3)")
    executors = {e["instance"]: e for e in body["executors"]}
    assert set(executors) == {gpu.instance, cpu.instance}
    assert executors[gpu.instance]["labels"] == {"rack": "7"}
    assert [d["id"] for d in executors[gpu.instance]["devices"]] == ["0", "1"]


# ---------------------------------------------------------------- a pool nobody serves


async def _settled(js: Any) -> None:
    """Until the scheduler has acked every event it was given: its decisions (and checks) are done."""
    async with asyncio.timeout(30):
        while True:
            info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)


async def _lease_checks(scheduler: Any, n: int) -> None:
    """Until the scheduler has checked its sessions' leases ``n`` more times."""
    leases = scheduler.leases
    renew, done = leases.renew, asyncio.Event()
    checks = 0

    async def counted(lease: Any) -> Any:
        nonlocal checks
        due = await renew(lease)
        checks += 1
        if checks >= n:
            done.set()
        return due

    leases.renew = counted
    try:
        async with asyncio.timeout(30):
            await done.wait()
    finally:
        leases.renew = renew


async def test_work_for_a_pool_with_no_executor_waits_the_session_is_told_once_and_it_runs_when_one_joins(
    settings: Settings, nc: Any
) -> None:
    js = nc.jetstream()
    # Many lease checks while the pool is missing, and a de-duplication window they outlast: what keeps
    # the error single is the scheduler itself, not JetStream dropping a repeat within its window.
    # A short grace before the session is told (the registry's TTL, 3 heartbeats; at least 1 s).
    settings = settings.model_copy(update={"gpus": "0", "work_lease_s": 0.5, "duplicate_window_s": 1.0,
                                           "registry_heartbeat_s": 0.2})
    async with SessionLog(nc, "gpu") as log:
        cpu_only = Executor(settings, [GPU], pools=["cpu"])
        await cpu_only.start()
        try:
            async with Stack(settings, [GPU], parts=("scheduler",)) as first:
                await log.add("Job", n=1)
                [told] = await log.until("error", code="pool_missing")
                await log.add("Job", n=2)  # a second firing for the same missing pool
                await log.until("transition_fired", count=2)
                await _settled(js)
                await _lease_checks(first.services["scheduler"], 3)
                await first.services["scheduler"].missing.idle()
            # Another scheduler (or this one restarted) does not say it again either.
            async with Stack(settings, [GPU], parts=("scheduler",)) as again:
                await log.add("Job", n=3)
                await log.until("transition_fired", count=3)
                await _settled(js)
                await _lease_checks(again.services["scheduler"], 3)  # they look at every waiting firing
                await again.services["scheduler"].missing.idle()
                # The work items wait in PB_WORK for an executor of the pool.
                waiting = await js.stream_info(subjects.WORK_STREAM,
                                               subjects_filter=subjects.session_work("gpu", log.session_id))
                assert sorted(s.split(".")[2] for s in waiting.state.subjects) == ["gpu"] * 3
                assert not log.of("transition_started")
                gpu = Executor(settings.model_copy(update={"gpus": "1"}), [GPU], pools=["gpu"])
                await gpu.start()
                try:
                    done = await log.until("transition_completed", count=3)
                finally:
                    await gpu.stop(timeout=5)
        finally:
            await cpu_only.stop(timeout=5)
    assert told.transition == "train"
    assert "pool 'gpu'" in told.message and "petribus executor APP --pool gpu" in told.message
    assert len(log.of("error")) == 1
    assert sorted(c.outputs[0].data["n"] for c in done) == [1, 2, 3]
    assert {s.executor for s in log.of("transition_started")} == {gpu.instance}
