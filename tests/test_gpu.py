"""GPU firings on an executor with two (simulated) devices: each firing has a device to itself, and the
devices, not the work queue, bound how many run at once.

The executor runs as its own process (``python -m petribus_executor --gpus 2``); the transitions record
the ``CUDA_VISIBLE_DEVICES`` they saw and when they ran, and wait for a peer (``tests/apps/gpu.py``), so
two that may run together are seen to.
"""

from __future__ import annotations

import asyncio
import inspect
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from petribus.settings import Settings
from petribus_executor.firing import FiringRunner

from .conftest import app
from .harness import Stack
from .test_executor import ExecutorProcess, SessionLog

GPU = app("gpu")

pytestmark = pytest.mark.skipif(
    "devices" not in inspect.signature(FiringRunner).parameters,
    reason="FiringRunner(devices=) is not there yet: firings get no devices to hold",
)


def _most_at_once(runs: list[Any]) -> int:
    edges = sorted([(r.start, 1) for r in runs] + [(r.end, -1) for r in runs], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_gpu_firings_each_get_their_own_device_and_at_most_two_run_at_once_on_two_devices(
    settings: Settings, nc: Any, tmp_path: Path
) -> None:
    meet = tmp_path / "meet"
    meet.mkdir()
    # Workers enough for all six, and the tuning pool takes as many items as a CPU pool would: only
    # the two devices can hold them back.
    ex = await ExecutorProcess.start(settings, [GPU], "--workers", "6", "--gpus", "2", "--pool", "gpu",
                                     "--pool", "tuning")
    try:
        async with asyncio.timeout(60):
            await ex.ready.wait()
        async with Stack(settings, [GPU], parts=("scheduler",)), SessionLog(nc, "gpu") as log:
            for n in range(3):
                await log.add("Job", n=n, meet=str(meet), peers=2)
                await log.add("TuneJob", n=10 + n, meet=str(meet), peers=2)
            done = await log.until("transition_completed", count=6, timeout=90)
    finally:
        await ex.kill()
    runs = [SimpleNamespace(**c.outputs[0].data) for c in done]
    assert sorted(r.n for r in runs) == [0, 1, 2, 10, 11, 12]
    assert {r.devices for r in runs} <= {"0", "1"}, [r.devices for r in runs]
    overlapping = [(a, b) for a, b in combinations(runs, 2) if a.start < b.end and b.start < a.end]
    assert overlapping, "no two GPU firings ever ran at once"
    assert all(a.devices != b.devices for a, b in overlapping), [(a.devices, b.devices) for a, b in overlapping]
    assert _most_at_once(runs) == 2
    assert all(r.met >= 2 for r in runs)  # each met a peer, none waited out its deadline
