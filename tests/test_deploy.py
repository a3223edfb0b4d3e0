"""Deployments: content-addressed versions, per-env deployments with policies and history, optimistic
changes, fetching and loading a version in private, and the commands, against a real nats-server."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.errors import BucketNotFoundError
from typer.testing import CliRunner

from petribus import bus
from petribus import deploy as d
from petribus.deploy import (APPS, Catalog, DeployError, InvalidDeploy, Policies, PolicyBreach, Version,
                             internal_bot, split_internal)
from petribus.embedded import NatsServer
from petribus_cli.deploy import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_NATS

APP = '''
from pydantic import BaseModel

from petribus import Bot, BotLocation
import helper


class Ask(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


bot = Bot(name="greeter", model={model!r}, locations=[BotLocation(marker=Ask), BotLocation(marker=Answer)])


@bot.transition(inputs={{Ask: 1}}, outputs=[Answer])
def reply(inputs):
    return {{Answer: [Answer(text=helper.shape(inputs[Ask][0].text))]}}
{extra}
'''

GPU_TRANSITIONS = '''
@bot.transition(inputs={Answer: 1}, outputs=[Ask], gpu="A10G", pool="big")
def again(inputs):
    return {}


@bot.transition(inputs={Answer: 2}, outputs=[Ask], gpu="T4")
def train(inputs):
    return {}
'''

BROKEN = '''
@bot.transition(inputs={}, outputs=[Answer])
def nothing_in(inputs):
    return {}
'''


def write_app(folder: Path, *, shape: str = "text.upper()", model: str | None = None, extra: str = "") -> str:
    """An app in ``folder`` whose transition shapes text with a sibling module; its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP.format(model=model, extra=extra))
    (folder / "helper.py").write_text(f"def shape(text):\n    return {shape}\n")
    return f"{folder / 'app.py'}:bot"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator:
    nc = await bus.connect(nats_server.url, name="test-deploy")
    yield nc.jetstream()
    await nc.close()


async def stored_keys(js) -> list[str]:
    kv = await d.bucket(js)
    try:
        return sorted(await kv.keys())
    except Exception:  # nats.py: NoKeysError for an empty bucket
        return []


# --- names and packages ----------------------------------------------------------------------------


def test_internal_names_round_trip_and_bad_names_are_refused():
    assert internal_bot("support-bot", "0123abcdef") == "support-bot--0123abcdef"
    assert split_internal("support-bot--0123abcdef") == ("support-bot", "0123abcdef")
    assert split_internal("support-bot") is None
    assert split_internal("support-bot--xyz") is None
    for bad in ("a--b", "1bot", "-bot", "bot.x", "", "x" * (d.MAX_NAME_LEN + 1)):
        with pytest.raises(InvalidDeploy) as refused:
            d.check_name(bad)
        assert refused.value.code == "invalid_name" and repr(bad) in refused.value.message
    assert len(internal_bot("x" * d.MAX_NAME_LEN, "0" * 10)) == 64


def test_same_folder_packs_to_the_same_digest_and_a_changed_file_to_another(tmp_path):
    spec = write_app(tmp_path / "app")
    (tmp_path / "app" / "requirements.txt").write_text("# pinned\nhttpx==0.27\n\npydantic>=2\n")
    first, v1 = d.package(spec, "greet")
    # What is never packed: caches, VCS, virtualenvs, dot-files (a .env holds secrets).
    for junk in ("__pycache__/helper.cpython-311.pyc", ".git/HEAD", ".venv/lib/x.py", "node_modules/m.js",
                 ".env", "stale.pyc"):
        (tmp_path / "app" / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "app" / junk).write_text("junk")
    again, v2 = d.package(spec, "greet")
    assert again == first and v2.digest == v1.digest
    assert v1.digest == hashlib.sha256(first).hexdigest() and v1.version == v1.digest[:10]
    assert v1.files == ["app.py", "helper.py", "requirements.txt"]
    assert v1.requirements == ["httpx==0.27", "pydantic>=2"]
    assert v1.bot == f"greet--{v1.version}" and v1.app == "app.py:bot" and v1.transitions == ["reply"]
    assert v1.pools == ["cpu"] and v1.gpus == []

    (tmp_path / "app" / "helper.py").write_text("def shape(text):\n    return text.lower()\n")
    _, changed = d.package(spec, "greet")
    assert changed.digest != v1.digest
    _, renamed = d.package(spec, "greet2")
    assert renamed.digest != changed.digest  # the name is part of what a version is


def test_an_archive_has_no_times_or_owners(tmp_path):
    data, version = d.package(write_app(tmp_path / "app"), "greet")
    assert data[4:8] == b"\0\0\0\0"  # gzip's mtime
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted([*version.files, d.MANIFEST])
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_resources_of_transitions_are_recorded(tmp_path):
    _, version = d.package(write_app(tmp_path / "app", model="gpt-4o", extra=GPU_TRANSITIONS), "greet")
    assert version.pools == ["big", "cpu", "gpu-t4"]
    assert version.gpus == ["A10G", "T4"]
    assert version.model == "gpt-4o"
    assert version.needs["again"].pool == "big" and version.needs["train"].gpus == ["T4"]


def test_a_too_big_folder_is_refused(tmp_path, monkeypatch):
    spec = write_app(tmp_path / "app")
    (tmp_path / "app" / "data.bin").write_bytes(b"x" * 4096)
    monkeypatch.setattr(d, "MAX_APP_BYTES", 2048)
    with pytest.raises(InvalidDeploy) as refused:
        d.package(spec, "greet")
    assert refused.value.code == "too_large" and "data.bin" in refused.value.message


# --- deploying -------------------------------------------------------------------------------------


async def test_deploy_stores_the_archive_and_records_and_deploying_again_changes_nothing(js, tmp_path):
    spec = write_app(tmp_path / "app")
    version, dep = await d.deploy(js, spec, "greet", actor="alice")
    assert dep.changed and dep.before is None
    assert (dep.env, dep.name, dep.active, dep.state) == ("default", "greet", version.version, "active")
    assert [(e.action, e.version, e.actor) for e in dep.history] == [("deploy", version.version, "alice")]

    obs = await js.object_store(APPS)
    stored = await obs.get(version.version)
    assert hashlib.sha256(stored.data).hexdigest() == version.digest
    assert await d.get_version(js, version.version) == version
    assert await stored_keys(js) == ["env.default.greet", f"version.{version.version}"]

    again_version, again = await d.deploy(js, spec, "greet", actor="bob")
    assert not again.changed and again_version.version == version.version
    assert again_version.created_by == "alice"  # the record stored first is kept
    assert len((await d.get_deployment(js, "greet")).history) == 1


async def test_an_invalid_net_is_refused_and_nothing_is_stored(js, tmp_path):
    spec = write_app(tmp_path / "broken", extra=BROKEN)
    with pytest.raises(InvalidDeploy) as refused:
        await d.deploy(js, spec, "broken")
    assert refused.value.code == "invalid_net" and "nothing_in" in refused.value.message
    assert await stored_keys(js) == []
    with pytest.raises(BucketNotFoundError):  # no archive either: its store was never needed
        await js.object_store(APPS)


async def test_release_leaves_the_origin_as_it_was_and_copies_policies_only_when_asked(js, tmp_path):
    version, _ = await d.deploy(js, write_app(tmp_path / "app"), "greet", env="dev")
    await d.set_policies(js, "greet", env="dev", policies=Policies(pools=["cpu"], max_concurrent_firings=3))
    dev_before = await d.get_deployment(js, "greet", "dev")

    prod = await d.release(js, "greet", src="dev", dst="prod", actor="carol")
    assert prod.active == version.version and prod.policies == Policies()
    assert prod.history[-1].action == "release" and prod.history[-1].detail == "from dev"
    assert await d.get_deployment(js, "greet", "dev") == dev_before

    staged = await d.release(js, "greet", src="dev", dst="staging", with_policies=True)
    assert staged.policies == Policies(pools=["cpu"], max_concurrent_firings=3)

    with pytest.raises(DeployError) as nothing:
        await d.release(js, "greet", src="qa", dst="prod")
    assert nothing.value.code == "nothing_to_release" and "qa" in nothing.value.message


async def test_deactivate_activate_and_rollback_are_kept_in_the_history(js, tmp_path):
    spec = write_app(tmp_path / "app")
    v1, _ = await d.deploy(js, spec, "greet", env="prod")
    with pytest.raises(DeployError) as nowhere:
        await d.rollback(js, "greet", env="prod")
    assert nowhere.value.code == "no_previous"

    write_app(tmp_path / "app", shape="text.lower()")
    v2, dep = await d.deploy(js, spec, "greet", env="prod")
    assert dep.before == v1.version and dep.previous_version() == v1.version

    off = await d.deactivate(js, "greet", env="prod")
    assert off.state == "deactivated" and off.active == v2.version
    assert not (await d.deactivate(js, "greet", env="prod")).changed
    on = await d.activate(js, "greet", env="prod")
    assert on.state == "active"

    back = await d.rollback(js, "greet", env="prod", actor="dave")
    assert back.active == v1.version and back.before == v2.version
    assert back.previous_version() == v2.version  # a second rollback goes forward again
    assert [(e.action, e.version) for e in back.history] == [
        ("deploy", v1.version), ("deploy", v2.version), ("deactivate", v2.version), ("activate", v2.version),
        ("rollback", v1.version)]
    with pytest.raises(DeployError) as missing:
        await d.deactivate(js, "greet", env="nowhere")
    assert missing.value.code == "no_deployment"


async def test_every_policy_breach_is_listed_at_once_and_nothing_changes(js, tmp_path):
    plain, _ = await d.deploy(js, write_app(tmp_path / "plain"), "greet", env="prod")
    strict = Policies(pools=["cpu"], gpus=["T4"], models=["small"])
    await d.set_policies(js, "greet", env="prod", policies=strict)
    before = await d.get_deployment(js, "greet", "prod")

    gpu_app = write_app(tmp_path / "gpu", model="gpt-4o", extra=GPU_TRANSITIONS)
    with pytest.raises(PolicyBreach) as refused:
        await d.deploy(js, gpu_app, "greet", env="prod")
    found = refused.value.breaches
    assert len(found) == 4, found
    assert any("'again'" in b and "pool 'big'" in b and "allowed pools: cpu" in b for b in found)
    assert any("'again'" in b and "'A10G'" in b and "allowed GPU types: T4" in b for b in found)
    assert any("'train'" in b and "pool 'gpu-t4'" in b for b in found)
    assert any("'gpt-4o'" in b and "allowed models: small" in b for b in found)
    assert await d.get_deployment(js, "greet", "prod") == before
    assert [v.version for v in await d.versions(js)] == [plain.version]  # its archive and record not stored

    gpu, _ = await d.deploy(js, gpu_app, "greet", env="dev")
    with pytest.raises(PolicyBreach):
        await d.release(js, "greet", src="dev", dst="prod")
    with pytest.raises(PolicyBreach) as tightened:
        await d.set_policies(js, "greet", env="dev", policies=Policies(gpus=[]))
    assert len(tightened.value.breaches) == 2  # again's A10G, train's T4
    assert (await d.get_deployment(js, "greet", "dev")).policies == Policies()
    assert (await d.get_deployment(js, "greet", "prod")).active == plain.version


async def test_a_change_that_loses_the_race_is_made_again_over_the_winner(js, nats_server, tmp_path, monkeypatch):
    await d.deploy(js, write_app(tmp_path / "app"), "greet", env="dev")
    other = await bus.connect(nats_server.url, name="other-operator")
    real_read = d._read
    reads: list[str] = []

    async def read_then_race(kv, key):
        entry = await real_read(kv, key)
        reads.append(key)
        if len(reads) == 1:  # between our read and our write, another operator changes the record
            await d.deactivate(other.jetstream(), "greet", env="dev", actor="bob")
        return entry

    monkeypatch.setattr(d, "_read", read_then_race)
    try:
        dep = await d.set_policies(js, "greet", env="dev", policies=Policies(pools=["cpu"]), actor="alice")
    finally:
        await other.close()
    assert reads.count("env.dev.greet") == 3  # ours, bob's, ours again after the conflict
    assert dep.state == "deactivated" and dep.policies.pools == ["cpu"]
    assert [(e.action, e.actor) for e in dep.history[-2:]] == [("deactivate", "bob"), ("policies", "alice")]


async def test_concurrent_operators_all_land(js, nats_server, tmp_path):
    await d.deploy(js, write_app(tmp_path / "app"), "greet", env="dev")
    conns = [await bus.connect(nats_server.url, name=f"op{i}") for i in range(5)]
    try:
        await asyncio.gather(*(
            d.amend_policies(nc.jetstream(), "greet", env="dev", actor=f"op{i}",
                             change=lambda p, i=i: p.model_copy(update={"max_concurrent_firings": i + 1}))
            for i, nc in enumerate(conns)))
    finally:
        for nc in conns:
            await nc.close()
    dep = await d.get_deployment(js, "greet", "dev")
    assert sorted(e.actor for e in dep.history if e.action == "policies") == [f"op{i}" for i in range(5)]


# --- fetching and loading --------------------------------------------------------------------------


async def test_fetch_extracts_a_version_and_reuses_a_complete_folder(js, tmp_path):
    version, _ = await d.deploy(js, write_app(tmp_path / "app"), "greet")
    folder = await d.fetch(js, version, tmp_path / "cache")
    assert folder == tmp_path / "cache" / version.version
    assert (folder / "helper.py").read_text() == (tmp_path / "app" / "helper.py").read_text()
    (folder / "marker").write_text("kept")
    assert await d.fetch(js, version, tmp_path / "cache") == folder and (folder / "marker").exists()
    (folder / "helper.py").unlink()  # incomplete: fetched again
    again = await d.fetch(js, version, tmp_path / "cache")
    assert (again / "helper.py").exists() and not (again / "marker").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [version.version]  # no temporary left


async def test_fetch_refuses_an_archive_changed_after_deploy(js, tmp_path):
    version, _ = await d.deploy(js, write_app(tmp_path / "app"), "greet")
    forged, _ = d.package(write_app(tmp_path / "evil", shape="'pwned'"), "greet")
    await (await js.object_store(APPS)).put(version.version, forged)
    with pytest.raises(DeployError) as refused:
        await d.fetch(js, version, tmp_path / "cache")
    assert refused.value.code == "tampered" and version.digest in refused.value.message
    assert not (tmp_path / "cache" / version.version).exists()


async def test_fetch_refuses_a_path_that_leaves_its_folder(js, tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, body in (("app.py", b"x = 1\n"), ("../escaped.py", b"print('out')\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = gzip.compress(raw.getvalue())
    digest = hashlib.sha256(data).hexdigest()
    version = Version(version=digest[:10], name="greet", bot=internal_bot("greet", digest[:10]), app="app.py:bot",
                      digest=digest, size=len(data), files=["app.py"])
    await (await d.objects(js)).put(version.version, data)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(DeployError) as refused:
        await d.fetch(js, version, cache)
    assert refused.value.code == "unsafe_archive" and "../escaped.py" in refused.value.message
    assert not (tmp_path / "deep" / "escaped.py").exists() and list(cache.iterdir()) == []


async def test_two_versions_of_an_app_load_side_by_side_with_their_own_helpers(js, tmp_path):
    spec = write_app(tmp_path / "app", shape="text.upper()")
    v1, _ = await d.deploy(js, spec, "greet")
    write_app(tmp_path / "app", shape="text[::-1]")
    v2, _ = await d.deploy(js, spec, "greet")
    assert v1.version != v2.version

    outsider = type(sys)("helper")  # a module of the same name loaded before must neither leak in nor be lost
    sys.modules["helper"] = outsider
    try:
        nets = [d.load(await d.fetch(js, v, tmp_path / "cache"), v) for v in (v1, v2)]
        assert sys.modules["helper"] is outsider
    finally:
        sys.modules.pop("helper", None)
    assert [n.bot for n in nets] == [v1.bot, v2.bot]
    said = []
    for net in nets:
        ask, answer = net.locations["Ask"].model, net.locations["Answer"].model
        said.append(net.transition("reply").fn({ask: [ask(text="Hello")]})[answer][0].text)
    assert said == ["HELLO", "olleH"]
    assert not any(str(tmp_path / "cache") in p for p in sys.path)


async def test_the_catalog_follows_the_bucket_and_wants_every_version_ever_active(js, nats_server, tmp_path):
    spec = write_app(tmp_path / "app")
    v1, _ = await d.deploy(js, spec, "greet", env="dev")
    nc = await bus.connect(nats_server.url, name="catalog")
    seen: list[int] = []
    catalog = Catalog(nc, on_change=lambda c: seen.append(len(c.versions())))
    await catalog.start()
    try:
        assert [v.version for v in catalog.wanted()] == [v1.version]
        assert catalog.active("greet", "dev") == v1
        write_app(tmp_path / "app", shape="text.lower()")
        v2, _ = await d.deploy(js, spec, "greet", env="dev")
        await _eventually(lambda: catalog.active("greet", "dev") == v2)
        assert [v.version for v in catalog.wanted()] == [v1.version, v2.version]
        await d.deactivate(js, "greet", env="dev")
        await _eventually(lambda: catalog.deployments()[("dev", "greet")].state == "deactivated")
        assert catalog.active("greet", "dev") is None
        for _ in range(500):  # the callback runs in the catalog's own task
            if seen[-1] == 2:
                break
            await asyncio.sleep(0.01)
        assert seen[0] == 1 and seen[-1] == 2
    finally:
        await catalog.close()
        await nc.close()


async def _eventually(check, timeout: float = 10.0) -> None:
    """Until ``check()`` holds (the watch applies changes in its own task; a wait on ``changed()`` begun
    after the change would miss it)."""
    for _ in range(int(timeout * 100)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the catalog never showed the change")


# --- the command line ------------------------------------------------------------------------------


def cli(server: NatsServer, *args: str):
    from petribus_cli.main import app

    return CliRunner().invoke(app, [*args, "--nats-url", server.url])


def test_the_commands_deploy_release_roll_back_and_show(nats_server, tmp_path):
    spec = write_app(tmp_path / "app")
    first = cli(nats_server, "deploy", spec, "--name", "greet", "--env", "dev")
    assert first.exit_code == 0, first.output
    v1 = first.output.split()[1]
    assert f"bot greet--{v1}" in first.output and "env dev: greet now runs" in first.output
    again = cli(nats_server, "deploy", spec, "--name", "greet", "--env", "dev")
    assert again.exit_code == 0 and "nothing changed" in again.output

    released = cli(nats_server, "release", "greet", "--from", "dev", "--to", "prod")
    assert released.exit_code == 0, released.output
    assert f"env prod: greet now runs {v1} from env dev" in released.output

    listed = cli(nats_server, "deployments", "list")
    assert listed.exit_code == 0, listed.output
    rows = [line.split()[:4] for line in listed.output.splitlines()]
    assert rows == [["ENV", "NAME", "ACTIVE", "STATE"], ["dev", "greet", v1, "active"],
                    ["prod", "greet", v1, "active"]]

    write_app(tmp_path / "app", shape="text.lower()")
    second = cli(nats_server, "deploy", spec, "--name", "greet", "--env", "prod")
    v2 = second.output.split()[1]
    assert second.exit_code == 0 and v2 != v1 and f"(before: {v1})" in second.output
    back = cli(nats_server, "rollback", "greet", "--env", "prod")
    assert back.exit_code == 0 and f"rolled back from {v2} to {v1}" in back.output
    off = cli(nats_server, "deactivate", "greet", "--env", "prod")
    assert off.exit_code == 0 and "is deactivated" in off.output
    assert "is active" in cli(nats_server, "activate", "greet", "--env", "prod").output

    shown = cli(nats_server, "deployments", "show", "greet", "--env", "prod")
    assert shown.exit_code == 0, shown.output
    assert f"version {v1}" in shown.output and "helper.py" in shown.output and "pools: any" in shown.output
    history = cli(nats_server, "deployments", "history", "greet", "--env", "prod")
    assert [line.split()[3] for line in history.output.splitlines()] == [
        "release", "deploy", "rollback", "deactivate", "activate"]
    versions = cli(nats_server, "deployments", "versions", "greet")
    assert [line.split()[0] for line in versions.output.splitlines()] == [v1, v2]


def test_the_policies_command_sets_what_it_is_given_and_refuses_a_breach(nats_server, tmp_path):
    assert cli(nats_server, "deploy", write_app(tmp_path / "app", extra=GPU_TRANSITIONS), "--name", "greet",
               "--env", "prod").exit_code == 0
    set_ = cli(nats_server, "deployments", "policies", "greet", "--env", "prod", "--max-concurrent-firings", "4",
               "--public")
    assert set_.exit_code == 0, set_.output
    assert "max concurrent firings per session: 4" in set_.output and "authorized: false" in set_.output

    refused = cli(nats_server, "deployments", "policies", "greet", "--env", "prod", "--pools", "cpu",
                  "--gpus", "none")
    assert refused.exit_code == EXIT_FAILED
    assert "'again'" in refused.output and "'train'" in refused.output and "nothing was changed" in refused.output
    shown = cli(nats_server, "deployments", "policies", "greet", "--env", "prod")
    assert "pools: any" in shown.output and "max concurrent firings per session: 4" in shown.output

    reset = cli(nats_server, "deployments", "policies", "greet", "--env", "prod", "--reset")
    assert reset.exit_code == 0 and "max concurrent firings per session: no limit" in reset.output


def test_bad_input_is_exit_2_and_no_nats_is_exit_3(nats_server, tmp_path):
    bad_name = cli(nats_server, "deploy", write_app(tmp_path / "app"), "--name", "two--dashes")
    assert bad_name.exit_code == EXIT_BAD_INPUT and "'two--dashes'" in bad_name.output
    broken = cli(nats_server, "deploy", write_app(tmp_path / "broken", extra=BROKEN), "--name", "broken")
    assert broken.exit_code == EXIT_BAD_INPUT and "nothing_in" in broken.output and "nothing was stored" in broken.output
    not_a_file = cli(nats_server, "deploy", str(tmp_path / "nope.py"), "--name", "x")
    assert not_a_file.exit_code == EXIT_BAD_INPUT and "nope.py" in not_a_file.output
    nothing = cli(nats_server, "rollback", "greet", "--env", "prod")
    assert nothing.exit_code == EXIT_FAILED and "no deployment greet in env prod" in nothing.output

    server = NatsServer(tmp_path / "gone").start()
    url = server.url
    server.stop()
    from petribus_cli.main import app

    refused = CliRunner().invoke(app, ["deployments", "list", "--nats-url", url])
    assert refused.exit_code == EXIT_NO_NATS and url.split("//")[-1] in refused.output
