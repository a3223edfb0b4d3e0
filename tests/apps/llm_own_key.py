"""Test app: a bot with its own model endpoint, as Beam apps pass it (``Bot(api_key=..., base_url=...)``),
read from variables the test sets (``BOT_OWN_KEY``, ``BOT_OWN_URL``) so no key is written in code."""

import os

from pydantic import BaseModel

from petribus import Bot, BotLocation


class UserName(BaseModel):
    name: str


bot = Bot(
    name="own_key",
    model="gpt-test",
    api_key=os.environ.get("BOT_OWN_KEY"),
    base_url=os.environ.get("BOT_OWN_URL"),
    locations=[BotLocation(marker=UserName)],
    description="A bot that talks to its own model endpoint.",
)
