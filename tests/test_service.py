"""The collector of a long-running process: what it loaded is frozen out of collections (``settle_collector``)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_a_settled_process_freezes_what_it_loaded_and_collects_its_young_objects_in_larger_batches() -> None:
    # In a process of its own: freezing the test runner's heap would change every test after this one.
    probe = (
        "import gc, json\n"
        "from petribus.service import GC_THRESHOLDS, settle_collector\n"
        "before = (gc.get_threshold(), gc.get_freeze_count())\n"
        "settle_collector()\n"
        "print(json.dumps([before, [gc.get_threshold(), gc.get_freeze_count()], GC_THRESHOLDS]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    (threshold_before, frozen_before), (threshold, frozen), wanted = json.loads(out.stdout)
    assert frozen_before == 0 and threshold_before[0] == 700  # Python's defaults, untouched by the import
    assert threshold == list(wanted) and threshold[0] > threshold_before[0]
    assert frozen > 10_000  # petribus and its imports: out of every later collection
