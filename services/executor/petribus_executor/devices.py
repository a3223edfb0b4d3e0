"""This executor's GPUs, and who holds which: each GPU firing has its devices to itself.

Devices are found once at start: ``PETRIBUS_GPUS`` / ``--gpus`` (a count, ``2``, or a type and a count,
``A10G:2``) simulates them, with ids ``"0"``, ``"1"``, ...; otherwise ``nvidia-smi`` is asked, and a
machine without it has none. A device id is what ``CUDA_VISIBLE_DEVICES`` takes (the index).

``DeviceAllocator`` hands devices out FIFO: a firing asks for ``count`` devices and waits until that
many are free *and* every firing that asked before it has been served, so a firing that wants two
devices is not starved by a stream of firings that want one. A device is never held by two firings.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections import deque
from dataclasses import dataclass
from typing import Any

from petribus.errors import PetribusError

NVIDIA_SMI_TIMEOUT_S = 10.0
_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}


class NotEnoughDevices(PetribusError, ValueError):
    """A firing wants more GPUs than this executor has at all: waiting would never end."""

    code = "not_enough_gpus"
    retryable = True  # another executor of the pool may have enough


class BadGpuSpec(PetribusError, ValueError):
    code = "bad_gpus"


@dataclass(frozen=True)
class Device:
    id: str  # what CUDA_VISIBLE_DEVICES takes
    type: str | None = None  # Beam's type name ("A10G", "H100"), None when unknown
    name: str | None = None  # the driver's full name ("NVIDIA A10G")
    uuid: str | None = None
    memory_mib: int | None = None


def gpu_type(name: str, memory_mib: int | None = None) -> str | None:
    """Beam's type name for a driver's device name: ``NVIDIA H100 80GB HBM3`` -> ``H100``, ``Tesla T4`` ->
    ``T4``, ``NVIDIA GeForce RTX 4090`` -> ``RTX4090``, ``NVIDIA RTX 6000 Ada Generation`` ->
    ``RTX6000Ada``, ``NVIDIA A100-SXM4-80GB`` -> ``A100-80`` (A100 and V100 by their memory)."""
    words = [w for w in name.replace("_", " ").split() if w.lower() not in _VENDOR_WORDS]
    if not words:
        return None
    first = words[0].split("-")[0].upper()
    if first == "RTX" and len(words) > 1:  # "RTX 4090", "RTX A6000", "RTX 6000 Ada Generation"
        model = words[1].split("-")[0]
        if model.upper().startswith("A"):
            return model.upper()
        return f"RTX{model}" + ("Ada" if any(w.lower() == "ada" for w in words[2:]) else "")
    gib = (memory_mib or 0) / 1024
    if first == "A100" and memory_mib:
        return "A100-80" if gib > 60 else "A100-40"
    if first == "V100" and memory_mib:
        return "V100-32" if gib > 20 else "V100"
    return first or None


def type_names(kind: str) -> set[str]:
    """The type names a device of ``kind`` answers to: its own and its family's (``A100-80``: ``A100``)."""
    return {kind.upper(), kind.split("-")[0].upper()}


def parse_gpus(spec: str) -> list[Device]:
    """Simulated devices from ``"N"`` or ``"TYPE:N"`` (tests, machines nvidia-smi cannot see)."""
    kind, sep, count = spec.strip().rpartition(":")
    if not count.isdigit() or (sep and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", kind)):
        raise BadGpuSpec(f"--gpus {spec!r} is neither a count ('2') nor TYPE:COUNT ('A10G:2'); "
                         "fix --gpus or PETRIBUS_GPUS")
    return [Device(id=str(i), type=kind.upper() if kind else None, name=kind or None)
            for i in range(int(count))]


def from_nvidia_smi(output: str) -> list[Device]:
    """Devices from ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader``."""
    devices = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        index, uuid, name, memory = parts[0], parts[1], ",".join(parts[2:-1]), parts[-1]
        mib = re.match(r"(\d+)", memory)
        memory_mib = int(mib.group(1)) if mib else None
        devices.append(Device(id=index, type=gpu_type(name, memory_mib), name=name, uuid=uuid or None,
                              memory_mib=memory_mib))
    return devices


def discover(spec: str | None) -> list[Device]:
    """This machine's GPUs: simulated by ``spec`` when given, else what ``nvidia-smi`` lists (none
    without it). A failing ``nvidia-smi`` is an error: an executor that silently had no GPUs would
    refuse its GPU pools for the wrong reason."""
    if spec is not None and spec.strip() != "":
        return parse_gpus(spec)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PetribusError(f"nvidia-smi failed ({exc}); fix the driver, or say which GPUs to use with "
                            "--gpus / PETRIBUS_GPUS", code="gpu_discovery") from None
    if done.returncode != 0:
        if "NVIDIA-SMI has failed" in done.stdout + done.stderr or "No devices" in done.stdout + done.stderr:
            return []
        raise PetribusError(f"nvidia-smi exited with {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}; "
                            "fix the driver, or say which GPUs to use with --gpus / PETRIBUS_GPUS",
                            code="gpu_discovery")
    return from_nvidia_smi(done.stdout)


class DeviceAllocator:
    """The executor's devices, each held by at most one firing, handed out in the order asked for."""

    def __init__(self, devices: list[Device] | tuple[Device, ...]) -> None:
        self.devices: dict[str, Device] = {d.id: d for d in devices}
        self._free: list[str] = [d.id for d in devices]  # in device order: the lowest ids go first
        self._waiters: deque[tuple[int, asyncio.Future[tuple[str, ...]]]] = deque()

    @property
    def total(self) -> int:
        return len(self.devices)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def types(self) -> set[str]:
        """The GPU type names its devices answer to (upper case), as ``gpu-<type>`` pools name them."""
        return {name for d in self.devices.values() if d.type for name in type_names(d.type)}

    async def acquire(self, count: int) -> tuple[str, ...]:
        """``count`` devices to hold until ``release``; waits, behind every earlier caller, until they
        are free. Raises ``NotEnoughDevices`` at once if this executor has fewer than ``count``."""
        if count <= 0:
            return ()
        if count > self.total:
            raise NotEnoughDevices(
                f"a firing wants {count} GPU(s) and this executor has {self.total}; start an executor with "
                f"at least {count} GPUs for this pool, or ask for fewer (gpu_count=)")
        if not self._waiters and count <= len(self._free):
            return self._take(count)
        waiter: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # served, but given up before it could use them
            else:
                self._serve()  # it may have blocked smaller requests behind it
            raise

    def release(self, devices: tuple[str, ...]) -> None:
        """Give ``devices`` back; the next waiters in line get them."""
        for d in devices:
            if d not in self.devices:
                raise PetribusError(f"release of unknown device {d!r} (this executor has {sorted(self.devices)})")
            if d in self._free:
                raise PetribusError(f"device {d!r} released twice")
        self._free.extend(devices)
        self._free.sort(key=_order)
        self._serve()

    def _take(self, count: int) -> tuple[str, ...]:
        taken, self._free = self._free[:count], self._free[count:]
        return tuple(taken)

    def _serve(self) -> None:
        while self._waiters:
            count, waiter = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if count > len(self._free):
                return  # the head waits; nobody overtakes it
            self._waiters.popleft()
            waiter.set_result(self._take(count))

    def describe(self) -> list[dict[str, Any]]:
        """Every device with whether it is busy, for the registry (``GET /pools``)."""
        free = set(self._free)
        return [{"id": d.id, "type": d.type, "name": d.name, "uuid": d.uuid, "memory_mib": d.memory_mib,
                 "busy": d.id not in free} for d in self.devices.values()]


def _order(device_id: str) -> tuple[int, str]:
    return (int(device_id), device_id) if device_id.isdigit() else (1 << 30, device_id)
