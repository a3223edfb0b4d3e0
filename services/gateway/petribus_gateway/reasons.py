"""WebSocket close reasons: short and whole, never a message cut at the frame's limit."""

from __future__ import annotations


CLOSE_REASON_BYTES = 123  # the most a close frame's reason may hold


def close_reason(message: str, code: str | None = None) -> str:
    """A close reason a client can show as it is: the whole message if it fits in the protocol's 123 bytes,
    else its first clause, else its code. Never a message cut mid-word (the error event sent just before
    the close carries the whole message)."""
    clause = message.split(";", 1)[0].strip()
    fallback = f"{code or 'closed'}; the error event before this close says why"
    for text in (message, clause, fallback, code or "closed"):
        if len(text.encode()) <= CLOSE_REASON_BYTES:
            return text
    return "closed"
