"""One error hierarchy for petribus.

Every error carries a stable ``code`` and a message a person can act on: what was wrong, with which
value, and what to do. Errors raised at a boundary (nats, openai, a sandbox) are turned into these and
marked ``retryable`` so callers can decide without string matching.
"""

from __future__ import annotations


class PetribusError(Exception):
    """Base of every petribus error."""

    code: str = "petribus_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class NetDefinitionError(PetribusError, ValueError):
    """The bot's net is invalid. ``problems`` lists every problem found, not just the first."""

    code = "net_definition"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the bot's net has {len(self.problems)} problem(s):\n{lines}")


class UnknownHandoff(NetDefinitionError):
    """A bot hands over to a bot the services that loaded it do not serve (``Bot(handoffs=...)``)."""

    code = "unknown_handoff"

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.message = f"{len(self.problems)} hand-off(s) to a bot that is not served:\n{lines}"
        self.args = (self.message,)


class InvalidInput(PetribusError, ValueError):
    """A client sent something that cannot enter the log (bad JSON, unknown type, failed validation)."""

    code = "invalid_input"


class UnknownLocation(InvalidInput):
    code = "unknown_location"


class UnknownRequest(InvalidInput, LookupError):
    """An answer names a task, question or file request the session never had."""

    code = "unknown_request"


class AlreadyAnswered(InvalidInput):
    """An answer to something that no longer waits: answered before, timed out, or its run ended."""

    code = "already_answered"


class FileTooLarge(InvalidInput):
    """A file is larger than ``PETRIBUS_MAX_FILE_BYTES``."""

    code = "file_too_large"


class UnknownSession(PetribusError, LookupError):
    code = "unknown_session"


class UnknownBot(PetribusError, LookupError):
    code = "unknown_bot"


class TransitionOutputError(PetribusError, TypeError):
    """A transition returned something that does not match its declared outputs."""

    code = "bad_transition_output"


class TransitionTimeout(PetribusError, TimeoutError):
    code = "transition_timeout"
    retryable = True


class SandboxCrashed(PetribusError, RuntimeError):
    code = "sandbox_crashed"
    retryable = True


class BusError(PetribusError, ConnectionError):
    code = "bus_error"
    retryable = True


class StorageFull(BusError):
    """The session log (a stream with ``discard=new``) is at its limit: the append was refused, nothing lost."""

    code = "storage_full"
    retryable = False


class BusTimeout(BusError, TimeoutError):
    code = "bus_timeout"


class BusUnavailable(BusError):
    """The bus stayed unreachable (no server, no stream leader, no answer) for the whole outage budget
    (``PETRIBUS_BUS_OUTAGE_S``); nothing is known to have been lost, and the call may be tried again."""

    code = "bus_unavailable"
    retryable = True


class AppLoadError(PetribusError, ImportError):
    code = "app_load"
