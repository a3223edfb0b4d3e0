"""Test app for the model-driven LLM service: the order bot, plus a hidden audit trail and a transition
that asks the model a question (blocking or not)."""

from pydantic import BaseModel, Field

from petribus import Bot, BotContext, BotLocation


class UserName(BaseModel):
    """The customer whose order it is."""

    name: str = Field(description="The customer's name, as the user gave it.")


class OrderStatus(BaseModel):
    message: str


class AuditEntry(BaseModel):
    secret_note: str


class Question(BaseModel):
    text: str
    wait: bool = True
    timeout: float = 60.0


class Answer(BaseModel):
    text: str


bot = Bot(
    model="gpt-test",
    locations=[BotLocation(marker=UserName), BotLocation(marker=OrderStatus),
               BotLocation(marker=AuditEntry, expose=False), BotLocation(marker=Question),
               BotLocation(marker=Answer)],
    description="A bot to cancel customers' orders.",
    welcome_message="Hi! Whose order should I cancel?",
)


@bot.transition(inputs={UserName: 1}, outputs=[OrderStatus, AuditEntry], description="Cancels a user's order.")
def cancel_order(context: BotContext, inputs):
    name = inputs[UserName][0].name
    context.say(f"Order cancelled for {name}")
    context.remember({"cancelled": name})
    return {OrderStatus: [OrderStatus(message=f"order_cancelled for {name}")],
            AuditEntry: [AuditEntry(secret_note=f"audit of {name}")]}


@bot.transition(inputs={AuditEntry: 1}, outputs=[], expose=False, description="Files the audit trail.")
def file_audit(inputs):
    return {}


@bot.transition(inputs={Question: 1}, outputs=[Answer], description="Asks the model a question.")
def ask_model(context: BotContext, inputs):
    question = inputs[Question][0]
    reply = context.prompt(question.text, wait_for_response=question.wait, timeout=question.timeout)
    return {Answer: [Answer(text=str(reply))]}
