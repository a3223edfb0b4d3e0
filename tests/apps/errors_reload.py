"""Test app for serve --reload: its transition fails until the test edits a copy of this file to fix it."""

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Job(BaseModel):
    n: int


class Result(BaseModel):
    value: int


bot = Bot(name="errors_reload", locations=[BotLocation(marker=Job), BotLocation(marker=Result)],
          description="A bot whose one transition is fixed while it serves.")


@bot.transition(inputs={Job: 1}, outputs=[Result])
def double(inputs):
    n = inputs[Job][0].n
    raise ValueError(f"not written yet: {n}")  # FIX ME
