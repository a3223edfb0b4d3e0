"""Test app for many firings per worker: async firings that wait, sync ones, a loop blocker, questions.

Every run reports where and when it ran (``Span``): its worker's pid, its start and end on the
machine's monotonic clock, and how many firings of this app its process had running at once.
"""

import asyncio
import os
import time

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Nap(BaseModel):
    n: int
    seconds: float = 0.0
    gather: bool = False  # once napped, ask (confirm) and wait for the answer: the test answers when all ask
    release: str = ""  # once napped, wait until this file exists


class SyncNap(BaseModel):
    n: int
    seconds: float = 0.0
    begun: str = ""  # a file the run creates as it begins (an absolute path): a test's sign it is running


class Block(BaseModel):
    seconds: float


class Question(BaseModel):
    n: int
    blocking: bool = False


class SyncQuestion(BaseModel):
    n: int
    threads: int = 0  # threads of its own, each asking too, while the run itself asks


class Span(BaseModel):
    n: int
    pid: int
    start: float
    end: float
    running_at_start: int  # firings of this app running in this process when it started, itself included
    running_at_end: int
    peak: int  # most firings of this app ever running at once in this process, as of its end
    how: str
    answer: str = ""


bot = Bot(
    name="concurrency",
    locations=[BotLocation(marker=m) for m in (Nap, SyncNap, Block, Question, SyncQuestion, Span)],
    description="Firings that wait, block and ask, and say where they ran.",
)

_running = 0
_peak = 0


def _enter() -> tuple[float, int]:
    global _running, _peak
    _running += 1
    _peak = max(_peak, _running)
    return time.monotonic(), _running


def _leave(n: int, started: tuple[float, int], how: str, answer: str = "") -> dict:
    global _running
    span = Span(n=n, pid=os.getpid(), start=started[0], end=time.monotonic(), running_at_start=started[1],
                running_at_end=_running, peak=_peak, how=how, answer=answer)
    _running -= 1
    return {Span: span}


@bot.transition(inputs={Nap: 1}, outputs=[Span])
async def nap(context: BotContext, inputs):
    item = inputs[Nap][0]
    started = _enter()
    context.say(f"in {os.getpid()}")
    await asyncio.sleep(item.seconds)
    if item.gather:
        await context.aconfirm(f"nap {item.n} is in")
    while item.release and not os.path.exists(item.release):
        await asyncio.sleep(0.05)
    return _leave(item.n, started, "async")


@bot.transition(inputs={SyncNap: 1}, outputs=[Span])
def sync_nap(inputs):
    item = inputs[SyncNap][0]
    started = _enter()
    if item.begun:
        open(item.begun, "w").close()
    time.sleep(item.seconds)
    return _leave(item.n, started, "sync")


@bot.transition(inputs={Block: 1}, outputs=[Span])
async def block(inputs):
    started = _enter()
    time.sleep(inputs[Block][0].seconds)  # noqa: ASYNC251 -- the mistake under test
    return _leave(-1, started, "blocked")


@bot.transition(inputs={Question: 1}, outputs=[Span])
async def ask(context: BotContext, inputs):
    item = inputs[Question][0]
    started = _enter()
    context.say(f"hello {item.n}")
    if item.blocking:  # allowed, at the cost of stalling this worker's other async firings
        yes = context.confirm(f"confirm {item.n}")
        reply = context.prompt(f"prompt {item.n}")
    else:
        yes = await context.aconfirm(f"confirm {item.n}")
        reply = await context.aprompt(f"prompt {item.n}")
    context.remember({"n": item.n})
    return _leave(item.n, started, "async", answer=f"{yes}/{reply}")


@bot.transition(inputs={SyncQuestion: 1}, outputs=[Span])
def sync_ask(context: BotContext, inputs):
    """A def run that asks from its own thread and from threads it starts, all at once: each blocks on
    its own answer while the others' cross the pipe."""
    import threading

    item = inputs[SyncQuestion][0]
    started = _enter()
    answers: dict[int, str] = {}

    def ask(k: int) -> None:
        yes = context.confirm(f"confirm {item.n}.{k}")
        answers[k] = f"{yes}/{context.prompt(f'prompt {item.n}.{k}')}"

    helpers = [threading.Thread(target=ask, args=(k,)) for k in range(1, item.threads + 1)]
    for helper in helpers:
        helper.start()
    ask(0)
    for helper in helpers:
        helper.join()
    return _leave(item.n, started, "sync", answer=" ".join(answers[k] for k in sorted(answers)))
