"""Our header parser for nats-py gives nats-py's own results, for ordinary and hostile header blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from petribus import bus  # noqa: F401  (installs the parser)
from petribus import nats_headers
from nats.aio.client import Client

SAMPLES = [
    b"Nats-Msg-Id: fire:abc\r\nNats-Expected-Last-Subject-Sequence: 12\r\n\r\n",
    b"Nats-Stream: PB_EVENTS\r\nNats-Subject: pb.ev.b.s\r\nNats-Sequence: 7\r\nNats-Time-Stamp: 2026-11-29T13:00:00Z\r\n",
    b"Bad Name: x\r\nGood:y\r\nTabbed:\tz\r\n:empty-name\r\nno-colon\r\n",
    b"Caf\xc3\xa9: v\r\nK: caf\xc3\xa9 \xff\r\nK2: \x1c\r\nA\x1cB: 1\r\n",
    b"",
]


def test_the_installed_parser_is_ours_and_agrees_with_nats_py_on_samples() -> None:
    assert nats_headers.original is not None, "nats-py no longer has _parse_header_lines: drop nats_headers"
    assert Client._parse_header_lines is nats_headers.parse_header_lines
    for raw in SAMPLES:
        assert nats_headers.parse_header_lines(raw) == nats_headers.original(raw), raw


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.sampled_from([b":", b": ", b"", b":\t"]),
                          st.binary(max_size=12)), max_size=6))
def test_it_agrees_with_nats_py_on_any_header_block(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines)
    assert nats_headers.parse_header_lines(raw) == nats_headers.original(raw)
