"""What can go wrong asking a model, as petribus errors a user can act on; and keeping secrets out of text.

The OpenAI SDK's exceptions are turned into these at the boundary (``openai_responder``). Their
messages say what failed and what to check, and never carry the key: an endpoint's own error text is
passed through :func:`redact` before it goes anywhere (OpenAI echoes part of a wrong key back).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from petribus.errors import PetribusError


class LLMError(PetribusError):
    """The model could not answer. The user gets one ``error`` event with this code and message."""

    code = "llm_error"


class LLMAuthError(LLMError):
    code = "llm_auth"


class LLMPermissionError(LLMError):
    code = "llm_permission"


class LLMModelNotFound(LLMError):
    code = "llm_model_not_found"


class LLMBadRequest(LLMError):
    code = "llm_bad_request"


class LLMUnavailable(LLMError):
    """Retries ran out (timeouts, rate limits, 5xx): worth trying again later."""

    code = "llm_unavailable"
    retryable = True


class LLMOffline(LLMError):
    code = "llm_offline"


REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret (and its tail: endpoints echo ``sk-...abcd``) replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
            if len(secret) >= 12:
                text = text.replace(secret[-8:], REDACTED)
    return text


def endpoint(base_url: str | None) -> str:
    """The endpoint to name in a message: the base URL without any user:password in it."""
    if not base_url:
        return "the OpenAI API (api.openai.com)"
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
