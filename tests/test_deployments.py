"""Services under ``--deployments`` (issue 14): what ``petribus deploy`` stored runs, versions side by side.

Real parts: a nats-server, the scheduler, LLM service and gateway in this process with ``deployments`` on,
and ``DeployedExecutors``, which starts a real executor process per version. The app's two versions differ
in one line (what their transition writes), so every output says which code ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import NamedTuple

import httpx
import websockets
from petribus import deploy, subjects
from petribus.net import Net
from petribus.settings import Settings
from petribus_executor.deployed import DeployedExecutors
from petribus_gateway.app import Gateway
from petribus_llm.app import LLMService
from petribus_scheduler.app import Scheduler

from . import test_bus_auth
from .harness import Client

# The closed bus's fixtures (a nats-server with a user per role, and admin's connection).
credentials, closed_server = test_bus_auth.credentials, test_bus_auth.closed_server
closed_settings, admin = test_bus_auth.closed_settings, test_bus_auth.admin

APP = '''
from pydantic import BaseModel
from petribus import Bot, BotLocation


class Order(BaseModel):
    item: str


class Shipped(BaseModel):
    item: str
    by: str


bot = Bot(name="shop", locations=[BotLocation(marker=Order), BotLocation(marker=Shipped)],
          description="ships orders")


@bot.transition(inputs={{Order: 1}}, outputs=[Shipped], description="ships an order"{pool})
def ship(inputs):
    {extra}return {{Shipped: [Shipped(item=inputs[Order][0].item, by="{tag}")]}}
'''


def write_app(folder: Path, tag: str, *, pool: str | None = None, extra: str = "") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shop.py").write_text(textwrap.dedent(APP).format(
        tag=tag, pool=f", pool={pool!r}" if pool else "", extra=extra))
    return f"{folder / 'shop.py'}:bot"


class Services(NamedTuple):
    scheduler: Scheduler
    llm: LLMService
    gateway: Gateway
    executors: DeployedExecutors | None


@contextlib.asynccontextmanager
async def _services(settings: Settings, *, plain: Sequence[Net] = (),
                    pools: Sequence[str] = ("cpu",)) -> AsyncIterator[Services]:
    """The services as ``--deployments`` runs them, in this process (the executors' versions in processes
    of their own; none when ``pools`` is empty); stopped again in reverse."""
    scheduler, llm, gateway = Scheduler(settings, []), LLMService(settings, []), Gateway(settings, list(plain))
    for service in (scheduler, llm, gateway):
        service.deployments = True
    executors = DeployedExecutors(settings, pools=list(pools)) if pools else None
    started: list = []
    try:
        if executors is not None:
            await executors.start()
        for service in (scheduler, llm, gateway):
            await service.start()
            started.append(service)
        yield Services(scheduler, llm, gateway, executors)
    finally:
        for service in reversed(started):
            await service.stop()
        if executors is not None:
            await executors.stop()


async def _order(client: Client, item: str) -> dict:
    """Order ``item`` and return the ``Shipped`` marker its firing output."""
    await client.send({"type": "marker_added", "value": {"location": "Order", "data": {"item": item}}})

    def outcome(e: dict) -> bool:
        if e["type"] == "transition_failed":
            return True
        return e["type"] == "transition_completed" and e["value"]["outputs"][0]["data"]["item"] == item

    done = await client.until(outcome, timeout=60)
    assert done["type"] == "transition_completed", done
    [out] = done["value"]["outputs"]
    return out["data"]


async def _new_session(js, url: str) -> tuple[Client, str, str]:
    """A new session over the WebSocket: the client, the session id, and the bot (version) whose subjects
    hold its log, read from the stream itself."""
    client = await Client.connect(url)
    created = await client.until(lambda e: e["type"] == "session_created")
    return client, created["value"], await _bot_of(js, created["value"])


async def _bot_of(js, session_id: str) -> str:
    info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.event("*", session_id, "*"))
    bots = {subjects.parse_events(s)[0] for s in info.state.subjects or {}}
    assert len(bots) == 1, bots
    return bots.pop()


async def _wait_ready(js, version: str, gateway: Gateway, *, timeout: float = 60.0) -> None:
    """Until the gateway's routing sees ``version`` ready (every part loaded it)."""
    routing = _routing(gateway)
    for _ in range(int(timeout * 10)):
        ok, _why = routing.ready(version)
        if ok:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"version {version} never ready: {routing.ready(version)}")


def _routing(gateway: Gateway):
    for middleware in gateway.app.user_middleware:
        if "routing" in middleware.kwargs:
            return middleware.kwargs["routing"]
    raise AssertionError("the gateway has no deployment routing")


async def test_versions_run_side_by_side_blue_green_deactivate_rollback_and_envs(
        settings: Settings, nc, tmp_path: Path) -> None:
    js = nc.jetstream()
    v1, _ = await deploy.deploy(js, write_app(tmp_path / "v1", "v1"), "shop")
    assert v1.bot == f"shop--{v1.version}"

    async with _services(settings) as (_, _, gateway, _), contextlib.AsyncExitStack() as later:
        ws = gateway.url.replace("http", "ws", 1)
        await _wait_ready(js, v1.version, gateway)

        # A new session goes to the active version and runs its code; its events name the version.
        old, old_id, bot = await _new_session(js, f"{ws}/bots/shop/ws")
        assert bot == v1.bot
        assert await _order(old, "apple") == {"item": "apple", "by": "v1"}

        # v2 needs a pool no executor serves yet: it is active, but not ready, so new sessions stay on v1.
        v2, dep = await deploy.deploy(js, write_app(tmp_path / "v2", "v2", pool="big"), "shop")
        assert dep.active == v2.version and v2.version != v1.version
        routing = _routing(gateway)
        for _ in range(100):
            if v2.bot in gateway.nets:
                break
            await asyncio.sleep(0.1)
        ok, why = routing.ready(v2.version)
        assert not ok and "executor of pool 'big'" in why, why
        waiting, _, bot = await _new_session(js, f"{ws}/bots/shop/ws")
        assert bot == v1.bot  # blue-green: the old version until the new one is ready
        await waiting.close()

        big = DeployedExecutors(settings, pools=["big"])
        await big.start()
        later.push_async_callback(big.stop)
        await _wait_ready(js, v2.version, gateway)
        new, _, bot = await _new_session(js, f"{ws}/bots/shop/ws")
        assert bot == v2.bot
        assert await _order(new, "pear") == {"item": "pear", "by": "v2"}
        # The first session is pinned to v1: its next firing still runs v1's code.
        assert await _order(old, "plum") == {"item": "plum", "by": "v1"}
        await old.close()
        again = await Client.connect(f"{ws}/bots/shop/ws?session_id={old_id}&since=0")
        assert (await again.until(lambda e: e["type"] == "session_created"))["value"] == old_id
        assert await _order(again, "date") == {"item": "date", "by": "v1"}  # reconnected: still v1
        await again.close()

        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            # REST by deployment name: the session's own version answers.
            detail = await http.get(f"/bots/shop/sessions/{old_id}")
            assert detail.status_code == 200, detail.text
            assert [m["data"]["by"] for m in detail.json()["marking"].get("Shipped", [])] == ["v1"] * 3
            # The net the dashboard draws for a session is its own version's (?session_id=), while the
            # deployment's own net is the version a new session gets.
            assert (await http.get(f"/bots/shop/net?session_id={old_id}")).json()["bot"] == v1.bot
            assert (await http.get("/bots/shop/net")).json()["bot"] == v2.bot
            assert (await http.get(f"/bots/shop?session_id={old_id}")).json()["version"] == v1.version
            assert (await http.get("/bots/shop")).json()["version"] == v2.version

            # Listed by the deployment's name: its sessions on every version, each saying which.
            listed = (await http.get("/bots/shop/sessions")).json()
            on = {s["session_id"]: s["bot"] for s in listed["sessions"]}
            assert listed["bot"] == "shop" and on[old_id] == v1.bot and v2.bot in on.values()

            # Not a session id (a subject wildcard): refused as one (422), never looked up across the stream.
            wild = await http.get("/bots/shop/sessions/*")
            assert wild.status_code == 422 and wild.json()["code"] == "invalid_session_id", wild.text
            assert ("shop", "*") not in routing.sessions

            # Forked onto v2 (issue 11's fork, by deployment name): the fork runs v2, the source stays on v1.
            forked = await http.post(f"/bots/shop/sessions/{old_id}/fork",
                                     json={"at": detail.json()["last_seq"], "bot": v2.bot})
            assert forked.status_code == 201, forked.text
            fork_id = forked.json()["session_id"]
            assert await _bot_of(js, fork_id) == v2.bot
            fork = await Client.connect(f"{ws}/bots/shop/ws?session_id={fork_id}&since=0")
            assert await _order(fork, "lime") == {"item": "lime", "by": "v2"}
            await fork.close()

            # Deactivated: no new session (REST 409, WebSocket 4409); existing sessions run on.
            await deploy.deactivate(js, "shop", actor="test")
            await _until(lambda: routing.catalog.deployments()[("default", "shop")].state == "deactivated")
            refused = await http.post("/bots/shop/sessions")
            assert refused.status_code == 409 and refused.json()["code"] == "deployment_deactivated"
            async with websockets.connect(f"{ws}/bots/shop/ws") as sock:
                error = json.loads(await sock.recv())
                assert error["value"]["code"] == "deployment_deactivated"
                await sock.wait_closed()
                assert sock.close_code == 4409
            assert await _order(new, "fig") == {"item": "fig", "by": "v2"}

            # Activate, then roll back to v1: new sessions run v1 again.
            await deploy.activate(js, "shop", actor="test")
            await deploy.rollback(js, "shop", actor="test")
            await _until(lambda: routing.catalog.deployments()[("default", "shop")].active == v1.version)
            back, _, bot = await _new_session(js, f"{ws}/bots/shop/ws")
            assert bot == v1.bot
            await back.close()

            # Environments: released to prod, served under /envs/prod/; dev has nothing.
            await deploy.release(js, "shop", src="default", dst="prod", actor="test")
            await _until(lambda: ("prod", "shop") in routing.catalog.deployments())
            prod, _, bot = await _new_session(js, f"{ws}/envs/prod/bots/shop/ws")
            assert bot == v1.bot
            assert await _order(prod, "kiwi") == {"item": "kiwi", "by": "v1"}
            await prod.close()
            missing = await http.post("/envs/dev/bots/shop/sessions")
            assert missing.status_code == 404 and "no deployment 'shop' in environment 'dev'" in missing.json()["message"]
        await new.close()


async def test_a_version_a_service_cannot_load_is_reported_and_gets_no_sessions(
        settings: Settings, nc, tmp_path: Path, monkeypatch) -> None:
    js = nc.jetstream()
    good, _ = await deploy.deploy(js, write_app(tmp_path / "good", "good"), "shop")
    # Loads where it was deployed; raises where the services load it (a variable only they have).
    broken_src = write_app(tmp_path / "bad", "bad")
    path = Path(broken_src.split(":")[0])
    path.write_text("import os\nif os.environ.get('SHOP_BREAKS'):\n    raise RuntimeError('no database here')\n"
                    + path.read_text())
    monkeypatch.setenv("SHOP_BREAKS", "")
    bad, _ = await deploy.deploy(js, broken_src, "shop")
    monkeypatch.setenv("SHOP_BREAKS", "1")

    async with _services(settings, pools=()) as (scheduler, _, gateway, _):
        routing = _routing(gateway)
        assert good.bot in scheduler.nets and bad.bot not in scheduler.nets  # the fault happened
        ok, why = routing.ready(bad.version)
        assert not ok and why.startswith("failed:") and "no database here" in why, why
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            # The good version is not ready either (no executor runs here): said so, naming what it waits for.
            answer = await http.post("/bots/shop/sessions")
            assert answer.status_code == 503 and answer.json()["code"] == "version_not_ready"
            assert "no database here" in answer.json()["message"]
        # The operator sees it too: which service could not load the active version, and why.
        from petribus_cli.main import app
        from typer.testing import CliRunner

        shown = await asyncio.to_thread(CliRunner().invoke, app, ["deployments", "show", "shop", "--nats-url",
                                                                  settings.nats_url])
        assert shown.exit_code == 0, shown.output
        assert f"version {bad.version}" in shown.output and "ready:        no, failed:" in shown.output
        assert "scheduler" in shown.output and "FAILED: " in shown.output and "no database here" in shown.output


async def _until(check, timeout: float = 30.0) -> None:
    for _ in range(int(timeout * 20)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never happened")


async def test_deployments_run_on_a_closed_bus_without_a_permission_violation(
        closed_settings: Settings, closed_server, admin, tmp_path: Path) -> None:
    """Each service reads the deployments, fetches the archives and reports in PB_READY as its own role;
    only admin (petribus deploy) writes deployments."""
    version, _ = await deploy.deploy(admin.jetstream(), write_app(tmp_path / "v", "closed"), "shop")
    async with _services(closed_settings) as (_, _, gateway, _):
        await _wait_ready(admin.jetstream(), version.version, gateway)
        client, _, bot = await _new_session(admin.jetstream(), f"{gateway.url.replace('http', 'ws', 1)}/bots/shop/ws")
        assert bot == version.bot
        assert await _order(client, "tea") == {"item": "tea", "by": "closed"}
        await client.close()
    assert test_bus_auth._violations(closed_server) == [], "a service did something its role may not"


async def test_each_environment_applies_its_own_policies_to_its_sessions(
        settings: Settings, nc, tmp_path: Path) -> None:
    """One version, two environments: ``max_concurrent_firings=1`` holds a default-env session to one firing
    at a time while a prod session of the same version runs its firings together; prod's
    ``authorized=True`` needs a key where default's ``authorized=False`` needs none (the bot itself says
    nothing, so it is authorized: the policy is what opens default)."""
    from petribus import keys
    from petribus.bus import EventLog
    from petribus.core import fold

    js = nc.jetstream()
    version, _ = await deploy.deploy(js, write_app(tmp_path / "v", "slow", extra="__import__('time').sleep(0.4)\n    "),
                                     "shop")
    await deploy.release(js, "shop", src="default", dst="prod", actor="test")
    await deploy.set_policies(js, "shop", env="default", actor="test",
                              policies=deploy.Policies(max_concurrent_firings=1, authorized=False))
    await deploy.set_policies(js, "shop", env="prod", actor="test", policies=deploy.Policies(authorized=True))
    token, _ = await keys.create(js, "ops")

    async with _services(settings) as (_, _, gateway, _):
        await _wait_ready(js, version.version, gateway)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            assert (await http.post("/envs/prod/bots/shop/sessions")).status_code == 401
            key = {"Authorization": f"Bearer {token}"}
            prod = (await http.post("/envs/prod/bots/shop/sessions", headers=key)).json()["session_id"]
            default = (await http.post("/bots/shop/sessions")).json()["session_id"]  # public by policy
            # Naming the version itself opens nothing prod closes.
            assert (await http.post(f"/bots/{version.bot}/sessions")).status_code == 401
            assert (await http.get(f"/bots/{version.bot}/sessions/{default}")).status_code == 401
            for session_id, headers in ((prod, key), (default, {})):
                base = "/envs/prod/bots/shop" if headers else "/bots/shop"
                for item in ("a", "b", "c"):
                    added = await http.post(f"{base}/sessions/{session_id}/markers", headers=headers,
                                            json={"location": "Order", "data": {"item": item}})
                    assert added.status_code == 201, added.text
        peaks = {}
        for session_id in (prod, default):
            for _ in range(200):
                log = await EventLog(nc).read(version.bot, session_id)
                if sum(e.type == "transition_completed" for _, e in log) == 3:
                    break
                await asyncio.sleep(0.1)
            assert fold(log).env == ("prod" if session_id == prod else "default")
            running = peak = 0
            for _, event in log:
                running += {"transition_fired": 1, "transition_completed": -1}.get(event.type, 0)
                peak = max(peak, running)
            peaks[session_id] = peak
        assert peaks[prod] > 1  # without the policy the firings overlap ...
        assert peaks[default] == 1  # ... with it, one at a time


async def test_a_handoff_names_a_deployment_and_opens_its_active_version_in_the_same_environment(
        settings: Settings, nc, tmp_path: Path) -> None:
    """``Bot(handoffs=["handoff_billing"])`` names a deployment: under ``--deployments`` the hand-off opens a
    session of the version of it active in the source session's environment, linked to the source, and
    that version's model and transitions answer it."""
    import shutil

    from petribus.bus import EventLog
    from petribus.events import HandedOff, SessionCreated
    from pydantic import SecretStr

    from .conftest import APPS
    from .scripted_llm import ScriptedLLM, call, say
    from .test_handoff import ASKED, KEY, REQUEST, TOOL

    js = nc.jetstream()
    for name in ("handoff_support", "handoff_billing"):
        (tmp_path / name).mkdir()
        shutil.copy(APPS / f"{name}.py", tmp_path / name / f"{name}.py")
    await deploy.deploy(js, f"{tmp_path / 'handoff_billing' / 'handoff_billing.py'}:bot", "handoff_billing",
                        env="prod")
    support, _ = await deploy.deploy(js, f"{tmp_path / 'handoff_support' / 'handoff_support.py'}:bot",
                                     "handoff_support", env="prod")
    billing = await deploy.get_deployment(js, "handoff_billing", "prod")

    async with ScriptedLLM(key=KEY) as llm:
        llm.when(ASKED, call(TOOL, request=REQUEST), say("I handed you over to billing."))
        llm.when(REQUEST, call("Refund", order="42"), say("Refund started for order 42."))
        modelled = settings.model_copy(update={"openai_api_key": SecretStr(KEY), "openai_base_url": llm.base_url})
        async with _services(modelled) as (_, _, gateway, _):
            await _wait_ready(js, support.version, gateway)
            await _wait_ready(js, billing.active, gateway)
            ws = gateway.url.replace("http", "ws", 1)
            client, source, bot = await _new_session(js, f"{ws}/envs/prod/bots/handoff_support/ws")
            assert bot == support.bot
            await client.send({"type": "user_message", "value": ASKED})
            told = await client.until("handed_off")
            await client.close()
            target_bot = deploy.internal_bot("handoff_billing", billing.active)
            assert told["value"]["bot"] == target_bot
            target = told["value"]["session_id"]
            for _ in range(300):  # the billing version's model adds a Refund, which its transition runs
                log = await EventLog(nc).read(target_bot, target)
                if any(e.type == "transition_completed" for _, e in log):
                    break
                await asyncio.sleep(0.1)
            opening = log[0][1]
            assert isinstance(opening, SessionCreated) and opening.env == "prod"
            assert (opening.parent.bot, opening.parent.session_id) == (support.bot, source)
            assert any(e.type == "transition_completed" for _, e in log), [e.type for _, e in log]
            handed = [e for _, e in await EventLog(nc).read(support.bot, source) if isinstance(e, HandedOff)]
            assert [(h.target_bot, h.target_session) for h in handed] == [(target_bot, target)]


async def test_a_fetch_that_meets_a_bus_timeout_is_tried_again_not_reported_failed(
        settings: Settings, nc, tmp_path: Path, monkeypatch) -> None:
    """A version's fault keeps it from traffic for good; the bus's moment must not: the first fetch times
    out (the fault happens, once), the version is loaded on the next try, and no failure is reported."""
    import nats.errors

    from petribus import deployed

    js = nc.jetstream()
    version, _ = await deploy.deploy(js, write_app(tmp_path / "v", "v"), "shop")
    real, tries = deployed.fetch, []

    async def flaky(*args, **kwargs):
        tries.append(1)
        if len(tries) == 1:
            raise nats.errors.TimeoutError
        return await real(*args, **kwargs)

    monkeypatch.setattr(deployed, "fetch", flaky)
    loaded: list[str] = []
    follower = await deployed.follow(nc, role="scheduler", instance="t", data_dir=tmp_path / "data",
                                     add_net=lambda net: loaded.append(net.bot))
    try:
        assert loaded == [] and tries == [1]  # the first try failed, and was not reported
        await _until(lambda: loaded == [version.bot], timeout=15)
        assert follower.handled == {version.version: ""}
        reports = deployed.Reports(nc)
        await reports.start()
        assert [r.ok for r in reports.of(version.version)] == [True]
        await reports.close()
    finally:
        await follower.close()


async def test_each_versions_executor_reports_its_firings_on_the_parents_metrics_port(
        settings: Settings, nc, tmp_path: Path) -> None:
    """A version's executor is a child process; it must not inherit the parent's metrics port (compose sets
    one port for every service: the parent listens there, so the child could not and would be started
    again in a loop). The parent's port reports the children's firings, exactly once each, and forgets a
    child's port once its version's executor stopped."""
    from petribus import metrics
    from petribus.embedded import free_ports

    from .test_metrics import moved, scrape, until_scraped, value

    [port] = free_ports(1)  # a fixed port, as compose's 9100: 0 would let every process pick its own
    metered = settings.model_copy(update={"metrics_port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    js = nc.jetstream()
    version, _ = await deploy.deploy(js, write_app(tmp_path / "v", "metered"), "shop")
    children_before = list(metrics._children)
    async with _services(metered) as (_, _, gateway, executors):
        await _wait_ready(js, version.version, gateway)
        [child] = executors.children.values()
        assert child.settings.metrics_port not in (None, port)
        labels = {"bot": version.bot, "transition": "ship"}
        before = await scrape(url)
        client, _, _ = await _new_session(js, f"{gateway.url.replace('http', 'ws', 1)}/bots/shop/ws")
        for item in ("one", "two"):
            assert await _order(client, item) == {"item": item, "by": "metered"}
        await client.close()
        # The child counts a firing right after appending its outcome, which the client may see first.
        await until_scraped(url, lambda s: value(s, "petribus_firings_completed_total", **labels)
                            - value(before, "petribus_firings_completed_total", **labels) >= 2)
        after = await scrape(url)

    assert moved(after, before, "petribus_firings_completed_total", **labels) == 2
    assert moved(after, before, "petribus_firings_started_total", **labels) == 2
    assert moved(after, before, "petribus_firing_duration_seconds_count", outcome="ok", **labels) == 2
    assert metrics._children == children_before  # the stopped child's port is no longer read


async def test_bots_lists_each_deployment_once_by_name_as_its_environment_runs_it(
        settings: Settings, nc, tmp_path: Path) -> None:
    """``GET /bots`` names a deployment, never a version's own bot: once, with the version a new session of
    the request's environment gets, in a plain bot's shape; it follows a release; an environment whose
    policy needs a key hides it from a caller without one, as ``GET /bots`` hides an authorized plain bot.
    The dashboard's recent sessions of a deployment span its versions."""
    from petribus import keys
    from petribus.loader import load_net

    from .conftest import app

    js = nc.jetstream()
    v1, _ = await deploy.deploy(js, write_app(tmp_path / "v1", "v1"), "shop")
    v2, _ = await deploy.deploy(js, write_app(tmp_path / "v2", "v2"), "shop", env="staging")
    await deploy.set_policies(js, "shop", env="default", actor="test", policies=deploy.Policies(authorized=False))
    await deploy.set_policies(js, "shop", env="prod", actor="test", policies=deploy.Policies(authorized=True))
    token, _ = await keys.create(js, "ops")  # keys are required from now on
    key = {"Authorization": f"Bearer {token}"}

    plain = load_net(app("auth_public"))
    async with _services(settings, plain=[plain]) as (_, _, gateway, _):
        await _wait_ready(js, v1.version, gateway)
        await _wait_ready(js, v2.version, gateway)
        routing = _routing(gateway)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            async def listed(path: str = "/bots", headers: dict | None = None) -> dict[str, dict]:
                answer = await http.get(path, headers=headers or {})
                assert answer.status_code == 200, answer.text
                names = [b["name"] for b in answer.json()]
                assert len(names) == len(set(names)), names  # each once
                return {b["name"]: b for b in answer.json()}

            # Two versions deployed, v1 active in default: listed once, by name, with v1; the plain bot as ever.
            bots = await listed()
            assert sorted(bots) == ["public", "shop"]
            assert bots["shop"]["version"] == v1.version and bots["public"]["version"] is None
            assert bots["shop"].keys() == bots["public"].keys()  # a plain bot's shape
            assert [t["name"] for t in bots["shop"]["transitions"]] == ["ship"]
            assert sorted(await listed(headers=key)) == ["public", "shop"]  # a key sees no version either
            # A bot that is not there is answered with the names a caller may use, never a version's.
            missing = await http.get("/bots/shop--0000000000/sessions", headers=key)
            assert missing.status_code == 404 and "['public', 'shop']" in missing.json()["message"], missing.text
            assert "shop--" not in missing.json()["message"].split(";", 1)[1]
            described = await http.get("/bots/shop")
            assert described.status_code == 200 and described.json() == bots["shop"]
            # staging runs v2; its policy says nothing, so the bot's own authorized holds: a key is needed.
            assert await listed("/envs/staging/bots") == {}
            staged = await listed("/envs/staging/bots", key)
            assert list(staged) == ["shop"] and staged["shop"]["version"] == v2.version
            first = (await http.post("/bots/shop/sessions", headers=key)).json()["session_id"]

            # Released to default: the listing follows.
            await deploy.release(js, "shop", src="staging", dst="default", actor="test")
            await _until(lambda: routing.catalog.deployments()[("default", "shop")].active == v2.version)
            bots = await listed()
            assert sorted(bots) == ["public", "shop"] and bots["shop"]["version"] == v2.version
            assert (await http.get("/bots/shop")).json()["version"] == v2.version
            second = (await http.post("/bots/shop/sessions", headers=key)).json()["session_id"]
            assert {await _bot_of(js, first), await _bot_of(js, second)} == {v1.bot, v2.bot}
            # The dashboard's list of the deployment's sessions: both versions', each read from its own log.
            recent = await http.get("/bots/shop/recent", headers=key)
            assert recent.status_code == 200, recent.text
            assert recent.json()["bot"] == "shop"
            assert {s["session_id"] for s in recent.json()["sessions"]} == {first, second}

            # prod needs a key by policy: without one it lists nothing and describes nothing.
            await deploy.release(js, "shop", src="default", dst="prod", actor="test")
            await _until(lambda: ("prod", "shop") in routing.catalog.deployments())
            assert await listed("/envs/prod/bots") == {}
            assert (await http.get("/envs/prod/bots/shop")).status_code == 401
            shown = await listed("/envs/prod/bots", key)
            assert list(shown) == ["shop"] and shown["shop"]["version"] == v2.version
            assert (await http.get("/envs/prod/bots/shop", headers=key)).json()["version"] == v2.version

            # Deactivated: still listed (its sessions run on), saying it takes no new ones.
            await deploy.deactivate(js, "shop", actor="test")
            await _until(lambda: routing.catalog.deployments()[("default", "shop")].state == "deactivated")
            assert (await listed())["shop"]["deactivated"] is True
            assert (await http.get("/bots/shop")).json()["deactivated"] is True
            assert (await listed("/envs/prod/bots", key))["shop"]["deactivated"] is False
