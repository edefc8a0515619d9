"""The shared loop never asks which algorithm runs: no isinstance on algorithm / run-config classes, no
comparison with an algorithm's name. PPO-only work sits behind `Algorithm` hooks with no-op defaults."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import align.trainer.loop as loop_module
from align.config import GRPOAlgoConfig, GRPOConfig, PPOConfig
from align.trainer.algorithm import Algorithm, make_algorithm
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.ppo import PPOAlgorithm

ALGO_CLASS_NAMES = {"PPOAlgorithm", "GRPOAlgorithm", "PPOConfig", "GRPOConfig", "PPOAlgoConfig", "GRPOAlgoConfig"}
ALGO_NAMES = {"ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"}


def algorithm_branches(source: str) -> list[str]:
    """Line-numbered descriptions of every place `source` branches on the algorithm's type or name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
            names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)} if len(node.args) > 1 else set()
            if names & ALGO_CLASS_NAMES:
                found.append(f"line {node.lineno}: isinstance(..., {'|'.join(sorted(names & ALGO_CLASS_NAMES))})")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
            for s in sides:  # `x in ("ppo", ...)`
                if isinstance(s, (ast.Tuple, ast.List, ast.Set)):
                    consts |= {e.value for e in s.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            attrs = {s.attr for s in sides if isinstance(s, ast.Attribute)}
            if consts & ALGO_NAMES or attrs & {"name", "algorithm"} and any(isinstance(s, ast.Constant) for s in sides):
                found.append(f"line {node.lineno}: compares with an algorithm name")
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            imported = {a.name for a in node.names}
            if imported & {"PPOAlgorithm", "GRPOAlgorithm"} or (getattr(node, "module", "") or "").endswith((".ppo", ".grpo")):
                found.append(f"line {node.lineno}: imports an algorithm class")
    return found


def test_loop_has_no_algorithm_branches():
    source = Path(loop_module.__file__).read_text()
    assert algorithm_branches(source) == []


@pytest.mark.parametrize("snippet", [
    "if isinstance(self.algo, PPOAlgorithm):\n    pass",
    "x = isinstance(cfg, (PPOConfig, dict))",
    "if self.algo.name == 'ppo':\n    pass",
    "if cfg.algorithm in ('grpo', 'rloo'):\n    pass",
    "from align.trainer.ppo import PPOAlgorithm",
])
def test_the_check_catches_injected_branches(snippet):
    assert algorithm_branches(snippet)


def test_make_algorithm_picks_by_config():
    ppo = PPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["x"]})
    grpo = GRPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["x"]})
    assert type(make_algorithm(ppo)) is PPOAlgorithm and type(make_algorithm(grpo)) is GRPOAlgorithm
    assert isinstance(make_algorithm(ppo), Algorithm) and isinstance(make_algorithm(grpo), Algorithm)


def test_grpo_reward_hook_is_a_no_op_and_ppo_overrides_it():
    """GRPO inherits the no-op hooks; PPO's shape_rewards builds the token rewards."""
    assert GRPOAlgorithm.shape_rewards is Algorithm.shape_rewards
    assert GRPOAlgorithm.after_step is Algorithm.after_step
    assert PPOAlgorithm.shape_rewards is not Algorithm.shape_rewards
    assert not GRPOAlgorithm.accepts_token_rewards and PPOAlgorithm.accepts_token_rewards
    algo = GRPOAlgorithm(GRPOAlgoConfig())

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the GRPO hook read step.{name}")

    assert algo.shape_rewards(Untouchable(), curiosity=None) == {}


def test_ppo_hook_shapes_rewards_without_curiosity():
    from types import SimpleNamespace

    from align.config import PPOAlgoConfig
    from align.trainer.state import StepData

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    step = StepData(batch=SimpleNamespace(mask=mask, logprobs=logp))
    step.scores = torch.tensor([1.0, -3.0])
    algo = PPOAlgorithm(PPOAlgoConfig(kl_coef=0.0))
    metrics = algo.shape_rewards(step)
    assert metrics["kl/coef"] == 0.0
    assert step.old_logprobs is logp  # KL off: the rollout's log-probs stand in
    assert step.token_rewards.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, -3.0]]  # the score on the last token
