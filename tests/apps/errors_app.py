"""Test app for errors with context: transitions that raise, with what a user needs to see why."""

import os
import time

from petribus import Bot, BotLocation
from pydantic import BaseModel


class Order(BaseModel):
    item: str
    qty: int


class AsyncOrder(BaseModel):
    item: str
    qty: int


class Charge(BaseModel):
    amount: int


class Depth(BaseModel):
    n: int


class Bulk(BaseModel):
    text: str


class Stall(BaseModel):
    seconds: float


class Meal(BaseModel):
    mib: int


class Coin(BaseModel):
    side: str


class Done(BaseModel):
    ok: bool


bot = Bot(
    name="errors_app",
    locations=[BotLocation(marker=m) for m in (Order, AsyncOrder, Charge, Depth, Bulk, Stall, Meal, Coin, Done)],
    description="Transitions that fail, for the errors-with-context tests.",
)


@bot.transition(inputs={Order: 2}, outputs=[Done])
def ship_orders(inputs):
    total = sum(order.qty for order in inputs[Order])
    return {Done: [Done(ok=check_stock(total))]}


def check_stock(total):
    in_stock = 3
    if total > in_stock:
        raise ValueError(f"only {in_stock} in stock, {total} ordered")
    return True


@bot.transition(inputs={AsyncOrder: 1}, outputs=[Done])
async def ship_async(inputs):
    order = inputs[AsyncOrder][0]
    raise LookupError(f"no warehouse has {order.item!r}")


@bot.transition(inputs={Charge: 1}, outputs=[Done], secrets=["ERRORS_TOKEN"])
def charge_card(inputs):
    token = os.environ["ERRORS_TOKEN"]
    header = {"Authorization": f"Bearer {token}"}
    raise PermissionError(f"the payment API refused {header['Authorization']} for {inputs[Charge][0].amount}")


@bot.transition(inputs={Depth: 1}, outputs=[Done])
def recurse(inputs):
    return {Done: [Done(ok=descend(inputs[Depth][0].n))]}


def descend(n):
    return descend(n + 1)  # never ends: RecursionError, a thousand frames deep


@bot.transition(inputs={Bulk: 2}, outputs=[Done])
def digest_bulk(inputs):
    sizes = [len(b.text) for b in inputs[Bulk]]
    raise ValueError("cannot digest: " + "z" * 3000 + f" {sizes}")



@bot.transition(inputs={Stall: 1}, outputs=[Done], timeout=1)
def stall(inputs):
    time.sleep(inputs[Stall][0].seconds)  # past its timeout: the worker is killed, no traceback to be had


@bot.transition(inputs={Meal: 1}, outputs=[Done], memory=64)
def gulp(inputs):
    block = bytearray(inputs[Meal][0].mib * 1024 * 1024)  # past memory=64: MemoryLimitExceeded, here
    return {Done: [Done(ok=bool(block))]}


@bot.transition(inputs={Coin: 1}, outputs=[Done], retries=1)
def flip(inputs):
    raise RuntimeError(f"landed on {inputs[Coin][0].side}")  # every time: one retry, then for good
