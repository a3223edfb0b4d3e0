"""Errors with context: a failed firing's ``transition_failed`` says where it failed (the user's frames,
bounded, secrets masked) and what it consumed (its input markers, as many as fit in one message)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import structlog

from petribus import logs
from petribus.events import encode
from petribus.settings import Settings
from petribus_executor import failures
from petribus_executor.firing import ENVELOPE_BYTES

from .conftest import APPS, app
from .harness import Stack
from .test_container import base, engine  # noqa: F401  (fixtures: a container engine, its base image)
from .test_executor import SessionLog

ERRORS = app("errors_app")
SOURCE = APPS / "errors_app.py"
TOKEN = "tok-7f3a9c2e51d84b06"  # a secret value: never in an event


def line_of(text: str) -> int:
    """The line of the test app that holds ``text``."""
    return next(i for i, line in enumerate(SOURCE.read_text().splitlines(), start=1) if text in line)


def frames(traceback: str) -> list[tuple[str, int, str]]:
    return [(f, int(n), fn) for f, n, fn in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', traceback)]


def as_dicts(markers: list[Any]) -> list[dict[str, Any]]:
    return [m.model_dump() for m in markers]


async def test_a_def_that_raises_shows_its_users_frames_locals_and_the_markers_it_consumed(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        orders = [await log.add("Order", item="lamp", qty=2), await log.add("Order", item="desk", qty=2)]
        [failed] = await log.until("transition_failed", final=True)

    assert failed.transition == "ship_orders" and failed.error_type == "ValueError"
    assert failed.error == "only 3 in stock, 4 ordered"
    shown = frames(failed.traceback)
    assert shown == [(str(SOURCE), line_of("Done(ok=check_stock(total))"), "ship_orders"),
                     (str(SOURCE), line_of('raise ValueError(f"only'), "check_stock")]  # petribus's way in left out
    assert "total = 4" in failed.traceback and "in_stock = 3" in failed.traceback  # the values it failed on
    assert failed.traceback.rstrip().endswith("ValueError: only 3 in stock, 4 ordered")
    assert as_dicts(failed.inputs) == as_dicts(orders)
    assert failed.value()["inputs"] == as_dicts(orders) and failed.value()["traceback"] == failed.traceback


async def test_an_async_def_that_raises_shows_its_frame_and_input(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        order = await log.add("AsyncOrder", item="sofa", qty=1)
        [failed] = await log.until("transition_failed", final=True)

    assert failed.transition == "ship_async" and failed.error_type == "LookupError"
    assert frames(failed.traceback) == [(str(SOURCE), line_of("raise LookupError"), "ship_async")]
    assert "order = AsyncOrder(item='sofa', qty=1)" in failed.traceback
    assert as_dicts(failed.inputs) == as_dicts([order])


async def test_every_failed_attempt_of_a_retried_firing_has_its_traceback_and_inputs(
    settings: Settings, nc: Any
) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        coin = await log.add("Coin", side="edge")
        await log.until("transition_failed", final=True)

    attempts = log.of("transition_failed", transition="flip")
    assert [(f.attempt, f.final) for f in attempts] == [(1, False), (2, True)]
    for failed in attempts:
        assert frames(failed.traceback) == [(str(SOURCE), line_of("landed on"), "flip")]
        assert as_dicts(failed.inputs) == as_dicts([coin])


async def test_a_secret_in_the_message_or_a_local_is_masked(
    settings: Settings, nc: Any, monkeypatch: Any, capfd: Any
) -> None:
    monkeypatch.setenv("PETRIBUS_SECRET_ERRORS_TOKEN", TOKEN)
    saved = structlog.get_config()
    logged = io.StringIO()
    logs.configure(level="debug", stream=logged)
    try:
        async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), \
                SessionLog(nc, "errors_app") as log:
            await log.add("Charge", amount=12)
            [failed] = await log.until("transition_failed", final=True)
            stored = "\n".join(e.model_dump_json() for _, e in log.events)
    finally:
        structlog.configure(**saved)

    assert failed.error_type == "PermissionError"
    assert failed.error == "the payment API refused Bearer *** for 12"  # the secret was in it, and is masked
    assert "token = '***'" in failed.traceback and "'Bearer ***'" in failed.traceback  # locals, masked
    assert TOKEN not in stored and TOKEN[:8] not in stored
    out, err = capfd.readouterr()  # what worker processes wrote to fd 1 and 2
    assert "firing failed" in logged.getvalue()  # the executor's log line has the traceback, masked the same
    assert TOKEN not in logged.getvalue() + out + err


async def test_an_endless_recursion_gives_a_bounded_traceback(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        await log.add("Depth", n=0)
        [failed] = await log.until("transition_failed", final=True)

    assert failed.error_type == "RecursionError"
    assert len(failed.traceback) <= failures.MAX_CHARS + 100
    left_out = re.search(r"… ([\d,]+) frames left out …", failed.traceback)
    assert left_out and int(left_out[1].replace(",", "")) > 500  # it really was deep
    shown = frames(failed.traceback)
    assert shown[0][2] == "recurse" and shown[-1][2] == "descend"  # the way in and where it ended
    assert len(shown) <= failures.MAX_FRAMES
    assert failed.traceback.rstrip().endswith("RecursionError: maximum recursion depth exceeded")


async def test_inputs_too_big_for_one_event_keep_what_fits_and_say_how_many_were_left_out(
    settings: Settings, nc: Any
) -> None:
    limit = nc.max_payload - ENVELOPE_BYTES
    each = (limit - 1500) // 2  # two fit in one work item; with the error and traceback, not in one event
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        bulk = [await log.add("Bulk", text="a" * each), await log.add("Bulk", text="b" * each)]
        [failed] = await log.until("transition_failed", final=True)

    assert failed.transition == "digest_bulk" and failed.error_type == "ValueError"  # it ran and raised
    assert len(encode(failed)) <= limit
    assert as_dicts(failed.inputs) == as_dicts(bulk[:1])
    assert "(1 of 2 input markers are not in this event" in failed.error
    assert failed.traceback and "digest_bulk" in failed.traceback


async def test_a_timed_out_firing_has_no_traceback_but_its_inputs(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        stall = await log.add("Stall", seconds=60)
        [failed] = await log.until("transition_failed", final=True)

    assert failed.error_type == "TransitionTimeout" and "killed" in failed.error
    assert failed.traceback is None and "traceback" not in failed.value()
    assert as_dicts(failed.inputs) == as_dicts([stall])


async def test_a_firing_over_its_memory_limit_shows_where_it_allocated(settings: Settings, nc: Any) -> None:
    async with Stack(settings, [ERRORS], parts=("scheduler", "executor")), SessionLog(nc, "errors_app") as log:
        meal = await log.add("Meal", mib=512)
        [failed] = await log.until("transition_failed", final=True)

    assert failed.error_type == "MemoryLimitExceeded" and "memory=64 MiB" in failed.error
    assert frames(failed.traceback) == [(str(SOURCE), line_of("block = bytearray("), "gulp")]
    assert failed.traceback.rstrip().endswith("MemoryError")
    assert as_dicts(failed.inputs) == as_dicts([meal])


def test_masking_covers_a_secret_as_a_repr_shows_it_and_never_leaves_a_prefix() -> None:
    secret = "it's-a\\secret-" + "x" * 300
    failures.hide([secret])
    try:
        try:
            value = {"key": secret}
            raise RuntimeError(repr(value))
        except RuntimeError as exc:
            text = failures.describe(exc)
    finally:
        failures.hide([])
    assert "***" in text and "it\\'s-a" not in text and "it's-a" not in text and "x" * 20 not in text
    assert Path(__file__).name in text  # this test's own frame is the user's


def test_a_chain_of_exceptions_shows_each_with_its_link() -> None:
    try:
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("lookup failed") from exc
    except ValueError as exc:
        text = failures.describe(exc)
    assert text.index("KeyError: 'missing'") < text.index("direct cause") < text.index("ValueError: lookup failed")


async def test_a_container_worker_shows_the_users_frame_with_its_secrets_masked(engine: Any, base: str) -> None:
    from petribus_executor import protocol as p
    from petribus_executor.container import ContainerLauncher

    from .test_container import start

    launcher = ContainerLauncher(Settings(container_warm=0), [ERRORS])
    try:
        worker = await start(launcher, transition="charge_card", env=(("ERRORS_TOKEN", TOKEN),),
                             secret_names=("ERRORS_TOKEN",))
        request = p.Request(bot="errors_app", session_id="s", firing_id="f", transition="charge_card", attempt=1,
                            inputs=(p.InputMarker("m", "Charge", {"amount": 7}),))
        p.write(worker.fd, p.frame((p.RUN, 1, request)))
        done = await worker.recv()
    finally:
        await launcher.close()

    outcome = done[2]
    assert outcome.error_type == "PermissionError" and outcome.error == "the payment API refused Bearer *** for 7"
    assert [fn for _, _, fn in frames(outcome.traceback)] == ["charge_card"]
    assert "token = '***'" in outcome.traceback and TOKEN not in outcome.traceback


def test_variables_passed_into_the_sandbox_are_masked_too() -> None:
    from petribus_executor import failures
    from petribus_executor.limits import hidden_values

    environ = {"DB_PASSWORD": "hunter2-is-long", "LANG": "C.UTF-8", "SHORT": "abc", "OTHER": "not-passed-value"}
    hidden = hidden_values([("API_TOKEN", "tok-123456789")], environ, ["DB_PASSWORD", "SHORT", "LANG"])
    assert sorted(hidden) == ["hunter2-is-long", "tok-123456789"]  # passed, and 8 characters or more
    text = failures.mask("connect(password='hunter2-is-long') with tok-123456789; lang C; abc", hidden)
    assert text == "connect(password='***') with ***; lang C; abc"
