"""Test app: transitions that need GPUs, and say which devices they saw and when they ran.

``train`` needs one GPU of any type (pool ``gpu``); ``tune`` one GPU too, in a pool of its own name
(``tuning``), which an executor takes as much work from as from a CPU pool: only its devices bound how
many run at once. Each firing notes that it started in ``Job.meet``
(a folder) and waits until ``Job.peers`` firings have (or ``Job.wait`` seconds pass): two that can run
at once always overlap, so a test can prove they did; one that had to wait for a device is let through
by those that went before it.
"""

import os
import time
from pathlib import Path

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Job(BaseModel):
    n: int
    meet: str = ""
    peers: int = 0
    wait: float = 30.0


class TuneJob(Job):
    pass


class Ran(BaseModel):
    n: int
    devices: str | None
    start: float
    end: float
    met: int = 0


bot = Bot(
    name="gpu",
    locations=[BotLocation(marker=Job), BotLocation(marker=TuneJob), BotLocation(marker=Ran, expose=False)],
    description="Runs jobs on GPUs.",
)


def _run(job: Job) -> dict:
    start = time.time()
    met = 0
    if job.meet:
        meet = Path(job.meet)
        (meet / f"{job.n}").touch()
        deadline = time.monotonic() + job.wait
        while (met := len(list(meet.iterdir()))) < job.peers and time.monotonic() < deadline:
            time.sleep(0.02)
    return {Ran: [Ran(n=job.n, devices=os.environ.get("CUDA_VISIBLE_DEVICES"), start=start, end=time.time(),
                      met=met)]}


@bot.transition(inputs={Job: 1}, outputs=[Ran], gpu="any", gpu_count=1, description="Trains on one GPU.")
def train(inputs):
    return _run(inputs[Job][0])


@bot.transition(inputs={TuneJob: 1}, outputs=[Ran], gpu_count=1, pool="tuning", description="Tunes on one GPU.")
def tune(inputs):
    return _run(inputs[TuneJob][0])
