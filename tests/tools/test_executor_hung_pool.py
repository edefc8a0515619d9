"""ToolExecutor.run_batch returns although hung calls hold every worker: the queued calls are answered "not
started" once the batch's bound has passed (CallRunner does the same for the rollout engine's tool calls)."""
from __future__ import annotations

import threading
import time

from align.tools import ToolExecutor, ToolResult


def test_calls_queued_behind_hung_ones_are_answered_within_the_batch_bound():
    release = threading.Event()

    def hang(tool_input, context=None):
        release.wait(60)
        return ToolResult(True, "late")

    ex = ToolExecutor(max_workers=1, timeout_s=0.3, resolver=(lambda name: hang, lambda name: name))
    box = {}
    runner = threading.Thread(target=lambda: box.update(out=ex.run_batch([("hang", "a"), ("hang", "b")])), daemon=True)
    t0 = time.monotonic()
    runner.start()
    runner.join(10)  # the bound: 0.3 s x (ceil(2 calls / 1 worker) + 1 rounds) = 0.9 s, plus polling
    took = time.monotonic() - t0
    release.set()
    ex.close()
    assert "out" in box, "run_batch was still waiting 10 s later: the queued call never timed out"
    first, second = box["out"]
    assert (first.ok, first.error) == (False, "timeout after 0.3s")
    assert second.ok is False and "not started" in second.error
    assert took < 5
