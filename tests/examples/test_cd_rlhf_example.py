"""examples/cd_rlhf.py: the task's reward and tokenizer by hand, the statistics by hand (fast), and the
whole experiment at toy size (slow)."""
from __future__ import annotations

import json
import math

import cd_rlhf_report as report
import cd_rlhf_task as task
import pytest
from cd_rlhf import main


def test_favourite_words_reward_by_hand():
    f, a, o = task.FAVOURITES[0], task.ALLOWED[10], task.OTHER[0]
    got = task.FavouriteWordsReward()(["p"] * 5, [" ".join([f] * 5), " ".join([a] * 5), f"{f} {a} {o} {a} {f}",
                                                  f"{f} {a}", f"{f}x {a} {a} {a} {a}"])
    # favourite +0.5, allowed +0.4, other or unknown -0.4, summed over 5 slots; not five words -> -2.0
    assert got == pytest.approx([2.5, 2.0, 0.5 + 0.4 - 0.4 + 0.4 + 0.5, -2.0, -0.4 + 4 * 0.4])
    assert len(set(task.WORDS)) == 40 and set(task.FAVOURITES) < set(task.ALLOWED)
    assert not set(task.ALLOWED) & set(task.OTHER)


def test_piece_tokenizer_splits_words_into_several_pieces_and_decodes_back():
    tok = task.piece_tokenizer()
    word = task.ALLOWED[5]
    pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
    assert len(pieces) == len(word) // 2 >= 3 and all(p.startswith("##") for p in pieces[1:])
    text = "list five : " + " ".join(task.FAVOURITES)
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    # every word's first piece is its own, so the continuation pieces are determined by it
    assert len({task.word_pieces(w)[0] for w in task.WORDS}) == len(task.WORDS)


def test_no_chain_of_continuation_pieces_can_loop():
    # The diverged plain-PPO run (seed 2, eta 0) broke down into "##no ##no ##no ..." loops: "sinono" taught
    # the policy that "##no" may follow "##no". No valid word may make a continuation piece reachable from
    # itself (brute force: follow every chain of "##" pieces seen inside words; none may come back).
    follows: dict[str, set[str]] = {}
    for word in task.WORDS:
        pieces = [word[i:i + 2] for i in range(0, len(word), 2)]
        assert len(set(pieces)) == len(pieces), f"{word} repeats a syllable"
        for a, b in zip(pieces[1:], pieces[2:]):
            follows.setdefault(a, set()).add(b)
    for start in follows:
        seen, frontier = set(), set(follows[start])
        while frontier:
            assert start not in frontier, f"##{start} can follow itself through other words"
            seen |= frontier
            frontier = {c for p in frontier for c in follows.get(p, ())} - seen


def test_word_shares_count_invalid_words():
    f, o = task.FAVOURITES[0], task.OTHER[0]
    shares = task.word_shares([[f"{f} {o} {f}zz", ""], [f"{f} {f}"]])
    # 5 word slots: 3 favourites, 1 other, 1 that is no word at all; the empty text has no slot
    assert shares == pytest.approx({"favourite_share": 3 / 5, "allowed_share": 3 / 5, "invalid_share": 1 / 5,
                                    "empty_share": 1 / 3})


def test_t_interval_and_collapse_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.3026527297 (t table, 2 degrees of freedom) -> half width 4.3027 / sqrt(3) = 2.48414
    mean, lo, hi = report.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - 4.3026527297 / math.sqrt(3), rel=1e-10)
    assert hi == pytest.approx(2.0 + 4.3026527297 / math.sqrt(3), rel=1e-10)
    oracles = {"allowed_uniform": {"diversity": 0.4}, "favourites_uniform": {"diversity": 0.1}}
    assert report.collapse(0.4, oracles) == 0.0 and report.collapse(0.1, oracles) == pytest.approx(1.0)
    assert report.collapse(0.25, oracles) == pytest.approx(0.5)


def test_compare_accepts_only_shown_gains_at_a_reward_not_lower():
    def final(reward, div, ead, sb):
        return {"reward": reward, "diversity": div, "ead": ead, "self_bleu": sb}

    oracles = {"allowed_uniform": {"diversity": 0.4}, "favourites_uniform": {"diversity": 0.1}}
    runs = []
    for s, (r0, r1) in enumerate([(2.0, 2.01), (2.1, 2.1), (1.9, 1.92)]):
        runs.append({"eta": 0.0, "seed": s, "final": final(r0, 0.10 + 0.01 * s, 0.7, 0.30)})
        runs.append({"eta": 0.1, "seed": s, "final": final(r1, 0.20 + 0.012 * s, 0.8 + 0.001 * s, 0.20)})
    comp = report.compare({"etas": [0.0, 0.1], "seeds": [0, 1, 2], "runs": runs, "oracles": oracles})["0.1"]
    # reward diffs 0.01, 0, 0.02: mean 0.01, sd 0.01 -> interval 0.01 -+ 4.3027 * 0.01 / sqrt(3) = [-0.0148, 0.0348]
    assert comp["reward"]["low"] == pytest.approx(0.01 - 4.3026527297 * 0.01 / math.sqrt(3), rel=1e-9)
    assert comp["reward_not_lower"] and comp["diversity"]["better_shown"] and comp["self_bleu"]["better_shown"]
    assert comp["ead"]["better_shown"] and comp["accepted"]
    # the same gains with a reward interval reaching below -0.05 are not accepted
    for r in runs:
        if r["eta"] == 0.1:
            r["final"]["reward"] -= 0.2
    assert not report.compare({"etas": [0.0, 0.1], "seeds": [0, 1, 2], "runs": runs, "oracles": oracles})["0.1"]["accepted"]


def test_matched_reward_gain_and_diverged_pairs_by_hand():
    sft = [{"seed": 0, "reward": 0.3, "diversity": 0.6}]
    base = {"eta": 0.0, "seed": 0, "final": {"reward": 1.9, "diversity": 0.1},
            "checkpoints": [{"reward": 1.2, "diversity": 0.45}, {"reward": 1.6, "diversity": 0.3},
                            {"reward": 1.9, "diversity": 0.1}]}
    cur = {"eta": 0.1, "seed": 0, "final": {"reward": 1.62, "diversity": 0.4}, "checkpoints": []}
    high = {"eta": 0.2, "seed": 0, "final": {"reward": 2.2, "diversity": 0.2}, "checkpoints": []}
    results = {"etas": [0.0, 0.1, 0.2], "sft_models": sft, "runs": [base, cur, high]}
    m = report.matched_reward_gain(results)
    # eta 0.1 at reward 1.62: eta = 0 points with reward >= 1.57 are (1.6, 0.3) and (1.9, 0.1) -> 0.4 - 0.3 = +0.1
    assert m["0.1"]["n"] == 1 and m["0.1"]["mean"] == pytest.approx(0.1)
    # eta 0.2 at reward 2.2: no eta = 0 point reaches 2.15 -> unmatched
    assert m["0.2"]["n"] == 0 and m["0.2"]["unmatched"] == 1
    assert report.diverged({"final": {"reward": -2.0}}) and not report.diverged({"final": {"reward": -1.5}})


@pytest.mark.slow
def test_quick_mode_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--seeds", "0", "1", "--steps", "3", "--prompts-per-step", "4", "--n", "3",
                 "--sft-epochs", "1", "--n-sft", "64", "--etas", "0", "0.1", "--no-sentbert"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["eta"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (0.1, 0), (0.0, 1), (0.1, 1)]
    eta0 = results["runs"][0]["history"]
    assert all("curiosity/gate_rate" not in h for h in eta0)  # no curiosity module in the eta = 0 run
    gated = [h["curiosity/gate_rate"] for h in results["runs"][1]["history"]]
    assert len(gated) == 3 and all(0.0 < g <= 1.0 for g in gated)
    assert all(len(r["final"]["example"]) == 3 for r in results["runs"])
    assert "0.1" in results["comparison"]
    table = (out / "table.md").read_text()
    assert "| eta = 0 |" in table and "| eta = 0.1 |" in table and "favourites uniform" in table
    assert (out / "cd_rlhf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
