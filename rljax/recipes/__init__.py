"""Recipes: whole training runs on a task, reusable by studies and by users.

`rljax.recipes.tasks`: one call per task on your model and data — `sft`, `reward_model`, `dpo`, `kto`, `grpo`
(any RL algorithm), each with its config dataclass, returning a `TaskResult`.
`rljax.recipes.arithmetic_runs`: the embedded arithmetic task's SFT and RL studies.
"""
from rljax.recipes.tasks import (DPOTaskConfig, GRPOTaskConfig, KTOTaskConfig, RewardModelTaskConfig, SFTTaskConfig,
                                 TaskConfig, TaskResult, dpo, grpo, kto, load_model, reward_model, reward_model_scorer,
                                 sft)

__all__ = ["DPOTaskConfig", "GRPOTaskConfig", "KTOTaskConfig", "RewardModelTaskConfig", "SFTTaskConfig", "TaskConfig",
           "TaskResult", "dpo", "grpo", "kto", "load_model", "reward_model", "reward_model_scorer", "sft"]
