"""The wire contract: every event encodes, decodes strictly, and shows to a client in one shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from petribus import events as ev
from petribus.events import EVENT_CLASSES, EVENT_TYPES, SCHEMA_VERSION, Marker, decode, encode, to_client

COMMON = dict(bot="order_bot", session_id="s1", cause="c0", trace="00-abc-def-01", request_id="r1")


def _m(location: str = "UserName", **data: Any) -> Marker:
    return Marker(location=location, data=data or {"name": "alice"})


# One fully populated example of each type: optional fields set, so a field that does not survive
# the round trip shows up.
SAMPLES: dict[str, ev._Event] = {
    "session_created": ev.SessionCreated(**COMMON, parent=ev.HandoffParent(bot="support", session_id="s0", seq=4,
                                                                           handoff_id="e5")),
    "user_message": ev.UserMessage(**COMMON, text="cancel alice's order"),
    "agent_message": ev.AgentMessage(**COMMON, text="done", firing_id="f1", transition="cancel_order",
                                     reply_to="e0"),
    "marker_added": ev.MarkerAdded(**COMMON, marker=_m(nested={"n": 1, "xs": [1, 2.5, None, "s"]}), source="llm"),
    "transition_fired": ev.TransitionFired(**COMMON, firing_id="f1", transition="cancel_order",
                                           consumed=["m1", "m2"], confirm=True),
    "transition_started": ev.TransitionStarted(**COMMON, firing_id="f1", transition="cancel_order",
                                               executor="exec-1", attempt=2),
    "transition_completed": ev.TransitionCompleted(**COMMON, firing_id="f1", transition="cancel_order",
                                                   outputs=[_m("OrderStatus", message="cancelled")],
                                                   duration_ms=12.5),
    "transition_failed": ev.TransitionFailed(**COMMON, firing_id="f1", transition="cancel_order", error="boom",
                                             error_type="ValueError", retryable=True, final=False, attempt=3,
                                             traceback="Traceback ...\nValueError: boom", inputs=[_m()]),
    "confirm_transition": ev.ConfirmTransition(**COMMON, firing_id="f1", transition="cancel_order",
                                               description="Cancel?", markers=[_m()]),
    "accept_transition": ev.AcceptTransition(**COMMON, firing_id="f1"),
    "reject_transition": ev.RejectTransition(**COMMON, firing_id="f1", reason="changed my mind"),
    "confirm_request": ev.ConfirmRequest(**COMMON, firing_id="f1", transition="cancel_order",
                                         description="Refund?", timeout=30.0),
    "confirm_response": ev.ConfirmResponse(**COMMON, accepted=False),
    "memory_updated": ev.MemoryUpdated(**COMMON, firing_id="f1", transition="cancel_order",
                                       memory={"k": [1, {"n": None}]}),
    "input_file_request": ev.InputFileRequest(**COMMON, firing_id="f1", transition="t", file_id="file1",
                                              description="your receipt", upload_url="/files/file1"),
    "input_file_response": ev.InputFileResponse(**COMMON, file_id="file1", name="receipt.pdf", size=1024),
    "output_file": ev.OutputFile(**COMMON, firing_id="f1", transition="t", file_id="file2", name="out.csv",
                                 description="results", size=9, url="/files/file2"),
    "error": ev.ErrorEvent(**COMMON, code="invalid_input", message="bad marker", firing_id="f1", transition="t"),
    "prompt_request": ev.PromptRequest(**COMMON, firing_id="f1", transition="t", text="Summarise this",
                                       wait=False, timeout=30.0),
    "prompt_response": ev.PromptResponse(**COMMON, firing_id="f1", transition="t", text="",
                                         error="the model refused the key", code="llm_auth"),
    "session_forked": ev.SessionForked(**COMMON, source_bot="order_bot", source_session="s0", source_seq=7,
                                       markers=[_m()], chat=[ev.ForkedTurn(role="user", text="hi")],
                                       memory=[{"k": 1}], in_flight=["f1"],
                                       files=[ev.ForkedFile(file_id="file1", name="a.txt", size=3,
                                                            content_type="text/plain", direction="input")]),
    "halt_set": ev.HaltSet(**COMMON, before=["cancel_order"]),
    "handed_off": ev.HandedOff(**COMMON, target_bot="billing", target_session="s2", request="refund my order",
                               actor=ev.Actor(owner="alice", key_id="k1")),
    "session_expired": ev.SessionExpired(**COMMON, idle_s=86400.5,
                                         actor=ev.Actor(owner="alice", key_id="k1", address="10.0.0.7")),
}


def test_every_event_type_has_a_sample():
    assert set(SAMPLES) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES)) == len(EVENT_CLASSES)


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_event_round_trips_through_encode_and_decode(type_):
    event = SAMPLES[type_]
    back = decode(encode(event))
    assert type(back) is type(event)
    assert back == event
    assert decode(encode(event).decode()) == event  # str as well as bytes


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda c: c.__name__)
def test_event_with_only_required_fields_round_trips(cls):
    required = {name: SAMPLES[cls.model_fields["type"].default].__dict__[name]
                for name, f in cls.model_fields.items() if f.is_required()}
    event = cls(**required)
    assert decode(encode(event)) == event


def test_remembering_none_round_trips():
    event = ev.MemoryUpdated(bot="b", session_id="s", memory=None)
    assert decode(encode(event)).memory is None


def test_marker_data_keeps_its_json_types():
    event = SAMPLES["marker_added"]
    data = decode(encode(event)).marker.data  # type: ignore[union-attr]
    assert data == {"nested": {"n": 1, "xs": [1, 2.5, None, "s"]}}
    assert type(data["nested"]["n"]) is int and type(data["nested"]["xs"][1]) is float


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_schema_version_is_on_every_event(type_):
    assert json.loads(encode(SAMPLES[type_]))["v"] == SCHEMA_VERSION


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_unknown_field_is_rejected(type_):
    payload = json.loads(encode(SAMPLES[type_]))
    payload["surprise"] = 1
    with pytest.raises(ValidationError) as info:
        decode(json.dumps(payload))
    assert "surprise" in str(info.value) and "extra" in str(info.value).lower()


def test_unknown_field_inside_a_marker_is_rejected():
    payload = json.loads(encode(SAMPLES["marker_added"]))
    payload["marker"]["colour"] = "red"
    with pytest.raises(ValidationError, match="colour"):
        decode(json.dumps(payload))


def test_unknown_event_type_is_rejected():
    payload = json.loads(encode(SAMPLES["user_message"]))
    payload["type"] = "user_whispered"
    with pytest.raises(ValidationError) as info:
        decode(json.dumps(payload))
    assert "user_whispered" in str(info.value)


def test_event_without_type_is_rejected():
    payload = json.loads(encode(SAMPLES["user_message"]))
    del payload["type"]
    with pytest.raises(ValidationError, match="type"):
        decode(json.dumps(payload))


def test_missing_required_field_is_rejected():
    payload = json.loads(encode(SAMPLES["transition_fired"]))
    del payload["consumed"]
    with pytest.raises(ValidationError, match="consumed"):
        decode(json.dumps(payload))


def test_events_are_immutable():
    with pytest.raises(ValidationError):
        SAMPLES["user_message"].text = "edited"  # type: ignore[misc]


def test_events_get_unique_ids_and_a_timestamp():
    a, b = ev.SessionCreated(bot="b", session_id="s"), ev.SessionCreated(bot="b", session_id="s")
    assert a.id != b.id and a.ts > 0


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_to_client_shape(type_):
    event = SAMPLES[type_]
    shown = to_client(event, seq=42)
    assert set(shown) == {"type", "value", "metadata", "pair_id"}  # Beam's BotEvent fields
    assert shown["type"] == type_
    paired = {"confirm_request": "r1", "confirm_response": "r1", "prompt_request": "r1", "prompt_response": "r1",
              "input_file_request": "file1", "input_file_response": "file1"}
    assert shown["pair_id"] == paired.get(type_, "")
    meta = shown["metadata"]
    assert {"session_id", "request_id", "task_id", "transition_name", "seq"} <= set(meta)
    assert (meta["session_id"], meta["request_id"], meta["seq"]) == ("s1", "r1", 42)
    json.dumps(shown)  # a client gets plain JSON


def test_to_client_names_the_firing_as_task():
    meta = to_client(SAMPLES["transition_completed"], seq=7)["metadata"]
    assert (meta["task_id"], meta["transition_name"]) == ("f1", "cancel_order")
    meta = to_client(SAMPLES["user_message"], seq=None)["metadata"]
    assert (meta["task_id"], meta["transition_name"], meta["seq"]) == (None, None, None)


def test_to_client_values():
    assert to_client(SAMPLES["user_message"], 1)["value"] == "cancel alice's order"
    added = to_client(SAMPLES["marker_added"], 1)["value"]
    assert added["location"] == "UserName" and added["data"]["nested"]["n"] == 1
    assert to_client(SAMPLES["transition_fired"], 1)["value"] == {"transition": "cancel_order",
                                                                 "consumed": ["m1", "m2"]}
    assert to_client(SAMPLES["error"], 1)["value"] == {"code": "invalid_input", "message": "bad marker"}
