"""Secrets: the ``petribus secrets`` commands against a real nats-server, the store's watch and env
fallback, and no value anywhere it could be read back (output, repr, logs, errors)."""

from __future__ import annotations

import asyncio
import io

import pytest
import structlog
from typer.testing import CliRunner

from petribus import bus
from petribus.embedded import NatsServer
from petribus.errors import PetribusError
from petribus.secrets import ENV_PREFIX, MissingSecret, SecretStore, listing
from petribus_cli.secrets import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_NATS, secrets_app

VALUE = "s3cr3t-Zq7vX-petribus-test-value"  # distinctive: any leak of it is found by a plain search


def cli(server: NatsServer, *args: str, stdin: str | None = None):
    return CliRunner().invoke(secrets_app, [*args, "--nats-url", server.url], input=stdin)


# --- the command line ------------------------------------------------------------------------------


def test_set_list_delete_round_trip_without_showing_a_value(nats_server):
    done = cli(nats_server, "set", "API_TOKEN", stdin=VALUE + "\n")
    assert done.exit_code == 0, done.output
    assert cli(nats_server, "set", "DB_PASSWORD", stdin="other").exit_code == 0

    shown = cli(nats_server, "list")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert [line.split()[0] for line in lines] == ["API_TOKEN", "DB_PASSWORD"]
    assert all("UTC" in line for line in lines)
    assert VALUE not in shown.output and VALUE not in done.output and "other" not in shown.output

    gone = cli(nats_server, "delete", "API_TOKEN")
    assert gone.exit_code == 0, gone.output
    assert [line.split()[0] for line in cli(nats_server, "list").output.splitlines()] == ["DB_PASSWORD"]


def test_piped_value_keeps_everything_but_one_trailing_newline(nats_server):
    async def stored() -> str:
        nc = await bus.connect(nats_server.url, name="t")
        try:
            store = SecretStore(nc, environ={})
            await store.start()
            value = store.resolve(("K",))["K"]
            await store.close()
            return value
        finally:
            await nc.close()

    assert cli(nats_server, "set", "K", stdin="  two\nlines \n").exit_code == 0
    assert asyncio.run(stored()) == "  two\nlines "


def test_list_of_an_empty_store_says_how_to_add_one(nats_server):
    shown = cli(nats_server, "list")
    assert shown.exit_code == 0 and "petribus secrets set NAME" in shown.output


def test_value_is_never_an_argument():
    refused = CliRunner().invoke(secrets_app, ["set", "API_TOKEN", "--value", VALUE])
    assert refused.exit_code != 0
    assert "--value" in refused.output  # "No such option"
    helped = CliRunner().invoke(secrets_app, ["set", "--help"])
    assert "stdin" in helped.output and "hidden prompt" in helped.output


@pytest.mark.parametrize("name", ["API-TOKEN", "1TOKEN", "with space"])
def test_bad_name_is_refused_before_connecting(name):
    refused = CliRunner().invoke(secrets_app, ["set", name, "--nats-url", "nats://127.0.0.1:1"], input="v")
    assert refused.exit_code == EXIT_BAD_INPUT
    assert repr(name) in refused.output and "environment variable name" in refused.output


def test_empty_value_is_refused_saying_how_to_delete(nats_server):
    refused = cli(nats_server, "set", "API_TOKEN", stdin="\n")
    assert refused.exit_code == EXIT_BAD_INPUT
    assert "empty" in refused.output and "petribus secrets delete API_TOKEN" in refused.output


def test_delete_of_a_secret_not_set_says_so(nats_server):
    refused = cli(nats_server, "delete", "NEVER_SET")
    assert refused.exit_code == EXIT_FAILED and "NEVER_SET is not set" in refused.output


def test_unreachable_nats_is_exit_3_naming_the_url(tmp_path):
    server = NatsServer(tmp_path / "gone").start()
    url = server.url
    server.stop()
    refused = CliRunner().invoke(secrets_app, ["list", "--nats-url", url])
    assert refused.exit_code == EXIT_NO_NATS and url in refused.output


# --- the store --------------------------------------------------------------------------------------


async def test_watch_sees_set_and_delete_without_a_restart(nats_server):
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ={})
    await store.start()
    try:
        with pytest.raises(MissingSecret):
            store.resolve(("API_TOKEN",))

        changed = asyncio.ensure_future(store.changed())
        await asyncio.sleep(0)  # the waiter is registered before the CLI writes
        done = await asyncio.to_thread(cli, nats_server, "set", "API_TOKEN", stdin=VALUE)
        assert done.exit_code == 0, done.output
        await changed
        assert store.resolve(("API_TOKEN",)) == {"API_TOKEN": VALUE}

        changed = asyncio.ensure_future(store.changed())
        await asyncio.sleep(0)
        assert (await asyncio.to_thread(cli, nats_server, "delete", "API_TOKEN")).exit_code == 0
        await changed
        with pytest.raises(MissingSecret):
            store.resolve(("API_TOKEN",))
    finally:
        await store.close()
        await nc.close()


async def test_store_starts_with_what_is_already_stored(nats_server):
    assert (await asyncio.to_thread(cli, nats_server, "set", "A", stdin="one")).exit_code == 0
    assert (await asyncio.to_thread(cli, nats_server, "set", "B", stdin="two")).exit_code == 0
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ={})
    await store.start()
    try:
        assert store.resolve(("B", "A")) == {"A": "one", "B": "two"}
        assert store.names() == ["A", "B"]
        assert [s.name for s in await listing(nc.jetstream())] == ["A", "B"]
    finally:
        await store.close()
        await nc.close()


async def test_store_value_wins_over_the_prefixed_env_and_the_bare_name_never_counts(nats_server):
    environ = {f"{ENV_PREFIX}FROM_STORE": "env-loses", f"{ENV_PREFIX}FROM_ENV": "env-value",
               "BARE_ONLY": "must-not-leak"}
    assert (await asyncio.to_thread(cli, nats_server, "set", "FROM_STORE", stdin="store-wins")).exit_code == 0
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ=environ)
    await store.start()
    try:
        assert store.resolve(("FROM_STORE", "FROM_ENV")) == {"FROM_STORE": "store-wins", "FROM_ENV": "env-value"}
        with pytest.raises(MissingSecret) as info:
            store.resolve(("BARE_ONLY",))
        assert "must-not-leak" not in str(info.value)
        assert store.names() == ["FROM_STORE"]  # env fallbacks are not the store's
    finally:
        await store.close()
        await nc.close()


async def test_missing_secret_lists_every_missing_name_and_how_to_set_it(nats_server):
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ={f"{ENV_PREFIX}PRESENT": VALUE})
    await store.start()
    try:
        with pytest.raises(MissingSecret) as info:
            store.resolve(("FIRST", "PRESENT", "SECOND"))
    finally:
        await store.close()
        await nc.close()
    err = info.value
    assert isinstance(err, PetribusError) and err.code == "missing_secret" and err.retryable is False
    assert err.names == ["FIRST", "SECOND"]
    message = str(err)
    assert "petribus secrets set FIRST" in message and "petribus secrets set SECOND" in message
    assert "PRESENT" not in message and VALUE not in message
    assert f"{ENV_PREFIX}<NAME>" in message


async def test_no_value_in_repr_or_logs(nats_server):
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ={})
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            changed = asyncio.ensure_future(store.changed())
            await asyncio.sleep(0)
            assert (await asyncio.to_thread(cli, nats_server, "set", "API_TOKEN", stdin=VALUE)).exit_code == 0
            await changed
        assert store.resolve(("API_TOKEN",))["API_TOKEN"] == VALUE
        assert any(e.get("what") == "secrets" and e.get("key") == "API_TOKEN" for e in logs), logs  # by name
        assert VALUE not in repr(logs)
        assert VALUE not in repr(store) and VALUE not in str(store)
    finally:
        await store.close()
        await nc.close()


async def test_watch_survives_a_server_restart(nats_server):
    nc = await bus.connect(nats_server.url, name="t")
    store = SecretStore(nc, environ={})
    await store.start()
    try:
        nats_server.restart()
        done = await asyncio.to_thread(cli, nats_server, "set", "AFTER_RESTART", stdin=VALUE)
        assert done.exit_code == 0, done.output
        while "AFTER_RESTART" not in store.names():
            await store.changed()
        assert store.resolve(("AFTER_RESTART",)) == {"AFTER_RESTART": VALUE}
    finally:
        await store.close()
        await nc.close()


# --- end to end: a secret reaches the transition that names it, and nothing else -------------------

LEAK_APP = '''
import hashlib
import os

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Ask(BaseModel):
    n: int


class Seen(BaseModel):
    digest: str


class Done(BaseModel):
    blind: bool


bot = Bot(name="leaky", model="gpt-test", description="Peeks at a secret.",
          locations=[BotLocation(marker=Ask), BotLocation(marker=Seen), BotLocation(marker=Done)])


@bot.transition(inputs={Ask: 1}, outputs=[Seen], secrets=["API_TOKEN"], description="Peeks.")
def peek(inputs):
    token = os.environ.get("API_TOKEN", "")
    return {Seen: [Seen(digest=hashlib.sha256(token.encode()).hexdigest())]}


@bot.transition(inputs={Seen: 1}, outputs=[Done], description="Names no secret.")
def blind(inputs):
    leaked = "API_TOKEN" in os.environ or any(k.startswith("PETRIBUS_SECRET_") for k in os.environ)
    return {Done: [Done(blind=not leaked)]}
'''


async def test_a_secret_reaches_only_its_transition_and_never_an_event_a_log_the_model_or_get_bots(
    settings, nc, tmp_path, capfd
):
    import hashlib

    import httpx
    from pydantic import SecretStr

    from petribus import logs
    from petribus.events import TransitionCompleted

    from .harness import Stack
    from .scripted_llm import ScriptedLLM, call, say
    from .test_llm_openai import Session

    app = tmp_path / "leaky.py"
    app.write_text(LEAK_APP)
    assert (await asyncio.to_thread(
        CliRunner().invoke, secrets_app, ["set", "API_TOKEN", "--nats-url", settings.nats_url], VALUE,
    )).exit_code == 0
    saved = structlog.get_config()
    in_process = io.StringIO()
    logs.configure(level="debug", stream=in_process)  # workers' own output goes to fd 2: capfd has it
    try:
        async with ScriptedLLM() as llm:
            llm.when("peek please", call("Ask", n=1), say("Peeking."))
            llm.when("what happened", say("It peeked."))
            with_llm = settings.model_copy(update={"openai_api_key": SecretStr("sk-test"),
                                                   "openai_base_url": llm.base_url})
            async with Stack(with_llm, [f"{app}:bot"]) as stack, Session(nc, bot="leaky") as session:
                await session.say("peek please")
                [done] = await session.until(TransitionCompleted, transition="blind")
                await session.answer(await session.say("what happened"))
                async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
                    bots = (await http.get("/bots")).text
            events = await _all_events_of(nc, "leaky")
    finally:
        structlog.configure(**saved)
    [seen] = session.of(TransitionCompleted, transition="peek")
    assert seen.outputs[0].data["digest"] == hashlib.sha256(VALUE.encode()).hexdigest()  # it got the value
    assert done.outputs[0].data == {"blind": True}  # the transition that names no secret saw none
    out, err = capfd.readouterr()
    assert "firing completed" in in_process.getvalue()  # the services' debug logs were captured
    for where, text in {"events": events, "logs": in_process.getvalue() + out + err, "GET /bots": bots,
                        "the model's requests": repr([r.body for r in llm.requests])}.items():
        assert VALUE not in text, where


async def _all_events_of(nc, bot: str) -> str:
    from petribus.bus import EventLog

    log = EventLog(nc)
    out: list[str] = []
    for sid in await log.sessions(bot):
        out.extend(e.model_dump_json() for _, e in await log.read(bot, sid))
    return "\n".join(out)


MISSING_APP = '''
import os

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Ask(BaseModel):
    n: int


class Seen(BaseModel):
    value: str


bot = Bot(name="needy", locations=[BotLocation(marker=Ask), BotLocation(marker=Seen)])


@bot.transition(inputs={Ask: 1}, outputs=[Seen], secrets=["FROM_ENV", "NOT_SET_A", "NOT_SET_B"], retries=3)
def needs(inputs):
    return {Seen: [Seen(value=os.environ["FROM_ENV"])]}
'''


async def test_a_firing_missing_secrets_fails_for_good_naming_each_and_how_to_set_it(
    settings, nc, tmp_path, monkeypatch
):
    from petribus.events import TransitionFailed, TransitionStarted

    from .harness import Stack
    from .test_llm_openai import Session

    app = tmp_path / "needy.py"
    app.write_text(MISSING_APP)
    monkeypatch.setenv(f"{ENV_PREFIX}FROM_ENV", VALUE)  # found: only the two others are missing
    async with Stack(settings, [f"{app}:bot"], parts=("scheduler", "executor")), \
            Session(nc, bot="needy") as session:
        await session.add("Ask", n=1)
        [failed] = await session.until(TransitionFailed, transition="needs")
    assert failed.final and not failed.retryable and failed.attempt == 1  # retries=3, yet no retry
    assert failed.error_type == "MissingSecret"
    assert "petribus secrets set NOT_SET_A" in failed.error and "petribus secrets set NOT_SET_B" in failed.error
    assert "FROM_ENV" not in failed.error and VALUE not in failed.error
    assert session.of(TransitionStarted) == []  # it never ran
