"""End-to-end GRPO: `align.train` vs TRL's `GRPOTrainer` on the same job, alternating, several repetitions.

Both sides get the same model directory, prompts (examples/arithmetic.py), reward (`ExactAnswer`, a TRL-style
callable), group size, lengths, sampling settings, optimizer (AdamW, constant lr, grad-norm clip 1), loss
(clipped token-mean, TRL's "dapo"), beta 0 (no reference pass) and one optimizer step per generation batch.
Every completion is forced to exactly `max_new_tokens` tokens (min_new_tokens = max_new_tokens on both sides)
so tokens/s compare like for like. Each side runs in its own subprocess (clean peak memory: resident set on
CPU, `torch.cuda.max_memory_allocated` on GPU); the first step of every run is warm-up and not timed.

    python benchmarks/e2e_vs_trl.py --mode cpu                 # tiny model, CI-like time
    python benchmarks/e2e_vs_trl.py --mode gpu                 # Qwen2-0.5B shape, bf16, the TRL anchor job
    python benchmarks/e2e_vs_trl.py --mode cpu --parity        # learning parity: reward after N steps, both
    python benchmarks/e2e_vs_trl.py --mode cpu --smoke         # 2 steps x 1 repetition (the test's mode)

`--micro-batch-size` sets the samples per forward/backward on both sides (TRL: per_device_train_batch_size with
gradient accumulation up to the step's batch); the CPU ratio depends on it (TRL's per-micro-step overhead).
The GPU mode needs `trl` and `datasets` importable on the GPU machine.

Prints a table last and writes JSON (--out). PPO: TRL 1.16 ships no PPO trainer (removed from `trl` and not in
`trl.experimental`), so there is no PPO row; the JSON says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e_protocol  # noqa: E402

SIDES = ("align", "trl")


@dataclass
class Job:
    """One GRPO job, described once and run identically by both trainers."""

    model_dir: str = ""
    data_path: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    fixed_length: bool = True  # min_new_tokens = max_new_tokens: every completion has the same length
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    micro_batch_size: int = 8  # samples per forward/backward (TRL: per_device_train_batch_size)
    lr: float = 1e-4
    clip: float = 0.2
    max_grad_norm: float = 1.0
    steps: int = 6
    seed: int = 0
    work_dir: str = ""
    profile_phase: str = ""  # align only: profile this phase of the trainer (e2e_protocol.PhaseProfiler)
    profile_top: int = 15

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class Preset:
    job: Job
    reps: int
    model: dict = field(default_factory=dict)  # make_model kwargs
    prompt_width: int = 0  # pad prompts to this many characters (= tokens: the tokenizer is per character)


def presets(mode: str) -> Preset:
    if mode == "cpu":
        return Preset(Job(device="cpu", dtype="float32", max_new_tokens=16, micro_batch_size=8, steps=6), reps=3,
                      model=dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4))
    # The anchor job of issue 9 / NOTES.md: 8 prompts x 8, prompt 128 + 256 new tokens, top-k 50, top-p 0.9.
    return Preset(Job(device="cuda", dtype="bfloat16", max_new_tokens=256, top_k=50, top_p=0.9, micro_batch_size=64,
                      lr=1e-6, steps=6), reps=3,
                  model=dict(arch="qwen2-0.5b"), prompt_width=128)


# ----------------------------------------------------------------------------------------------------------
# Inputs: model and prompts written to disk once, read by both sides.


def make_wide_tokenizer(vocab_size: int):
    """The tiny models' character tokenizer, padded with filler tokens to `vocab_size` entries (a real model's
    vocabulary width, so the [N, V] logits cost what they cost for Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from align.testing import DEFAULT_ALPHABET, SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in DEFAULT_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i  # never produced by the pre-tokenizer; decodes to a marker
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)


def make_qwen2_05b_shape(path: Path, seed: int = 0) -> Path:
    """A random Qwen2-0.5B-shaped model (494M parameters, tied embeddings) in bf16, 151,936-entry tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = make_wide_tokenizer(151936)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prepare_inputs(preset: Preset, work: Path, sft_steps: int = 0) -> Job:
    """Write the model and the prompt file; with `sft_steps`, warm-start the model with `align.sft` first."""
    from arithmetic import write_arithmetic_data

    job = dataclasses.replace(preset.job, work_dir=str(work))
    data = write_arithmetic_data(work / "data", n_rl=256, n_sft=2000, seed=job.seed)
    prompts = data["prompts"]
    if preset.prompt_width:
        # Left-fill each prompt to exactly `prompt_width` characters (one token each): same prompts both sides.
        rows = [json.loads(line) for line in prompts.read_text().splitlines()]
        filler = "Add the two numbers and answer with the sum only. "
        for r in rows:
            need = preset.prompt_width - len(r["prompt"])
            r["prompt"] = (filler * (need // len(filler) + 1))[:need] + r["prompt"]
        prompts = work / "data" / f"prompts_{preset.prompt_width}.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if preset.model.get("arch") == "qwen2-0.5b":
        model_dir = make_qwen2_05b_shape(work / "model", seed=job.seed)
    else:
        from align.testing import make_tiny_model

        model_dir = make_tiny_model(work / "model", seed=job.seed, **preset.model)
    if sft_steps:
        import align

        out = align.sft({"model": {"path": str(model_dir), "dtype": job.dtype}, "data": {"path": str(data["sft"])},
                         "train": {"max_steps": sft_steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10,
                                   "seed": job.seed, "device": job.device},
                         "output_dir": str(work / "sft-model"), "logging": {"print_every": 0, "progress": False}})
        model_dir = Path(out["output_dir"])
    return dataclasses.replace(job, model_dir=str(model_dir), data_path=str(prompts))


# ----------------------------------------------------------------------------------------------------------
# The two sides (each runs in a child process).


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device == "cuda":
        import torch

        out["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def run_align(job: Job) -> dict:
    from arithmetic import ExactAnswer

    from align.trainer.loop import Trainer

    config = {
        "algorithm": "grpo",
        "model": {"path": job.model_dir, "dtype": job.dtype},
        "data": {"path": job.data_path, "max_prompt_length": 512},
        "rollout": {"max_new_tokens": job.max_new_tokens, "temperature": job.temperature, "top_k": job.top_k,
                    "top_p": job.top_p, "micro_batch_size": job.samples_per_step},
        "reward": {"functions": [ExactAnswer()]},
        "algo": {"group_size": job.group_size, "advantage": "grpo", "scale": "group", "kl_coef": 0.0,
                 "clip_low": job.clip, "clip_high": job.clip, "loss_agg": "token-mean", "epochs": 1},
        "train": {"steps": job.steps, "prompts_per_step": job.prompts_per_step, "mini_batch_size": 0,
                  "micro_batch_size": job.micro_batch_size, "lr": job.lr, "weight_decay": 0.0,
                  "max_grad_norm": job.max_grad_norm, "lr_scheduler": "constant", "seed": job.seed,
                  "device": job.device},
        "logging": {"run_dir": str(Path(job.work_dir) / "align_run"), "progress": False, "print_every": 0},
        "checkpoint": {"every": 0, "save_final": False, "overwrite": True},  # repeated runs share the work dir
    }
    trainer = Trainer(config)
    if job.fixed_length:
        # RolloutConfig has no min_new_tokens key (yet): set it on the trainer's sampling parameters.
        trainer.params = dataclasses.replace(trainer.params, min_new_tokens=job.max_new_tokens)
    base = _peak_memory(job.device)
    if job.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    ends: list[float] = []
    step_fn = trainer.train_step

    def timed_step():
        metrics = step_fn()
        _sync(job.device)
        ends.append(time.perf_counter())
        return metrics

    trainer.train_step = timed_step  # the real `Trainer.train()` loop (logging included) runs unchanged
    profiler = None
    if job.profile_phase:  # train_step looks the phase up on the instance: this wraps the one the loop calls
        name = f"phase_{job.profile_phase}"
        profiler = e2e_protocol.PhaseProfiler(getattr(trainer, name), top=job.profile_top)
        setattr(trainer, name, profiler)
    start = time.perf_counter()
    result = trainer.train()
    trainer.close()
    hist = result.history
    return {
        "step_seconds": _deltas(start, ends),
        "reward": [h["reward/mean"] for h in hist],
        "tokens": [h["rollout/tokens"] for h in hist],
        "phases": {k: [h[k] for h in hist] for k in hist[0] if k.startswith("time/")},
        "memory_before_train": base,
        "memory": _peak_memory(job.device),
        **({"profile": profiler.report()} if profiler is not None else {}),
    }


def run_trl(job: Job) -> dict:
    import torch
    from arithmetic import ExactAnswer
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, job.dtype)
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(job.device)
            ends.append(time.perf_counter())

    n = job.samples_per_step
    if n % job.micro_batch_size:
        raise ValueError(f"micro_batch_size {job.micro_batch_size} must divide the step's {n} samples")
    args = GRPOConfig(
        output_dir=str(Path(job.work_dir) / "trl_run"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, log_completions=False, use_cpu=job.device == "cpu", bf16=job.dtype == "bfloat16",
        seed=job.seed, max_steps=job.steps,
        per_device_train_batch_size=job.micro_batch_size, gradient_accumulation_steps=n // job.micro_batch_size,
        num_generations=job.group_size, max_completion_length=job.max_new_tokens,
        temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
        generation_kwargs={"min_new_tokens": job.max_new_tokens} if job.fixed_length else None,
        beta=0.0, num_iterations=1, epsilon=job.clip, epsilon_high=job.clip, loss_type="dapo", scale_rewards="group",
        learning_rate=job.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=job.max_grad_norm, optim="adamw_torch", remove_unused_columns=False,
    )
    dataset = load_dataset("json", data_files=job.data_path, split="train")
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=dtype)
    trainer = GRPOTrainer(model=model, reward_funcs=ExactAnswer(), args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()])
    base = _peak_memory(job.device)
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_seconds": _deltas(start, ends),
        "reward": [h["reward"] for h in logs],
        "tokens": [h["completions/mean_length"] * n for h in logs],
        "memory_before_train": base,
        "memory": _peak_memory(job.device),
    }


def _deltas(start: float, ends: list[float]) -> list[float]:
    return [b - a for a, b in zip([start] + ends[:-1], ends)]


# ----------------------------------------------------------------------------------------------------------
# Orchestration


IN_PROCESS = False  # --in-process: run both sides here (fast tests; memory figures are then not per side)


def run_child(side: str, job: Job, timeout: float | None = None) -> dict:
    if IN_PROCESS:
        return (run_align if side == "align" else run_trl)(job)
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(dataclasses.asdict(job)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--job", str(spec), "--result", str(result)]
        # the protocol's 1 thread per process (CPU); on the GPU the host threads are left as they are
        env = dict(os.environ, **(e2e_protocol.THREAD_ENV if job.device == "cpu" else {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"the {side} run failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def summarize_side(runs: list[dict], job: Job) -> dict:
    """Per run: the median of its warm steps (first step excluded); across runs: median, min, max."""
    per_run = [statistics.median(r["step_seconds"][1:] or r["step_seconds"]) for r in runs]
    tokens = statistics.median(t for r in runs for t in r["tokens"])
    s = statistics.median(per_run)
    mem_key = "peak_gpu_allocated_mib" if job.device == "cuda" else "peak_rss_mib"
    out = {
        "s_per_step": s, "s_per_step_min": min(per_run), "s_per_step_max": max(per_run), "s_per_step_runs": per_run,
        "first_step_s": statistics.median(r["step_seconds"][0] for r in runs),
        "steps_per_s": 1.0 / s, "tokens_per_step": tokens, "tokens_per_s": tokens / s,
        "peak_memory_mib": statistics.median(r["memory"][mem_key] for r in runs), "memory_kind": mem_key,
        "memory_growth_mib": statistics.median(r["memory"][mem_key] - r["memory_before_train"].get(mem_key, 0.0)
                                               for r in runs),
        "mean_reward": statistics.mean(x for r in runs for x in r["reward"]),
    }
    if "phases" in runs[0]:
        out["phases_s"] = {k: statistics.median(v for r in runs for v in r["phases"][k][1:] or r["phases"][k])
                           for k in runs[0]["phases"]}
    return out


def benchmark(job: Job, reps: int, timeout: float | None = None) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    order_log, loads = [], []
    for _ in range(reps):
        for side in SIDES:  # the protocol's strict alternation: align, TRL, align, TRL, ...
            order_log.append(side)
            loads.append(e2e_protocol.load_1m())
            runs[side].append(run_child(side, job, timeout))
    summary = {s: summarize_side(runs[s], job) for s in SIDES}
    a, t = summary["align"], summary["trl"]
    summary["speedup_steps_per_s"] = t["s_per_step"] / a["s_per_step"]  # align's steps/s over TRL's
    summary["speedup_spread"] = [t["s_per_step_min"] / a["s_per_step_max"], t["s_per_step_max"] / a["s_per_step_min"]]
    summary["memory_ratio"] = a["peak_memory_mib"] / t["peak_memory_mib"]  # align / TRL
    return {"runs": runs, "order": order_log, "load_1m_before_runs": loads, "summary": summary}


def parity(job: Job, last: int, seeds: list[int], timeout: float | None = None) -> dict:
    """Both trainers from the same warm-started model, N steps, for each seed; the mean reward of the last
    `last` steps. Noise: two standard errors of the align - TRL difference, from the spread across seeds
    (with one seed: the binomial error of the 0/1 rewards, `samples_per_step` samples per step)."""
    out: dict = {"steps": job.steps, "last": last, "seeds": seeds, "align": {}, "trl": {}}
    for side in SIDES:
        out[side] = {"reward_curves": [], "first_means": [], "last_means": []}
    for seed in seeds:
        for side in (SIDES if seed % 2 == 0 else SIDES[::-1]):
            r = run_child(side, dataclasses.replace(job, seed=seed), timeout)["reward"]
            out[side]["reward_curves"].append(r)
            out[side]["first_means"].append(statistics.mean(r[:last]))
            out[side]["last_means"].append(statistics.mean(r[-last:]))
    for side in SIDES:
        o = out[side]
        o["first_mean"], o["last_mean"] = statistics.mean(o["first_means"]), statistics.mean(o["last_means"])
        if len(seeds) > 1:
            o["stderr"] = statistics.stdev(o["last_means"]) / len(seeds) ** 0.5
        else:
            p, n = o["last_mean"], last * job.samples_per_step
            o["stderr"] = (p * (1 - p) / n) ** 0.5
    a, t = out["align"], out["trl"]
    out["difference"] = a["last_mean"] - t["last_mean"]
    out["noise"] = 2 * (a["stderr"] ** 2 + t["stderr"] ** 2) ** 0.5
    out["within_noise"] = abs(out["difference"]) <= out["noise"]
    out["align_not_worse"] = out["difference"] >= -out["noise"]
    return out


def machine_info(device: str) -> dict:
    import torch
    import transformers
    import trl

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(result: dict) -> None:
    job = result["job"]
    mem = "peak GPU alloc" if job["device"] == "cuda" else "peak RSS"
    how = (f"warm steps, median of {result['reps']} alternating runs [min-max]" if "summary" in result
           else f"lr {job['lr']:g}, EOS allowed")
    print(f"\nGRPO end to end, {job['prompts_per_step']} prompts x {job['group_size']}, {job['max_new_tokens']} new "
          f"tokens, micro-batch {job['micro_batch_size']}, {job['device']} {job['dtype']}; {how}")
    if "summary" in result:
        s = result["summary"]
        print(f"{'trainer':<8} {'s/step':>22} {'steps/s':>8} {'gen tok/s':>10} {mem + ' MiB':>18} "
              f"{'(+ in training)':>15} {'first step s':>13}")
        for side in SIDES:
            r = s[side]
            spread = f"{r['s_per_step']:.3f} [{r['s_per_step_min']:.3f}-{r['s_per_step_max']:.3f}]"
            print(f"{side:<8} {spread:>22} {r['steps_per_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_memory_mib']:>18.0f} {r['memory_growth_mib']:>15.0f} {r['first_step_s']:>13.2f}")
        lo, hi = s["speedup_spread"]
        goal = 2.0 if job["device"] == "cpu" else 3.0
        met = "met" if s["speedup_steps_per_s"] >= goal else "NOT met"
        print(f"align / TRL: {s['speedup_steps_per_s']:.2f}x steps/s (range {lo:.2f}-{hi:.2f}; goal >= {goal:g}x: "
              f"{met}), peak memory {s['memory_ratio']:.2f}x of TRL's"
              + (f" (goal <= 0.5x: {'met' if s['memory_ratio'] <= 0.5 else 'NOT met'})" if job["device"] == "cuda" else ""))
        if "phases_s" in s["align"]:
            print("align phases (s, median warm step): " +
                  ", ".join(f"{k[5:]} {v:.3f}" for k, v in s["align"]["phases_s"].items() if k != "time/step"))
    if "parity" in result:
        p = result["parity"]
        print(f"parity after {p['steps']} steps, seeds {p['seeds']}, mean reward of the last {p['last']}: "
              f"align {p['align']['last_mean']:.3f} (first {p['align']['first_mean']:.3f}), "
              f"TRL {p['trl']['last_mean']:.3f} (first {p['trl']['first_mean']:.3f}); "
              f"difference {p['difference']:+.3f}, noise (2 s.e.) {p['noise']:.3f}: "
              f"{'within noise' if p['within_noise'] else 'OUTSIDE noise'}")
    print(f"PPO: {result['ppo']['status']} ({result['ppo']['reason']})")


def trl_ppo_status() -> dict:
    import trl

    for where in ("trl", "trl.experimental.ppo"):
        try:
            module = __import__(where, fromlist=["PPOTrainer"])
            if hasattr(module, "PPOTrainer"):
                return {"status": "available", "reason": f"{where}.PPOTrainer exists but is not benchmarked here"}
        except ImportError:
            continue
    return {"status": "no TRL PPO row",
            "reason": f"trl {trl.__version__} ships no PPOTrainer (not in trl nor trl.experimental)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions per side (default: 3)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (first one is warm-up)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="2 steps x 1 repetition, short completions (for tests)")
    ap.add_argument("--parity", action="store_true", help="learning parity instead of speed")
    ap.add_argument("--parity-steps", type=int, default=40)
    ap.add_argument("--parity-last", type=int, default=10)
    ap.add_argument("--parity-lr", type=float, default=5e-4)
    ap.add_argument("--parity-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-steps", type=int, default=150, help="warm start before the parity run")
    ap.add_argument("--work-dir", default="", help="where models and data go (default: a temporary directory)")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/e2e_vs_trl_<mode>.json)")
    ap.add_argument("--in-process", action="store_true",
                    help="run both sides in this process (for tests: no per-side memory figures)")
    ap.add_argument("--timeout", type=float, default=None, help="per child run, seconds")
    ap.add_argument("--protocol", action="store_true",
                    help="CPU: the fixed protocol (load < 1.5 checked, 1 thread per process, 3 strictly alternating "
                         "repetitions, medians) at each --micro-batch-sizes, with a profile of align's dominant phase")
    ap.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 64], help="--protocol's micro-batches")
    ap.add_argument("--profile-top", type=int, default=15, help="--protocol: rows of each profile kept")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        job = Job(**json.loads(Path(args.job).read_text()))
        if job.device == "cpu":
            e2e_protocol.pin_threads()
        out = (run_align if args.child == "align" else run_trl)(job)
        Path(args.result).write_text(json.dumps(out))
        return 0

    global IN_PROCESS
    IN_PROCESS = args.in_process
    preset = presets(args.mode)
    if args.mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("--mode gpu needs CUDA; this machine has none", file=sys.stderr)
            return 2
    if (args.parity or args.protocol) and args.mode != "cpu":
        print("--parity and --protocol run on the CPU task (--mode cpu)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.smoke else preset.reps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        result: dict = {"command": " ".join([Path(sys.executable).name, "benchmarks/e2e_vs_trl.py", *sys.argv[1:]]),
                        "mode": args.mode, "reps": reps, "in_process": args.in_process, "machine": machine_info(preset.job.device),
                        "ppo": trl_ppo_status()}
        if args.parity:
            job = prepare_inputs(preset, work, sft_steps=args.sft_steps)
            job = dataclasses.replace(job, steps=args.parity_steps, max_new_tokens=3, fixed_length=False, lr=args.parity_lr,
                                      micro_batch_size=job.samples_per_step)
            result["job"] = dataclasses.asdict(job)
            result["parity"] = parity(job, min(args.parity_last, args.parity_steps), args.parity_seeds, args.timeout)
        elif args.protocol:
            job = prepare_inputs(preset, work)
            overrides = {k: v for k, v in (("steps", args.steps), ("max_new_tokens", args.max_new_tokens)) if v}
            job = dataclasses.replace(job, **({"steps": 3, "max_new_tokens": 4} if args.smoke else {}), **overrides)
            result["job"] = dataclasses.asdict(job)
            result["protocol"] = e2e_protocol.run_protocol(benchmark, run_child, job, args.micro_batch_sizes, reps,
                                                           args.timeout, args.profile_top)
        else:
            job = prepare_inputs(preset, work)
            overrides = {k: v for k, v in (("steps", args.steps), ("micro_batch_size", args.micro_batch_size),
                                           ("max_new_tokens", args.max_new_tokens)) if v}
            if args.smoke:
                overrides = {"steps": 2, "max_new_tokens": 4} | overrides
            job = dataclasses.replace(job, **overrides)
            result["job"] = dataclasses.asdict(job)
            result |= benchmark(job, reps, args.timeout)
    if args.mode == "gpu":
        result["notes"] = [e2e_protocol.F20_NOTE]
    kind = "_parity" if args.parity else "_protocol" if args.protocol else ""
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"e2e_vs_trl_{args.mode}{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.protocol:
        for mb, r in result["protocol"]["micro_batches"].items():
            print_table({**result, **r})
            print(f"bound: {r['bound']['reading']}")
            e2e_protocol.print_profile(r["profile"]["phase"], r["profile"], r["summary"]["align"]["phases_s"])
        print(f"\nprotocol: {result['protocol']['verdict']['label']} (1-minute load before each run: "
              f"{result['protocol']['verdict']['load_1m_readings']})")
    else:
        print_table(result)
        for note in result.get("notes", []):
            print(f"note: {note}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
