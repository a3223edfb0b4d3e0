"""Settings from the environment (``PETRIBUS_*``), with defaults that work on one machine."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "petribus"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PETRIBUS_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server URL (comma-separated for a cluster).")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Embedded nats-server's store folder.")
    sync_interval: str = Field(
        default="1s",
        description="How often JetStream fsyncs ('always' for every write). Acknowledged events newer "
        "than this can be lost if the machine (not just the process) crashes.",
    )
    duplicate_window_s: float = Field(default=120.0, description="JetStream de-duplication window (Nats-Msg-Id).")
    replicas: int = Field(default=1, description="Stream replicas (3 on a 3-node cluster).")
    # A closed bus (docs/closed-bus.md): who this process is to NATS, and TLS to it.
    nats_user: str | None = Field(default=None, description="NATS user to connect as (with nats_password).")
    nats_password: SecretStr | None = Field(default=None, description="Password of nats_user.")
    nats_auth_dir: Path | None = Field(
        default=None,
        description="A folder of <role>.password files (as petribus serve and petribus credentials write them): "
        "each service connects as its role's user (scheduler, executor, llm, gateway; admin for the CLI).",
    )
    nats_creds: Path | None = Field(default=None, description="A NATS .creds file (JWT and nkey seed), for "
                                    "servers run with accounts; needs the nkeys package.")
    nats_tls_ca: Path | None = Field(default=None, description="CA certificate that signed the NATS server's "
                                     "(tls:// URLs); unset: the system's CAs.")
    nats_tls_cert: Path | None = Field(default=None, description="Client certificate, for a server that "
                                       "verifies clients (with nats_tls_key).")
    nats_tls_key: Path | None = Field(default=None, description="Private key of nats_tls_cert.")
    bus_outage_s: float = Field(
        default=60.0, gt=0,
        description="How long an append or read keeps retrying while the bus is unavailable (nats-server "
        "restarting, a cluster electing a stream leader, no responders, timeouts) before it raises "
        "BusUnavailable. Long enough for an election and a process restart.",
    )

    # scheduler
    scheduler_batch: int = 256
    scheduler_retry_s: float = Field(
        default=1.0,
        description="Pause before a session whose step failed is tried again; doubled with each further "
        "delivery of its events, up to scheduler_retry_max_s. Other sessions never wait for it.",
    )
    scheduler_retry_max_s: float = Field(default=60.0, description="Longest pause between two tries of a "
                                         "failing session.")
    scheduler_sweep_s: float = Field(
        default=60.0,
        description="How often each scheduler re-reads the sessions it holds that have markers or firings "
        "in flight and acts on what events alone would not have woken (a claim never dispatched, an enabled "
        "transition never claimed). A reconnect to NATS sweeps at once.",
    )
    work_lease_s: float = Field(
        default=60.0,
        description="How often a session with firings in flight is checked for lost work items (a server "
        "crash, a purge): a lost one is sent again within this time, while any scheduler runs.",
    )
    confirm_timeout_s: float = Field(
        default=300.0,
        description="Seconds a user has to accept or reject a confirm=True firing before it is rejected "
        "(reason 'timeout') and its markers go back; 0 waits for ever.",
    )

    # bounded storage and lifetimes (docs/limits.md)
    events_max_bytes: int = Field(
        default=8 * 1024**3, description="Most bytes PB_EVENTS (every session's log) may hold; -1: no limit. "
        "At the limit appends are refused (discard=new), never an older event dropped; new sessions are "
        "refused earlier, at new_sessions_max_fill of it.")
    events_max_per_session: int = Field(
        default=1_000_000, description="Most events of one kind (one type: user_message, marker_added, ...) "
        "one session's log may hold; -1: no limit. PB_EVENTS has a subject per kind of event of each session "
        "and JetStream bounds each subject, so a session may hold this many of every kind; events_max_bytes "
        "bounds them all. At the limit the session's appends of that kind are refused (an error), its older "
        "events are never dropped.")
    work_max_bytes: int = Field(default=1024**3, description="Most bytes each of PB_WORK (work items), "
                                "PB_TIMERS (leases, confirmation deadlines) and PB_IDLE (expiry timers) may hold "
                                "(-1: no limit); at the limit a claim's dispatch or a timer is refused and the "
                                "session is retried.")
    files_max_bytes: int = Field(default=8 * 1024**3, description="Most bytes the PB_FILES object store may "
                                 "hold (-1: no limit); at the limit a send_file or an upload is refused.")
    new_sessions_max_fill: float = Field(
        default=0.9, gt=0, le=1, description="New sessions are refused once PB_EVENTS holds this share of "
        "events_max_bytes: the rest is kept for the sessions already live.")
    session_ttl_s: float = Field(
        default=30 * 24 * 3600.0, ge=0, description="A session with no event for this long gets "
        "session_expired and is deleted like DELETE (0: sessions never expire).")
    deleted_ttl_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="How long the record that a session was deleted is kept: "
        "until then a late append for it (a firing still running) is refused and purged. Executors and "
        "schedulers hold these records in memory (some 150 bytes each).")
    max_sessions_per_owner: int = Field(
        default=1000, ge=0, description="Sessions one owner (an API key's owner; without a key, one client "
        "address) may hold at once; creating one more answers 429 session_quota (0: no quota).")
    session_create_rate: float = Field(
        default=2.0, ge=0, description="Sessions one client address may create per second, on average "
        "(0: no limit); bursts of session_create_burst.")
    session_create_burst: int = Field(default=100, ge=1, description="Sessions one address may create at once.")
    ws_message_rate: float = Field(
        default=100.0, ge=0, description="Messages per second one WebSocket connection may send, on average "
        "(0: no limit); an excess message gets an error event (rate_limited) and is not processed.")
    ws_message_burst: int = Field(default=1000, ge=1, description="Messages a connection may send at once.")
    key_request_rate: float = Field(
        default=200.0, ge=0, description="Requests (REST, and WebSocket messages) per second per API key, or "
        "per client address without a key (0: no limit); an excess answers 429 with Retry-After.")
    key_request_burst: int = Field(default=2000, ge=1, description="Requests one key may send at once.")
    max_body_bytes: int = Field(
        default=1024 * 1024, description="Largest JSON request body (REST) the gateway reads; a larger one "
        "answers 413 before it is read whole (file uploads have max_file_bytes).")

    # files (context.send_file / get_file, the gateway's file routes)
    max_file_bytes: int = Field(
        default=50 * 1024 * 1024,
        description="Largest file a transition may send or a user may upload, in bytes.",
    )

    # executor
    pool: str = Field(default="cpu", description="Executor pool this process serves (cpu, gpu, ...).")
    workers: int = Field(default=16, ge=1, description="Warm worker processes per executor, at most. A sync "
                         "(def) firing has a worker to itself, so this many sync firings run at once.")
    worker_concurrency: int = Field(default=256, ge=1, description="Async (async def) firings that one worker "
                                    "process runs at once, as tasks on its event loop.")
    executor_max_inflight: int = Field(default=1000, ge=1, description="Most firings one executor takes from "
                                       "its pool's queue at once (running, waiting for a worker, or having their "
                                       "outcome written); the rest wait in JetStream for any executor.")
    ack_wait_s: float = Field(default=30.0, description="Work not heartbeated for this long is redelivered.")
    max_deliver: int = Field(default=5, description="Runs of one firing that may end with no outcome (its "
                             "executor died, its heartbeats lapsed) before the firing fails for good.")
    retry_backoff_s: float = Field(default=1.0, description="Wait before the first retry of a failed firing "
                                   "(retries=); doubled for each further retry, with jitter.")
    retry_backoff_max_s: float = Field(default=60.0, description="Longest wait between two retries.")

    # sandboxes (docs/sandboxes.md)
    sandbox: str | None = Field(default=None, description="'container' runs every transition of this executor "
                                "in a container, 'process' every one in a process; unset, each transition's "
                                "own sandbox= decides.")
    sandbox_env: str = Field(default="", description="Names of the executor's environment variables that "
                             "transitions see, comma-separated, besides PATH, LANG, TZ and the like and the "
                             "variables the app reads when it is imported (found by the loader).")
    sandbox_max_files: int = Field(default=1024, ge=16, description="Open files a worker process may have.")
    sandbox_cpu_seconds: float = Field(default=3600.0, gt=0, description="CPU time one def firing may use "
                                       "before it is stopped (SIGXCPU), unless its timeout= is shorter.")
    preload: bool = Field(default=True, description="Import the apps once in the fork server, so workers start "
                          "with them. Turn off (PETRIBUS_PRELOAD=0) when importing an app initialises a GPU "
                          "runtime (CUDA must not be initialised in a process that forks).")
    volumes_dir: Path | None = Field(default=None, description="Where Volume(name=...) folders live on this "
                                     "machine (default: DATA_DIR/volumes).")
    container_image: str | None = Field(default=None, description="Image for container firings that name none "
                                        "(default: a small local image petribus makes itself).")
    container_warm: int = Field(default=4, ge=0, description="Idle containers kept warm per transition and "
                                "image, ready for its next firing.")

    # placement (docs/pools.md)
    gpus: str | None = Field(default=None, description="This executor's GPUs when it cannot ask nvidia-smi (tests, "
                             "simulations): a count ('2') or TYPE:COUNT ('A10G:2').")
    labels: str = Field(default="", description="This executor's labels, 'key=value,key2=value2', shown in "
                        "GET /pools.")
    registry_heartbeat_s: float = Field(default=5.0, gt=0, description="How often an executor reports its pools, "
                                        "devices and free capacity to the registry (GET /pools).")

    # gateway
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    gateway_max_message_bytes: int = Field(
        default=1024 * 1024,
        description="Largest WebSocket message a client may send; a larger one gets an error event.",
    )
    allowed_origins: str = Field(
        default="",
        description="Browser origins (scheme://host[:port], comma-separated) besides the gateway's own that may "
        "open a WebSocket or send POST/PUT/DELETE (docs/security.md). Requests without Origin pass.",
    )
    insecure: bool = Field(
        default=False,
        description="Let a gateway listen on a non-loopback address with no API key: anyone who reaches it "
        "may read and drive every session of every authorized bot (docs/security.md).",
    )

    # llm
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    llm_model: str | None = Field(default=None, description="Overrides Bot(model=...) (e.g. a local model's name).")
    llm_timeout_s: float = Field(default=120.0, description="Seconds to wait for the model per request "
                                 "(and between two streamed pieces) before retrying.")
    llm_max_retries: int = Field(default=4, description="Retries (exponential backoff) of a model call that "
                                 "timed out, was rate limited (429) or failed with a 5xx.")
    llm_max_corrections: int = Field(default=2, description="Times a tool call that fails validation goes back "
                                     "to the model with the error before the user is told instead.")
    llm_context_chars: int = Field(default=48_000, description="Budget of one model request, in characters "
                                   "(~4 per token): older turns beyond it are summarised and dropped.")

    # metrics (docs/metrics.md)
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics "
        "from this process (unset: not served; the gateway has /metrics anyway). Every service of one process "
        "shares it.")
    metrics_host: str = Field(default="127.0.0.1", description="Address the metrics port listens on; the "
                              "endpoint has no authentication: expose it to the scraper's network only.")

    log_level: str = "info"
    log_format: str = Field(default="console", description="'console' (key=value) or 'json'.")

    @property
    def executor_inflight(self) -> int:
        """Firings one executor holds at once (its work consumer's credits): room for every worker to be
        full, plus one outcome per worker being written while the next run starts, at most
        ``executor_max_inflight``."""
        return max(1, min(self.executor_max_inflight, self.workers * (self.worker_concurrency + 1)))
