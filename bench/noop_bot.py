"""Benchmark app: a transition that consumes a Tick and does nothing."""

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Tick(BaseModel):
    n: int


bot = Bot(name="bench", locations=[BotLocation(marker=Tick)], description="no-op firings")


@bot.transition(inputs={Tick: 1}, outputs=[], description="does nothing")
def noop(inputs):
    return None
