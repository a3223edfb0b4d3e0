"""Test app: ``chain.py``'s net grown (time travel: forks onto changed code). ``Stage`` and ``Result`` have
a new field with a default, and a new transition, ``archive``, takes each result further."""

from pydantic import BaseModel

from petribus import Bot, BotLocation

STEPS = 5


class Task(BaseModel):
    n: int


class Stage(BaseModel):
    n: int
    step: int
    trail: list[str] = []
    weight: int = 0  # new: a marker from ``chain`` has none, and gets this default in a fork


class Result(BaseModel):
    n: int
    trail: list[str]
    weight: int = 0


class Archived(BaseModel):
    n: int
    steps: int
    weight: int


bot = Bot(name="chain_grown", locations=[BotLocation(marker=m) for m in (Task, Stage, Result, Archived)],
          description=f"Takes each task through {STEPS} steps, weighing each, and archives the result.")


@bot.transition(inputs={Task: 1}, outputs=[Stage], description="Starts a task.")
def begin(inputs):
    return {Stage: [Stage(n=inputs[Task][0].n, step=1, trail=["g1"], weight=1)]}


@bot.transition(inputs={Stage: 1}, outputs=[Stage, Result], description="One step further.")
def advance(inputs):
    s = inputs[Stage][0]
    if s.step >= STEPS:
        return {Result: [Result(n=s.n, trail=s.trail, weight=s.weight)]}
    return {Stage: [Stage(n=s.n, step=s.step + 1, trail=[*s.trail, f"g{s.step + 1}"], weight=s.weight + 1)]}


@bot.transition(inputs={Result: 1}, outputs=[Archived], description="Archives a result (new in this version).")
def archive(inputs):
    r = inputs[Result][0]
    return {Archived: [Archived(n=r.n, steps=len(r.trail), weight=r.weight)]}
