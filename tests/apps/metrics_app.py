"""Test app for the metrics: a transition that completes, one that fails for good, one that waits for a
confirmation (a firing held in flight), and a model for the chat (tests/test_metrics.py)."""

from petribus import Bot, BotContext, BotLocation
from pydantic import BaseModel


class Item(BaseModel):
    n: int


class Bad(BaseModel):
    n: int


class Gate(BaseModel):
    n: int


class Question(BaseModel):
    text: str


class Done(BaseModel):
    n: int


bot = Bot(
    name="metrics_app",
    model="gpt-test",
    locations=[BotLocation(marker=m) for m in (Item, Bad, Gate, Question, Done)],
    description="Counts items, fails on bad ones, asks before passing a gate.",
)


@bot.transition(inputs={Item: 1}, outputs=[Done], description="Marks an item done.")
def tick(inputs):
    return {Done: [Done(n=inputs[Item][0].n)]}


@bot.transition(inputs={Bad: 1}, outputs=[Done], description="Always fails.")
def boom(inputs):
    raise ValueError(f"bad item {inputs[Bad][0].n}")


@bot.transition(inputs={Gate: 1}, outputs=[Done], confirm=True, description="Passes a gate once confirmed.")
def gate(inputs):
    return {Done: [Done(n=inputs[Gate][0].n)]}


@bot.transition(inputs={Question: 1}, outputs=[Done], description="Asks the model; the answer is not shown.")
def ask(context: BotContext, inputs):
    context.prompt(inputs[Question][0].text, wait_for_response=True, timeout=30)
    return {Done: [Done(n=0)]}
