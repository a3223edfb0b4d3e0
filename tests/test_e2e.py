"""End to end over the WebSocket: every service running, a real nats-server, the examples' bots."""

from __future__ import annotations

from pathlib import Path

from tests.harness import Client, Stack, session_state

EXAMPLES = Path(__file__).parent.parent / "examples"
ORDER_BOT = f"{EXAMPLES / 'order_bot.py'}:bot"
PARALLEL = f"{EXAMPLES / 'parallel_search.py'}:bot"


def _completed(name: str):
    return lambda e: e["type"] == "transition_completed" and e["metadata"]["transition_name"] == name


async def test_order_bot_cancels_then_offers_refund(settings, nc):
    async with Stack(settings, [ORDER_BOT]) as stack:
        client = await Client.connect(stack.ws_url("order_bot"))
        created = await client.recv()
        assert created["type"] == "session_created"
        sid = created["value"]
        await client.send({"type": "marker_added", "value": {"location": "UserName", "data": {"name": "alice"}}})
        await client.until(_completed("offer_refund"))
        await client.close()

    seen = client.events
    added = next(e for e in seen if e["type"] == "marker_added")
    assert added["value"]["data"] == {"name": "alice"}
    fired = next(e for e in seen if e["type"] == "transition_fired")
    assert fired["metadata"]["transition_name"] == "cancel_order"
    cancel = [e["type"] for e in seen if e["metadata"]["task_id"] == fired["metadata"]["task_id"]]
    assert cancel == ["transition_fired", "transition_started", "agent_message", "transition_completed"]
    said = next(e for e in seen if e["type"] == "agent_message" and e["metadata"]["task_id"])
    assert said["value"] == "Order cancelled for alice"
    done = next(e for e in seen if _completed("cancel_order")(e))
    assert done["value"]["outputs"][0]["location"] == "OrderStatus"
    refund = [e for e in seen if e["metadata"]["transition_name"] == "offer_refund"]
    assert [e["type"] for e in refund if e["type"].startswith("transition_")] == [
        "transition_fired", "transition_started", "transition_completed"]
    # Sequences are strictly increasing: the client saw the log in order, nothing twice.
    seqs = [e["metadata"]["seq"] for e in seen]
    assert seqs == sorted(set(seqs))

    state, events = await session_state(nc, "order_bot", sid)
    assert [m.data for m in state.marking()["RefundStatus"]] == [{"message": "refund_offered"}]
    assert set(state.counts()) == {"RefundStatus"} and not state.in_flight
    assert [s for s, _ in events] == seqs  # the client saw exactly the log


async def test_parallel_searches_overlap_and_summary_waits_for_both(settings, nc):
    async with Stack(settings, [PARALLEL]) as stack:
        client = await Client.connect(stack.ws_url("parallel_search"))
        sid = (await client.recv())["value"]
        await client.send({"type": "marker_added", "value": {"location": "Query", "data": {"text": "petri"}}})
        summary = await client.until(_completed("summarise"))
        await client.close()

    assert summary["value"]["outputs"][0]["data"]["sources"] == 3
    state, events = await session_state(nc, "parallel_search", sid)
    times: dict[tuple[str, str], float] = {}
    for _, e in events:
        if e.type in ("transition_started", "transition_completed"):
            times[(e.transition, e.type)] = e.ts
    # Both searches (a second each) were running at once: each started before the other finished.
    assert times[("search_web", "transition_started")] < times[("search_docs", "transition_completed")]
    assert times[("search_docs", "transition_started")] < times[("search_web", "transition_completed")]
    # The summary only started once both results were in.
    assert times[("summarise", "transition_started")] > max(
        times[("search_web", "transition_completed")], times[("search_docs", "transition_completed")])
    assert set(state.counts()) == {"Summary"}
