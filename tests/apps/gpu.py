"""Test app: transitions that need GPUs, and say which devices they saw and when they ran.

``train`` needs one GPU of any type (pool ``gpu``). Each firing notes that it started in ``Job.meet``
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


class Ran(BaseModel):
    n: int
    devices: str | None
    start: float
    end: float
    met: int = 0


bot = Bot(
    name="gpu",
    locations=[BotLocation(marker=Job), BotLocation(marker=Ran, expose=False)],
    description="Runs jobs on GPUs.",
)


@bot.transition(inputs={Job: 1}, outputs=[Ran], gpu="any", gpu_count=1, description="Trains on one GPU.")
def train(inputs):
    job = inputs[Job][0]
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
