"""benchmarks/rollout.py (F19): both sides of the engine-vs-generate comparison detokenise, or only the engine."""
from __future__ import annotations

import pytest
from _bench import load_benchmark


def load_bench():
    return load_benchmark("rollout", "rollout_bench")


@pytest.mark.parametrize("mode, per_call", [("both", 4), ("engine-only", 2)])
def test_generate_side_decodes_text_like_the_engine(mode, per_call):
    """The engine's generate decodes the prompts and the completions (2 batch_decode calls); with "both" the HF
    side does the same, so each timed pair of calls makes 4."""
    import torch

    bench = load_bench()
    torch.manual_seed(0)
    model, tok = bench.build_model("tiny", torch.device("cpu"), torch.float32)
    decoded = []
    real = tok.batch_decode
    tok.batch_decode = lambda rows, **kw: decoded.append(len(rows)) or real(rows, **kw)
    row = bench.bench_shape(model, tok, batch=3, prompt_len=5, new_tokens=2, repeats=1, timer=bench.Timer(torch.device("cpu")),
                            check_logprobs=False, detokenize=mode)
    assert len(decoded) == 2 * per_call  # a warm-up pair and one timed pair
    assert set(decoded) == {3}  # every call decodes the whole batch
    assert row["ours"]["tokens_per_s"] > 0 and row["hf"]["tokens_per_s"] > 0
