"""benchmarks/kernels_bench.py's Timer (F6): on a GPU the kernel time comes from CUDA-graph replays, apart from the host's
launch time, so a launch-bound call reads as its kernels' time and a bandwidth-bound one as its bytes' time."""
from __future__ import annotations

import pytest
import torch
from _bench import load_benchmark

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load_kernels_bench():
    return load_benchmark("kernels_bench")


def test_cpu_timer_is_per_call_wall_time():
    bench = load_kernels_bench()
    calls = []
    r = bench.Timer("cpu", warmup=1, iters=4)(lambda x: calls.append(x), [(1,), (2,)])
    assert calls == [1, 1, 2, 1, 2]  # 1 warm-up, then 4 timed calls over the rotating inputs
    assert r["timing"] == "perf_counter per call" and 0 < r["us_min"] <= r["us"]


@pytest.mark.gpu
@gpu
def test_gpu_timer_separates_launch_overhead_from_kernel_time():
    bench = load_kernels_bench()
    timer = bench.Timer("cuda", warmup=3, iters=20)
    tiny = [(torch.randn(4, device="cuda"),) for _ in range(2)]

    def many_launches(x):  # 40 tiny kernels: the host launches take far longer than the GPU work
        for _ in range(40):
            x = x * 1.0001
        return x

    r = timer(many_launches, tiny)
    assert r["timing"].startswith("CUDA graph")
    assert r["host_us_per_call"] > 40 * 2  # >= ~2 us per eager launch on any host
    assert r["us"] < 0.5 * r["eager_event_us"]  # replayed, the launch gaps shrink

    n = 256 * 2**20  # 1 GiB fp32 per buffer, 2 buffers (> 2 x L2)
    big = [(torch.randn(n, device="cuda"), torch.empty(n, device="cuda")) for _ in range(2)]
    r = timer(lambda src, dst: dst.copy_(src), big)
    tb_per_s = 2 * 4 * n / (r["us"] * 1e-6) / 1e12  # bytes read + written
    assert 0.5 < tb_per_s < 6.0  # an H100 / H200 copies at ~3-4.3 TB/s: a real copy, not a cached or skipped one
    assert r["us"] == pytest.approx(r["eager_event_us"], rel=0.2)  # bandwidth-bound: launches do not matter
