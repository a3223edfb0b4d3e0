"""Scrape N sites at once, then summarise: one marker fans out to N firings, and a join waits for all N.

    petribus serve examples/fanout.py:bot                  # N = 100
    FANOUT_N=1000 petribus serve examples/fanout.py:bot    # N = 1,000

then type ``/add Crawl {"topic": "petri nets"}``. ``plan`` turns the crawl into N ``Page`` markers,
N ``fetch`` firings run at the same time (each awaits one second, a stand-in for an HTTP or model
call), and ``summarise`` fires once all N ``Fetched`` markers are there.

A join's count is part of the net (``inputs={Fetched: N}``), fixed when the bot is defined, so N is
read from ``FANOUT_N`` when this module is imported. Every process that loads the bot (scheduler,
executor, their workers) must see the same value; ``petribus serve`` passes its environment to all of
them. Run one crawl per session: the join takes the oldest N ``Fetched`` markers of its session,
whichever crawl they came from. ``bench/bench_fanout.py`` times this bot.
"""

import asyncio
import os

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation

N = int(os.environ.get("FANOUT_N", "100"))


class Crawl(BaseModel):
    topic: str


class Page(BaseModel):
    url: str


class Fetched(BaseModel):
    url: str
    words: int


class Report(BaseModel):
    topic: str
    pages: int
    words: int


bot = Bot(
    name="fanout",
    locations=[
        BotLocation(marker=Crawl, description="A topic to crawl N sites for."),
        BotLocation(marker=Page, expose=False),
        BotLocation(marker=Fetched, expose=False),
        BotLocation(marker=Report),
    ],
    description=f"Fetches {N:,} pages about a topic at the same time and summarises them.",
)


@bot.transition(inputs={Crawl: 1}, outputs=[Page], description=f"Picks the {N:,} pages to fetch.")
def plan(inputs):
    topic = inputs[Crawl][0].topic
    slug = "-".join(topic.split())
    return {Page: [Page(url=f"https://site{i}.example/{slug}") for i in range(N)]}


@bot.transition(inputs={Page: 1}, outputs=[Fetched], description="Fetches one page.")
async def fetch(inputs):
    url = inputs[Page][0].url
    await asyncio.sleep(1.0)  # stands in for an HTTP request or a model call
    return {Fetched: [Fetched(url=url, words=len(url) * 10)]}


@bot.transition(inputs={Fetched: N}, outputs=[Report], description=f"Summarises all {N:,} pages.")
def summarise(context: BotContext, inputs):
    pages = inputs[Fetched]
    words = sum(p.words for p in pages)
    topic = pages[0].url.rsplit("/", 1)[1].replace("-", " ")
    context.say(f"fetched {len(pages):,} pages about {topic!r}: {words:,} words")
    return {Report: [Report(topic=topic, pages=len(pages), words=words)]}
