"""Benchmark the `kernels` package against its PyTorch references and peers, side by side.

    python benchmarks/kernels_bench.py                      # GPU if present, else CPU (torch paths only)
    python benchmarks/kernels_bench.py --device cuda --out benchmarks/results/kernels.json

Sampling at [B, V] (default on GPU: B = 256, V = 151,936, bf16 as the engine feeds a bf16 model, and fp32):
ours (Triton, with the flags the engine passes, read off the sampler's signature, and plain) vs our PyTorch
reference vs the common sort-based top-k/top-p + multinomial sampler (and softmax + multinomial for
temperature only), plus FlashInfer when it is installed. Token log-probs at [N, V] (default on GPU: N = 16,384
bf16): ours vs our fp32 PyTorch reference vs TRL's `selective_log_softmax`, forward and backward (forward +
backward minus forward on the GPU, the backward alone on the CPU). Fused linear + log-probs (hidden states in)
vs full logits + log_softmax, forward + backward, with peak memory.
GPU timing (F6 of GPU_READINESS.md): the kernel time is the replay of a CUDA graph of --graph-calls calls over
input buffers rotated to cover twice the L2 (so no call reads a cached copy), divided by the calls, median
of --replays replays; the host time of one eager call (launch only, no sync) is reported beside it, since an
eager call's ~20 small torch launches would otherwise be what a per-call event pair measures. Warm-up first.
CPU timing: perf_counter; Triton rows are listed as skipped (the Triton CPU interpreter is a correctness
tool, not a fast path). Prints a table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from align import kernels  # noqa: E402
from align.kernels.logprobs_reference import token_logprobs_reference  # noqa: E402
from align.kernels.sampling_reference import sample_reference  # noqa: E402

GOALS_US = {  # issue 3 targets on an H100 at the default GPU sizes
    ("sample", "temperature 0.8"): 80.0,
    ("sample", "top-k 50 + top-p 0.9"): 150.0,
    ("logprobs", "forward"): 1900.0,
    ("logprobs", "backward"): 3700.0,
}


def _trl_selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as exc:  # trl is not installed on every GPU image
        return None, f"trl unavailable: {type(exc).__name__}"
    return selective_log_softmax, ""


def _flashinfer_sampler():
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_logits
    except Exception:
        return None
    return top_k_top_p_sampling_from_logits


def sort_based_sampler(logits, temperature, top_k, top_p):
    """The widespread sort-based sampler (HF warpers + multinomial): full sort, cumsum, scatter, multinomial."""
    z = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1, descending=False)
        cum = sorted_z.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False
        z = z.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return torch.multinomial(z.softmax(-1), 1).squeeze(1)


def softmax_multinomial(logits, temperature):
    return torch.multinomial((logits.float() / temperature).softmax(-1), 1).squeeze(1)


class Timer:
    """Median time per call in microseconds.

    CUDA (F6 of GPU_READINESS.md): one eager call launches ~20 small torch kernels besides the Triton one, ~0.15 ms
    of host time, so CUDA events around single eager calls measure the host, not the kernel. The kernel time here
    is the replay of a CUDA graph of `graph_calls` calls over the rotating input buffers, divided by the calls
    (median over `replays` replays); the host time of one eager call (perf_counter around the launch, no sync) and
    the old eager-event figure are reported beside it. A function that cannot be captured (e.g. a peer that syncs)
    falls back to eager events, and its record says so. CPU: perf_counter per call (host time is the time)."""

    def __init__(self, device: str, warmup: int, iters: int, graph_calls: int = 20, replays: int = 10,
                 max_s: float = 1.0):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.graph_calls, self.replays = graph_calls, replays
        self.max_s = max_s  # per phase (eager calls, graph replays): slow peers stop early (at least 3 samples)

    def __call__(self, fn, inputs: list) -> dict:
        for i in range(self.warmup):
            fn(*inputs[i % len(inputs)])
        if self.device != "cuda":
            times = []
            for i in range(self.iters):
                t0 = time.perf_counter()
                fn(*inputs[i % len(inputs)])
                times.append((time.perf_counter() - t0) * 1e6)
            return {"us": statistics.median(times), "us_min": min(times), "peak_extra_mb": None,
                    "timing": "perf_counter per call"}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        eager, host = [], []
        began = time.perf_counter()
        for i in range(self.iters):
            if i >= 3 and time.perf_counter() - began > self.max_s:
                break
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            host.append((time.perf_counter() - t0) * 1e6)  # launch cost: the call returns before the GPU is done
            end.record()
            end.synchronize()
            eager.append(start.elapsed_time(end) * 1000.0)
        out = {"eager_event_us": statistics.median(eager), "host_us_per_call": statistics.median(host),
               "peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
        try:
            out.update(self._graph(fn, inputs, max(out["eager_event_us"], out["host_us_per_call"])))
        except Exception as exc:  # noqa: BLE001 - reported in the row, never a silent number
            torch.cuda.synchronize()
            out.update(us=out["eager_event_us"], us_min=min(eager),
                       timing=f"eager CUDA events per call (graph capture failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
        return out

    def _graph(self, fn, inputs: list, call_us: float) -> dict:
        # calls per graph: --graph-calls, fewer for slow calls (a graph of ~0.25 s), every buffer equally often
        calls = max(1, min(self.graph_calls, int(0.25e6 / max(call_us, 1e-3))))
        n = -(-max(calls, len(inputs)) // len(inputs)) * len(inputs)
        replays = max(3, min(self.replays, int(self.max_s * 1e6 / max(n * call_us, 1e-3))))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends before capture
            for i in range(3):
                fn(*inputs[i % len(inputs)])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                fn(*inputs[i % len(inputs)])
        graph.replay()  # first replay uploads the graph
        torch.cuda.synchronize()
        per_call = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) * 1000.0 / n)
        del graph
        return {"us": statistics.median(per_call), "us_min": min(per_call),
                "timing": f"CUDA graph of {n} calls over {len(inputs)} rotating buffers, median of {replays} replays"}


def _l2_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20)


def _n_buffers(device: str, bytes_per_input: int) -> int:
    # rotate over >= 2 x L2 (50 MB on an H100, 60 MB on an H200) so no call reads a copy the previous one cached
    return max(2, -(-(2 * _l2_bytes(device)) // max(1, bytes_per_input))) if device == "cuda" else 1


def engine_sample_flags(b: int, device: str) -> list[tuple[str, dict]]:
    """The keyword sets the rollout engine passes to `kernels.sample`, as far as this checkout's sampler has them
    (read off its signature, so the benchmark fits the code before and after the [gpu-fixes] F3 / F4 changes):
    the trainer's engine asks for details with no rank (rank_cap=0; curiosity off), a Ray rollout worker also
    draws counter noise inside the kernel; "rank pass" is details with the full rank (curiosity top-k > 1)."""
    params = inspect.signature(kernels.sample).parameters
    if "rank_cap" not in params:
        return [("engine flags", {"return_details": True})]
    flags = [("engine flags", {"return_details": True, "rank_cap": 0}),
             ("rank pass", {"return_details": True, "rank_cap": None})]
    if "counter" in params and device == "cuda":
        keys = torch.arange(b, device=device, dtype=torch.int64) + 12345  # any per-row sample keys
        step = torch.zeros(1, device=device, dtype=torch.int64)
        flags.append(("Ray worker: counter noise", {"return_details": True, "rank_cap": 1, "counter": (keys, step)}))
    return flags


def bench_sampling(device, timer, b, v, results, dtype=torch.float32):
    """`dtype`: the logits' dtype. The engine feeds the model's logits (bf16 for a bf16 model) and asks for
    `return_details=True` (the rank, a second pass over the row): the "engine flags" row times exactly that call;
    the plain row shows what the rank pass costs (F3)."""
    gen = torch.Generator(device=device).manual_seed(0)
    nbuf = _n_buffers(device, b * v * torch.finfo(dtype).bits // 8)
    bufs = [((torch.randn(b, v, device=device, generator=gen) * 3).to(dtype),) for _ in range(nbuf)]
    flashinfer = _flashinfer_sampler() if device == "cuda" else None
    cases = [
        ("temperature 0.8", dict(temperature=0.8)),
        ("top-k 50 + top-p 0.9", dict(top_k=50, top_p=0.9)),
        ("top-p 0.9", dict(top_p=0.9)),
        ("min-p 0.1", dict(min_p=0.1)),
    ]
    size = f"B={b} V={v} {str(dtype).replace('torch.', '')}"
    flags = engine_sample_flags(b, device)
    for name, cfg in cases:
        impls = [(f"ours (triton, {label})", lambda x, cfg=cfg, kw=kw: kernels.sample(x, **cfg, **kw, backend="triton"))
                 for label, kw in flags]
        impls += [
            ("ours (triton)", lambda x, cfg=cfg: kernels.sample(x, **cfg, backend="triton")),
            ("ours (torch reference)", lambda x, cfg=cfg: sample_reference(x, **cfg)),
        ]
        if name.startswith("temperature"):
            impls.append(("softmax + multinomial", lambda x: softmax_multinomial(x, 0.8)))
        else:
            t, k, p = cfg.get("temperature", 1.0), cfg.get("top_k", 0), cfg.get("top_p", 1.0)
            if "min_p" not in cfg:
                impls.append(("sort-based top-k/top-p + multinomial",
                              lambda x, t=t, k=k, p=p: sort_based_sampler(x, t, k, p)))
            if flashinfer is not None and k > 0:
                impls.append(("flashinfer top_k_top_p_sampling_from_logits",
                              lambda x, k=k, p=p: flashinfer(x, k, p)))
        for impl, fn in impls:
            row = {"group": "sample", "case": name, "impl": impl, "size": size}
            if "triton" in impl and device != "cuda":
                row["skipped"] = "Triton needs CUDA (CPU run: torch paths only)"
            else:
                row.update(timer(fn, bufs))
            results.append(row)


def bench_logprobs(device, timer, n, v, dtype, results):
    gen = torch.Generator(device=device).manual_seed(1)
    elt = torch.finfo(dtype).bits // 8
    nbuf = _n_buffers(device, n * v * elt)
    size = f"N={n} V={v} {str(dtype).replace('torch.', '')}"
    bufs = []
    for _ in range(nbuf):
        x = (torch.randn(n, v, device=device, generator=gen) * 3).to(dtype)
        tok = torch.randint(0, v, (n,), device=device, generator=gen)
        bufs.append((x, tok))
    trl_fn, trl_note = _trl_selective_log_softmax()
    fwd = [
        ("ours (triton)", lambda x, t: kernels.token_logprobs(x, t, backend="triton")),
        ("ours (torch reference, fp32)", lambda x, t: token_logprobs_reference(x, t)),
        ("trl selective_log_softmax", (lambda x, t: trl_fn(x, t)) if trl_fn else None),
    ]
    ent = [
        ("ours (triton)", lambda x, t: kernels.token_logprobs(x, t, with_entropy=True, backend="triton")),
        ("ours (torch reference)", lambda x, t: token_logprobs_reference(x, t, with_entropy=True)),
    ]
    x0, t0 = bufs[0][0][:64], bufs[0][1][:64]
    exact = torch.log_softmax(x0.double(), -1).gather(-1, t0[:, None]).squeeze(-1)
    for case, impls in (("forward", fwd), ("forward + entropy", ent)):
        for impl, fn in impls:
            row = {"group": "logprobs", "case": case, "impl": impl, "size": size}
            if fn is None:
                row["skipped"] = trl_note
            elif "triton" in impl and device != "cuda":
                row["skipped"] = "Triton needs CUDA (CPU run: torch paths only)"
            else:
                with torch.no_grad():
                    row.update(timer(fn, bufs))
                    if case == "forward":  # accuracy on 64 rows against float64
                        row["max_abs_err_vs_fp64"] = float((fn(x0, t0).double() - exact).abs().max())
            results.append(row)

    # backward. GPU: forward + backward in one call (a CUDA graph must capture the forward that the backward
    # reads) minus the forward row above, both graph-timed. CPU (no graphs, and a difference of two small noisy
    # times can come out <= 0): the backward alone, repeated over one retained graph per buffer.
    fb_impls = [
        ("ours (triton)", lambda x, t: kernels.token_logprobs(x, t, backend="triton")),
        ("ours (torch reference, fp32)", lambda x, t: token_logprobs_reference(x, t)),
        ("trl selective_log_softmax", (lambda x, t: trl_fn(x, t)) if trl_fn else None),
    ]
    ones = torch.ones(n, device=device)
    forward_us = {r["impl"]: r["us"] for r in results
                  if r["group"] == "logprobs" and r["case"] == "forward" and "us" in r and r["size"] == size}
    for impl, fn in fb_impls:
        row = {"group": "logprobs", "case": "backward", "impl": impl, "size": size}
        if fn is None:
            row["skipped"] = trl_note
        elif "triton" in impl and device != "cuda":
            row["skipped"] = "Triton needs CUDA (CPU run: torch paths only)"
        elif device != "cuda":
            graphs = []
            for x, t in bufs:
                leaf = x.detach().requires_grad_()
                graphs.append((leaf, fn(leaf, t), ones))
            row.update(timer(lambda leaf, out, g: torch.autograd.grad(out, leaf, g, retain_graph=True), graphs))
            del graphs
        else:
            def fwd_bwd(x, t, fn=fn):
                leaf = x.detach().requires_grad_()
                return torch.autograd.grad(fn(leaf, t), leaf, ones)

            timed = timer(fwd_bwd, bufs)
            row["forward_backward_us"] = timed.pop("us")
            row["forward_backward_us_min"] = timed.pop("us_min")
            row.update(timed)
            for k in ("eager_event_us", "host_us_per_call"):
                row.pop(k, None)  # fwd+bwd launch figures: not the backward's
            diff = row["forward_backward_us"] - forward_us.get(impl, float("nan"))
            if diff > 0:
                row["us"] = diff
                row["derived"] = "forward + backward minus the forward row"
            else:
                row["skipped"] = (f"backward not resolved: forward + backward {row['forward_backward_us']:.1f} us vs "
                                  f"forward {forward_us.get(impl, float('nan')):.1f} us")
        results.append(row)


def bench_fused_linear(device, timer, n, h, v, dtype, results):
    gen = torch.Generator(device=device).manual_seed(2)
    hidden = (torch.randn(n, h, device=device, generator=gen)).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype).requires_grad_()
    tokens = torch.randint(0, v, (n,), device=device, generator=gen)
    size = f"N={n} H={h} V={v} {str(dtype).replace('torch.', '')}"
    backend = "triton" if device == "cuda" else "torch"

    def ours():
        lp = kernels.fused_linear_logprobs(hidden, weight, tokens, backend=backend)
        torch.autograd.grad(lp.sum(), (hidden, weight))

    def naive():
        logits = hidden @ weight.T
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.autograd.grad(lp.sum(), (hidden, weight))

    for impl, fn in ((f"ours (chunked, {backend})", ours), ("full logits + fp32 log_softmax", naive)):
        row = {"group": "fused_linear", "case": "forward + backward", "impl": impl, "size": size}
        row.update(timer(fn, [()]))
        results.append(row)


def add_ratios(results):
    """ratio = reference time / impl time within each (group, case, size): > 1 means faster than the reference."""
    refs = {}
    for r in results:
        if ("reference" in r["impl"] or r["impl"].startswith("full logits")) and "us" in r:
            refs.setdefault((r["group"], r["case"], r["size"]), r.get("us"))
    for r in results:
        ref = refs.get((r["group"], r["case"], r["size"]))
        if ref and r.get("us"):
            r["speedup_vs_reference"] = ref / r["us"]


def format_table(results, device) -> str:
    head = (f"{'group':<13}{'case':<22}{'impl':<46}{'size':<28}{'kernel us':>11}{'host us':>9}{'x ref':>7}"
            f"{'peak MB':>9}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        us = f"{r['us']:.1f}" if "us" in r else "-"
        host = f"{r['host_us_per_call']:.0f}" if "host_us_per_call" in r else "-"
        ratio = f"{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "-"
        mb = f"{r['peak_extra_mb']:.0f}" if r.get("peak_extra_mb") is not None else "-"
        notes = [r["skipped"]] if "skipped" in r else []
        if "max_abs_err_vs_fp64" in r:
            notes.append(f"max |logp err| vs fp64 = {r['max_abs_err_vs_fp64']:.1e}")
        if "derived" in r:
            notes.append(r["derived"])
        if device == "cuda" and "timing" in r and not r["timing"].startswith("CUDA graph"):
            notes.append(r["timing"])
        goal = r.get("goal_us")
        if goal is not None:
            notes.append(f"goal <= {goal:.0f} us: {'met' if r.get('meets_goal') else 'NOT met'}")
        lines.append(f"{r['group']:<13}{r['case']:<22}{r['impl']:<46}{r['size']:<28}{us:>11}{host:>9}{ratio:>7}"
                     f"{mb:>9}  {'; '.join(notes)}")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    import transformers
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"device": torch.cuda.get_device_name(), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count, "l2_bytes": _l2_bytes(device),
                 "cuda": torch.version.cuda}
    else:
        info["device"] = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.get_num_threads()} torch threads)")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch", type=int, default=None, help="sampling rows (GPU default 256, CPU 32)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (GPU default 151936, CPU 32768)")
    ap.add_argument("--rows", type=int, default=None, help="log-prob rows N (GPU default 16384, CPU 256)")
    ap.add_argument("--hidden", type=int, default=None, help="fused linear hidden size (GPU 896, CPU 64)")
    ap.add_argument("--fused-rows", type=int, default=None, help="fused linear rows (GPU 4096, CPU 256)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="log-prob logits dtype")
    ap.add_argument("--sample-dtypes", nargs="+", choices=["bfloat16", "float32"], default=None,
                    help="sampling logits dtypes (GPU default: bfloat16, the engine's for a bf16 model, and float32, "
                         "the goals' dtype; CPU default float32, the engine's CPU dtype)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="eager calls timed per row (host time, eager events)")
    ap.add_argument("--graph-calls", type=int, default=20, help="calls captured in one CUDA graph")
    ap.add_argument("--replays", type=int, default=10, help="graph replays timed (median)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sample", "logprobs", "fused_linear"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU runs only)")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    b = args.batch or (256 if gpu else 32)
    v = args.vocab or (151_936 if gpu else 32_768)
    n = args.rows or (16_384 if gpu else 256)
    h = args.hidden or (896 if gpu else 64)
    nf = args.fused_rows or (4096 if gpu else 256)
    dtype = getattr(torch, args.dtype)
    sample_dtypes = [getattr(torch, d) for d in (args.sample_dtypes or (["bfloat16", "float32"] if gpu else ["float32"]))]
    timer = Timer(device, args.warmup if args.warmup is not None else (5 if gpu else 2),
                  args.iters if args.iters is not None else (20 if gpu else 5), args.graph_calls, args.replays)
    if not gpu:
        # one thread by default: on a shared, oversubscribed CPU, OpenMP parallel regions stall (measured here:
        # a bf16 -> fp32 copy went from ~1 ms to ~180 ms with 2 threads at load 18 on 2 cores)
        torch.set_num_threads(args.threads)

    results = []
    if "sample" not in args.skip:
        for sdt in sample_dtypes:
            bench_sampling(device, timer, b, v, results, sdt)
    if "logprobs" not in args.skip:
        bench_logprobs(device, timer, n, v, dtype, results)
    if "fused_linear" not in args.skip:
        bench_fused_linear(device, timer, nf, h, v, dtype, results)
    add_ratios(results)
    default_sizes = gpu and v == 151_936 and b == 256 and n == 16_384 and dtype == torch.bfloat16
    for r in results:
        goal = GOALS_US.get((r["group"], r["case"]))
        if goal and r["impl"].startswith("ours (triton") and default_sizes and "us" in r:
            r["goal_us"], r["meets_goal"] = goal, r["us"] <= goal

    machine = machine_info(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    timing = (f"kernel: CUDA graph of {args.graph_calls} calls over rotating buffers (>= 2 x L2), median of "
              f"{args.replays} replays / calls; host: perf_counter per eager call" if gpu else "perf_counter, median")
    out.write_text(json.dumps({"machine": machine, "timing": timing, "command": " ".join(["python", *sys.argv]),
                               "results": results}, indent=2))
    print(f"# kernels benchmark on {machine['device']} (torch {machine['torch']}, triton {machine['triton']}); "
          f"JSON: {out}")
    print(f"# timing: {timing}")
    if not gpu:
        print("# CPU run: Triton timings skipped (the kernels need CUDA for speed); torch paths only.")
    print(format_table(results, device))


if __name__ == "__main__":
    main()
