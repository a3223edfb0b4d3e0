"""The container sandbox against a real engine (podman's Docker API, started by scripts/engine).

First the parts on their own: a container worker speaking the worker protocol over its socket, what
its container lets it see and do, its limits, the images. Then through the services: a real executor
process, nats-server and scheduler, and the transitions of ``tests/apps/contained.py``. The engine and
the images are shared by every test of the run. Without an engine these tests fail, saying why; they
never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from petribus.resources import Image
from petribus.settings import Settings
from petribus_executor import images
from petribus_executor import protocol as p
from petribus_executor.container import INTERPRETER_MIB, LABEL, ContainerLauncher, ContainerProcess
from petribus_executor.images import ImageBuildFailed, ImageNotFound, ensure_image, image_tag
from petribus_executor.sandbox import Profile

from .conftest import app
from .harness import Stack
from .test_executor import ExecutorProcess, SessionLog

REPO = Path(__file__).resolve().parent.parent
APP = app("contained")
SECRET = f"s3cr3t-{uuid.uuid4().hex}"
BUILT = Image(python_packages=["six"], commands=["echo made-in-build > /opt/marker"])


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """A client of the engine scripts/engine starts (when DOCKER_HOST is not set already)."""
    if os.environ.get("PETRIBUS_ENGINE_ERROR"):
        pytest.fail(f"no container engine: {os.environ['PETRIBUS_ENGINE_ERROR']}")
    if not os.environ.get("DOCKER_HOST"):
        run = subprocess.run([str(REPO / "scripts" / "engine")], capture_output=True, text=True)
        if run.returncode != 0:
            pytest.fail(f"scripts/engine could not start a container engine:\n{run.stderr}")
        for line in run.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            os.environ[key] = value
    c = images.client()
    yield c
    c.close()


@pytest.fixture(scope="session")
def base(engine: Any) -> str:
    return asyncio.run(ensure_image(None))


@pytest.fixture(scope="session")
def built(engine: Any, base: str) -> str:
    return asyncio.run(ensure_image(BUILT))


@pytest.fixture
async def launcher(engine: Any) -> AsyncIterator[ContainerLauncher]:
    launcher = ContainerLauncher(Settings(container_warm=0), [APP])
    yield launcher
    await launcher.close()


class Worker:
    """The executor's end of one container worker's socket."""

    def __init__(self, proc: ContainerProcess, fd: int) -> None:
        self.proc = proc
        self.fd = fd
        self.frames = p.Frames()
        self.pending: list[tuple[Any, ...]] = []

    async def recv(self) -> tuple[Any, ...]:
        while not self.pending:
            data = await asyncio.to_thread(os.read, self.fd, 1 << 16)
            if not data:
                raise EOFError
            self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    async def fire(self, job: int, transition: str, location: str, data: dict[str, Any]) -> p.Outcome:
        request = p.Request(bot="contained", session_id="s", firing_id=uuid.uuid4().hex, transition=transition,
                            attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, location, data),))
        p.write(self.fd, p.frame((p.RUN, job, request)))
        msg = await self.recv()
        assert msg[:2] == (p.DONE, job), msg
        return msg[2]


async def start(launcher: ContainerLauncher, **profile: Any) -> Worker:
    proc, fd = await launcher.launch(Profile(kind="container", **profile), {"cpus": None})
    worker = Worker(proc, fd)
    ready = await worker.recv()
    assert ready[0] == p.READY, ready
    return worker


def host_address() -> str:
    """This machine's address on its network (not loopback): where a container without network
    would have to go to reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))
        return s.getsockname()[0]


@pytest.fixture
def server() -> Iterator[str]:
    """A TCP server on this machine's address, which this machine itself can reach."""
    with socket.create_server(("0.0.0.0", 0)) as srv:
        address = f"{host_address()}:{srv.getsockname()[1]}"
        with socket.create_connection((host_address(), srv.getsockname()[1]), timeout=5):
            pass  # the control: reachable from outside a container
        yield address


def seen(outcome: p.Outcome) -> dict[str, Any]:
    assert outcome.ok, (outcome.error_type, outcome.error, outcome.traceback)
    [(location, data)] = outcome.outputs
    assert location == "Seen"
    return data


async def test_container_worker_sees_its_image_not_the_host(launcher: ContainerLauncher, built: str,
                                                            server: str, tmp_path: Path) -> None:
    host_file = tmp_path / "on-the-host"
    host_file.write_text("x")
    worker = await start(launcher, image=built, memory_mib=64, transition="look",
                         env=(("PETRIBUS_TEST_SECRET", SECRET),), secret_names=("PETRIBUS_TEST_SECRET",))

    got = seen(await worker.fire(1, "look", "Probe", {"host_file": str(host_file), "address": server,
                                                      "secret_name": "PETRIBUS_TEST_SECRET"}))

    assert got["host_file_visible"] is False
    assert got["image_marker"] == "made-in-build"  # written by the image's build command
    assert got["package"] != ""  # six, installed into the image only (the executor's venv has none)
    assert got["connect_error"] == "ENETUNREACH"
    assert got["root_write_error"] == "EROFS"
    assert got["boot_file_left"] is False
    assert got["secret"] == SECRET
    assert got["cwd"].startswith(worker.proc.root)


async def test_container_limits_and_secrets_as_the_engine_shows_them(launcher: ContainerLauncher,
                                                                    engine: Any, base: str) -> None:
    worker = await start(launcher, memory_mib=96, cpus=1, max_files=256, transition="look",
                         env=(("PETRIBUS_TEST_SECRET", SECRET),), secret_names=("PETRIBUS_TEST_SECRET",))

    inspected = engine.api.inspect_container(worker.proc.id)

    host = inspected["HostConfig"]
    assert host["Memory"] == (96 + INTERPRETER_MIB) * 1024 * 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "none"
    assert host["PidsLimit"] > 0
    assert [(u["Soft"], u["Hard"]) for u in host["Ulimits"] if "nofile" in u["Name"].lower()] == [(256, 256)]
    assert inspected["Config"]["Labels"][LABEL] == launcher.owner
    assert SECRET not in json.dumps(inspected)  # environment, command line, labels: none carries it
    assert not (Path(worker.proc.scratch) / "boot.json").exists()


async def test_memory_over_the_container_limit_is_killed_and_named(launcher: ContainerLauncher,
                                                                   base: str) -> None:
    worker = await start(launcher, memory_mib=64, transition="hog")
    request = p.Request(bot="contained", session_id="s", firing_id="f", transition="hog", attempt=1,
                        inputs=(p.InputMarker("m", "Hog", {"mib": 400}),))

    p.write(worker.fd, p.frame((p.RUN, 1, request)))
    with pytest.raises(EOFError):
        await worker.recv()
    await asyncio.to_thread(worker.proc.join)

    assert worker.proc.exitcode == -9
    assert worker.proc.exit_reason() == ("killed: over its memory limit of 64 MiB (mem_limit, plus "
                                         f"{INTERPRETER_MIB} MiB for the interpreter)")


async def test_a_killed_container_says_it_was_killed_not_out_of_memory(launcher: ContainerLauncher,
                                                                       base: str) -> None:
    worker = await start(launcher, transition="look")

    worker.proc.kill()
    await asyncio.to_thread(worker.proc.join)

    assert not worker.proc.is_alive()
    assert worker.proc.exitcode == -9
    assert worker.proc.exit_reason() == "killed by its executor"


async def test_default_image_has_no_packages_of_its_own(launcher: ContainerLauncher, base: str,
                                                        server: str) -> None:
    worker = await start(launcher, transition="look")

    got = seen(await worker.fire(1, "look", "Probe", {"host_file": str(REPO / "README.md"), "address": server}))

    assert (REPO / "README.md").exists()
    assert got["host_file_visible"] is False
    assert got["image_marker"] == "" and got["package"] == ""
    assert got["connect_error"] == "ENETUNREACH"


async def test_a_container_with_network_reaches_what_one_without_cannot(launcher: ContainerLauncher,
                                                                       base: str, server: str) -> None:
    probe = {"host_file": "/nonexistent", "address": server}
    with_network = await start(launcher, transition="look", network=True)
    without = await start(launcher, transition="look")

    assert seen(await with_network.fire(1, "look", "Probe", probe))["connect_error"] == ""
    assert seen(await without.fire(1, "look", "Probe", probe))["connect_error"] == "ENETUNREACH"


async def test_volumes_are_mounted_read_write_at_their_paths(launcher: ContainerLauncher, base: str,
                                                            tmp_path: Path) -> None:
    absolute, relative = tmp_path / "absolute", tmp_path / "relative"
    absolute.mkdir()
    relative.mkdir()
    worker = await start(launcher, transition="note",
                         volumes=((str(absolute), "/data"), (str(relative), "cache")))

    at_absolute = await worker.fire(1, "note", "Note", {"path": "/data/a.txt", "text": "one"})
    at_relative = await worker.fire(2, "note", "Note", {"path": "cache/b.txt", "text": "two"})

    assert at_absolute.ok and at_relative.ok, (at_absolute.error, at_relative.error)
    assert (absolute / "a.txt").read_text() == "one"
    assert (relative / "b.txt").read_text() == "two"  # through the worker's link, to the host's folder


async def test_close_removes_every_container_and_scratch_folder(engine: Any, base: str) -> None:
    launcher = ContainerLauncher(Settings(container_warm=0), [APP])
    workers = [await start(launcher, transition="look") for _ in range(2)]
    assert len(engine.api.containers(all=True, filters={"label": f"{LABEL}={launcher.owner}"})) == 2

    await launcher.close()

    assert engine.api.containers(all=True, filters={"label": f"{LABEL}={launcher.owner}"}) == []
    assert not any(Path(w.proc.scratch).exists() for w in workers)


async def test_a_dead_executors_containers_are_removed_by_the_next(engine: Any, base: str,
                                                                   launcher: ContainerLauncher) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = engine.containers.run(base, ["sleep", "600"], detach=True, network_mode="none",
                                 labels={LABEL: f"{socket.gethostname()}:{dead.pid}"})

    await start(launcher, transition="look")

    assert engine.api.containers(all=True, filters={"id": left.id}) == []


async def test_a_warm_spare_of_the_same_profile_is_handed_out_ready(engine: Any, base: str) -> None:
    launcher = ContainerLauncher(Settings(container_warm=1), [APP])
    try:
        first = await start(launcher, transition="look")
        await launcher.warmed()
        [spare] = [c for c in engine.api.containers(filters={"label": f"{LABEL}={launcher.owner}"})
                   if c["Id"] != first.proc.id]

        second = await start(launcher, transition="look")  # its ready was waiting in the socket
        other = await start(launcher, transition="hog")  # another transition: never a spare of look's

        assert second.proc.id == spare["Id"]
        assert other.proc.id not in (first.proc.id, spare["Id"])
        outcome = await second.fire(1, "look", "Probe", {"host_file": "/nonexistent", "address": "10.0.0.1:1"})
        assert outcome.ok, outcome.error
    finally:
        await launcher.close()
    assert engine.api.containers(all=True, filters={"label": f"{LABEL}={launcher.owner}"}) == []


async def test_an_image_is_built_once_per_content(engine: Any, built: str) -> None:
    lines: list[str] = []
    images._ready.clear()  # forget what this process knows: the engine's copy must be found

    again = await ensure_image(Image(python_packages=["six"], commands=["echo made-in-build > /opt/marker"]),
                               progress=lines.append)

    assert again == built == image_tag(BUILT)
    assert lines == []  # nothing built
    assert image_tag(Image(python_packages=["six"])) != built


async def test_concurrent_builds_of_one_image_build_it_once(engine: Any, base: str) -> None:
    image = Image(commands=[f"echo {uuid.uuid4().hex} > /opt/once"])
    lines: list[str] = []
    try:
        tags = await asyncio.gather(*(ensure_image(image, progress=lines.append) for _ in range(3)))

        assert tags == [image_tag(image)] * 3
        assert sum(line.startswith("building ") for line in lines) == 1
        assert any("RUN echo" in line for line in lines)  # the build's progress reached the callback
    finally:
        engine.images.remove(image_tag(image), force=True)


async def test_a_failing_build_names_the_image_the_step_and_its_output(engine: Any, base: str) -> None:
    image = Image(commands=["echo made-it-so-far", "echo about-to-fail && exit 3"])

    with pytest.raises(ImageBuildFailed) as failed:
        await ensure_image(image)

    message = str(failed.value)
    assert image_tag(image) in message
    assert "step 'RUN echo about-to-fail && exit 3' failed" in message
    assert "about-to-fail" in message.split("last lines:")[1]  # the failing step's own output
    assert engine.api.images(name=image_tag(image)) == []


async def test_a_base_image_no_registry_has_is_a_clear_error(engine: Any) -> None:
    image = Image(base_image="registry.invalid/petribus/nothing:1")

    with pytest.raises(ImageBuildFailed) as failed:
        await ensure_image(image)

    assert "registry.invalid/petribus/nothing:1" in str(failed.value)
    assert "needs a registry the engine can reach" in str(failed.value)


async def test_an_image_named_by_tag_must_exist(engine: Any) -> None:
    with pytest.raises(ImageNotFound) as missing:
        await ensure_image("localhost/petribus-nothing:1")

    assert "localhost/petribus-nothing:1" in str(missing.value)


# ------------------------------------------------------------ through the services

@pytest.fixture
async def executor(settings: Settings, engine: Any, built: str) -> AsyncIterator[ExecutorProcess]:
    """An executor process (it inherits DOCKER_HOST) for the contained app; its containers go with it."""
    ex = await ExecutorProcess.start(settings, [APP], "--workers", "2")
    async with asyncio.timeout(60):
        await ex.ready.wait()
    yield ex
    await ex.kill()
    owner = f"{socket.gethostname()}:{ex.proc.pid}"
    for c in engine.api.containers(all=True, filters={"label": f"{LABEL}={owner}"}):
        try:
            engine.api.remove_container(c["Id"], force=True)
        except docker.errors.NotFound:
            pass  # went with its worker
        except docker.errors.APIError:  # stopping by itself (its worker saw the executor go): let it finish
            with contextlib.suppress(docker.errors.NotFound):
                engine.api.wait(c["Id"], timeout=30)
                engine.api.remove_container(c["Id"], force=True)
    for scratch in (Path(tempfile.gettempdir()) / "petribus-containers").glob(f"{ex.proc.pid}-*"):
        shutil.rmtree(scratch)  # a killed executor cannot: the next launcher's sweep would


async def test_a_container_transition_sees_its_image_not_the_host_nor_the_network(
    settings: Settings, nc: Any, executor: ExecutorProcess, server: str, tmp_path: Path, engine: Any
) -> None:
    host_file = tmp_path / "on-the-host"
    host_file.write_text("x")
    async with Stack(settings, [APP], parts=("scheduler",)), SessionLog(nc, "contained") as log:
        await log.add("Probe", host_file=str(host_file), address=server)
        done = (await log.until("transition_completed"))[0]

    got = done.outputs[0].data
    assert got["host_file_visible"] is False and host_file.exists()
    assert got["image_marker"] == "made-in-build" and got["package"] != ""
    assert got["connect_error"] == "ENETUNREACH"
    assert got["root_write_error"] == "EROFS"
    # It ran in one of this executor's containers, of the image the transition names.
    [container] = [c for c in engine.api.containers(filters={"label": f"{LABEL}={socket.gethostname()}:"
                                                                        f"{executor.proc.pid}"})
                   if c["Id"].startswith(got["hostname"])]
    assert container["Labels"]["petribus.image"] == image_tag(BUILT)


async def test_a_container_over_its_memory_fails_the_firing_naming_the_limit_and_its_marker_returns(
    settings: Settings, nc: Any, executor: ExecutorProcess
) -> None:
    async with Stack(settings, [APP], parts=("scheduler",)), SessionLog(nc, "contained") as log:
        hog = await log.add("Hog", mib=400)
        failed = (await log.until("transition_failed", final=True, timeout=90))[0]
        state = await log.state()

    assert failed.final
    assert "over its memory limit of 64 MiB" in failed.error, failed.error
    assert [m.id for m in state.marking()["Hog"]] == [hog.id]
    assert "Fed" not in state.marking() or state.marking()["Fed"] == []
