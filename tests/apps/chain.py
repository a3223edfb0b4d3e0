"""Test app: a chain of steps (time travel): a task goes through ``advance`` until its last step.

``v2`` (bot ``chain_v2``) is the same net with changed code: its steps leave another mark.
"""

from pydantic import BaseModel

from petribus import Bot, BotLocation

STEPS = 5


class Task(BaseModel):
    n: int


class Stage(BaseModel):
    n: int
    step: int
    trail: list[str] = []


class Result(BaseModel):
    n: int
    trail: list[str]


def chain(name: str, mark: str) -> Bot:
    bot = Bot(name=name, locations=[BotLocation(marker=Task), BotLocation(marker=Stage),
                                    BotLocation(marker=Result)],
              description=f"Takes each task through {STEPS} steps ({mark}).")

    @bot.transition(inputs={Task: 1}, outputs=[Stage], description="Starts a task.")
    def begin(inputs):
        return {Stage: [Stage(n=inputs[Task][0].n, step=1, trail=[f"{mark}1"])]}

    @bot.transition(inputs={Stage: 1}, outputs=[Stage, Result], description="One step further.")
    def advance(inputs):
        s = inputs[Stage][0]
        if s.step >= STEPS:
            return {Result: [Result(n=s.n, trail=s.trail)]}
        return {Stage: [Stage(n=s.n, step=s.step + 1, trail=[*s.trail, f"{mark}{s.step + 1}"])]}

    return bot


bot = chain("chain", "v1-")
v2 = chain("chain_v2", "v2-")

