"""What TRL, OpenRLHF and verl call align's config keys, for one-line hints on an unknown key.

A bare name (TRL's `GRPOConfig` fields, OpenRLHF's command-line flags without `--`) matches the last part
of an unknown key wherever it stands; a dotted name (verl's Hydra paths) matches the whole path, including
the leaves of an unknown nested section (`actor_rollout_ref: {actor: {optim: {lr: ...}}}`). docs/migrating.md
("Key names") shows the same table; tests/core/test_key_names.py checks every target is a real key.
"""
from __future__ import annotations

from typing import Any

# peer name -> (whose name, align key)
PEER_KEYS: dict[str, tuple[str, str]] = {
    # TRL (GRPOConfig / TrainingArguments field names)
    "learning_rate": ("TRL", "train.lr"),
    "num_generations": ("TRL", "algo.group_size"),
    "per_device_train_batch_size": ("TRL", "train.micro_batch_size"),
    "max_completion_length": ("TRL", "rollout.max_new_tokens"),
    "beta": ("TRL", "algo.kl_coef"),
    "epsilon": ("TRL", "algo.clip_low"),
    "epsilon_high": ("TRL", "algo.clip_high"),
    "num_iterations": ("TRL", "algo.epochs"),
    "loss_type": ("TRL", "algo.loss_agg"),
    "scale_rewards": ("TRL", "algo.scale"),
    "reward_weights": ("TRL", "reward.weights"),
    "max_steps": ("TRL", "train.steps"),
    "lr_scheduler_type": ("TRL", "train.lr_scheduler"),
    "output_dir": ("TRL", "logging.run_dir"),
    "save_steps": ("TRL", "checkpoint.every"),
    "save_total_limit": ("TRL", "checkpoint.keep_last"),
    "logging_steps": ("TRL", "logging.print_every"),
    "resume_from_checkpoint": ("TRL", "checkpoint.resume_from"),
    "model_name_or_path": ("TRL", "model.path"),
    "dataset_name": ("TRL", "data.path"),
    "temperature": ("TRL", "rollout.temperature"),
    "top_p": ("TRL", "rollout.top_p"),
    "top_k": ("TRL", "rollout.top_k"),
    "min_p": ("TRL", "rollout.min_p"),
    "warmup_steps": ("TRL", "train.warmup_steps"),
    "seed": ("TRL", "train.seed"),
    "weight_decay": ("TRL", "train.weight_decay"),
    "max_grad_norm": ("TRL", "train.max_grad_norm"),
    "gradient_checkpointing": ("TRL", "model.gradient_checkpointing"),
    "mask_truncated_completions": ("TRL", "algo.mask_truncated_completions"),
    # TRL's PPOConfig (older TRL releases; 1.16 ships none)
    "num_ppo_epochs": ("TRL", "algo.epochs"),
    "cliprange": ("TRL", "algo.clip_low"),
    "cliprange_value": ("TRL", "algo.value_clip"),
    "kl_coef": ("TRL", "algo.kl_coef"),
    "vf_coef": ("TRL", "algo.vf_coef"),
    "lam": ("TRL", "algo.lam"),
    "response_length": ("TRL", "rollout.max_new_tokens"),
    # OpenRLHF (openrlhf.cli.train_ppo_ray flags)
    "pretrain": ("OpenRLHF", "model.path"),
    "critic_pretrain": ("OpenRLHF", "model.critic_path"),
    "prompt_data": ("OpenRLHF", "data.path"),
    "input_key": ("OpenRLHF", "data.prompt_key"),
    "apply_chat_template": ("OpenRLHF", "data.chat_template"),
    "prompt_max_len": ("OpenRLHF", "data.max_prompt_length"),
    "generate_max_len": ("OpenRLHF", "rollout.max_new_tokens"),
    "n_samples_per_prompt": ("OpenRLHF", "algo.group_size"),
    "actor_learning_rate": ("OpenRLHF", "train.lr"),
    "critic_learning_rate": ("OpenRLHF", "train.critic_lr"),
    "init_kl_coef": ("OpenRLHF", "algo.kl_coef"),
    "eps_clip": ("OpenRLHF", "algo.clip_low"),
    "lambd": ("OpenRLHF", "algo.lam"),
    "max_epochs": ("OpenRLHF", "algo.epochs"),
    "rollout_batch_size": ("OpenRLHF", "train.prompts_per_step"),
    "train_batch_size": ("OpenRLHF", "train.mini_batch_size"),
    "micro_train_batch_size": ("OpenRLHF", "train.micro_batch_size"),
    "micro_rollout_batch_size": ("OpenRLHF", "rollout.micro_batch_size"),
    "remote_rm_url": ("OpenRLHF", "reward.remote_url"),
    "save_path": ("OpenRLHF", "logging.run_dir"),
    "max_ckpt_num": ("OpenRLHF", "checkpoint.keep_last"),
    "l2": ("OpenRLHF", "train.weight_decay"),
    "max_norm": ("OpenRLHF", "train.max_grad_norm"),
    "entropy_loss_coef": ("OpenRLHF", "algo.entropy_coef"),
    "lora_rank": ("OpenRLHF", "model.lora.r"),
    "lora_alpha": ("OpenRLHF", "model.lora.alpha"),
    "gamma": ("OpenRLHF", "algo.gamma"),
    "kl_target": ("OpenRLHF", "algo.kl_target"),
    "kl_estimator": ("OpenRLHF", "algo.kl_estimator"),
    # verl (ppo_trainer.yaml paths)
    "data.train_files": ("verl", "data.path"),
    "data.max_response_length": ("verl", "rollout.max_new_tokens"),
    "data.train_batch_size": ("verl", "train.prompts_per_step"),
    "actor_rollout_ref.model.path": ("verl", "model.path"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": ("verl", "model.gradient_checkpointing"),
    "actor_rollout_ref.model.lora_rank": ("verl", "model.lora.r"),
    "actor_rollout_ref.model.lora_alpha": ("verl", "model.lora.alpha"),
    "actor_rollout_ref.actor.optim.lr": ("verl", "train.lr"),
    "actor_rollout_ref.actor.optim.weight_decay": ("verl", "train.weight_decay"),
    "actor_rollout_ref.actor.ppo_mini_batch_size": ("verl", "train.mini_batch_size"),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": ("verl", "train.micro_batch_size"),
    "actor_rollout_ref.actor.ppo_epochs": ("verl", "algo.epochs"),
    "actor_rollout_ref.actor.clip_ratio": ("verl", "algo.clip_low"),
    "actor_rollout_ref.actor.clip_ratio_low": ("verl", "algo.clip_low"),
    "actor_rollout_ref.actor.clip_ratio_high": ("verl", "algo.clip_high"),
    "actor_rollout_ref.actor.clip_ratio_c": ("verl", "algo.dual_clip"),
    "actor_rollout_ref.actor.entropy_coeff": ("verl", "algo.entropy_coef"),
    "actor_rollout_ref.actor.kl_loss_coef": ("verl", "algo.kl_coef"),
    "actor_rollout_ref.actor.kl_loss_type": ("verl", "algo.kl_estimator"),
    "actor_rollout_ref.actor.loss_agg_mode": ("verl", "algo.loss_agg"),
    "actor_rollout_ref.actor.grad_clip": ("verl", "train.max_grad_norm"),
    "actor_rollout_ref.rollout.n": ("verl", "algo.group_size"),
    "actor_rollout_ref.rollout.temperature": ("verl", "rollout.temperature"),
    "actor_rollout_ref.rollout.top_p": ("verl", "rollout.top_p"),
    "actor_rollout_ref.rollout.top_k": ("verl", "rollout.top_k"),
    "actor_rollout_ref.rollout.response_length": ("verl", "rollout.max_new_tokens"),
    "critic.optim.lr": ("verl", "train.critic_lr"),
    "critic.model.path": ("verl", "model.critic_path"),
    "critic.cliprange_value": ("verl", "algo.value_clip"),
    "algorithm.gamma": ("verl", "algo.gamma"),
    "algorithm.lam": ("verl", "algo.lam"),
    "algorithm.kl_ctrl.kl_coef": ("verl", "algo.kl_coef"),
    "algorithm.kl_ctrl.target_kl": ("verl", "algo.kl_target"),
    "algorithm.kl_ctrl.horizon": ("verl", "algo.kl_horizon"),
    "trainer.total_training_steps": ("verl", "train.steps"),
    "trainer.save_freq": ("verl", "checkpoint.every"),
    "trainer.default_local_dir": ("verl", "logging.run_dir"),
    "trainer.experiment_name": ("verl", "logging.name"),
    "trainer.max_actor_ckpt_to_keep": ("verl", "checkpoint.keep_last"),
    "custom_reward_function.path": ("verl", "reward.functions"),
}
_MAX_LISTED = 6


def _leaves(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    return [key]


def _lookup(path: str) -> tuple[str, str] | None:
    path = path.replace("-", "_")
    if path in PEER_KEYS:
        return PEER_KEYS[path]
    bare = path.rsplit(".", 1)[-1].lstrip("_")  # `--n_samples_per_prompt` written with its dashes
    return PEER_KEYS.get(bare) if "." not in bare else None


def peer_hint(where: str, value: Any, names: list[str], prefix: str) -> str:
    """'; TRL's name: align's key is `train.lr` (...)' for an unknown key `where` (dotted), or ''.

    A hint is kept only where its target is consistent with the section being built (`names` under
    `prefix`): at the top level the target's section must exist, so configs without an `algo` section
    (SFT, reward-model training) never get pointed at one."""

    def fits(target: str) -> bool:
        head, _, rest = target.partition(".")
        if not prefix:
            return head in names
        return not target.startswith(prefix + ".") or rest.split(".")[0] in names

    found: list[tuple[str, str, str]] = []
    for leaf in _leaves(where, value):
        hit = _lookup(leaf)
        if hit and fits(hit[1]):
            found.append((leaf, *hit))
    if not found:
        return ""
    if len(found) == 1 and found[0][0] == where:
        _, who, target = found[0]
        return f"; that is {who}'s name: align's key is `{target}` (docs/migrating.md, Key names)"
    listed = ", ".join(f"`{leaf}` -> `{target}`" for leaf, _, target in found[:_MAX_LISTED])
    more = f" and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    return f"; {found[0][1]} keys in align: {listed}{more} (docs/migrating.md, Key names)"
