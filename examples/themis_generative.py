"""Generative Themis on TARA at CPU scale: a small causal LM (random init) that writes its own tool calls, vs a
plain RM of the same backbone and budget.

Both RMs: the same Llama config (default 4 layers x 128), the same tokenizer (byte-level BPE trained offline on
the training texts, digits split one per token), the same pairs in the same batches, the same steps, optimiser
and schedule, 3 seeds. They differ in what they read and how they are trained:
  themis  the released Themis loss (align.rewards.themis.encode_themis / themis_loss: LM on the assistant part
          + 0.5 * Bradley-Terry at the EOS), sequences with the gold trace (real tool observations) + rationale;
          evaluated only through ThemisRewardModel.score (it writes Thought / Action / Action Input, the real
          tool runs, it writes the rationale, the value head scores);
  plain   Bradley-Terry on "Question: q\\nAnswer: a" + EOS (value head at the EOS).
Training data: TARA train splits (calendar, weather, multi-tool; items touching a test city-date dropped) plus
synthetic pairs (align.rewards.themis_synth): calendar computed, weather / multi-tool from TARA's weather cache
outside the test splits. Metrics on TARA's test splits: valid-call share (first Action parses and the tool
accepts it), gold-observation share, pairwise accuracy; LM loss per segment on the gold test traces.

    ALIGN_TARA_DIR=/path/to/tara python examples/themis_generative.py --out runs/themis_gen --seeds 0 1 2
Results and protocol: docs/experiments/themis_tara.md ("Generative Themis").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

EVAL_GROUPS = ("calendar", "weather", "multi_tools")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----- data ----------------------------------------------------------------------------------------------

def build_data(args) -> dict:
    from align.rewards.tara import load_tara, load_weather_cache
    from align.rewards.themis_synth import (
        calendar_templates,
        city_dates_of,
        synth_calendar,
        synth_weather,
        weather_answer_templates,
        weather_keys,
    )

    rng = random.Random(1234)  # the data is the same for every seed; seeds vary init and batch order
    test = {g: load_tara([g], "test") for g in EVAL_GROUPS}
    banned = city_dates_of([it for g in EVAL_GROUPS for it in test[g]])
    train = load_tara(["calendar", "weather", "multi_tools"], "train")  # all of it feeds the templates
    kept = [it for it in train if not (city_dates_of([it]) & banned)]
    dropped = len(train) - len(kept)
    kept = [it for it in kept if it.group in args.tara_groups]
    multi = [it for it in kept if it.group == "multi_tools"]
    kept = [it for it in kept if it.group != "multi_tools"] + multi[: args.tara_multi]  # the longest sequences: fewer
    cache = load_weather_cache()
    keys = weather_keys(cache, banned)
    cal_t = calendar_templates([it for it in train if it.group == "calendar"])
    wea_t = weather_answer_templates([it for it in train if it.group == "weather"])
    cf = args.claim_first
    synth = (synth_calendar(args.synth_calendar, rng, cal_t, claim_first=cf)
             + synth_weather(args.synth_weather, rng, cache, keys, wea_t, claim_first=cf)
             + synth_weather(args.synth_multi, rng, cache, keys, wea_t, multi=True, claim_first=cf))
    pool = kept + synth
    leaked = city_dates_of(pool) & banned
    assert not leaked, f"test city-dates in the training data: {sorted(leaked)[:5]}"
    return {"train": pool, "test": test, "dropped_tara_train": dropped, "banned": len(banned), "cache": cache,
            "weather_keys": len(keys), "counts": {g: sum(it.group == g for it in pool) for g in sorted({it.group for it in pool})}}


def build_tokenizer(texts, out: Path, vocab_size: int, extra_tokens=()):
    """Byte-level BPE trained on `texts` (digits one per token), plus `extra_tokens` added whole (themis_vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from align.rewards.tara import THEMIS_SPECIAL_TOKENS

    if (out / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(out))
    tk = Tokenizer(models.BPE())
    # one token per digit: dates and numbers are copied and compared digit by digit
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", *THEMIS_SPECIAL_TOKENS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=list(THEMIS_SPECIAL_TOKENS))
    if extra_tokens:
        from themis_vocab import add_word_tokens  # examples/themis_vocab.py, beside this script

        add_word_tokens(tok, extra_tokens)
    tok.save_pretrained(str(out))
    return tok


def build_base(args, tok, out: Path, seed: int, log=None) -> tuple[str, dict | None]:
    """The seed's backbone, shared by both variants: random init, then (--copy-steps > 0) generic copy
    pre-training (examples/copy_pretrain.py: random token spans repeated, no task text). Returns the folder
    and the copy pre-training's stats (with its CPU seconds; None without it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    stats_path = out / "copy_pretrain.json"
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.max_length,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        if args.copy_steps > 0:
            from copy_pretrain import copy_eval, pretrain_copy_stages  # examples/copy_pretrain.py, beside this script

            c0, w0 = cpu_seconds(), time.perf_counter()
            special = set(tok.all_special_ids)
            vocab, sep = [i for i in range(len(tok)) if i not in special], tok("\n", add_special_tokens=False)["input_ids"][0]
            # stage 1: positional rows; stage 2 (--copy-induct-steps): rows with random prefix / gap (content copy)
            stages = [{"steps": args.copy_steps, "warmup": args.copy_warmup}]
            if args.copy_induct_steps > 0:
                stages.append({"steps": args.copy_induct_steps, "warmup": 20, "prefix": tuple(args.copy_prefix), "gap": tuple(args.copy_gap)})
            stats = pretrain_copy_stages(model, vocab, stages, batch_size=args.copy_batch_size, lr=args.copy_lr, seed=seed,
                                         span=tuple(args.copy_span), sep_id=sep, log=log, log_every=max(1, args.copy_steps // 4),
                                         sub_vocab=tuple(args.copy_sub_vocab) if args.copy_sub_vocab else None, bos_id=copy_first_id(args, tok))
            stats.update(cpu_s=cpu_seconds() - c0, wall_s=time.perf_counter() - w0,
                         eval=copy_eval(model, vocab, sep, copy_first_id(args, tok)))  # held-out rows, after the CPU count
            out.mkdir(parents=True, exist_ok=True)
            stats_path.write_text(json.dumps(stats))
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return str(out), (json.loads(stats_path.read_text()) if stats_path.is_file() else None)


def copy_first_id(args, tok) -> int:
    """The fixed first token of every copy row: `<s>` (--copy-first-token bos), or the first token of every
    task sequence, '###' of '### USER:' (task): the tokenizer adds no `<s>` to the Themis / plain texts, and
    a copy circuit that leans on `<s>` as its attention sink does not copy in text that lacks it."""
    if args.copy_first_token == "bos":
        return tok.bos_token_id
    from align.rewards.tara import render_user

    return tok(render_user("q", "a"), add_special_tokens=False)["input_ids"][0]


def batches_by_group(items, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Batches of one group each (similar lengths, little padding), in a shuffled order; cycles as needed."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        chunk = []
        for g in sorted({it.group for it in items}):
            idx = [i for i, it in enumerate(items) if it.group == g]
            rng.shuffle(idx)
            chunk.extend(idx[k:k + batch_size] for k in range(0, len(idx), batch_size))
        rng.shuffle(chunk)
        out.extend(chunk)
    return out[:steps]


# ----- training --------------------------------------------------------------------------------------------

def _opt_sched(model, args, steps):
    from types import SimpleNamespace

    from align.rewards.training import _optimizer, _schedule

    opt = _optimizer(model.named_parameters(), SimpleNamespace(lr=args.lr, weight_decay=args.weight_decay))
    return opt, _schedule(opt, steps, args.warmup_ratio)


def train_themis(args, base: str, items, batches, seed: int, log):
    import torch

    from align.rewards.tara import render_item
    from align.rewards.themis import ThemisLossOptions, create_themis, encode_themis, pad_left, themis_loss
    from align.rewards.training import _optimizer_step

    torch.manual_seed(seed)
    model, tok = create_themis(base)
    opts, rng = ThemisLossOptions(), random.Random(seed)
    segs = [(render_item(it, "pos"), render_item(it, "neg")) for it in items]
    mix = copy_mixer(args, tok, seed) if args.mix_copy > 0 else None
    opt, sched = _opt_sched(model, args, len(batches))
    model.train()
    hist = []
    for step, idx in enumerate(batches, 1):
        rows = [encode_themis(tok, segs[i][0], True, opts, rng, args.max_length) for i in idx]
        rows += [encode_themis(tok, segs[i][1], False, opts, rng, args.max_length) for i in idx]
        ids = pad_left([r[0] for r in rows], tok.pad_token_id)
        weights = pad_left([r[1] for r in rows], 0.0, dtype=torch.float32)
        mask = pad_left([[1] * len(r[0]) for r in rows], 0)
        logits, rewards = model(ids, mask)
        loss, parts = themis_loss(logits, ids, weights, rewards, 1.0, 0.5)
        if mix is not None:  # --mix-copy: keep the copy pre-training's rows in the LM objective
            closs = mix(model)
            loss = loss + args.mix_copy * closs
            parts = {**parts, "copy_loss": float(closs.detach())}
        _optimizer_step(loss, step, model, opt, sched, 1.0)
        hist.append({"step": step, "group": items[idx[0]].group, **parts})
        if step % args.log_every == 0:
            recent = hist[-args.log_every:]
            log(f"themis step {step}/{len(batches)} lm {sum(h['lm_loss'] for h in recent) / len(recent):.3f} "
                f"rm {sum(h['rm_loss'] for h in recent) / len(recent):.3f} acc {sum(h['pair_acc'] for h in recent) / len(recent):.2f}")
    model.eval()
    return model, tok, hist


def copy_mixer(args, tok, seed: int):
    """A function model -> the LM loss on a fresh batch of copy rows (the second copy stage's rows: random
    prefix / gap), for mixing into the Themis steps: without it the Themis LM loss on task text alone can
    overwrite the copy circuit the pre-training built (session 7 probe 1)."""
    import torch
    import torch.nn.functional as F
    from copy_pretrain import copy_batch

    special = set(tok.all_special_ids)
    vocab, sep = [i for i in range(len(tok)) if i not in special], tok("\n", add_special_tokens=False)["input_ids"][0]
    g = torch.Generator().manual_seed(10_000 + seed)

    def loss(model):
        x, y = copy_batch(vocab, args.mix_copy_batch, tuple(args.copy_span), sep, g, sub_vocab=tuple(args.copy_sub_vocab) if args.copy_sub_vocab else None,
                          bos_id=copy_first_id(args, tok), prefix=tuple(args.copy_prefix), gap=tuple(args.copy_gap))
        logits, _ = model(x, torch.ones_like(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y[:, 1:].reshape(-1), ignore_index=-100)

    return loss


def train_plain(args, base: str, items, batches, seed: int, log):
    import torch

    from align.rewards.classifier import ClassifierRewardModel
    from align.rewards.tara import render_plain
    from align.rewards.training import _optimizer_step, bradley_terry_loss

    torch.manual_seed(seed)
    rm = ClassifierRewardModel(base, head="value_head", template="{prompt}{completion}", max_length=args.max_length,
                               batch_size=64, add_eos=True, device="cpu")
    texts = [(render_plain(it.question, it.pos.answer, it.context), render_plain(it.question, it.neg.answer, it.context)) for it in items]
    opt, sched = _opt_sched(rm.model, args, len(batches))
    rm.model.train()
    hist = []
    for step, idx in enumerate(batches, 1):
        enc = rm.encode([texts[i][0] for i in idx] + [texts[i][1] for i in idx])
        r = rm.forward_scores(**enc).float()
        b = len(idx)
        loss = bradley_terry_loss(r[:b], r[b:])
        _optimizer_step(loss, step, rm.model, opt, sched, 1.0)
        hist.append({"step": step, "rm_loss": float(loss.detach()), "pair_acc": float((r[:b] > r[b:]).float().mean())})
        if step % args.log_every == 0:
            recent = hist[-args.log_every:]
            log(f"plain step {step}/{len(batches)} rm {sum(h['rm_loss'] for h in recent) / len(recent):.3f}")
    rm.model.eval()
    return rm, hist


# ----- evaluation ----------------------------------------------------------------------------------------

def eval_themis(args, model, tok, test: dict, groups) -> dict:
    """Only through the public API: ThemisRewardModel(model=, tokenizer=).score(prompts, completions, context=)."""
    from align.rewards.themis import ThemisRewardModel

    rm = ThemisRewardModel(model=model, tokenizer=tok, max_rounds=3, max_new_tokens=args.max_new_tokens,
                           max_length=args.max_length, batch_size=args.eval_batch_size, device="cpu")
    out = {}
    for g in groups:
        items = test[g][: args.test_limit] if args.test_limit else test[g]
        n = len(items)
        res = rm.score([it.question for it in items] * 2, [it.pos.answer for it in items] + [it.neg.answer for it in items],
                       context=[it.context for it in items] * 2)
        pos, neg = res.scores[:n], res.scores[n:]
        gold = [it.pos.steps for it in items] * 2  # both sides' gold traces are the question's calls
        out[g] = {"n_pairs": n, "accuracy": sum(a > b for a, b in zip(pos, neg)) / n,
                  **call_shares([info["tool_calls"] for info in res.info], [[s.observation for s in st] for st in gold]),
                  "samples": [{"question": items[i % n].question, "answer": (items[i % n].pos if i < n else items[i % n].neg).answer,
                               "trace": res.info[i]["trace"], "score": res.scores[i]} for i in (0, n, 1, n + 1)],
                  "first_calls": [{"question": items[i % n].question, "call": (res.info[i]["tool_calls"] or [None])[0]}
                                  for i in range(min(n, 12))],
                  "per_sample": [sample_record(info, st[0].observation, sc) for info, st, sc in zip(res.info, gold, res.scores)]}
    return out


def sample_record(info: dict, gold_observation: str, score: float) -> dict:
    """One sample, compactly: its first call's input and whether the tool accepted it and returned the gold
    observation, the rationale's verdict ("match" / "differ" / None: the last of the two words after 'Work:'
    in the trace) and the score."""
    first = (info["tool_calls"] or [None])[0]
    work = info["trace"].rsplit("Work:", 1)[1] if "Work:" in info["trace"] else ""
    words = [w for w in ("match", "differ") if w in work]
    verdict = max(words, key=work.rindex) if words else None
    return {"input": None if first is None else first["input"], "ok": bool(first and first["ok"]),
            "gold": bool(first and first["ok"] and first["observation"] == gold_observation), "verdict": verdict, "score": score}


def call_shares(calls_per_sample: list[list[dict]], gold_observations: list[list[str]]) -> dict:
    """From each sample's tool-call records (ThemisRewardModel info["tool_calls"]: action, input, ok,
    observation = the tool's output as shown, error) and its gold observations: the share whose first call
    the tool accepted, whose first observation is the gold one, whose every gold step is matched; and why
    the first calls failed (error text up to its first colon, counted)."""
    valid = obs_first = obs_all = 0
    fails: dict[str, int] = {}
    for calls, gold in zip(calls_per_sample, gold_observations, strict=True):
        first = calls[0] if calls else None
        if first is not None and first["ok"]:
            valid += 1
            obs_first += first["observation"] == gold[0]
        else:
            why = "no tool call" if first is None else (first.get("error") or "failed")
            key = why.split(":")[0][:40]
            fails[key] = fails.get(key, 0) + 1
        if len(calls) >= len(gold) and all(c["ok"] and c["observation"] == o for c, o in zip(calls, gold)):
            obs_all += 1
    m = max(1, len(calls_per_sample))
    return {"valid_call_share": valid / m, "gold_observation_share": obs_first / m, "all_gold_observations_share": obs_all / m,
            "call_failures": fails}


def eval_plain(rm, test: dict, groups, limit) -> dict:
    from align.rewards.tara import render_plain

    out = {}
    for g in groups:
        items = test[g][:limit] if limit else test[g]
        pos = rm.score_texts([render_plain(it.question, it.pos.answer, it.context) for it in items])
        neg = rm.score_texts([render_plain(it.question, it.neg.answer, it.context) for it in items])
        out[g] = {"n_pairs": len(items), "accuracy": sum(a > b for a, b in zip(pos, neg)) / len(items)}
    return out


def segment_lm_loss(model, tok, test: dict, groups, max_length: int, per_group: int = 48) -> dict:
    """Token-mean LM loss (nats) on the gold test sequences (both sides), split into the tool-call text (thought,
    action, input; also split into its digit tokens and the rest), the observations and the rationale: where
    the model is still uncertain."""
    import torch
    import torch.nn.functional as F

    from align.rewards.tara import render_item
    from align.rewards.themis import pad_left

    out = {}
    with torch.no_grad():
        for g in groups:
            kinds = ("call", "call_digits", "call_other", "observation", "rationale")
            sums, counts = dict.fromkeys(kinds, 0.0), dict.fromkeys(kinds, 0)
            for it in test[g][:per_group]:
                for side in ("pos", "neg"):
                    seg = render_item(it, side)
                    enc = tok(seg.text, return_offsets_mapping=True)
                    ids = enc["input_ids"][-max_length:]
                    offs = enc["offset_mapping"][-max_length:]
                    t = pad_left([ids], tok.pad_token_id)
                    logits, _ = model(t, torch.ones_like(t))
                    ce = F.cross_entropy(logits[0, :-1].float(), t[0, 1:], reduction="none")
                    for j, (a, _) in enumerate(offs[1:]):
                        if a < seg.user_end:
                            continue
                        kind = "call"
                        if seg.work_span and a >= seg.work_span[0]:
                            kind = "rationale"
                        elif any(s <= a < e for s, e in seg.observation_spans):
                            kind = "observation"
                        sums[kind] += float(ce[j])
                        counts[kind] += 1
                        if kind == "call":  # the digits of dates / counts (copied from the question) vs the rest
                            sub = "call_digits" if tok.convert_ids_to_tokens(ids[j + 1]).lstrip("\u0120").isdigit() else "call_other"
                            sums[sub] += float(ce[j])
                            counts[sub] += 1
            out[g] = {k: sums[k] / max(1, counts[k]) for k in sums}
    return out


def paired_ci(a, b) -> dict:
    """Mean of the paired differences a - b and its 95% t-interval over seeds."""
    import statistics

    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"mean_diff": mean, "ci95": None, "diffs": d}
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return {"mean_diff": mean, "ci95": [mean - half, mean + half], "diffs": d}


# ----- main ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tara", type=Path, default=None, help="the TARA data folder (default: $ALIGN_TARA_DIR)")
    p.add_argument("--out", type=Path, default=Path("runs/themis_gen"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--groups", nargs="+", default=["calendar", "weather", "multi_tools"], help="test splits to evaluate")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--synth-calendar", type=int, default=3000)
    p.add_argument("--synth-weather", type=int, default=1200)
    p.add_argument("--synth-multi", type=int, default=150)
    p.add_argument("--tara-groups", nargs="*", default=["calendar", "weather", "multi_tools"],
                   help="TARA train splits in the training data (none: synthetic pairs only)")
    p.add_argument("--tara-multi", type=int, default=150, help="TARA multi-tool train pairs used (the longest texts)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--test-limit", type=int, default=None, help="at most this many test pairs per group (quick runs)")
    p.add_argument("--segment-pairs", type=int, default=48, help="test pairs per group for the LM loss per segment")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=["themis", "plain"], choices=["themis", "plain"])
    p.add_argument("--copy-steps", type=int, default=0,
                   help="generic copy pre-training steps for each seed's backbone (examples/copy_pretrain.py; 0: none), shared by both variants")
    p.add_argument("--copy-lr", type=float, default=1e-3)
    p.add_argument("--copy-batch-size", type=int, default=32)
    p.add_argument("--copy-warmup", type=int, default=50)
    p.add_argument("--copy-span", type=int, nargs=2, default=[4, 16], metavar=("MIN", "MAX"))
    p.add_argument("--copy-sub-vocab", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="each copy row draws from a random sub-vocabulary of this many ids (log-uniform), so tokens recur as digits do")
    p.add_argument("--copy-induct-steps", type=int, default=0,
                   help="a second copy stage on rows with random prefix / gap (only content matching copies); 0: none")
    p.add_argument("--copy-prefix", type=int, nargs=2, default=[0, 16], metavar=("MIN", "MAX"))
    p.add_argument("--copy-gap", type=int, nargs=2, default=[0, 16], metavar=("MIN", "MAX"))
    p.add_argument("--mix-copy", type=float, default=0.0, help="weight of a copy-row LM loss added to every Themis step (0: none)")
    p.add_argument("--mix-copy-batch", type=int, default=16, help="copy rows per Themis step with --mix-copy")
    p.add_argument("--copy-first-token", choices=["bos", "task"], default="bos",
                   help="first token of the copy rows: <s>, or the first token of every task text ('###')")
    p.add_argument("--copy-shared", action="store_true",
                   help="one copy-pretrained base (from the first seed) shared by every seed; its CPU counted once")
    p.add_argument("--city-tokens", action="store_true", help="one added token per weather-cache city (examples/themis_vocab.py)")
    p.add_argument("--claim-first", action="store_true", help="synthetic traces state the answer's value in the first Thought")
    args = p.parse_args(argv)
    import torch

    from align.rewards.tara import render_item
    from align.tools.data import tara_dir

    os.environ["ALIGN_TARA_DIR"] = str(tara_dir(args.tara))
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()

    def log(s):
        print(f"[{time.perf_counter() - t0:6.0f}s] {s}", flush=True)

    data = build_data(args)
    log(f"data: {data['counts']}; TARA train items dropped for a test city-date: {data['dropped_tara_train']}; "
        f"test city-dates banned: {data['banned']}; weather cache keys used: {data['weather_keys']}")
    extra = ()
    if args.city_tokens:
        from themis_vocab import city_token_strings

        extra = city_token_strings(data["cache"])
    tok = build_tokenizer([render_item(it, s).text for it in data["train"] for s in ("pos", "neg")], args.out / "tokenizer", args.vocab, extra)
    runs: dict[str, list] = {v: [] for v in args.variants}
    for seed in args.seeds:
        base_seed = args.seeds[0] if args.copy_shared else seed  # --copy-shared: one pretrained base for every seed
        name = (f"base_seed{base_seed}" + (f"_copy{args.copy_steps}" if args.copy_steps > 0 else "")
                + (f"_induct{args.copy_induct_steps}" if args.copy_steps > 0 and args.copy_induct_steps > 0 else "")
                + ("_task" if args.copy_steps > 0 and args.copy_first_token == "task" else ""))
        base, copy_stats = build_base(args, tok, args.out / name, base_seed, log)
        copy_cpu = copy_stats["cpu_s"] if copy_stats else 0.0
        if copy_stats:
            log(f"seed {seed}: copy pre-training {copy_stats['steps']} steps, copy loss {copy_stats['first_loss']:.2f} -> "
                f"{copy_stats['copy_loss']:.3f} nats ({copy_cpu:.0f} s CPU)")
        batches = batches_by_group(data["train"], args.batch_size, args.steps, seed)
        for variant in args.variants:
            t, c = time.perf_counter(), cpu_seconds()
            if variant == "themis":
                model, vtok, hist = train_themis(args, base, data["train"], batches, seed, log)
                tt, tc = time.perf_counter() - t, cpu_seconds() - c
                ev = eval_themis(args, model, vtok, data["test"], args.groups)
                seg = segment_lm_loss(model, vtok, data["test"], args.groups, args.max_length, args.segment_pairs)
                lm_by_group = {g: sum(h["lm_loss"] for h in hist[-100:] if h["group"] == g) / max(1, sum(h["group"] == g for h in hist[-100:]))
                               for g in sorted({h["group"] for h in hist})}
                rec = {"seed": seed, "eval": ev, "segment_lm_loss": seg, "train_lm_loss_last100": lm_by_group}
            else:
                rm, hist = train_plain(args, base, data["train"], batches, seed, log)
                tt, tc = time.perf_counter() - t, cpu_seconds() - c
                rec = {"seed": seed, "eval": eval_plain(rm, data["test"], args.groups, args.test_limit)}
            rec.update(train_wall_s=tt, train_cpu_s=tc, total_wall_s=time.perf_counter() - t, total_cpu_s=cpu_seconds() - c,
                       final_train=hist[-1], copy_pretrain=copy_stats, copy_pretrain_cpu_s=copy_cpu)
            runs[variant].append(rec)
            e = rec["eval"]
            log(f"{variant} seed {seed}: " + ", ".join(
                f"{g} acc {100 * e[g]['accuracy']:.1f}" + (f" valid {100 * e[g]['valid_call_share']:.1f} gold-obs {100 * e[g]['gold_observation_share']:.1f}"
                                                         if variant == "themis" else "") for g in args.groups)
                + f" (train {tc:.0f} s CPU, total {rec['total_cpu_s']:.0f} s CPU, {rec['total_wall_s']:.0f} s wall)")
            (args.out / "results.partial.json").write_text(json.dumps(runs, indent=2))
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "data": {k: v for k, v in data.items() if k not in ("train", "test", "cache")}, "runs": runs,
               "wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "loadavg_end": os.getloadavg()}
    if "themis" in runs and "plain" in runs:
        summary["paired"] = {g: paired_ci([r["eval"][g]["accuracy"] for r in runs["themis"]], [r["eval"][g]["accuracy"] for r in runs["plain"]])
                             for g in args.groups}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    from themis_report import plot, print_table  # examples/themis_report.py, beside this script

    plot(summary, args.groups, args.out / "results.png")
    print_table(summary, args.groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
