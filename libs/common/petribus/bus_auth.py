"""A closed bus: one NATS user per service role, each allowed only the subjects its role uses.

Whoever reaches an open nats-server can append any event, queue any work and read every secret, past
every check the gateway makes. So each service connects as the user of its role (``ROLES``) and the
server refuses what that role never does: the gateway cannot queue work or write the keys bucket, the
executor cannot publish work, deltas or keys, nor read the keys bucket, the LLM service cannot queue
work or touch files, and no service but ``admin`` may delete or update a stream. The permissions are
allow-lists (``PERMISSIONS``): a subject not listed is refused. Each role's replies come to inboxes of
its own (``_INBOX_<role>.>``), so no service can read another's replies (a secret's value among them).

Each kind of event has a subject of its own (``pb.ev.<bot>.<session>.<kind>``), so a role may append
only the kinds it makes (``APPENDS``): the gateway never a ``transition_fired``, the executor never a
``user_message``, the LLM service never a claim or an outcome (docs/closed-bus.md); the LLM service
opens a handed-over session (``session_created``, ``user_message``: docs/handoffs.md).

Passwords: ``Credentials`` makes one per role (random, 32 bytes) in a folder of ``<role>.password``
files (0600; the folder 0700) and renders the ``authorization`` block of a nats-server config that
checks them. ``petribus serve`` keeps them under ``DATA_DIR/nats/auth``; ``petribus credentials DIR``
writes them for a production server. A client finds its credentials with ``ClientAuth.from_settings``.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from petribus import keys, subjects
from petribus import secrets as transition_secrets
from petribus.errors import BusError
from petribus.settings import Settings

ROLES = ("admin", "scheduler", "executor", "llm", "gateway")
SERVICE_ROLES = ROLES[1:]
PASSWORD_SUFFIX = ".password"
SERVER_BLOCK = "users.conf"  # the authorization block, for a nats-server config's `include`
API = "$JS.API"

EVENTS = subjects.EVENTS_STREAM
WORK = subjects.WORK_STREAM
TIMERS = subjects.TIMERS_STREAM
IDLE = subjects.IDLE_STREAM
FILES = f"OBJ_{subjects.FILES_BUCKET}"


def inbox_prefix(role: str) -> str:
    """Where a role's replies come: a subscription no other role is allowed."""
    return "_INBOX" if role == "admin" else f"_INBOX_{role}"


@dataclass(frozen=True)
class Permissions:
    """A nats-server user's ``permissions``: allow-lists, and denials that win over them."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()

    def render(self) -> dict[str, object]:
        publish: dict[str, object] = {"allow": list(self.publish)}
        if self.deny_publish:
            publish["deny"] = list(self.deny_publish)
        return {"publish": publish, "subscribe": {"allow": list(self.subscribe)}}


def _read_stream(stream: str) -> tuple[str, ...]:
    """Look at a stream: its info, single messages (direct or from the leader), ephemeral consumers
    (watches, ordered subscriptions) and their flow control."""
    return (f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}.>", f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.INFO.{stream}.*",
            f"$JS.FC.{stream}.>")


def _durable(stream: str, durable: str) -> tuple[str, ...]:
    """Create, read, pull from and acknowledge one durable consumer (``*``: any of the stream's)."""
    return (f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}", f"{API}.CONSUMER.INFO.{stream}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.{durable}.>")


def _list_consumers(stream: str) -> tuple[str, ...]:
    return (f"{API}.CONSUMER.LIST.{stream}", f"{API}.CONSUMER.NAMES.{stream}")


def _kv_read(bucket: str) -> tuple[str, ...]:
    """Read and watch a KV bucket, and create it if it is missing (whoever starts first does)."""
    return (*_read_stream(f"KV_{bucket}"), f"{API}.STREAM.CREATE.KV_{bucket}")


def _kv_write(bucket: str) -> tuple[str, ...]:
    return (*_kv_read(bucket), f"$KV.{bucket}.>")


# Every service: the account info (the CLI's probe), the streams' creation at start (a create of an
# existing stream with the same settings changes nothing; only admin may update or delete one), the
# session logs and the deleted sessions read, and events appended.
_SERVICE = (
    f"{API}.INFO", f"{API}.STREAM.NAMES",  # the stream of a subject (nats-py asks before a subscription)
    *(f"{API}.STREAM.CREATE.{s}" for s in (EVENTS, WORK, TIMERS, IDLE, FILES)),
    *_read_stream(EVENTS), *_kv_read(subjects.DELETED_BUCKET),
    # Deployments (--deployments): what is deployed read, the versions' archives fetched, and whether
    # this service loaded each version said. Only admin (petribus deploy) writes deployments.
    *_kv_read(subjects.DEPLOY_BUCKET), *_read_stream(f"OBJ_{subjects.APPS_BUCKET}"),
    f"{API}.STREAM.CREATE.OBJ_{subjects.APPS_BUCKET}", *_kv_write(subjects.READY_BUCKET),
)
# The kinds of event each role appends (a subject each): nothing else may it append.
APPENDS: dict[str, tuple[str, ...]] = {
    "gateway": ("session_created", "agent_message", "user_message", "marker_added", "accept_transition",
                "reject_transition", "confirm_response", "input_file_response", "session_forked", "halt_set"),
    "scheduler": ("transition_fired", "confirm_transition", "reject_transition", "transition_failed", "error",
                  "session_expired"),
    "executor": ("transition_started", "transition_completed", "transition_failed", "agent_message",
                 "memory_updated", "confirm_request", "confirm_response", "prompt_request", "prompt_response",
                 "input_file_request", "input_file_response", "output_file"),
    # A hand-off (docs/handoffs.md): handed_off in the source session, and the target session's opening
    # session_created and the user_message that carries the request over.
    "llm": ("agent_message", "marker_added", "prompt_response", "error", "handed_off", "session_created",
            "user_message"),
}
# The files of sessions (an object store): chunks and metadata written, replaced chunks purged.
_FILES = (*_read_stream(FILES), f"$O.{subjects.FILES_BUCKET}.>", f"{API}.STREAM.PURGE.{FILES}")
# Deleting a session (petribus.deletion; the gateway's DELETE, the scheduler's expiry): a tombstone, then
# purges of its files, work items, timers and log. A purge names its subject in the request, which
# permissions do not see: whoever may purge one session's subject may purge the whole stream.
_DELETE = (*_FILES, f"$KV.{subjects.DELETED_BUCKET}.>",
           *(f"{API}.STREAM.PURGE.{s}" for s in (EVENTS, WORK, TIMERS, IDLE)))
_NEVER = (f"{API}.STREAM.DELETE.>", f"{API}.STREAM.UPDATE.>", f"{API}.CONSUMER.DELETE.>",
          f"{API}.STREAM.MSG.DELETE.>", f"{API}.ACCOUNT.>", f"{API}.META.>", f"{API}.SERVER.>")


def _service(role: str, *publish: str, subscribe: tuple[str, ...] = ()) -> Permissions:
    return Permissions(publish=(*_SERVICE, *subjects.kinds(*APPENDS[role]), *publish),
                       subscribe=(f"{inbox_prefix(role)}.>", *subscribe), deny_publish=_NEVER)


PERMISSIONS: dict[str, Permissions] = {
    "admin": Permissions(publish=(">",), subscribe=(">",)),
    "scheduler": _service(
        "scheduler",
        f"{subjects.WORK_PREFIX}.>", f"{subjects.TIMERS_PREFIX}.>", f"{subjects.IDLE_PREFIX}.>",
        f"{API}.STREAM.INFO.{WORK}", *_list_consumers(WORK),  # queued work items; the pools served
        *_durable(EVENTS, subjects.SCHEDULER_DURABLE),
        *_durable(TIMERS, "*"), *_durable(IDLE, "*"),  # only the scheduler keeps timers
        *_kv_read(subjects.EXECUTORS_BUCKET), *_DELETE,
    ),
    "executor": _service(
        "executor",
        *_durable(WORK, "*"),  # executor-<pool>, one per pool
        *_kv_write(subjects.EXECUTORS_BUCKET), *_kv_read(transition_secrets.SECRETS_BUCKET), *_FILES,
        subscribe=(subjects.claims_landed(),),  # which claims are stored: work sent with them runs on that
    ),
    "llm": _service(
        "llm",
        f"{subjects.DELTAS_PREFIX}.>", *_durable(EVENTS, subjects.LLM_DURABLE),
    ),
    "gateway": _service(
        "gateway",
        f"{API}.STREAM.INFO.{WORK}", *_list_consumers(WORK),  # GET /pools: the pools, their queued work
        *_kv_read(subjects.EXECUTORS_BUCKET), *_kv_read(keys.KEYS_BUCKET), *_DELETE,
        subscribe=(f"{subjects.DELTAS_PREFIX}.>",),
    ),
}


class Credentials:
    """A password per role, kept in ``folder`` as ``<role>.password`` files: made once, reused after."""

    def __init__(self, folder: Path, passwords: dict[str, str]) -> None:
        self.folder = folder
        self._passwords = passwords

    @classmethod
    def load_or_create(cls, folder: str | Path) -> Credentials:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        passwords = {}
        for role in ROLES:
            path = folder / f"{role}{PASSWORD_SUFFIX}"
            if not path.exists():
                _write_private(path, secrets.token_urlsafe(32))
            passwords[role] = _read_password(path)
        return cls(folder, passwords)

    def password(self, role: str) -> SecretStr:
        return SecretStr(self._passwords[role])

    def server_block(self) -> str:
        """The ``authorization { users: [...] }`` of a nats-server config: each role's user, password
        and permissions."""
        users = [{"user": role, "password": self._passwords[role], "permissions": PERMISSIONS[role].render()}
                 for role in ROLES]
        # JSON is valid nats-server config; every subject is quoted, so '$JS...' is never a variable.
        return f"authorization {{\n  users: {json.dumps(users, indent=2)}\n}}\n"

    def write_server_block(self) -> Path:
        path = self.folder / SERVER_BLOCK
        _write_private(path, self.server_block())
        return path

    def __repr__(self) -> str:
        return f"Credentials({str(self.folder)!r}, roles={list(self._passwords)})"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read, from its first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _read_password(path: Path) -> str:
    password = path.read_text().strip()
    if not password:
        raise BusError(f"the NATS password file {path} is empty; delete it to have a new password made, "
                       "or write the password there", retryable=False)
    return password


@dataclass(frozen=True)
class ClientAuth:
    """What a client shows the server: a user and password or a .creds file, TLS, and its inbox prefix."""

    user: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    creds: Path | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    inbox: str = "_INBOX"

    @classmethod
    def from_settings(cls, settings: Settings, role: str = "admin", *, local_admin: bool = False) -> ClientAuth:
        """The credentials of ``role`` from the settings: a .creds file (``PETRIBUS_NATS_CREDS``), else a
        user and password (``PETRIBUS_NATS_USER``/``_PASSWORD``), else the role's file in a credentials
        folder (``PETRIBUS_NATS_AUTH_DIR``); else none. ``local_admin`` (the command-line tools) also
        finds the admin password a local ``petribus serve`` made under ``DATA_DIR/nats/auth``."""
        tls = _tls(settings)
        inbox = inbox_prefix(role)
        if settings.nats_creds is not None:
            return cls(creds=settings.nats_creds, tls=tls, inbox=inbox)
        if settings.nats_user:
            return cls(user=settings.nats_user, password=settings.nats_password, tls=tls, inbox=inbox)
        folder = settings.nats_auth_dir
        if folder is None and local_admin and role == "admin":
            local = local_auth_dir(settings.data_dir)
            folder = local if (local / f"admin{PASSWORD_SUFFIX}").exists() else None
        if folder is None:
            return cls(tls=tls, inbox=inbox)
        path = Path(folder) / f"{role}{PASSWORD_SUFFIX}"
        if not path.exists():
            raise BusError(f"no NATS password for the {role} user in {folder} (PETRIBUS_NATS_AUTH_DIR): expected "
                           f"{path}, as petribus serve or petribus credentials write it", retryable=False)
        return cls(user=role, password=SecretStr(_read_password(path)), tls=tls, inbox=inbox)

    def options(self) -> dict[str, object]:
        """Keyword arguments for ``nats.connect``."""
        out: dict[str, object] = {"inbox_prefix": self.inbox}
        if self.creds is not None:
            try:
                import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
            except ImportError:
                raise BusError(f"PETRIBUS_NATS_CREDS={self.creds} needs the nkeys package (pip install nkeys)",
                               retryable=False) from None
            out["user_credentials"] = str(self.creds)
        elif self.user:
            out["user"] = self.user
            out["password"] = self.password.get_secret_value() if self.password else ""
        if self.tls is not None:
            out["tls"] = self.tls
        return out

    def describe(self) -> str:
        """Who connects, for messages: never the password."""
        if self.creds is not None:
            return f"the credentials in {self.creds}"
        return f"user {self.user!r}" if self.user else "no credentials"


def local_auth_dir(data_dir: Path) -> Path:
    """Where ``petribus serve`` keeps its embedded server's passwords."""
    return Path(data_dir) / "nats" / "auth"


def _tls(settings: Settings) -> ssl.SSLContext | None:
    if settings.nats_tls_ca is None and settings.nats_tls_cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
    if settings.nats_tls_cert is not None:
        ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key) if settings.nats_tls_key else None)
    return ctx
