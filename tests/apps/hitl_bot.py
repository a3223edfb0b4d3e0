"""Test app for people in the loop: confirm=True transitions, context.confirm, and files both ways."""

import hashlib
import os
import tempfile

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Order(BaseModel):
    id: int


class Cancelled(BaseModel):
    id: int


class Ticket(BaseModel):
    id: int


class Escalated(BaseModel):
    id: int


class Closed(BaseModel):
    id: int


class Refund(BaseModel):
    amount: int
    timeout: float = 30.0


class RefundDecision(BaseModel):
    amount: int
    approved: bool


class Upload(BaseModel):
    description: str
    timeout: float = 30.0


class Received(BaseModel):
    name: str
    size: int
    sha256: str


class Blob(BaseModel):
    size: int


class Question(BaseModel):
    text: str


bot = Bot(
    name="hitl",
    locations=[BotLocation(marker=m) for m in (Order, Ticket, Refund, Upload, Blob, Question)]
    + [BotLocation(marker=m, expose=False) for m in (Cancelled, Escalated, Closed, RefundDecision, Received)],
    description="Asks before it acts; takes and gives files.",
)


@bot.transition(inputs={Order: 1}, outputs=[Cancelled], confirm=True, description="Cancels an order.")
def cancel(inputs):
    return {Cancelled: [Cancelled(id=inputs[Order][0].id)]}


# A ticket is offered to escalate first (declaration order); one the user rejects there is closed.
@bot.transition(inputs={Ticket: 1}, outputs=[Escalated], confirm=True, description="Escalates a ticket.")
def escalate(inputs):
    return {Escalated: [Escalated(id=inputs[Ticket][0].id)]}


@bot.transition(inputs={Ticket: 1}, outputs=[Closed], description="Closes a ticket.")
def close(inputs):
    return {Closed: [Closed(id=inputs[Ticket][0].id)]}


@bot.transition(inputs={Refund: 1}, outputs=[RefundDecision], description="Refunds, if the user agrees.")
def refund(context: BotContext, inputs):
    r = inputs[Refund][0]
    context.say(f"About to refund {r.amount}")
    approved = context.confirm(f"Refund {r.amount} EUR?", timeout=r.timeout)
    return {RefundDecision: [RefundDecision(amount=r.amount, approved=approved)]}


@bot.transition(inputs={Upload: 1}, outputs=[Received], description="Takes a file and sends it back.")
def echo_file(context: BotContext, inputs):
    u = inputs[Upload][0]
    path = context.get_file(u.description, timeout=u.timeout)
    with open(path, "rb") as f:
        data = f.read()
    context.send_file(path, f"your {os.path.basename(path)}, back")
    return {Received: [Received(name=os.path.basename(path), size=len(data),
                                sha256=hashlib.sha256(data).hexdigest())]}


@bot.transition(inputs={Blob: 1}, description="Sends a file of the asked size.")
def send_blob(context: BotContext, inputs):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob.bin")
        with open(path, "wb") as f:
            f.write(b"x" * inputs[Blob][0].size)
        context.send_file(path, "a blob")


@bot.transition(inputs={Question: 1}, timeout=1.0, description="Asks, but cannot wait long.")
def impatient(context: BotContext, inputs):
    context.confirm(inputs[Question][0].text, timeout=60)
