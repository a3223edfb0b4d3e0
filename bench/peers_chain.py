"""The chain workload of ``bench_chain.py`` in Burr and LangGraph, each persisting its state at every step.

Runs in the peers' venv (``bench_chain.py`` makes it), never in petribus's. Each system runs a chain of
10 no-op steps (``step`` goes 0 -> 10) with its documented SQLite persistence, in a fresh SQLite file
of one temporary folder, one new application / thread per round:

- ``burr``: ``ApplicationBuilder().with_state_persister(SQLitePersister(...))``; Burr's persister hook
  INSERTs the state and COMMITs after every step (``SQLitePersister.save``).
- ``langgraph``: ``StateGraph(...).compile(checkpointer=SqliteSaver(conn))`` and
  ``invoke(..., durability="sync")``: each step's checkpoint is written and committed before the next
  step starts.
- ``langgraph-async``: the same graph with LangGraph's default ``durability="async"``: a step's
  checkpoint is written while the next step runs (the chain does not wait for it).

    bench/.peers/bin/python bench/peers_chain.py burr --rounds 55 --dir /tmp/x

Prints one JSON line per round: {"system", "round" (0-based), "total_s", "rows"} where ``rows`` is
what the round left in the database (to check that every step was persisted), and one last line
{"system", "sqlite": {"journal_mode", "synchronous"}, "version"} read from the connection the system used.
"""

# No ``from __future__ import annotations``: LangGraph reads the nodes' type hints when it builds the graph.
import argparse
import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypedDict

STEPS = 10


def pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(sync, sync)}


# ---------------------------------------------------------------- Burr


def burr_runner(db: Path) -> tuple[Callable[[], tuple[int, int]], sqlite3.Connection]:
    from burr.core import ApplicationBuilder, State, action
    from burr.core.persistence import SQLitePersister

    persister = SQLitePersister.from_values(db_path=str(db), table_name="burr_state")
    persister.initialize()

    def make(i: int):
        @action(reads=["step"], writes=["step"])
        def step(state: State) -> State:
            return state.update(step=state["step"] + 1)

        return step

    actions = {f"step{i}": make(i) for i in range(STEPS)}
    transitions = [(f"step{i}", f"step{i + 1}") for i in range(STEPS - 1)]

    def run() -> tuple[int, int]:
        app_id = uuid.uuid4().hex
        app = (ApplicationBuilder()
               .with_actions(**actions)
               .with_transitions(*transitions)
               .with_state(step=0)
               .with_entrypoint("step0")
               .with_identifiers(app_id=app_id)
               .with_state_persister(persister)
               .build())
        t0 = time.perf_counter()
        _, _, state = app.run(halt_after=[f"step{STEPS - 1}"])
        total = time.perf_counter() - t0
        rows = persister.connection.execute("SELECT count(*) FROM burr_state WHERE app_id = ?",
                                            (app_id,)).fetchone()[0]
        if state["step"] != STEPS:
            raise SystemExit(f"burr: the chain ended at step {state['step']}")
        return total, rows

    return run, persister.connection


# ---------------------------------------------------------------- LangGraph


class Chain(TypedDict):
    step: int


def langgraph_runner(db: Path, durability: str) -> tuple[Callable[[], tuple[int, int]], sqlite3.Connection]:
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    conn = sqlite3.connect(str(db), check_same_thread=False)  # as SqliteSaver.from_conn_string opens it
    saver = SqliteSaver(conn)
    saver.setup()

    def node(state: Chain) -> dict[str, Any]:
        return {"step": state["step"] + 1}

    builder = StateGraph(Chain)
    for i in range(STEPS):
        builder.add_node(f"step{i}", node)
    builder.add_edge(START, "step0")
    for i in range(STEPS - 1):
        builder.add_edge(f"step{i}", f"step{i + 1}")
    builder.add_edge(f"step{STEPS - 1}", END)
    graph = builder.compile(checkpointer=saver)

    def run() -> tuple[int, int]:
        thread = uuid.uuid4().hex
        t0 = time.perf_counter()
        out = graph.invoke({"step": 0}, {"configurable": {"thread_id": thread}}, durability=durability)
        total = time.perf_counter() - t0
        if out["step"] != STEPS:
            raise SystemExit(f"langgraph: the chain ended at step {out['step']}")
        with saver.lock:
            rows = conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id = ?", (thread,)).fetchone()[0]
        return total, rows

    return run, conn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["burr", "langgraph", "langgraph-async"])
    ap.add_argument("--rounds", type=int, default=55)
    ap.add_argument("--dir", type=Path, required=True, help="folder for the SQLite file (made fresh here)")
    args = ap.parse_args()

    db = args.dir / f"{args.system}.sqlite"
    if args.system == "burr":
        run, conn = burr_runner(db)
        package = "burr"
    else:
        run, conn = langgraph_runner(db, "sync" if args.system == "langgraph" else "async")
        package = "langgraph"
    for rnd in range(args.rounds):
        total, rows = run()
        print(json.dumps({"system": args.system, "round": rnd, "total_s": total, "rows": rows}), flush=True)
    print(json.dumps({"system": args.system, "sqlite": pragmas(conn), "sqlite_version": sqlite3.sqlite_version,
                      "version": version(package)}), flush=True)


if __name__ == "__main__":
    main()
