"""Test app: one no-op transition per marker, plus a join that needs two inputs."""

import time

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Item(BaseModel):
    n: int
    sleep: float = 0.0


class Done(BaseModel):
    n: int


class Left(BaseModel):
    v: int


class Right(BaseModel):
    v: int


class Pair(BaseModel):
    total: int


bot = Bot(
    name="counter",
    locations=[BotLocation(marker=Item), BotLocation(marker=Done, expose=False),
               BotLocation(marker=Left), BotLocation(marker=Right), BotLocation(marker=Pair)],
    description="Counts items; joins left and right.",
)


@bot.transition(inputs={Item: 1}, outputs=[Done], description="Marks an item done, after its sleep.")
def work(inputs):
    item = inputs[Item][0]
    if item.sleep:
        time.sleep(item.sleep)
    return {Done: [Done(n=item.n)]}


@bot.transition(inputs={Left: 1, Right: 1}, outputs=[Pair], description="Joins a left and a right.")
def join(inputs):
    return {Pair: [Pair(total=inputs[Left][0].v + inputs[Right][0].v)]}


class Order(BaseModel):
    amount: int


class Approved(BaseModel):
    amount: int


guarded = Bot(
    name="guarded",
    locations=[BotLocation(marker=Order), BotLocation(marker=Approved)],
    description="Approves only small orders; a guard that raises is treated as false.",
)


@guarded.transition(inputs={Order: 1}, outputs=[Approved], description="Approves orders under 100.",
                    when=lambda inputs: 1 / (inputs[Order][0].amount - 13) and inputs[Order][0].amount < 100)
def approve(inputs):
    return {Approved: [Approved(amount=inputs[Order][0].amount)]}
