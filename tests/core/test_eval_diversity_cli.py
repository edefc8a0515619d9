"""`align eval-diversity` on a tiny random model saved like a real checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

from align.cli import main
from align.diversity import diversity
from align.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldiv")
    model = make_tiny_model(root / "model", hidden_size=32, num_layers=1, num_heads=2, seed=0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(["Tell me: ", "Say: "])) + "\n")
    return root, model, prompts


def _run(capsys, *argv):
    rc = main(["eval-diversity", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_samples_n_per_prompt_and_reports_metrics_of_those_samples(tiny, capsys):
    root, model, prompts = tiny
    out_file = root / "result.json"
    rc, out, _ = _run(capsys, model, "--prompts", prompts, "--n", 3, "--max-new-tokens", 6, "--no-sentbert",
                      "--output", out_file, "--seed", 1)
    assert rc == 0
    record = json.loads(out_file.read_text())
    groups = [s["completions"] for s in record["samples"]]
    assert [s["prompt"] for s in record["samples"]] == ["Tell me: ", "Say: "]
    assert [len(g) for g in groups] == [3, 3]
    assert all(len(text) <= 6 for g in groups for text in g)  # one character per token, at most 6 new tokens
    expected = diversity(groups, sentbert=False)
    assert record["metrics"] == pytest.approx(expected)
    assert "=== prompt: Tell me: " in out and "self_bleu" in out and "sentbert" not in out
    # the same seed gives the same samples; the run directory layout resolves to its latest policy
    run_dir = root / "run"
    ckpt = run_dir / "checkpoints" / "step-000002"
    shutil.copytree(model, ckpt / "policy")
    (ckpt / "trainer.pt").write_bytes(b"")
    (run_dir / "checkpoints" / "latest").write_text("step-000002")
    out_file2 = root / "result2.json"
    rc, _, _ = _run(capsys, run_dir, "--prompts", prompts, "--n", 3, "--max-new-tokens", 6, "--no-sentbert",
                    "--output", out_file2, "--seed", 1, "--quiet")
    assert rc == 0
    assert json.loads(out_file2.read_text())["samples"] == record["samples"]


def test_user_errors_are_one_line_and_exit_2(tiny, capsys, tmp_path):
    root, model, prompts = tiny
    rc, _, err = _run(capsys, model, "--prompts", tmp_path / "missing.jsonl")
    assert rc == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    rc, _, err = _run(capsys, model, "--prompts", bad)
    assert rc == 2 and "--prompt-key" in err and "bad.jsonl:1" in err
    rc, _, err = _run(capsys, model, "--prompts", prompts, "--n", 1)
    assert rc == 2 and "at least 2" in err
    rc, _, err = _run(capsys, tmp_path, "--prompts", prompts)
    assert rc == 2 and "not a model directory" in err


def test_config_file_and_set_overrides_go_through_the_one_config_machinery(tiny, capsys, tmp_path):
    root, model, prompts = tiny
    cfg = tmp_path / "div.yaml"
    cfg.write_text(f"checkpoint: {model}\nprompts: {prompts}\nn: 2\nmax_new_tokens: 4\nsentbert: false\n")
    out_file = tmp_path / "r.json"
    rc, _, _ = _run(capsys, "--config", cfg, "--set", "n=3", "--output", out_file, "--quiet")
    assert rc == 0
    record = json.loads(out_file.read_text())
    assert record["n"] == 3 and record["max_new_tokens"] == 4 and [len(s["completions"]) for s in record["samples"]] == [3, 3]
    rc, _, err = _run(capsys, model, "--prompts", prompts, "--set", "temperatur=0.5")
    assert rc == 2 and "did you mean 'temperature'" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, model, "--prompts", prompts, "--top-p", 0)
    assert rc == 2 and "top_p = 0.0: must be in (0, 1]" in err
