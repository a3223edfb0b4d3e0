"""A closed bus (docs/closed-bus.md): a nats-server that takes only petribus' users, each held to its role.

Every refusal is asserted twice: the server said why (the client's error callback gets its
``Authorization Violation`` or ``permissions violation for publish to "<subject>"``), and nothing
happened (seen through the admin user afterwards). Each role's allowed neighbour of a refused action
works on the same connection, so a refusal is the permission's doing, not a broken connection's.
"""

from __future__ import annotations

import asyncio
import json
import stat
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from petribus import bus, bus_auth, keys, subjects
from petribus.bus_auth import PERMISSIONS, ROLES, ClientAuth, Credentials, local_auth_dir
from petribus.embedded import NatsServer, find_binary, free_ports
from petribus.errors import BusError
from petribus.events import Marker, MarkerAdded
from petribus.secrets import SECRETS_BUCKET
from petribus.settings import Settings

from . import test_cli
from .harness import Client, Stack, session_state
from .test_cli import ORDER_BOT, PETRIBUS, START_S

WORK_ITEM = subjects.work_item("cpu", "order_bot", "s1", "f1")
petribus = test_cli.petribus  # the fixture that starts `petribus` subprocesses


@pytest.fixture
def credentials(tmp_path: Path) -> Credentials:
    return Credentials.load_or_create(tmp_path / "auth")


@pytest.fixture
def closed_server(tmp_path: Path, credentials: Credentials) -> Iterator[NatsServer]:
    [http_port] = free_ports(1)
    server = NatsServer(tmp_path / "nats", auth=credentials, http_port=http_port).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def closed_settings(closed_server: NatsServer, credentials: Credentials, tmp_path: Path) -> Settings:
    return Settings(nats_url=closed_server.url, nats_auth_dir=credentials.folder, data_dir=tmp_path / "data",
                    port=0, workers=2, ack_wait_s=30.0)


class Errors:
    """What the server told one connection it refused."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = asyncio.Condition()

    async def callback(self, exc: Exception) -> None:
        async with self._changed:
            self.seen.append(str(exc))
            self._changed.notify_all()

    async def refused(self, subject: str, what: str = "publish", timeout: float = 10.0) -> bool:
        """Whether the server says it refused ``what`` on ``subject`` (its -ERR may come after a flush's PONG)."""
        said = f'nats: permissions violation for {what} to "{subject}"'.lower()
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: said in (s.lower() for s in self.seen))
        except TimeoutError:
            return False
        return True


async def _as(role: str, settings: Settings, errors: Errors) -> NATS:
    auth = ClientAuth.from_settings(settings, role)
    return await nats.connect(settings.nats_url, name=f"test-{role}", error_cb=errors.callback, allow_reconnect=False,
                              **auth.options())  # type: ignore[arg-type]


@pytest.fixture
async def admin(closed_settings: Settings) -> AsyncIterator[NATS]:
    nc = await bus.connect(closed_settings.nats_url, "test-admin", auth=ClientAuth.from_settings(closed_settings))
    await bus.ensure_streams(nc.jetstream())
    yield nc
    await nc.close()


def _connections(server: NatsServer) -> dict[str, str]:
    """Connection name -> the user it authenticated as, from the server's /connz."""
    with urllib.request.urlopen(f"http://{server.host}:{server.http_port}/connz?auth=true", timeout=5) as resp:
        conns = json.loads(resp.read())["connections"]
    return {c.get("name", ""): c.get("authorized_user", "") for c in conns}


def _violations(server: NatsServer) -> list[str]:
    return [line for line in server.log_file.read_text().splitlines() if "Violation" in line]


async def _refused_without_credentials(url: str) -> Errors:
    errors = Errors()
    nc = NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(url, error_cb=errors.callback, allow_reconnect=False, max_reconnect_attempts=1)
    finally:
        await nc.close()  # a refused client still holds its socket
    return errors


async def test_a_client_without_credentials_is_refused_with_an_authorization_violation(closed_server, credentials):
    errors = await _refused_without_credentials(closed_server.url)
    assert any("Authorization Violation" in e for e in errors.seen)

    wrong = ClientAuth(user="gateway", password=credentials.password("scheduler"))
    with pytest.raises(BusError) as refused:
        await bus.connect(closed_server.url, "test", auth=wrong, reconnect=False)
    assert refused.value.code == "nats_unauthorized"
    assert "user 'gateway'" in refused.value.message
    assert credentials.password("scheduler").get_secret_value() not in refused.value.message


async def test_each_service_connects_as_its_role_and_a_session_runs_end_to_end(
        closed_settings, closed_server, admin) -> None:
    async with Stack(closed_settings, [ORDER_BOT]) as stack:
        users = _connections(closed_server)
        assert {users[f"petribus-{role}"] for role in ("scheduler", "executor", "llm", "gateway")} == \
            {"scheduler", "executor", "llm", "gateway"}
        assert all(users[f"petribus-{role}"] == role for role in ("scheduler", "executor", "llm", "gateway"))
        client = await Client.connect(stack.ws_url("order_bot"))
        session_id = (await client.until("session_created"))["value"]
        await client.send({"type": "marker_added", "value": {"location": "UserName", "data": {"name": "alice"}}})
        await client.until(lambda e: e["type"] == "transition_completed"
                           and e["metadata"]["transition_name"] == "offer_refund", timeout=60)
        await client.close()

    state, _ = await session_state(admin, "order_bot", session_id)
    assert [m.data for m in state.marking()["RefundStatus"]] == [{"message": "refund_offered"}]
    assert _violations(closed_server) == [], "a service did something its role may not"


async def _publish(nc: NATS, subject: str, payload: bytes = b"{}") -> None:
    """Publish with a reply inbox, as a JetStream publish or API request does (which would wait for an
    answer that a refused publish never gets)."""
    await nc.publish(subject, payload, reply=nc.new_inbox())
    await nc.flush()


async def _work_items(admin: NATS) -> int:
    info = await admin.jetstream().stream_info(subjects.WORK_STREAM, subjects_filter=subjects.all_work())
    return info.state.messages


async def _has_key(admin: NATS, bucket: str, key: str) -> bool:
    try:
        await (await admin.jetstream().key_value(bucket)).get(key)
    except nats.js.errors.KeyNotFoundError:
        return False
    return True


async def _streams(admin: NATS) -> set[str]:
    return {s.config.name for s in await admin.jetstream().streams_info()}


# role, refused subject, what must be true afterwards (seen as admin)
REFUSALS: list[tuple[str, str, str]] = [
    ("gateway", WORK_ITEM, "no work item"),
    ("gateway", f"$KV.{keys.KEYS_BUCKET}.forged", "no key"),
    ("gateway", f"{subjects.TIMERS_PREFIX}.confirm", "no timer"),
    ("executor", f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}", "streams kept"),
    ("executor", f"$JS.API.STREAM.PURGE.{subjects.EVENTS_STREAM}", "events kept"),
    ("executor", f"$KV.{keys.KEYS_BUCKET}.forged", "no key"),
    ("executor", WORK_ITEM, "no work item"),
    ("llm", WORK_ITEM, "no work item"),
    ("llm", f"$JS.API.STREAM.UPDATE.{subjects.EVENTS_STREAM}", "streams kept"),
    ("scheduler", f"$JS.API.STREAM.DELETE.{subjects.WORK_STREAM}", "streams kept"),
    ("scheduler", f"{subjects.DELTAS_PREFIX}.order_bot.s1", "nothing to see"),
    # Kinds of event a role does not make: a subject per kind lets NATS refuse them.
    ("gateway", subjects.event("order_bot", "s1", "transition_fired"), "events kept"),
    ("gateway", subjects.event("order_bot", "s1", "transition_completed"), "events kept"),
    ("executor", subjects.event("order_bot", "s1", "user_message"), "events kept"),
    ("executor", subjects.event("order_bot", "s1", "transition_fired"), "events kept"),
    ("llm", subjects.event("order_bot", "s1", "transition_completed"), "events kept"),
    ("scheduler", subjects.event("order_bot", "s1", "user_message"), "events kept"),
]


@pytest.mark.parametrize(("role", "subject", "afterwards"), REFUSALS)
async def test_a_role_is_refused_outside_its_permissions(closed_settings, admin, role, subject, afterwards):
    log = bus.EventLog(admin)
    await log.append(MarkerAdded(bot="order_bot", session_id="s1", marker=Marker(location="UserName", data={"name": "a"})))
    await keys.bucket(admin.jetstream())
    errors = Errors()
    nc = await _as(role, closed_settings, errors)
    try:
        # The role's own work goes through on this connection: appending a kind of event it makes.
        allowed = await nc.jetstream().publish(subjects.event("order_bot", "s1", bus_auth.APPENDS[role][0]), b"{}")
        assert allowed.stream == subjects.EVENTS_STREAM and not errors.seen

        await _publish(nc, subject)
        assert await errors.refused(subject), errors.seen
    finally:
        await nc.close()

    if afterwards == "no work item":
        assert await _work_items(admin) == 0
    elif afterwards == "no key":
        assert not await _has_key(admin, keys.KEYS_BUCKET, "forged")
    elif afterwards == "no timer":
        info = await admin.jetstream().stream_info(subjects.TIMERS_STREAM)
        assert info.state.messages == 0
    elif afterwards in ("streams kept", "events kept"):
        assert {subjects.EVENTS_STREAM, subjects.WORK_STREAM} <= await _streams(admin)
        assert await log.count("order_bot", "s1") == 2
    else:
        assert afterwards == "nothing to see"


@pytest.mark.parametrize("role", ["gateway", "llm", "scheduler"])
async def test_only_the_executor_reads_secrets_and_no_service_reads_anothers_replies(closed_settings, admin, role):
    """Secrets reach an executor as replies to its reads: no other role may read the bucket, nor
    listen on the inboxes where the executor's replies arrive."""
    js = admin.jetstream()
    await (await js.create_key_value(bucket=SECRETS_BUCKET)).put("TOKEN", b"s3cret")
    errors = Errors()
    nc = await _as(role, closed_settings, errors)
    try:
        read = f"$JS.API.DIRECT.GET.KV_{SECRETS_BUCKET}.$KV.{SECRETS_BUCKET}.TOKEN"
        await _publish(nc, read)
        assert await errors.refused(read), errors.seen
        await nc.subscribe("_INBOX_executor.>")
        await nc.subscribe("_INBOX.>")
        await nc.flush()
        assert await errors.refused("_INBOX_executor.>", "subscription"), errors.seen
        assert await errors.refused("_INBOX.>", "subscription"), errors.seen
    finally:
        await nc.close()

    executor_errors = Errors()
    executor = await _as("executor", closed_settings, executor_errors)
    try:
        entry = await (await executor.jetstream().key_value(SECRETS_BUCKET)).get("TOKEN")
        assert entry.value == b"s3cret" and not executor_errors.seen
    finally:
        await executor.close()


def test_every_service_role_has_an_inbox_of_its_own_and_cannot_delete_streams() -> None:
    for role in ROLES[1:]:
        perms = PERMISSIONS[role]
        assert perms.subscribe[0] == f"_INBOX_{role}.>"
        assert not any(s.startswith("_INBOX.") or s == ">" for s in perms.subscribe)
        assert "$JS.API.STREAM.DELETE.>" in perms.deny_publish
    assert f"{subjects.WORK_PREFIX}.>" in PERMISSIONS["scheduler"].publish
    assert not any(f"{subjects.WORK_PREFIX}.>" in PERMISSIONS[r].publish for r in ("gateway", "executor", "llm"))


def test_credentials_are_the_owners_alone_and_kept_across_loads(tmp_path: Path) -> None:
    first = Credentials.load_or_create(tmp_path / "auth")
    again = Credentials.load_or_create(tmp_path / "auth")
    assert stat.S_IMODE((tmp_path / "auth").stat().st_mode) == 0o700
    for role in ROLES:
        path = tmp_path / "auth" / f"{role}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert first.password(role).get_secret_value() == again.password(role).get_secret_value()
    assert len({first.password(r).get_secret_value() for r in ROLES}) == len(ROLES)
    assert first.password("admin").get_secret_value() not in repr(first)


def test_a_url_with_a_password_is_never_shown_with_it() -> None:
    assert bus.redact_url("nats://gw:hunter2@n1:4222, tls://n2:4222") == "nats://***@n1:4222,tls://n2:4222"


async def test_serve_makes_credentials_on_first_start_and_reuses_them(petribus, tmp_path) -> None:
    data = tmp_path / "data"
    first = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1", "--data-dir", data)
    nats_url = first.wait_for(r"NATS\s+(nats://\S+)", START_S).group(1)
    auth_dir = local_auth_dir(data)
    passwords = {r: (auth_dir / f"{r}.password").read_text() for r in ROLES}

    await _refused_without_credentials(nats_url)
    # A command-line tool run against it finds the admin's password in the data folder.
    settings = Settings(data_dir=data)
    nc = await bus.connect(nats_url, "test", auth=ClientAuth.from_settings(settings, local_admin=True),
                           reconnect=False)
    await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
    await nc.close()
    env = {"PETRIBUS_DATA_DIR": str(data)}
    code, said = await _run(PETRIBUS, "keys", "list", "--nats-url", nats_url, env=env)
    assert code == 0, said
    # A service needs its own role's password: it is refused, and says so, without one.
    code, said = await _run(PETRIBUS, "executor", ORDER_BOT, "--nats-url", nats_url, env=env)
    assert code == 3 and "refused no credentials (authorization violation)" in said, said
    assert first.stop() == 0, first.output()
    assert not any(p in first.output() for p in passwords.values()), "a password was printed"

    second = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1", "--data-dir", data)
    ws = second.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S).group(1)
    assert {r: (auth_dir / f"{r}.password").read_text() for r in ROLES} == passwords
    client = await Client.connect(ws)
    await client.until("session_created")
    await client.send({"type": "marker_added", "value": {"location": "UserName", "data": {"name": "bob"}}})
    await client.until(lambda e: e["type"] == "transition_completed"
                       and e["metadata"]["transition_name"] == "offer_refund", timeout=60)
    await client.close()
    assert second.stop() == 0, second.output()
    assert "Violation" not in (data / "nats" / "nats-server.log").read_text()


async def test_the_credentials_command_makes_users_a_nats_server_config_can_include(tmp_path) -> None:
    """The production form (deploy/nats.conf): the server's config includes the users.conf it wrote."""
    folder = tmp_path / "auth"
    code, said = await _run(PETRIBUS, "credentials", str(folder))
    assert code == 0, said
    passwords = {r: (folder / f"{r}.password").read_text() for r in ROLES}
    assert not any(p in said for p in passwords.values()), "a password was printed"
    code, said = await _run(PETRIBUS, "credentials", str(folder))
    assert code == 0 and {r: (folder / f"{r}.password").read_text() for r in ROLES} == passwords

    [port] = free_ports(1)
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                    f'include "{folder.name}/users.conf"\n')
    server = await asyncio.create_subprocess_exec(find_binary(), "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    try:
        settings = Settings(nats_url=url, nats_auth_dir=folder)
        nc = await bus.connect(url, "test-gateway", auth=ClientAuth.from_settings(settings, "gateway"), timeout=30)
        assert (await nc.jetstream().account_info()).streams == 0
        await nc.close()
        await _refused_without_credentials(url)
    finally:
        server.terminate()
        await server.wait()


async def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import os

    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_files_secrets_pools_and_deletion_work_on_a_closed_bus(closed_settings, closed_server, admin) -> None:
    """The paths that touch more than the log: an upload read by a transition and a file it sends back
    (object store, gateway and executor), a secret read from its bucket (executor only), GET /pools (the
    registry and the work stream) and DELETE (tombstone and purges)."""
    from petribus import secrets as transition_secrets

    from .conftest import app

    await transition_secrets.put(admin.jetstream(), "ERRORS_TOKEN", "tok-" + "x" * 16)
    parts = ("scheduler", "executor", "gateway")
    async with Stack(closed_settings, [app("hitl_bot"), app("errors_app")], parts=parts) as stack, \
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        client = await Client.connect(stack.ws_url("hitl"))
        session_id = (await client.until("session_created"))["value"]
        await client.send({"type": "marker_added", "value": {"location": "Upload", "data": {"description": "r"}}})
        request = (await client.until("input_file_request"))["value"]
        assert (await http.put(request["upload_url"], content=b"receipt")).status_code == 201
        sent = await client.until("output_file")
        await client.close()
        assert (await http.get(sent["value"]["url"])).content == b"receipt"

        charge = await Client.connect(stack.ws_url("errors_app"))
        await charge.until("session_created")
        await charge.send({"type": "marker_added", "value": {"location": "Charge", "data": {"amount": 1}}})
        failed = await charge.until("transition_failed")
        await charge.close()
        # The transition got its secret (else the firing fails with MissingSecret before it runs).
        assert failed["value"]["error_type"] == "PermissionError", failed
        # Work sent with its claim ran on the claim's republish, which the executor may read.
        assert stack.services["executor"].runner.landed_runs >= 2

        pools = await http.get("/pools")
        assert pools.status_code == 200 and "cpu" in {p["name"] for p in pools.json()["pools"]}, pools.text
        assert (await http.delete(f"/bots/hitl/sessions/{session_id}")).status_code == 204
        assert (await http.get(sent["value"]["url"])).status_code == 404

    assert await bus.EventLog(admin).count("hitl", session_id) == 0
    assert _violations(closed_server) == [], "a service did something its role may not"


async def test_the_llm_service_answers_and_streams_its_reply_on_a_closed_bus(closed_settings, closed_server) -> None:
    """The LLM service's own paths: its durable over the log, a marker its tool call adds, and the reply's
    pieces on pb.delta, which the gateway alone may read."""
    from pydantic import SecretStr

    from .conftest import app
    from .scripted_llm import ScriptedLLM, call, say

    async with ScriptedLLM(key="sk-closed-bus-test") as llm:
        llm.when("cancel alice", call("UserName", name="alice"), say("Asked to cancel alice's order."))
        settings = closed_settings.model_copy(update={"openai_api_key": SecretStr("sk-closed-bus-test"),
                                                      "openai_base_url": llm.base_url})
        async with Stack(settings, [app("llm_orders")]) as stack:
            client = await Client.connect(stack.ws_url("llm_orders"))
            await client.until("session_created")
            await client.send({"type": "user_message", "value": "cancel alice", "request_id": "r1"})
            reply = await client.until(lambda e: e["type"] == "agent_message" and e["metadata"]["request_id"] == "r1")
            await client.until(lambda e: e["type"] == "transition_completed"
                               and e["metadata"]["transition_name"] == "cancel_order")
            await client.close()

    pieces = [e["value"] for e in client.events if e["type"] == "agent_message_delta"
              and e["metadata"]["event_id"] == reply["metadata"]["event_id"]]
    assert pieces and "".join(pieces) == reply["value"]
    assert _violations(closed_server) == [], "a service did something its role may not"


async def test_tls_with_the_servers_ca_connects_and_without_it_is_refused(tmp_path, credentials) -> None:
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for argv in (("req", "-x509", *ec, "-keyout", str(tmp_path / "ca-key.pem"), "-out", str(ca), "-days", "1",
                  "-subj", "/CN=petribus test CA"),
                 ("req", *ec, "-keyout", str(key), "-out", str(tmp_path / "server.csr"), "-subj", "/CN=127.0.0.1"),
                 ("x509", "-req", "-in", str(tmp_path / "server.csr"), "-CA", str(ca), "-CAkey",
                  str(tmp_path / "ca-key.pem"), "-CAcreateserial", "-out", str(cert), "-days", "1",
                  "-extfile", str(tmp_path / "san.ext"))):
        code, said = await _run("openssl", *argv)
        assert code == 0, said
    credentials.write_server_block()
    [port] = free_ports(1)
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                    f'include "auth/users.conf"\ntls {{ cert_file: "{cert}", key_file: "{key}" }}\n')
    server = await asyncio.create_subprocess_exec(find_binary(), "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.DEVNULL)
    url = f"tls://127.0.0.1:{port}"
    try:
        settings = Settings(nats_url=url, nats_auth_dir=credentials.folder, nats_tls_ca=ca)
        nc = await bus.connect(url, "test-llm", auth=ClientAuth.from_settings(settings, "llm"), timeout=30)
        assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        await nc.close()
        untrusted = ClientAuth.from_settings(settings.model_copy(update={"nats_tls_ca": None}), "llm")
        with pytest.raises(BusError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await bus.connect(url, "test-llm", auth=untrusted, reconnect=False)
    finally:
        server.terminate()
        await server.wait()


async def test_the_streams_command_prepares_the_streams_as_admin_and_only_as_admin(closed_server, credentials,
                                                                                  tmp_path) -> None:
    anonymous = {"PETRIBUS_DATA_DIR": str(tmp_path / "empty")}  # no local serve's password to find there
    code, said = await _run(PETRIBUS, "streams", "--nats-url", closed_server.url, env=anonymous)
    assert code == 3 and "refused no credentials (authorization violation)" in said, said

    code, said = await _run(PETRIBUS, "streams", "--nats-url", closed_server.url,
                            env={**anonymous, "PETRIBUS_NATS_AUTH_DIR": str(credentials.folder)})
    assert code == 0, said
    nc = await bus.connect(closed_server.url, "test-admin", auth=ClientAuth(user="admin",
                                                                         password=credentials.password("admin")))
    try:
        assert {subjects.EVENTS_STREAM, subjects.WORK_STREAM, subjects.TIMERS_STREAM} <= await _streams(nc)
    finally:
        await nc.close()
