"""``GET /pools``: every executor pool, who serves it, its devices, its free capacity and its queue.

Read at request time from three places, none of them kept by the gateway:

- the registry (``petribus.registry``): the live executors, their pools, labels, devices and load;
- PB_WORK's consumers: each pool's durable consumer (``executor-<pool>``) gives its queue depth,
  ``num_pending`` (not yet delivered) + ``num_ack_pending`` (delivered, not yet acked: running);
- PB_WORK's subjects (``pb.work.<pool>.…``): work queued for a pool that no executor ever served has no
  consumer, only items; it is counted from the stream, so a pool nobody serves still shows its queue.

Pools the served bots' transitions name show up too, queued or not, with the transitions that use them.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

from petribus import subjects
from petribus.net import Net
from petribus.registry import ExecutorInfo, Registry, is_gpu_pool, start_hint
from petribus_gateway.auth import keyed
from petribus_gateway.context import GatewayContext, bus_ready, context

router = APIRouter(dependencies=[Depends(keyed)])
Ctx = Annotated[GatewayContext, Depends(context)]


class PoolDevices(BaseModel):
    total: int = Field(description="GPUs of the pool's executors together.")
    free: int = Field(description="Of those, not held by a firing now.")
    types: list[str] = Field(default_factory=list, description="GPU types among them.")


class PoolInfo(BaseModel):
    name: str
    gpu: bool = Field(description="A GPU pool (gpu, gpu-<type>): its executors need devices.")
    executors: list[str] = Field(description="Instances of the live executors serving it.")
    devices: PoolDevices
    capacity: int = Field(description="Work items the pool's executors take at once, together.")
    free: int = Field(description="Of that capacity, what is not in use now.")
    queued: int = Field(description="Work items in PB_WORK for the pool: waiting plus running "
                        "(num_pending + num_ack_pending of its consumer; without a consumer, its items).")
    pending: int = Field(description="Of those, waiting for an executor.")
    running: int = Field(description="Of those, delivered to an executor and not yet done.")
    transitions: list[str] = Field(default_factory=list, description="bot.transition of the served bots "
                                   "whose work goes to this pool.")
    hint: str | None = Field(default=None, description="How to start an executor, when the pool has none.")


class Pools(BaseModel):
    pools: list[PoolInfo]
    executors: list[ExecutorInfo]


async def overview(js: JetStreamContext, registry: Registry, nets: dict[str, Net]) -> Pools:
    executors = await registry.list()
    # The pool's consumer, when one exists, knows pending and running apart.
    consumers: dict[str, tuple[int, int]] = {}
    offset = 0
    while True:
        batch = await js.consumers_info(subjects.WORK_STREAM, offset=offset or None)
        for info in batch:
            pool = subjects.pool_of_durable(info.name)
            if pool is not None:  # a pool's shared consumer, or its bots' own (deployed versions): summed
                pending, running = consumers.get(pool, (0, 0))
                consumers[pool] = (pending + (info.num_pending or 0), running + (info.num_ack_pending or 0))
        offset += len(batch)
        if len(batch) < 256:
            break
    items: Counter[str] = Counter()
    try:
        stream = await js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.all_work())
    except NotFoundError:
        stream = None
    for subject, count in ((stream.state.subjects or {}) if stream is not None else {}).items():
        if (pool := subjects.pool_of_work(subject)) is not None:
            items[pool] += count
    needed: dict[str, list[str]] = {}
    for net in nets.values():
        for t in net.transitions:
            needed.setdefault(t.pool, []).append(f"{net.bot}.{t.name}")
    names = set(consumers) | set(items) | set(needed) | {p for e in executors for p in e.pools}
    pools = []
    for name in sorted(names):
        serving = [e for e in executors if name in e.pools]
        devices = [d for e in serving for d in e.devices]
        if name in consumers:
            pending, running = consumers[name]
        else:
            pending, running = items[name], 0
        capacity = sum(e.load[name].capacity for e in serving if name in e.load)
        held = sum(e.load[name].running for e in serving if name in e.load)
        pools.append(PoolInfo(
            name=name, gpu=is_gpu_pool(name), executors=[e.instance for e in serving],
            devices=PoolDevices(total=len(devices), free=sum(not d.busy for d in devices),
                                types=sorted({d.type for d in devices if d.type})),
            capacity=capacity, free=max(0, capacity - held), queued=pending + running, pending=pending,
            running=running, transitions=sorted(needed.get(name, [])),
            hint=None if serving else start_hint(name),
        ))
    return Pools(pools=pools, executors=executors)


def summary(pools: Pools) -> str:
    """One line for a health check: ``3 pools, 2 executors; waiting with no executor: gpu-a10g (3)``."""
    line = f"{len(pools.pools)} pools, {len(pools.executors)} executors"
    orphans = [f"{p.name} ({p.queued})" for p in pools.pools if not p.executors and p.queued]
    return line + (f"; waiting with no executor: {', '.join(orphans)}" if orphans else "")


@router.get("/pools", response_model=Pools, tags=["pools"], dependencies=[Depends(bus_ready)])
async def list_pools(ctx: Ctx) -> Pools:
    """Executor pools: their live executors, devices, free capacity and queue depth. A pool with work
    queued or a transition that needs it, and no executor, is listed too, with how to start one."""
    js = ctx.events.js
    registry = Registry(js, heartbeat_s=ctx.settings.registry_heartbeat_s, replicas=ctx.settings.replicas)
    return await overview(js, registry, ctx.nets)
