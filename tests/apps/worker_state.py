"""Test app: def and async def runs that report what their worker process looks like to them.

Each run answers with a ``State``: its working directory, what that folder held when the run began, and
the soft and hard CPU-time limits of its process. A ``Look`` may also leave a file behind, or change the
working directory, so that the next run in the same worker shows what it was handed.
"""

import os
import resource

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Look(BaseModel):
    leave_file: bool = False
    wander: bool = False  # chdir("/") before returning


class AsyncLook(BaseModel):
    pass


class State(BaseModel):
    pid: int
    cwd: str
    found: list[str]
    cpu_soft: int
    cpu_hard: int
    tmpdir: str


bot = Bot(name="worker_state", locations=[BotLocation(marker=m) for m in (Look, AsyncLook, State)],
          description="Runs that say what their worker is like to them.")


def _state() -> State:
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cwd = os.getcwd()
    return State(pid=os.getpid(), cwd=cwd, found=sorted(os.listdir(cwd)), cpu_soft=soft, cpu_hard=hard,
                 tmpdir=os.environ.get("TMPDIR", ""))


@bot.transition(inputs={Look: 1}, outputs=[State])
def look(inputs):
    seen = _state()
    if inputs[Look][0].leave_file:
        with open("left-behind.txt", "w") as f:
            f.write("x")
    if inputs[Look][0].wander:
        os.chdir("/")
    return {State: seen}


@bot.transition(inputs={AsyncLook: 1}, outputs=[State])
async def look_async(inputs):
    return {State: _state()}
