"""One query fans out to two searches that run at the same time; a summary waits for both.

    petribus serve examples/parallel_search.py:bot

then type ``/add Query {"text": "petri nets"}``.
"""

import asyncio

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Query(BaseModel):
    text: str


class WebQuery(BaseModel):
    text: str


class DocsQuery(BaseModel):
    text: str


class WebResult(BaseModel):
    query: str
    hits: list[str]


class DocsResult(BaseModel):
    query: str
    hits: list[str]


class Summary(BaseModel):
    query: str
    text: str
    sources: int


bot = Bot(
    locations=[
        BotLocation(marker=Query),
        BotLocation(marker=WebQuery, expose=False),
        BotLocation(marker=DocsQuery, expose=False),
        BotLocation(marker=WebResult, expose=False),
        BotLocation(marker=DocsResult, expose=False),
        BotLocation(marker=Summary),
    ],
    description="Searches the web and the docs at once and summarises both.",
)


@bot.transition(inputs={Query: 1}, outputs=[WebQuery, DocsQuery], description="Splits a query for both searches.")
def fan_out(inputs):
    q = inputs[Query][0].text
    return {WebQuery: [WebQuery(text=q)], DocsQuery: [DocsQuery(text=q)]}


@bot.transition(inputs={WebQuery: 1}, outputs=[WebResult], description="Searches the web.")
async def search_web(context: BotContext, inputs):
    q = inputs[WebQuery][0].text
    context.say(f"searching the web for {q!r}")
    await asyncio.sleep(1.0)  # stands in for a slow HTTP call
    return {WebResult: [WebResult(query=q, hits=[f"web: {q} (1)", f"web: {q} (2)"])]}


@bot.transition(inputs={DocsQuery: 1}, outputs=[DocsResult], description="Searches the docs.")
def search_docs(context: BotContext, inputs):
    import time

    q = inputs[DocsQuery][0].text
    context.say(f"searching the docs for {q!r}")
    time.sleep(1.0)  # a blocking call is fine: each firing has its own worker process
    return {DocsResult: [DocsResult(query=q, hits=[f"docs: {q}"])]}


@bot.transition(inputs={WebResult: 1, DocsResult: 1}, outputs=[Summary], description="Summarises both results.")
def summarise(context: BotContext, inputs):
    web, docs = inputs[WebResult][0], inputs[DocsResult][0]
    hits = web.hits + docs.hits
    context.say(f"{len(hits)} results for {web.query!r}: " + "; ".join(hits))
    return {Summary: [Summary(query=web.query, text="; ".join(hits), sources=len(hits))]}
