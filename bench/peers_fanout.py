"""The fan-out workload of ``bench_fanout.py`` written the documented way in LangGraph and in Burr.

Runs in its own venv (``bench_fanout.py`` makes it), never in petribus's. Each system: one step
plans N pages, N async sub-tasks each ``await asyncio.sleep(1)``, one join summarises all N.

    bench/.peers/bin/python bench/peers_fanout.py langgraph 100 --repeat 3

Prints one JSON line per round: {"system", "n", "round" (0 is the warm-up), "wall_s",
"first_start_s", "last_end_s", "cpu_s"}; times are from the call that starts the run. Both run in
this one process with their state in memory: nothing is written anywhere, so nothing survives a crash.
"""

# No ``from __future__ import annotations``: LangGraph reads the nodes' type hints when it builds the graph.
import argparse
import asyncio
import json
import operator
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

SLEEP_S = 1.0


class Span:
    """First start and last end of the sub-tasks of one round."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []


span = Span()


async def work(url: str) -> int:
    span.starts.append(time.perf_counter())
    await asyncio.sleep(SLEEP_S)  # stands in for an HTTP request or a model call
    span.ends.append(time.perf_counter())
    return len(url) * 10


def urls(topic: str, n: int) -> list[str]:
    slug = "-".join(topic.split())
    return [f"https://site{i}.example/{slug}" for i in range(n)]


# ---------------------------------------------------------------- LangGraph: Send fan-out, reducer join


class Crawl(TypedDict):
    topic: str
    pages: list[str]
    fetched: Annotated[list[int], operator.add]  # the reducer that joins the N branches
    report: dict[str, Any]


class Page(TypedDict):
    url: str



def langgraph_runner(n: int) -> Callable[[], Awaitable[dict[str, Any]]]:
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    def plan(state: Crawl) -> dict[str, Any]:
        return {"pages": urls(state["topic"], n)}

    def fan_out(state: Crawl) -> list[Send]:
        return [Send("fetch", {"url": url}) for url in state["pages"]]

    async def fetch(page: Page) -> dict[str, Any]:
        return {"fetched": [await work(page["url"])]}

    def summarise(state: Crawl) -> dict[str, Any]:
        return {"report": {"pages": len(state["fetched"]), "words": sum(state["fetched"])}}

    builder = StateGraph(Crawl)
    builder.add_node("plan", plan)
    builder.add_node("fetch", fetch)
    builder.add_node("summarise", summarise)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", fan_out, ["fetch"])
    builder.add_edge("fetch", "summarise")
    builder.add_edge("summarise", END)
    graph = builder.compile()

    async def run() -> dict[str, Any]:
        out = await graph.ainvoke({"topic": "petri nets", "pages": [], "fetched": []})
        return out["report"]

    return run


# ---------------------------------------------------------------- Burr: async MapStates, reduce join


def burr_runner(n: int) -> Callable[[], Awaitable[dict[str, Any]]]:
    from burr.core import ApplicationBuilder, State, action
    from burr.core.parallelism import MapStates

    @action(reads=["topic"], writes=["pages"])
    def plan(state: State) -> State:
        return state.update(pages=urls(state["topic"], n))

    @action(reads=["url"], writes=["words"])
    async def fetch(state: State) -> State:
        return state.update(words=await work(state["url"]))

    class FetchAll(MapStates):
        """One sub-application per page; async, so Burr runs them with asyncio.gather."""

        def action(self, state: State, inputs: dict[str, Any]) -> Any:
            return fetch  # a decorated function, as Burr's own async MapStates tests pass it

        def states(self, state: State, context: Any, inputs: dict[str, Any]) -> Any:
            for url in state["pages"]:
                yield state.update(url=url)

        async def reduce(self, state: State, states: Any) -> State:
            words = [s["words"] async for s in states]
            return state.update(fetched=words)

        def is_async(self) -> bool:
            return True

        @property
        def reads(self) -> list[str]:
            return ["pages"]

        @property
        def writes(self) -> list[str]:
            return ["fetched"]

    @action(reads=["fetched"], writes=["report"])
    def summarise(state: State) -> State:
        return state.update(report={"pages": len(state["fetched"]), "words": sum(state["fetched"])})

    async def run() -> dict[str, Any]:
        app = (
            ApplicationBuilder()
            .with_actions(plan=plan, fetch_all=FetchAll(), summarise=summarise)
            .with_transitions(("plan", "fetch_all"), ("fetch_all", "summarise"))
            .with_state(topic="petri nets")
            .with_entrypoint("plan")
            .build()
        )
        _, _, state = await app.arun(halt_after=["summarise"])
        return state["report"]

    return run


RUNNERS = {"langgraph": langgraph_runner, "burr": burr_runner}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=sorted(RUNNERS))
    ap.add_argument("n", type=int)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    run = RUNNERS[args.system](args.n)
    for rnd in range(args.repeat + 1):  # round 0 warms imports and caches up
        span.starts.clear()
        span.ends.clear()
        cpu0, t0 = time.process_time(), time.perf_counter()
        report = await run()
        wall = time.perf_counter() - t0
        if report["pages"] != args.n or len(span.ends) != args.n:
            raise SystemExit(f"{args.system}: joined {report['pages']} of {args.n} pages")
        print(json.dumps({
            "system": args.system, "n": args.n, "round": rnd, "wall_s": wall,
            "first_start_s": min(span.starts) - t0, "last_end_s": max(span.ends) - t0,
            "cpu_s": time.process_time() - cpu0,
        }), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
