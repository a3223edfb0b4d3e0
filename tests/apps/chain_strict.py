"""Test app: a net whose ``Stage`` needs a field that the chain's stages lack (a fork that does not fit)."""

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Task(BaseModel):
    n: int


class Stage(BaseModel):
    n: int
    step: int
    owner: str  # required: the chain's stages have none


class Result(BaseModel):
    n: int
    trail: list[str]


bot = Bot(name="chain_strict", locations=[BotLocation(marker=Task), BotLocation(marker=Stage),
                                          BotLocation(marker=Result)],
          description="A chain whose stages need an owner.")


@bot.transition(inputs={Stage: 1}, outputs=[Result], description="Ends a stage.")
def finish(inputs):
    s = inputs[Stage][0]
    return {Result: [Result(n=s.n, trail=[s.owner])]}
