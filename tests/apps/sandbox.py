"""Test app: transitions that probe and break the limits of their process sandbox."""

from __future__ import annotations

import asyncio
import os
import resource

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation, TaskPolicy, Volume
from petribus.errors import PetribusError

IMPORTED_IN = os.getpid()  # where this module was imported: the fork server (preloaded) or the worker


class Meal(BaseModel):
    mib: int  # how much the transition allocates


class Fed(BaseModel):
    mib: int
    pid: int


class Probe(BaseModel):
    tag: str = ""


class Escape(BaseModel):
    path: str  # a file outside the transition's folder


class Hoard(BaseModel):
    files: int


class Seen(BaseModel):
    pid: int
    env: dict[str, str]
    cwd: str
    cwd_existed: bool
    workdir: str | None
    affinity: list[int]
    data_limit: int
    nofile: int
    imported_here: bool
    tmp: str
    parent_env: str  # what the worker's parent (the fork server) has in its environment


class Refused(BaseModel):
    what: str
    message: str


class Sent(BaseModel):
    name: str


class Spin(BaseModel):
    n: int = 0


class Note(BaseModel):
    text: str


class Notes(BaseModel):
    texts: list[str]


class Late(BaseModel):
    n: int = 0


class Hook(BaseModel):
    fail: bool = False


class Needy(BaseModel):
    n: int = 0


class Gulp(BaseModel):
    mib: int


class Nap(BaseModel):
    seconds: float


bot = Bot(
    name="sandbox",
    locations=[BotLocation(marker=m) for m in (Meal, Fed, Probe, Escape, Hoard, Seen, Refused, Sent, Spin, Note,
                                               Notes, Late, Hook, Gulp, Nap, Needy)],
    volumes=[Volume(name="notebook", mount_path="./notebook")],
)


@bot.transition(inputs={Meal: 1}, outputs=[Fed], memory=64)
def eat(inputs):
    """Allocates what it is asked to, within 64 MiB or not."""
    meal = inputs[Meal][0]
    block = bytearray(meal.mib * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    return {Fed: [Fed(mib=len(block) // (1024 * 1024), pid=os.getpid())]}


@bot.transition(inputs={Probe: 1}, outputs=[Seen], memory=256, cpu=1)
def look(context: BotContext, inputs):
    """Reports what its sandbox looks like from inside (and leaves a file behind)."""
    cwd = os.getcwd()
    with open("scratch.txt", "w") as f:
        f.write("left behind")
    return {Seen: [Seen(
        pid=os.getpid(), env=dict(os.environ), cwd=cwd, cwd_existed=os.path.isdir(cwd),
        workdir=context.workdir, affinity=sorted(os.sched_getaffinity(0)),
        data_limit=resource.getrlimit(resource.RLIMIT_DATA)[0],
        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        imported_here=IMPORTED_IN == os.getpid(), tmp=os.environ.get("TMPDIR", ""),
        parent_env=_environ_of(os.getppid()),
    )]}


def _environ_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().replace(b"\0", b"\n").decode(errors="replace")
    except OSError as exc:
        return f"unreadable: {exc}"


@bot.transition(inputs={Escape: 1}, outputs=[Refused, Sent])
def leak(context: BotContext, inputs):
    """Tries to send files from outside its folder: a path, then a symlink to it; then one of its own."""
    target = inputs[Escape][0].path
    refused = []
    try:
        context.send_file(target)
    except PetribusError as exc:
        refused.append(Refused(what="path", message=exc.message))
    os.symlink(target, "innocent.txt")
    try:
        context.send_file("innocent.txt")
    except PetribusError as exc:
        refused.append(Refused(what="symlink", message=exc.message))
    with open("mine.txt", "w") as f:
        f.write("made here")
    context.send_file("mine.txt")
    return {Refused: refused, Sent: [Sent(name="mine.txt")]}


@bot.transition(inputs={Hoard: 1}, outputs=[Fed])
def hoard(inputs):
    """Opens files and keeps them open."""
    kept = [open(os.devnull) for _ in range(inputs[Hoard][0].files)]
    return {Fed: [Fed(mib=len(kept), pid=os.getpid())]}


@bot.transition(inputs={Spin: 1})
def spin(inputs):
    """Burns CPU until it is stopped."""
    n = 0
    while True:
        n += 1


@bot.transition(inputs={Note: 1}, outputs=[Notes])
def jot(context: BotContext, inputs):
    """Adds a note to the bot's volume and reads back every note there (from any session); sends it."""
    text = inputs[Note][0].text
    with open(os.path.join("notebook", f"{text}.txt"), "w") as f:
        f.write(text)
    context.send_file(os.path.join("notebook", f"{text}.txt"))
    return {Notes: [Notes(texts=sorted(name[:-4] for name in os.listdir("notebook")))]}


@bot.transition(inputs={Late: 1}, task_policy=TaskPolicy(ttl=1))
def hurry(inputs):
    """Worth running only within a second of being enabled."""


# The executor reads the URL where it imports the app (the test starts it with its server's address).
@bot.transition(inputs={Hook: 1}, outputs=[Fed],
                callback_url=os.environ.get("SANDBOX_HOOK_URL", "http://127.0.0.1:9/hook"))
def hooked(inputs):
    """Its outcomes are POSTed to its callback URL."""
    if inputs[Hook][0].fail:
        raise ValueError("asked to fail")
    return {Fed: [Fed(mib=0, pid=os.getpid())]}


@bot.transition(inputs={Gulp: 1}, outputs=[Fed], memory=64)
async def gulp(inputs):
    """An async def that allocates what it is asked to (sharing its worker with other async firings)."""
    block = bytearray(inputs[Gulp][0].mib * 1024 * 1024)
    return {Fed: [Fed(mib=len(block) // (1024 * 1024), pid=os.getpid())]}


@bot.transition(inputs={Nap: 1}, outputs=[Fed], memory=64)
async def nap(inputs):
    """An async def that waits, then says where it ran."""
    await asyncio.sleep(inputs[Nap][0].seconds)
    return {Fed: [Fed(mib=0, pid=os.getpid())]}


@bot.transition(inputs={Needy: 1}, python_packages=["petribus-no-such-package>=1"])
def needy(inputs):
    """Needs a package this executor does not have."""
