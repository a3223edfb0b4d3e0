"""Test app: one query fans out to 1,000 async tasks (each waits, as an HTTP call would); one join takes all."""

import asyncio

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation

N = 1000


class Query(BaseModel):
    n: int = N
    wait: float = 1.0


class Task(BaseModel):
    i: int
    wait: float


class Done(BaseModel):
    i: int


class Summary(BaseModel):
    count: int
    total: int


bot = Bot(
    name="fanout",
    locations=[BotLocation(marker=m) for m in (Query, Task, Done, Summary)],
    description="Fans a query out to many tasks and joins their results.",
)


@bot.transition(inputs={Query: 1}, outputs=[Task], description="Splits the query into tasks.")
def spread(inputs):
    query = inputs[Query][0]
    return {Task: [Task(i=i, wait=query.wait) for i in range(query.n)]}


@bot.transition(inputs={Task: 1}, outputs=[Done], description="One task: waits, as a web request would.")
async def work(context: BotContext, inputs):
    task = inputs[Task][0]
    await asyncio.sleep(task.wait)
    return {Done: [Done(i=task.i)]}


@bot.transition(inputs={Done: N}, outputs=[Summary], description="Joins every task's result.")
def join(context: BotContext, inputs):
    done = inputs[Done]
    context.say(f"joined {len(done)} results")
    return {Summary: [Summary(count=len(done), total=sum(d.i for d in done))]}


class Part(BaseModel):
    i: int


big = Bot(name="bigjoin", locations=[BotLocation(marker=Part), BotLocation(marker=Summary)],
          description="A join of 10,000 markers.")


@big.transition(inputs={Part: 10_000}, outputs=[Summary], description="Joins 10,000 parts.")
def join_all(inputs):
    parts = inputs[Part]
    return {Summary: [Summary(count=len(parts), total=sum(p.i for p in parts))]}
