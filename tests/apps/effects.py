"""Test app: transitions whose side effects (say, remember, confirm) must land once however often they run."""

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Chore(BaseModel):
    n: int
    sleep: float = 0.0


class Done(BaseModel):
    n: int
    key: str = ""


class Risky(BaseModel):
    n: int
    sleep: float = 0.0
    runs: str = ""  # a folder where each run leaves a file: how often the transition really ran


class Decided(BaseModel):
    n: int
    yes: bool


class Big(BaseModel):
    n_bytes: int


class Huge(BaseModel):
    text: str


class Flaky(BaseModel):
    fail_times: int
    counter: str  # a file that counts attempts across worker processes


bot = Bot(
    name="effects",
    locations=[BotLocation(marker=m) for m in (Chore, Done, Risky, Decided, Flaky, Big, Huge)],
    description="Side effects that must land once.",
)


@bot.transition(inputs={Chore: 1}, outputs=[Done], description="Says and remembers, then waits.")
async def chore(context: BotContext, inputs):
    chore = inputs[Chore][0]
    context.say(f"chore {chore.n} under way")
    context.remember({"chore": chore.n})
    await asyncio.sleep(chore.sleep)
    return {Done: [Done(n=chore.n, key=context.idempotency_key)]}


@bot.transition(inputs={Risky: 1}, outputs=[Decided], description="Asks the user, then waits.")
def risky(context: BotContext, inputs):
    risky = inputs[Risky][0]
    if risky.runs:
        Path(risky.runs, f"{os.getpid()}-{os.urandom(4).hex()}").touch()
    yes = context.confirm(f"go ahead with {risky.n}?", timeout=60)
    context.say(f"answer for {risky.n}: {yes}")
    time.sleep(risky.sleep)
    return {Decided: [Decided(n=risky.n, yes=yes)]}


@bot.transition(inputs={Flaky: 1}, outputs=[Done], retries=2, description="Fails its first runs.")
def flaky(inputs):
    flaky = inputs[Flaky][0]
    path = Path(flaky.counter)
    runs = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(runs))
    if runs <= flaky.fail_times:
        raise RuntimeError(f"flaky failure {runs}")
    return {Done: [Done(n=runs)]}


@bot.transition(inputs={Big: 1}, outputs=[Huge], description="Returns more than one event can hold.")
def swell(inputs):
    return {Huge: [Huge(text="x" * inputs[Big][0].n_bytes)]}


class Part(BaseModel):
    text: str


class Whole(BaseModel):
    size: int


heavy = Bot(name="heavy", locations=[BotLocation(marker=Part), BotLocation(marker=Whole)],
            description="A join whose inputs together are more than one message can hold.")


@heavy.transition(inputs={Part: 3}, outputs=[Whole], description="Joins three parts.")
def glue(inputs):
    return {Whole: [Whole(size=sum(len(p.text) for p in inputs[Part]))]}
