"""examples/themis_generative.py: its batching and statistics against hand computations, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import themis_generative  # examples/ (tests/conftest.py puts it on sys.path)


def test_batches_hold_one_group_and_cover_every_item_before_repeating():
    mod = themis_generative
    items = [SimpleNamespace(group=g) for g in ["a"] * 7 + ["b"] * 5]
    batches = mod.batches_by_group(items, 3, 10, seed=0)
    assert len(batches) == 10
    assert all(len({items[i].group for i in b}) == 1 for b in batches)
    # one pass = ceil(7/3) + ceil(5/3) = 5 batches holding each index once
    first_pass = sorted(i for b in batches[:5] for i in b)
    assert first_pass == list(range(12))


def test_paired_interval_is_the_t_interval_of_the_differences():
    mod = themis_generative
    res = mod.paired_ci([0.9, 0.8, 1.0], [0.5, 0.6, 0.6])
    d = [0.4, 0.2, 0.4]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, df=2}
    assert res["mean_diff"] == pytest.approx(mean)
    assert res["ci95"] == pytest.approx([mean - half, mean + half])


@pytest.mark.tara
def test_tiny_run_writes_the_measurements(tmp_path):
    mod = themis_generative
    rc = mod.main(["--out", str(tmp_path), "--seeds", "0", "1", "--groups", "calendar", "--steps", "3", "--layers", "1",
                   "--hidden", "32", "--ffn", "64", "--vocab", "300", "--max-new-tokens", "24", "--synth-calendar", "40",
                   "--synth-weather", "20", "--synth-multi", "4", "--tara-multi", "4", "--test-limit", "3", "--segment-pairs", "2", "--log-every", "1",
                   "--copy-steps", "2", "--copy-batch-size", "4", "--copy-sub-vocab", "4", "50"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["data"]["dropped_tara_train"] >= 1  # TARA's train split repeats test city-dates; dropped
    for v in ("themis", "plain"):
        assert [r["seed"] for r in res["runs"][v]] == [0, 1]
        assert all(r["eval"]["calendar"]["n_pairs"] == 3 for r in res["runs"][v])
    ev = res["runs"]["themis"][0]["eval"]["calendar"]
    assert 0 <= ev["valid_call_share"] <= 1 and 0 <= ev["gold_observation_share"] <= ev["valid_call_share"]
    assert set(res["runs"]["themis"][0]["segment_lm_loss"]["calendar"]) == {"call", "call_digits", "call_other", "observation", "rationale"}
    assert res["paired"]["calendar"]["ci95"] is not None
    assert (tmp_path / "results.png").stat().st_size > 1000
    # one copy-pretrained base per seed, shared by both variants; untrained it scores ~log(#ids it draws from)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    n_ids = len(tok) - len(set(tok.all_special_ids))  # <pad> <s> </s> and the Themis tokens are never drawn
    for k, seed in enumerate((0, 1)):
        st = json.loads((tmp_path / f"base_seed{seed}_copy2" / "copy_pretrain.json").read_text())
        assert st["steps"] == 2 and abs(st["first_loss"] - math.log(n_ids)) < 0.6 and st["cpu_s"] > 0
        assert res["runs"]["themis"][k]["copy_pretrain"] == st == res["runs"]["plain"][k]["copy_pretrain"]


def test_call_shares_read_the_trace_records_themis_writes(monkeypatch):
    """eval_themis on the records ThemisRewardModel returns (rewards/themis_traces.py: action, input, ok,
    observation, error): the tool's output is under "observation" (an earlier version read "output" and
    raised KeyError at the first accepted call)."""
    import align.rewards.themis as themis_mod

    def rec(ok, observation="", error=None):
        return {"action": "Calendar.week_day", "input": "2015-03-24", "ok": ok, "observation": observation, "error": error}

    infos = [  # pos of item 0, pos of item 1, neg of item 0, neg of item 1
        {"tool_calls": [rec(True, "Tuesday")], "trace": "Thought: They differ? <start_work> Work: They match, so it is correct."},
        {"tool_calls": [rec(True, "Monday")], "trace": "<start_work> Work: match? They differ, so it is wrong."},
        {"tool_calls": [rec(False, error="invalid date '2000-01-00'")], "trace": "t2"},
        {"tool_calls": [], "trace": "Work: nothing to compare"},
    ]

    class FakeThemis:
        def __init__(self, **kw):
            pass

        def score(self, prompts, completions, context=None):
            assert prompts == ["q0", "q1", "q0", "q1"] and completions == ["p0", "p1", "n0", "n1"]
            return SimpleNamespace(scores=[0.9, 0.1, 0.2, 0.5], info=infos)

    monkeypatch.setattr(themis_mod, "ThemisRewardModel", FakeThemis)
    mod = themis_generative
    items = [SimpleNamespace(question=f"q{k}", context=None, pos=SimpleNamespace(answer=f"p{k}", steps=[SimpleNamespace(observation=o)]),
                             neg=SimpleNamespace(answer=f"n{k}")) for k, o in enumerate(("Tuesday", "Friday"))]
    args = SimpleNamespace(max_new_tokens=8, max_length=64, eval_batch_size=4, test_limit=None)
    ev = mod.eval_themis(args, None, None, {"calendar": items}, ["calendar"])["calendar"]
    assert ev["accuracy"] == 0.5  # 0.9 > 0.2 right, 0.1 < 0.5 wrong
    assert ev["valid_call_share"] == 0.5 and ev["gold_observation_share"] == 0.25 and ev["all_gold_observations_share"] == 0.25
    assert ev["call_failures"] == {"invalid date '2000-01-00'": 1, "no tool call": 1}
    # per sample: the first call's input, accepted, gold observation, the rationale's last verdict word, the score
    assert ev["per_sample"] == [
        {"input": "2015-03-24", "ok": True, "gold": True, "verdict": "match", "score": 0.9},
        {"input": "2015-03-24", "ok": True, "gold": False, "verdict": "differ", "score": 0.1},
        {"input": "2015-03-24", "ok": False, "gold": False, "verdict": None, "score": 0.2},
        {"input": None, "ok": False, "gold": False, "verdict": None, "score": 0.5},
    ]


@pytest.mark.tara
def test_tiny_run_with_a_shared_base_city_tokens_and_claim_first(tmp_path):
    """--copy-shared: one copy-pretrained base for both seeds (one folder, the same stats in every run);
    --city-tokens: every city of the weather cache is one token of the saved tokenizer; --mix-copy: the
    Themis steps carry a copy-row loss."""
    from transformers import AutoTokenizer

    from align.rewards.tara import load_weather_cache
    from align.tools.weather import parse_query

    rc = themis_generative.main(["--out", str(tmp_path), "--seeds", "0", "1", "--groups", "weather", "--steps", "2", "--layers", "1",
                                 "--hidden", "32", "--ffn", "64", "--vocab", "300", "--max-new-tokens", "16", "--synth-calendar", "10",
                                 "--synth-weather", "10", "--synth-multi", "2", "--tara-multi", "2", "--tara-groups", "--test-limit", "2",
                                 "--segment-pairs", "1", "--copy-steps", "2", "--copy-batch-size", "4", "--copy-shared",
                                 "--city-tokens", "--claim-first", "--mix-copy", "1.0", "--mix-copy-batch", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(p.name for p in tmp_path.glob("base_*")) == ["base_seed0_copy2"]
    stats = [r["copy_pretrain"] for v in ("themis", "plain") for r in res["runs"][v]]
    assert len(stats) == 4 and all(s == stats[0] for s in stats)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    # --mix-copy: each Themis step also scores copy rows; 2 steps in, about log(#ids drawn) nats per copied token
    n_ids = len(tok) - len(set(tok.all_special_ids))
    assert all(abs(r["final_train"]["copy_loss"] - math.log(n_ids)) < 1.0 for r in res["runs"]["themis"])
    assert all("copy_loss" not in r["final_train"] for r in res["runs"]["plain"])
    cities = {parse_query(k)[0] for k in load_weather_cache()}
    assert len(cities) > 500
    for c in cities:
        ids = tok(f"in {c} on", add_special_tokens=False)["input_ids"]
        assert f" {c}" in tok.convert_ids_to_tokens(ids) and tok.decode(ids) == f"in {c} on"


@pytest.mark.tara
def test_copy_first_token_task_is_the_first_token_of_every_training_text(tmp_path):
    """--copy-first-token task: the copy rows open with the token every Themis / plain training text opens
    with (the tokenizer adds no <s>), read here from the tokenised texts themselves."""
    from types import SimpleNamespace

    from align.rewards.tara import load_tara, render_item, render_plain

    items = load_tara(["calendar", "weather"], "train")[:40]
    texts = [render_item(it, s).text for it in items for s in ("pos", "neg")]
    tok = themis_generative.build_tokenizer(texts, tmp_path / "tok", 300)
    task_id = themis_generative.copy_first_id(SimpleNamespace(copy_first_token="task"), tok)
    assert {tok(t)["input_ids"][0] for t in texts} == {task_id} and "### USER:".startswith(tok.decode([task_id]))
    assert task_id != tok.bos_token_id
    # the plain RM's texts ('Question: q\nAnswer: a') open with no <s> either (with their own first token)
    assert tok.bos_token_id not in {tok(render_plain(it.question, it.pos.answer, it.context))["input_ids"][0] for it in items}
    assert themis_generative.copy_first_id(SimpleNamespace(copy_first_token="bos"), tok) == tok.bos_token_id
