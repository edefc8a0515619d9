"""benchmarks/sharding.py: the bytes a rank holds at 2 ranks are half of one rank's, the lm_head included."""
from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_hold_half_the_sharded_state(monkeypatch):
    # on sys.path for this test only (its spawned ranks import `sharding` by name): a sibling's name
    # (benchmarks/tools.py) would shadow a package's for every test module collected after it
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import sharding

    args = {"device": "cpu", "hidden": 64, "layers": 2, "vocab": 256, "rows": 4, "seq": 16, "repeats": 1, "threads": 1}
    one, two = sharding.measure(1, args), sharding.measure(2, args, timeout_s=240)
    model = sharding.tiny_llama(64, 2, 256)
    total = sum(p.numel() for p in model.parameters())
    assert all(p.shape[0] % 2 == 0 for p in model.parameters())  # so each tensor splits into 2 equal halves
    # fp32: 4 bytes (param) + 4 (grad) + 8 (AdamW m, v) per parameter
    assert one["bytes"]["total"] == 16 * total
    # every tensor, the 256 x 64 lm_head too, is sharded: rank 0 holds exactly half
    assert two["bytes"]["total"] == 16 * total // 2
    assert "packing rows" in sharding.table([one, two], None)
