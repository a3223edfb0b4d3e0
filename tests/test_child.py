"""A service's child process (petribus.child): a start that fails is reported as the failure it is."""

from __future__ import annotations

import pytest

from petribus.child import ChildService
from petribus.errors import PetribusError
from petribus.settings import Settings


async def test_a_child_that_exits_before_ready_is_named_so_and_its_wait_still_fails(tmp_path):
    child = ChildService("test child", "petribus_no_such_module", [], Settings(data_dir=tmp_path))
    with pytest.raises(PetribusError, match="exited before it was ready") as started:
        await child.start()
    assert child.proc is not None and child.proc.returncode not in (None, 0)
    assert "did not start within" not in str(started.value)
    # A watcher that waits on it after the failed start (a restart loop) is told it failed; it is not
    # taken for a stop someone asked for, which would leave the service without its child for good.
    with pytest.raises(PetribusError, match="exited"):
        await child.wait()
    await child.stop()
    await child.wait()  # after a stop that was asked for, the end is not a failure
