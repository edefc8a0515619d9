"""benchmarks/sharding.py: the bytes a rank holds at 2 ranks are half the sharded state plus the whole lm_head."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_hold_half_the_sharded_state():
    import sharding

    args = {"device": "cpu", "hidden": 64, "layers": 2, "vocab": 256, "rows": 4, "seq": 16, "repeats": 1, "threads": 1}
    one, two = sharding.measure(1, args), sharding.measure(2, args, timeout_s=240)
    model = sharding.tiny_llama(64, 2, 256)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    # fp32: 4 bytes (param) + 4 (grad) + 8 (AdamW m, v) per parameter
    assert one["bytes"]["total"] == 16 * total
    # every sharded tensor splits into 2 equal halves here (dim 0 of each is even): exactly half, plus the head
    assert two["bytes"]["total"] == 16 * (total - head) // 2 + 16 * head
    assert "packing rows" in sharding.table([one, two], None)
