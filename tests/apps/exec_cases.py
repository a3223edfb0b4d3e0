"""Test app for the executor: async and sync context use, a wrong output, a flaky step, a slow step."""

import asyncio
import time
from pathlib import Path

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class AsyncHello(BaseModel):
    name: str


class SyncHello(BaseModel):
    name: str


class Greeted(BaseModel):
    text: str
    tags: list[str]


class Wrong(BaseModel):
    n: int


class Flaky(BaseModel):
    counter: str  # a file that counts attempts across worker processes
    fail_times: int


class Slow(BaseModel):
    seconds: float


class Ask(BaseModel):
    question: str


class Done(BaseModel):
    attempts: int = 0
    note: str = ""


bot = Bot(
    name="exec_cases",
    locations=[BotLocation(marker=m)
               for m in (AsyncHello, SyncHello, Greeted, Wrong, Flaky, Slow, Ask, Done)],
    description="Cases the executor must handle.",
)


@bot.transition(inputs={AsyncHello: 1}, outputs=[Greeted])
async def greet_async(context: BotContext, inputs):
    name = inputs[AsyncHello][0].name
    context.say(f"hello {name}, from a coroutine")
    await asyncio.sleep(0.01)
    context.remember({"greeted": name, "how": "async"})
    return {Greeted: Greeted(text=f"hi {name}", tags=["async", "ok"])}


@bot.transition(inputs={SyncHello: 1}, outputs=[Greeted])
def greet_sync(context: BotContext, inputs):
    name = inputs[SyncHello][0].name
    context.say(f"hello {name}, from a function")
    return {Greeted: [Greeted(text=f"hi {name}", tags=["sync"])]}


@bot.transition(inputs={Wrong: 1}, outputs=[Done])
def wrong_output(inputs):
    return {Greeted: [Greeted(text="not declared", tags=[])]}


@bot.transition(inputs={Flaky: 1}, outputs=[Done], retries=2)
def flaky(inputs):
    marker = inputs[Flaky][0]
    counter = Path(marker.counter)
    attempts = int(counter.read_text() or 0) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    if attempts <= marker.fail_times:
        raise RuntimeError(f"flaky failure {attempts}")
    return {Done: [Done(attempts=attempts)]}


@bot.transition(inputs={Slow: 1}, outputs=[Done], timeout=1.0)
def slow(inputs):
    time.sleep(inputs[Slow][0].seconds)
    return {Done: [Done(note="slow finished")]}


@bot.transition(inputs={Ask: 1}, outputs=[Done])
def ask(context: BotContext, inputs):
    reply = context.prompt(inputs[Ask][0].question)
    return {Done: [Done(note=str(reply))]}
