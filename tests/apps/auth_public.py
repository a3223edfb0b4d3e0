"""Test app: a public bot (``authorized=False``, as in Beam): it takes requests without an API key."""

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Note(BaseModel):
    text: str


class Filed(BaseModel):
    text: str


bot = Bot(name="public", locations=[BotLocation(marker=Note), BotLocation(marker=Filed)], authorized=False,
          description="Files notes; anyone may use it.")


@bot.transition(inputs={Note: 1}, outputs=[Filed], description="Files a note.")
def file_note(inputs):
    return {Filed: [Filed(text=inputs[Note][0].text)]}
