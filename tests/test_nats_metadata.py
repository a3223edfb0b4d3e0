"""Our parser of a JetStream delivery's metadata gives nats-py's own results, for every reply subject."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from petribus import bus  # noqa: F401  (installs the parser)
from petribus import nats_metadata

SAMPLES = [
    "$JS.ACK.PB_EVENTS.scheduler.1.123456.98765.1796011578725260000.42",
    "$JS.ACK.PB_WORK.executor-cpu.3.7.7.1796011578000000001.0",
    "$JS.ACK.hub.acct-hash.PB_EVENTS.scheduler.2.10.11.1796011578725260000.0.rand",  # a domain's form
    "$JS.ACK._.acct-hash.S.C.1.2.3.1796011578725260000.5.rand",
]


def _fields(md: Msg.Metadata) -> tuple:
    return (md.sequence.stream, md.sequence.consumer, md.num_delivered, md.num_pending, md.timestamp,
            md.stream, md.consumer, md.domain)


def test_the_installed_parser_is_ours_and_agrees_with_nats_py_on_samples() -> None:
    assert nats_metadata.original is not None, \
        "nats-py no longer has Metadata._from_reply: drop nats_metadata"
    assert Msg.Metadata.__dict__["_from_reply"].__func__ is nats_metadata.from_reply
    for reply in SAMPLES:
        ours, theirs = Msg.Metadata._from_reply(reply), nats_metadata.original.__func__(Msg.Metadata, reply)
        assert ours == theirs and _fields(ours) == _fields(theirs) and hash(ours) == hash(theirs), reply
        assert type(ours) is Msg.Metadata and type(ours.sequence) is Msg.Metadata.SequencePair
    msg = Msg(None, subject="pb.ev.b.s.marker_added", reply=SAMPLES[0])  # type: ignore[arg-type]
    assert msg.metadata.sequence.stream == 123456 and msg.metadata.num_delivered == 1


@pytest.mark.parametrize("reply", ["", "inbox.abc", "$JS.ACK.too.short", "$JS.NAK.S.C.1.2.3.4.5"])
def test_what_is_not_a_jetstream_reply_is_refused_as_nats_py_refuses_it(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        Msg.Metadata._from_reply(reply)


NAME = st.text(alphabet="abcXYZ_-09", min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(NAME, NAME, st.integers(1, 2**40), st.integers(1, 2**63), st.integers(1, 2**63), st.integers(0, 2**62),
       st.integers(0, 2**40))
def test_it_agrees_with_nats_py_on_any_delivery(stream: str, consumer: str, delivered: int, sseq: int,
                                                cseq: int, ts: int, pending: int) -> None:
    reply = f"$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
    ours, theirs = Msg.Metadata._from_reply(reply), nats_metadata.original.__func__(Msg.Metadata, reply)
    assert _fields(ours) == _fields(theirs)
