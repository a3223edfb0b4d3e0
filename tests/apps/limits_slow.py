"""Test app: a firing that runs until the test lets it finish (deletion while it runs, docs/limits.md)."""

import time
from pathlib import Path

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Go(BaseModel):
    folder: str  # where the firing says it started and waits to be released


class Went(BaseModel):
    folder: str


bot = Bot(name="limits_slow", locations=[BotLocation(marker=Go), BotLocation(marker=Went, expose=False)],
          description="Runs one slow firing per Go marker.")


@bot.transition(inputs={Go: 1}, outputs=[Went], description="Waits for the test's release file.")
def slow(context: BotContext, inputs):
    folder = Path(inputs[Go][0].folder)
    (folder / "started").write_text("1")
    while not (folder / "release").exists():
        time.sleep(0.02)
    context.say("still running after the release")
    Path("made.txt").write_text("made after the session was deleted")  # in the run's own folder
    (folder / "sending").write_text("1")
    context.send_file("made.txt", "a file the deleted session must not keep")  # refused: the run ends here
    return {Went: [Went(folder=str(folder))]}
