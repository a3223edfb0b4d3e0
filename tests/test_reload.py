"""``petribus serve --reload``: a code change runs anew within seconds and no session is lost; a broken
edit is reported and the code from before goes on serving until a good one."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from .conftest import APPS
from .harness import Client
from .test_cli import START_S, petribus  # noqa: F401  (the fixture)

RELOAD_S = 60.0  # a reload checks the app and starts the services anew; generous for a loaded machine
BROKEN = "    raise ValueError(f\"not written yet: {n}\")  # FIX ME"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def completed(event: dict) -> bool:
    return event["type"] == "transition_completed"


def failed(event: dict) -> bool:
    return event["type"] == "transition_failed" and event["value"]["final"]


async def test_a_fixed_transition_reloads_and_a_fork_from_before_its_failure_completes(petribus, tmp_path):
    source = tmp_path / "bot" / "app.py"
    source.parent.mkdir()
    shutil.copy(APPS / "errors_reload.py", source)
    served = petribus("serve", f"{source}:bot", "--reload", "--no-chat", "--port", "0", "--workers", "1",
                      "--data-dir", tmp_path / "data")
    ws_url = served.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S).group(1)
    http = served.wait_for(r"REST API\s+(http://\S+)/docs").group(1)
    served.wait_for(rf"reload\s+on every change to a \.py file under {source.parent}")

    client = await Client.connect(ws_url)
    session_id = (await client.until("session_created"))["value"]
    await client.send({"type": "marker_added", "value": {"location": "Job", "data": {"n": 21}}})
    added = await client.until("marker_added")
    failure = await client.until(failed, timeout=60)
    assert failure["value"]["error"] == "not written yet: 21" and "double" in failure["value"]["traceback"]

    edit(source, BROKEN, "    return {Result: [Result(value=n * 2)]}")
    served.wait_for(r"^reloaded after change to app\.py \(", RELOAD_S)
    async with httpx.AsyncClient(base_url=http, timeout=30) as rest:
        fork = (await rest.post(f"/bots/errors_reload/sessions/{session_id}/fork",
                                json={"at": added["metadata"]["seq"]})).json()
    forked = await Client.connect(f"{ws_url}?session_id={fork['session_id']}")
    done = await forked.until(completed, timeout=60)
    assert done["value"]["outputs"][0]["data"] == {"value": 42}  # the fixed code ran on the state from before
    await forked.close()

    # The chat's connection went down with the old services; it resumes where it was, nothing lost.
    await client.close()
    resumed = await Client.connect(f"{ws_url}?session_id={session_id}&since={failure['metadata']['seq']}")
    await resumed.send({"type": "marker_added", "value": {"location": "Job", "data": {"n": 5}}})
    assert (await resumed.until(completed, timeout=60))["value"]["outputs"][0]["data"] == {"value": 10}
    await resumed.close()
    assert served.stop() == 0, served.output()


async def test_a_broken_edit_is_reported_and_the_next_good_one_recovers(petribus, tmp_path):
    source = tmp_path / "app.py"
    shutil.copy(APPS / "errors_reload.py", source)
    served = petribus("serve", f"{source}:bot", "--reload", "--no-chat", "--port", "0", "--workers", "1",
                      "--data-dir", tmp_path / "data")
    ws_url = served.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S).group(1)

    edit(source, BROKEN, "    return {Result: [Result(value=n * 3)]  # a bracket missing")
    broken = served.wait_for(r"^not reloaded after change to app\.py: (.*)", RELOAD_S).group(1)
    assert "SyntaxError" in broken
    served.wait_for(r"the services go on with the code from before; waiting for the next change")
    client = await Client.connect(ws_url)  # the old services still serve
    session_id = (await client.until("session_created"))["value"]
    await client.send({"type": "marker_added", "value": {"location": "Job", "data": {"n": 2}}})
    failure = await client.until(failed, timeout=60)
    assert failure["value"]["error"] == "not written yet: 2"  # the code from before

    (source.parent / "__pycache__").mkdir(exist_ok=True)
    (source.parent / "__pycache__" / "noise.py").write_text("x = 1\n")  # not a change to the app
    edit(source, "# a bracket missing", "}")
    served.wait_for(r"^reloaded after change to app\.py \(", RELOAD_S)
    await client.close()  # the reload closed it (1012, service restart): resume where it was
    client = await Client.connect(f"{ws_url}?session_id={session_id}&since={failure['metadata']['seq']}")
    await client.send({"type": "marker_added", "value": {"location": "Job", "data": {"n": 4}}})
    assert (await client.until(completed, timeout=60))["value"]["outputs"][0]["data"] == {"value": 12}
    await client.close()
    assert not [line for line in served.lines if "noise.py" in line]
    assert served.stop() == 0, served.output()
