"""benchmarks/packing.py: `run` (the row `benchmarks/sharding.py` calls) measures the four modes on the same work."""
from __future__ import annotations

from _bench import load_benchmark


def load_bench():
    return load_benchmark("packing", "packing_bench")


def test_run_reports_four_modes_on_the_same_tokens():
    bench = load_bench()
    ids, att, mask = bench.mixed_batch(6, 6, 10, 64, seed=0)
    # the engine's layout: prompt real tokens end at the prompt width, responses start there and are contiguous
    assert (att[:, 5] == 1).all() and (mask[:, 0] == 1).all() and int(mask[0].sum()) == 10
    out = bench.run(n=6, max_prompt=6, max_response=10, hidden=32, layers=1, vocab=64, micro_batch_size=2,
                    max_tokens=24, repeats=1)
    assert [r["mode"] for r in out["rows"]] == ["unpacked, fixed", "packed, fixed", "unpacked, budget", "packed, budget"]
    assert out["real_tokens"] == int(att.sum()) and out["padded_tokens"] == 6 * 16
    unpacked, packed = out["rows"][0], out["rows"][1]
    assert unpacked["tokens_processed"] == 6 * 16 and unpacked["micro_batches"] == 3
    assert packed["tokens_processed"] < unpacked["tokens_processed"]
    assert out["rows"][2]["micro_batches"] == 6  # a budget of 24 holds one padded row of width 16
    for r in out["rows"]:
        assert r["max_logprob_diff"] < 1e-5 and r["tokens_per_s"] > 0
        assert abs(r["padding_frac"] - (1 - out["real_tokens"] / r["tokens_processed"])) < 1e-12
