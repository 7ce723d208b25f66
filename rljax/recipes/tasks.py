"""One call per task: SFT, a reward model, DPO (and its family), KTO and GRPO (any RL algorithm) on your data.

    from rljax.recipes import grpo, GRPOTaskConfig
    result = grpo("path/to/Qwen2.5-0.5B-Instruct", "prompts.jsonl", [my_reward],
                  GRPOTaskConfig(steps=100, n=8, max_new_tokens=256), run_dir="runs/grpo")
    result.params, result.metrics["reward_mean"]

Each entry point takes
  model:    an HF checkpoint directory (or hub id) — `load_pretrained` + `HFTokenizer.from_pretrained`
            from the same files — or a `(Model, params, tokenizer)` tuple;
  data:     a `datasets.Dataset`, a .jsonl / .json / .parquet file or directory, or a list of dicts
            (`rljax.data.adapters.load_records`); rows are validated by the adapters' schemas, and a bad
            row raises `DataError` naming the row and the field before anything trains;
  cfg:      the task's config dataclass (defaults for learning rate, steps, batch size, lengths);
  eval_data: optional; held-out rows of the same kind, evaluated every cfg.eval_every steps and at the
            end (the loss and metrics over all of them; GRPO: the reward of greedy completions), returned
            as `TaskResult.eval_metrics` / `eval_history` and logged under "<phase>/eval/";
  mesh:     optional; a device mesh (`rljax.sharding.make_mesh`) to train and sample on, the weights and
            batches sharded over it (a checkpoint is loaded straight onto it, each device reading its
            slice); default: a model tuple's own `Model.mesh`, one device for a checkpoint. On several
            processes (`rljax.distributed`) every process makes the same call with a mesh over all their
            devices and a run_dir on a file system they share; process 0 writes config.json and the metrics;
  run_dir:  optional; config.json, metrics.jsonl and checkpoints/ go there through `rljax.phases`, and a
            rerun with the same run_dir resumes from its latest checkpoint (a finished run returns at once).
            A run directory holds one run: a rerun with another task, config, model or data set raises
            `rljax.cli.ConfigMismatchError` naming each differing field before anything trains, unless
            `allow_change=True` (continue the saved run with the new values, e.g. more `steps`, recorded in
            config_changes.jsonl; with a schedule over `steps`, e.g. the default cosine, the continuation then
            differs from one uninterrupted run). How a run shows and saves (progress, log_every,
            checkpoint_every, tensorboard, wandb) may change freely;
and returns a `TaskResult` (trained params, final metrics, the per-step history, model, tokenizer, state).

Row formats (TRL's): SFT {prompt, completion} or {messages} (rows with `messages` and no `completion`
are conversations, a `prompt` beside them left aside, as in UltraChat's {prompt, prompt_id, messages});
reward model and DPO {prompt, chosen, rejected} (reward model also {prompt, response, score}); KTO
{prompt, completion, label} (label True for a desirable completion, TRL's unpaired preference rows); GRPO
{prompt, ...}: every other column is passed to the reward functions as a per-sample list
(`fn(prompts, completions, **columns) -> rewards`); as in TRL, the prompts and completions are text for
text prompts, and for message-list prompts the prompt's messages and the completion as one assistant
message, [{"role": "assistant", "content": text}] (`GRPOTaskConfig.reward_format`).
A prompt (or completion) may also be a list of {"role", "content"} messages. With a tokenizer that has
a chat template (and cfg.chat_template not False) every prompt is the template applied to its messages
(a plain prompt is one user message, after cfg.system_prompt) with the generation prompt; otherwise the
prompt text is used as is (messages through `simple_template`). A template that raises on a row is a
`DataError` naming the row (its file and line); one that renders a row's conversation otherwise than the
training text (the prompt, then the completion: e.g. it ignores add_generation_prompt, so the reply would
join the user's turn) is warned of, naming the first such row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from rljax import phases
from rljax.algorithms import get_algorithm
from rljax.chat_template import ChatTemplateError, compile_chat_template
from rljax.checkpoint import digest_params
from rljax.data.adapters import (DataError, Message, _check_role, _check_str, _get, _local_json_rows, chat_messages,
                                 load_records, located, preference_pairs, prompt_completion, row_locator,
                                 scored_responses, simple_template)
from rljax.data.collate import BatchIterator, collate_prompt_completion, encode_text, pad_rows
from rljax.data.lengths import Tokens, fit_lengths
from rljax.data.preference_collate import _desirable, _weight_or_label, collate_kto, collate_preferences, cut_prompt
from rljax.data.reward_collate import _finite, collate_pairs, collate_scored
from rljax.distributed import on_main, sync
from rljax.losses.preference import (PREFERENCE_METHODS, KTOConfig, check_kto_weights, preference_loss,
                                     with_live_reference)
from rljax.losses.reward_model import PointwiseConfig, RankingConfig, reward_model_loss
from rljax.losses.sft import sft_loss
from rljax.metrics import WandbConfig, read_metrics
from rljax.models import Model, add_head
from rljax.phases import LoopConfig, PromptBatch
from rljax.rewards.rules import (COMPLETION_IDS, LOG_EXTRA, LOG_METRIC, TRAINER_STATE, TRL_KEYWORDS, RewardCallConfig,
                                 RewardSum, TrainingProgress, call_reward)
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig, create_state

__all__ = ["TaskConfig", "SFTTaskConfig", "RewardModelTaskConfig", "DPOTaskConfig", "KTOTaskConfig", "GRPOTaskConfig",
           "TaskResult", "load_model", "sft", "reward_model", "dpo", "kto", "grpo", "sft_batches", "reward_batches",
           "preference_batches", "kto_batches", "prompt_batches", "combine_rewards", "conversational_rewards"]


# ----------------------------------------------------------------------------- configs and result
# What reward functions get as prompts and completions (`GRPOTaskConfig.reward_format`).
REWARD_FORMATS = ("auto", "text", "conversational")


@dataclass(frozen=True)
class TaskConfig:
    """What every task shares. steps: optimizer steps (GRPO: RL iterations); batch_size: rows per step
    (GRPO: prompts per iteration); max_length: longest tokenized row (None: the model's max_seq_len);
    overlong: what to do with a longer row, checked when the data set is built ("error": a DataError
    naming its file and line and how many rows are too long; "drop"; "truncate_prompt": cut the prompt
    from the left, after its leading special tokens (bos, or a chat template's own text before the first
    message's content); "truncate_completion": cut the completion from the right; see `rljax.data.lengths`;
    GRPO's rows are prompts: "error", "drop" or "truncate_prompt", against what the KV cache leaves them,
    `GRPOTaskConfig`); lr with `warmup_steps` of linear warmup then `schedule`;
    log_every: steps between metrics rows (the last step is always logged); eval_every: steps between
    evaluations on the task's eval_data (0: at the end only; the end is always evaluated); checkpoint_every: steps
    between checkpoints in run_dir (0: only the last); chat_template: None = apply the tokenizer's chat
    template when it has one; system_prompt: a system message before every prompt; dtype, max_seq_len:
    for a model loaded from a checkpoint (None: the checkpoint's). tensorboard, wandb: where else the
    metrics go (`LoopConfig`: TensorBoard under run_dir/tb when installed; a `WandbConfig` logs to
    Weights & Biases, offline under run_dir/wandb by default, which then needs a run_dir)."""

    lr: float = 1e-5
    steps: int = 100
    batch_size: int = 8
    max_length: int | None = None
    overlong: str = "error"
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    progress: bool = True
    chat_template: bool | None = None
    system_prompt: str | None = None
    dtype: str | None = None
    max_seq_len: int | None = None
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        from rljax.models.config import DTYPES

        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}.dtype: one of {tuple(DTYPES)} or None (the checkpoint's), "
                             f"got {self.dtype!r}")

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(lr=self.lr, schedule=self.schedule, warmup_steps=min(self.warmup_steps, self.steps),
                               total_steps=max(self.steps, 1), weight_decay=self.weight_decay,
                               clip_norm=self.clip_norm)

    def loop(self) -> LoopConfig:
        return LoopConfig(steps=self.steps, log_every=self.log_every, eval_every=self.eval_every,
                          checkpoint_every=self.checkpoint_every, progress=self.progress, tensorboard=self.tensorboard,
                          wandb=self.wandb)


@dataclass(frozen=True)
class SFTTaskConfig(TaskConfig):
    """SFT: the loss is the mean NLL of the completion tokens (and eos) given the prompt."""

    lr: float = 2e-5


@dataclass(frozen=True)
class RewardModelTaskConfig(TaskConfig):
    """Reward model: Bradley–Terry on {prompt, chosen, rejected} pairs (`RankingConfig(margin, centring)`),
    or the squared error to {prompt, response, score} rows (`PointwiseConfig`); the model gets a
    zero-initialised "reward" head when it has none. share_prompt: each pair as one row, prompt then
    chosen then rejected, both answers reading one copy of the prompt (`collate_pairs(share_prompt=True)`):
    the same scores, P + C + R tokens a pair instead of 2P + C + R."""

    lr: float = 1e-5
    margin: float = 0.0
    centring: float = 0.0
    share_prompt: bool = True


@dataclass(frozen=True)
class DPOTaskConfig(TaskConfig):
    """Offline preference optimisation on {prompt, chosen, rejected} pairs: method is a
    `PREFERENCE_METHODS` name other than "kto" (dpo, cdpo, robust_dpo, hinge, ipo, simpo, orpo);
    beta: None keeps the method's; max_prompt_length: prompts are cut from the left to this many tokens
    (a chat template's own leading text kept, the cut after it);
    overlong: "truncate_completion" (the usual recipe: the completion is cut from the right to fit
    max_length after the prompt), "error" or "drop" ("truncate_prompt" is max_prompt_length here).
    share_prompt: each pair as one row, prompt then chosen then rejected, both completions reading one
    copy of the prompt (`collate_preferences(share_prompt=True)`): the same losses, P + C + R tokens a pair
    instead of 2P + C + R. The reference is the model as given (frozen).
    nll_coef: c > 0 adds c x the token-mean NLL of the chosen completions (RPO; TRL's loss_type=["sigmoid",
    "sft"] with loss_weights=[1, c]); dpo's family and simpo (orpo's objective is that NLL already).
    label_smoothing: None keeps the method's; ε in [0, 0.5) is cDPO's label smoothing for dpo and cdpo
    (TRL's label_smoothing with loss_type="sigmoid") and the label flip rate for robust_dpo (with "robust").
    logp_reduction: None keeps the method's; "sum" or "mean" of the completion's token log-probs ("mean" with
    dpo is TRL's loss_type="sigmoid_norm": the log-ratios averaged over each completion's tokens)."""

    lr: float = 1e-6
    overlong: str = "truncate_completion"
    method: str = "dpo"
    beta: float | None = None
    max_prompt_length: int | None = None
    share_prompt: bool = True
    nll_coef: float = 0.0
    label_smoothing: float | None = None
    logp_reduction: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.loss()  # an unknown method or a bad beta is refused here, not when the task starts

    def loss(self):
        if self.method not in PREFERENCE_METHODS or self.method == "kto":
            raise ValueError(f"DPOTaskConfig.method: {self.method!r} is not one of "
                             f"{sorted(k for k in PREFERENCE_METHODS if k != 'kto')}")
        loss = PREFERENCE_METHODS[self.method]
        fields = {f.name for f in dataclasses.fields(loss)}
        changes = {}
        if self.beta is not None:
            if "beta" not in fields:
                raise ValueError(f"DPOTaskConfig.beta: {self.method} has no β (its loss's fields: {sorted(fields)})")
            changes["beta"] = self.beta
        if self.nll_coef:
            if "nll_coef" not in fields:
                raise ValueError(f"DPOTaskConfig.nll_coef: {self.method}'s objective is the chosen completions' NLL "
                                 "already (its odds_ratio_coef weighs the other term); it applies to dpo, cdpo, "
                                 "robust_dpo, hinge, ipo and simpo")
            changes["nll_coef"] = self.nll_coef
        if self.label_smoothing is not None:
            if "label_smoothing" not in fields or loss.objective != "sigmoid":
                raise ValueError(f"DPOTaskConfig.label_smoothing: for the sigmoid loss's label noise (dpo, cdpo, "
                                 f"robust_dpo), not {self.method}")
            changes["flip_rate" if loss.flip_rate else "label_smoothing"] = self.label_smoothing
        if self.logp_reduction is not None:
            changes["logp_reduction"] = self.logp_reduction  # each loss config checks its own
        return dataclasses.replace(loss, **changes)


@dataclass(frozen=True)
class KTOTaskConfig(TaskConfig):
    """KTO (Ethayarajh et al. 2024) on unpaired binary feedback, {prompt, completion, label} rows (label True /
    1 for a desirable completion, False / 0 for an undesirable one: TRL's unpaired preference format), against
    the frozen starting model. Each batch's reference point z0 reads its mismatched pairs (each row's prompt
    with the next row's completion, `collate_kto`), so batch_size >= 2. beta, desirable_weight,
    undesirable_weight: `KTOConfig`'s, TRL's names and defaults; a data set whose λ_D n_D / (λ_U n_U) lies
    outside the paper's [1, 4/3] is warned of when it is built. max_prompt_length, overlong: as
    DPOTaskConfig's (the prompt cut from the left, then the completion from the right)."""

    lr: float = 1e-6
    overlong: str = "truncate_completion"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_prompt_length: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 2:
            raise ValueError(f"KTOTaskConfig.batch_size: KTO's reference point z0 reads mismatched pairs from the "
                             f"other rows of a batch: at least 2, got {self.batch_size}")
        if self.overlong not in ("error", "drop", "truncate_completion"):
            raise ValueError(f"KTOTaskConfig.overlong: one of 'error', 'drop', 'truncate_completion' (the prompt's cut "
                             f"is max_prompt_length), got {self.overlong!r}")
        self.loss()  # a bad beta or weight is refused here, not when the task starts

    def loss(self) -> KTOConfig:
        return KTOConfig(beta=self.beta, desirable_weight=self.desirable_weight,
                         undesirable_weight=self.undesirable_weight)


@dataclass(frozen=True)
class GRPOTaskConfig(TaskConfig):
    """On-policy RL: `algorithm` is any `rljax.algorithms` registry name ("grpo", "rloo", "dapo", "dr_grpo",
    "reinforce", "ppo", ...) or an Algorithm; steps counts RL iterations, each sampling `n` completions of
    at most `max_new_tokens` tokens for `batch_size` prompts (stopping at every stop id of the tokenizer)
    and updating epochs x minibatches times (temperature, top_p, top_k, min_p, repetition_penalty:
    `SampleConfig`'s; top_k 0, min_p 0 and repetition_penalty 1 are off; the penalty applies to the held-out
    completions too, as TRL's generation config does).
    kl_coef: None keeps the algorithm's. Algorithms that need a
    value head (ppo, a2c) get one zero-initialised on the policy, those with a separate critic (trpo) a
    critic copied from the policy with a value head; a running baseline is `baseline_decay`'s moving
    average. A prompt longer than max_length (None, and at most: max_seq_len - max_new_tokens, what the
    KV cache leaves) is handled by overlong when the data set is built: "truncate_prompt" (the default)
    keeps its last tokens after its bos or its chat template's own leading text, "drop" drops the row,
    "error" is a DataError naming its file and line.
    reward_call: how the reward functions are called (`RewardCallConfig`: chunks on worker threads,
    a per-call time limit, raise or score a fixed value on a failed call; the metrics then count
    the failures as reward_failed).
    reward_format: what the reward functions get as prompts and completions (TRL's two formats):
    "text" (the prompt as the model read it, the completion's text), "conversational" (each prompt's
    messages, cfg.system_prompt first if given, and each completion as [{"role": "assistant",
    "content": text}]; a text prompt is one user message), or "auto" (the default): conversational
    when every row's prompt is a list of messages, text when every row's is a string (a data set
    with both is a DataError naming a row of each).
    mask_truncated: completions cut at max_new_tokens get no loss (`RLConfig.mask_truncated`; TRL's
    mask_truncated_completions).
    eval_samples: 0 (the default) scores each eval_data prompt's greedy completion; k >= 1 scores k completions
    of each sampled as in training (temperature, top_p, top_k; the same draws at every evaluation) and adds
    reward_best_mean, the mean of each prompt's best reward (pass@k for a 0/1 reward) (`reward_eval`).
    scale_rewards: TRL's option for the group estimator's scale: "group" (divide by each prompt's reward std),
    "batch" (by the whole batch's std), "none" (no division: Dr. GRPO's); None keeps the algorithm's. For
    algorithms with group advantages (grpo, dr_grpo, dapo, gspo, cispo); others refuse it, naming theirs.
    ref_sync_every, ref_sync_alpha: move the reference toward the policy every ref_sync_every iterations,
    θ_ref ← α θ + (1 − α) θ_ref (`RLConfig.ref_sync_every`; TRL's sync_ref_model; α = 1 resets it to the policy).
    top_entropy_quantile: < 1 trains the policy loss on that top fraction of the completion tokens by entropy
    alone (`GRPOConfig.top_entropy_quantile`, TRL's; Wang et al. 2025 use 0.2): for algorithms whose loss has
    the option (grpo, dr_grpo, dapo, cispo); others refuse it, naming their loss.
    samples_every: k > 0 writes every k-th iteration's samples (text, rewards, each reward function's
    reward, lengths, the row's columns) to run_dir/samples/iteration-NNNNNN.jsonl
    (`rljax.metrics.read_samples`); needs a run_dir."""

    lr: float = 1e-6
    schedule: str = "constant"
    batch_size: int = 4
    overlong: str = "truncate_prompt"
    algorithm: Any = "grpo"
    n: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    kl_coef: float | None = None
    epochs: int = 1
    minibatches: int = 1
    max_refills: int = 0
    track_kl: bool = True
    head_lr: float = 1e-3
    baseline_decay: float = 0.9
    reward_call: RewardCallConfig = dataclasses.field(default_factory=RewardCallConfig)
    reward_format: str = "auto"
    samples_every: int = 0
    mask_truncated: bool = False
    top_entropy_quantile: float = 1.0
    ref_sync_every: int = 0
    ref_sync_alpha: float = 0.6
    eval_samples: int = 0
    scale_rewards: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.scale_rewards not in (None, "group", "batch", "none"):
            raise ValueError(f"GRPOTaskConfig.scale_rewards: 'group', 'batch', 'none' or None (the algorithm's), got "
                             f"{self.scale_rewards!r}")
        if self.eval_samples < 0:
            raise ValueError(f"GRPOTaskConfig.eval_samples: must be >= 0 (0: greedy), got {self.eval_samples}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"GRPOTaskConfig.top_entropy_quantile: must be in (0, 1] (1: every token), got "
                             f"{self.top_entropy_quantile}")
        if self.reward_format not in REWARD_FORMATS:
            raise ValueError(f"GRPOTaskConfig.reward_format: one of {REWARD_FORMATS}, got {self.reward_format!r}")
        if self.samples_every < 0:
            raise ValueError(f"GRPOTaskConfig.samples_every: must be >= 0 (0: none), got {self.samples_every}")
        if self.overlong not in ("error", "drop", "truncate_prompt"):
            raise ValueError(f"GRPOTaskConfig.overlong: one of 'error', 'drop', 'truncate_prompt' (an RL row is a "
                             f"prompt; its completion is sampled), got {self.overlong!r}")
        if self.minibatches >= 1 and self.batch_size >= 1 and self.n >= 1 \
                and (self.batch_size * self.n) % self.minibatches:
            raise ValueError(f"GRPOTaskConfig.minibatches: {self.minibatches} does not divide the "
                             f"{self.batch_size * self.n} rows an iteration samples (batch_size {self.batch_size} x "
                             f"n {self.n})")

    def rl_config(self, tokenizer):
        from rljax.rl import RLConfig
        from rljax.transforms import moving_average_baseline

        algo = get_algorithm(self.algorithm)
        if self.kl_coef is not None:
            algo = algo.with_kl_coef(self.kl_coef)
        if self.top_entropy_quantile != 1.0:
            algo = algo.with_config(top_entropy_quantile=self.top_entropy_quantile)
        if self.scale_rewards is not None:
            from rljax.estimators import GroupAdvantageConfig

            adv = algo.estimator.config
            if not isinstance(adv, GroupAdvantageConfig):
                raise ValueError(f"GRPOTaskConfig.scale_rewards: {algo.name}'s estimator ({algo.estimator.name}) has no "
                                 "group scale; it applies to algorithms with group advantages (grpo, dr_grpo, dapo, "
                                 "gspo, cispo)")
            algo = algo.with_config(advantage=dataclasses.replace(
                adv, scale_by_std=self.scale_rewards != "none",
                std_scope="batch" if self.scale_rewards == "batch" else "group"))
        opt = dataclasses.replace(self.optimizer(), head_lr=self.head_lr)
        return RLConfig(algorithm=algo, sampling=SampleConfig(max_new_tokens=self.max_new_tokens, n=self.n,
                                                              temperature=self.temperature, top_p=self.top_p,
                                                              top_k=self.top_k, min_p=self.min_p,
                                                              repetition_penalty=self.repetition_penalty,
                                                              **tokenizer_ids(tokenizer)),
                        optimizer=opt, epochs=self.epochs, minibatches=self.minibatches, track_kl=self.track_kl,
                        truncate_prompts=True, max_refills=self.max_refills, reward_call=self.reward_call,
                        mask_truncated=self.mask_truncated, ref_sync_every=self.ref_sync_every,
                        ref_sync_alpha=self.ref_sync_alpha,
                        transforms=(moving_average_baseline(self.baseline_decay),) if algo.needs().baseline else ())


@dataclass(frozen=True)
class TaskResult:
    """params: the trained parameters (GRPO: the policy's); metrics: the last logged step's metrics
    (names without the phase prefix, e.g. "loss", "reward_mean"; {} when no step ran, steps=0); history:
    every logged step's metrics with its "step"; model, tokenizer: as used; state: the final TrainState /
    RLState; run_dir: where the run was written (None when none was given: a temporary directory held it
    and is gone); eval_metrics, eval_history: the last evaluation on eval_data and every one with its
    "step" (names without the "<phase>/eval/" prefix; {} and [] without eval_data)."""

    params: Any
    metrics: dict
    history: list
    model: Model
    tokenizer: Any
    state: Any
    run_dir: str | None
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    eval_history: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- model and data
def load_model(model, *, dtype: str | None = None, max_seq_len: int | None = None, head: str | None = None,
               mesh=None):
    """(Model, params, tokenizer) from an HF checkpoint directory / hub id, or a (Model, params, tokenizer)
    tuple as it is; `head` ("reward", "value") is added zero-initialised when the model lacks it. mesh: the
    Model's mesh (a checkpoint's params loaded onto it; a tuple's params are placed on it by the state
    that trains them); None: a tuple's own, none for a checkpoint."""
    if isinstance(model, (str, os.PathLike)):
        from rljax.models.hf import load_pretrained, resolve_path
        from rljax.tokenizer import HFTokenizer

        path = resolve_path(os.fspath(model))
        tok = HFTokenizer.from_pretrained(path)
        arch, params = load_pretrained(path, dtype=dtype, mesh=mesh,
                                       config_overrides={} if max_seq_len is None else {"max_seq_len": max_seq_len})
        if arch.vocab_size < tok.vocab_size:
            raise ValueError(f"{path}: config.json vocab_size={arch.vocab_size} is smaller than the tokenizer's "
                             f"{tok.vocab_size} ids")
        m = Model(arch, mesh)
    else:
        try:
            m, params, tok = model
        except (TypeError, ValueError):
            raise TypeError("model must be an HF checkpoint path or a (Model, params, tokenizer) tuple, got "
                            f"{type(model).__name__}") from None
        if not isinstance(m, Model) or not hasattr(tok, "encode"):
            got = ", ".join(type(x).__name__ for x in model)
            raise TypeError(f"model: expected a (Model, params, tokenizer) tuple in that order, got ({got})")
        if m.config.vocab_size < tok.vocab_size:  # ids past the embedding table would give NaN losses
            raise ValueError(f"model: the Model's vocab_size={m.config.vocab_size} is smaller than the tokenizer's "
                             f"{tok.vocab_size} ids; build the Model with vocab_size >= {tok.vocab_size}")
        if dtype is not None or max_seq_len is not None:
            raise ValueError("dtype, max_seq_len: they apply to a model loaded from a checkpoint; a (Model, params, "
                             "tokenizer) tuple is used as built, so build its Model with the dtype and max_seq_len "
                             "wanted (or leave these None)")
        if mesh is not None:
            m = dataclasses.replace(m, mesh=mesh)
    if head is not None:
        m, params = add_head(m, params, head)
    return m, params, tok


def _rows(data) -> list[dict]:
    """The data set's rows as dicts (a list is kept as given, so each row is validated on its own; local
    JSON files are read as written, like a list: `datasets` would unify a column's types)."""
    if isinstance(data, (list, tuple)):
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise DataError(f"row {i}: expected a dict, got {type(row).__name__}")
        rows = [dict(r) for r in data]
    else:
        rows = _local_json_rows(data)
        if rows is None:
            rows = load_records(data).to_list()
    if not rows:
        raise DataError("the data set has no rows")
    return rows


def _columns(rows: Sequence[Mapping]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _use_chat(tok, cfg: TaskConfig) -> bool:
    has = getattr(tok, "chat_template", None) is not None
    if cfg.chat_template and not has:
        raise ValueError(f"chat_template=True, but the tokenizer {tok!r} has no chat template")
    use = has if cfg.chat_template is None else bool(cfg.chat_template)
    if use and callable(getattr(tok, "get_chat_template", None)):
        # A template that cannot be chosen or does not compile is no row's fault: raised here as it is,
        # before any row, so that an error `_render` sees is one row's.
        compile_chat_template(tok.get_chat_template())
    return use


def _render(tok, messages: list[dict], row: int, *, add_generation_prompt: bool) -> str:
    """The chat template applied to row `row`'s messages. A template that raises on them (Jinja's
    raise_exception, e.g. "roles must alternate") is a DataError naming the row, which the builders
    (`_locating`) turn into its file and line, as for any other bad row."""
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as e:
        raise DataError(f"row {row}: {e}") from e


def _messages(value, row: int, field: str) -> list[dict]:
    """A prompt given as a string (one user message) or a list of {role, content} messages, validated."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence) or not value:
        raise DataError(f"row {row}: field {field!r} must be a string or a non-empty list of messages, "
                        f"got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"row {row}: field '{field}[{j}]' must be a dict with 'role' and 'content'")
        role = _check_role(m.get("role"), f"{field}[{j}].role", row)
        out.append({"role": role, "content": _check_str(m.get("content"), f"{field}[{j}].content", row,
                                                        allow_empty=True)})
    return out


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` after a system message of `system_prompt`, unless they start with their own."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _prompt_text(tok, messages: list[dict], chat: bool, system_prompt: str | None, plain: str | None = None,
                 row: int = 0) -> str:
    """The text of a prompt: the chat template with the generation prompt (errors naming row `row`), or
    `plain` (a string prompt) when there is no template and no system prompt, else `simple_template`."""
    messages = _with_system(messages, system_prompt)
    if chat:
        return _render(tok, messages, row, add_generation_prompt=True)
    if plain is not None and not system_prompt:
        return plain
    return simple_template([Message(m["role"], m["content"]) for m in messages])


def _completion_text(value, row: int, field: str):
    """A completion given as a list of messages is its last message's content; other values as they are
    (the adapters' schemas check them)."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], Mapping):
        return value[-1].get("content")
    return value


def _rendered(tok, rows: list[dict], fields: Sequence[str], cfg: TaskConfig) -> list[dict]:
    """Rows with the prompt rendered to text (see the module docstring) and message-list completions in
    `fields` replaced by their last message's content; missing or malformed prompts raise DataError."""
    chat = _use_chat(tok, cfg)
    out = []
    for i, row in enumerate(rows):
        prompt = _get(i, row, "prompt")
        msgs = _messages(prompt, i, "prompt")
        new = dict(row, prompt=_prompt_text(tok, msgs, chat, cfg.system_prompt,
                                            prompt if isinstance(prompt, str) else None, row=i))
        for f in fields:
            if f in new:
                new[f] = _completion_text(new[f], i, f)
        out.append(new)
    return out


def _chats(rows: list[dict], cfg: TaskConfig) -> list[list[dict]]:
    """The messages each {prompt, ...} row's prompt was rendered from (`_rendered`), system prompt included."""
    return [_with_system(_messages(_get(i, row, "prompt"), i, "prompt"), cfg.system_prompt)
            for i, row in enumerate(rows)]


def _check_continuation(tok, chats: Sequence[list[dict]], prompts: Sequence[str],
                        completions: Sequence[Sequence[str]], names: Sequence[str], where: Callable[[int], str]
                        ) -> None:
    """Warn when the chat template does not render a row's whole conversation (its messages, then the
    completion as the assistant's reply) as the text trained on: the rendered prompt, then the completion.
    A template that ignores add_generation_prompt does not: the completion would be joined onto the last
    turn without the assistant's header, a format the model never sees. One warning names the first such
    row (file and line, `where`) and counts them. A warning, not an error: templates also trim or rewrite
    an assistant's text (drop its reasoning, add an empty think block), which a run may accept."""
    bad = []
    for i, (msgs, prompt, cs) in enumerate(zip(chats, prompts, completions)):
        for name, c in zip(names, cs):
            try:
                full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}])
            except ChatTemplateError as e:  # the prompt rendered, so the row trains as before: warn, not fail
                full = e
            # Leading and trailing white space aside: templates may trim a reply (Llama 3's `| trim`).
            if isinstance(full, Exception) or not (full.startswith(prompt)
                                                   and full[len(prompt):].lstrip().startswith(c.strip())):
                bad.append((i, name, c, full))
                break
    if not bad:
        return
    i, name, c, full = bad[0]
    prompt = prompts[i]
    if isinstance(full, Exception):
        how = f"it raises on the whole conversation ({full})"
    elif full.startswith(prompt):
        how = f"after the rendered prompt it writes {full[len(prompt):][:60]!r}, not the {name} {c[:40]!r}"
    else:
        k = len(os.path.commonprefix([prompt, full]))
        how = (f"it does not begin with the rendered prompt (they part after {k} characters: the prompt goes on "
               f"{prompt[k:k + 40]!r}, the conversation {full[k:k + 40]!r})")
    warnings.warn(f"{where(i)}: the chat template renders the conversation ending in the {name} as the "
                  f"assistant's reply differently from the text trained on (the prompt rendered with "
                  f"add_generation_prompt, then the {name}): {how}. A template that ignores add_generation_prompt "
                  f"joins the reply onto the last turn without the assistant's header. {len(bad)} of {len(chats)} "
                  f"rows.", stacklevel=4)


def _template_keep(tok, messages: list[dict], prompt_ids: Sequence[int]) -> int:
    """How many leading tokens of a chat prompt (`prompt_ids`, rendered from `messages`) are the template's
    own text before the first message's content (bos, the first header, a system message the template
    adds), which overlong="truncate_prompt" must keep: found as the common start of two renderings that
    differ only in that content, tokenized, and its common start with `prompt_ids` (a token that merges
    across the boundary is not kept whole, so may be cut)."""
    a, b = (tok.apply_chat_template([dict(messages[0], content=mark)] + messages[1:], add_generation_prompt=True)
            for mark in ("\x01", "\x02"))
    head = tok.encode(os.path.commonprefix([a, b]), add_bos=False, add_eos=False)
    return len(os.path.commonprefix([list(head), list(prompt_ids)]))


def _max_length(cfg: TaskConfig, model: Model) -> int:
    return cfg.max_length if cfg.max_length is not None else model.config.max_seq_len


@contextlib.contextmanager
def _row_errors():
    """A collator's check run while the data set is built raises a ValueError naming the row ("row 3: ...", e.g.
    text the tokenizer cannot encode, `encode_text`); it is raised again as a DataError (chained), which the
    builders (`_locating`) name by the row's file and line, as any other bad row."""
    try:
        yield
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e)) from e


def _encoded(tok, prompts: Sequence[str], completions: Sequence[Sequence[str]], *, add_bos: bool,
             names: Sequence[str]) -> list[tuple[list[int], list[list[int]]]]:
    """Each example as ([bos] prompt ids, [completion ids + eos, ...]); text the tokenizer cannot encode is a
    DataError naming the row and the field (the prompt, or the completion's name in `names`)."""
    with _row_errors():
        return [(encode_text(tok, p, i, "prompt", add_bos=add_bos, add_eos=False),
                 [encode_text(tok, c, i, name, add_bos=False, add_eos=True) for name, c in zip(names, cs)])
                for i, (p, cs) in enumerate(zip(prompts, completions))]


def _check_pairs(data, examples, kept: Sequence[int], fitted, max_length: int | None) -> None:
    """Each kept (chosen, rejected) pair of `fit_lengths` must differ as fitted tokens (their texts differ,
    `preference_pairs`), else the pair says nothing: a DataError naming the first such row's file and line,
    saying whether the truncation to max_length made them equal (the texts differ only past the cut) or the
    tokenizer encodes both alike. `examples` are the pairs before fitting."""
    for i, (_, completions) in zip(kept, fitted):
        if list(completions[0]) == list(completions[1]):
            whole = examples[i][1]
            why = (f"the same tokens after truncation to max_length={max_length}; raise max_length or drop the row"
                   if list(whole[0]) != list(whole[1]) else "different texts that the tokenizer encodes as the same "
                   "tokens, so the pair says nothing")
            raise DataError(f"{row_locator(data)(i)}: chosen and rejected are {why}")


def _fitted(tok, data, prompts: Sequence[str], completions: Sequence[Sequence[str]], cfg: TaskConfig, *,
            max_length: int | None, add_bos: bool, names=None, allowed=None,
            chats: Sequence[list[dict]] | None = None) -> tuple[list[int], list[tuple]]:
    """Each example (a prompt and its completions) tokenized ([bos] prompt, completion eos) and fitted to
    max_length by cfg.overlong when the data set is built (`rljax.data.lengths.fit_lengths`): (indices kept,
    (Tokens(prompt), [Tokens(completion), ...]) for each). Errors name the row's file and line in `data`:
    text the tokenizer cannot encode (naming the field: the prompt, or the completion's name in `names`),
    a row too long, and, for names ("chosen", "rejected"), a pair fitted to the same tokens (`_check_pairs`).
    chats: the messages of chat-template prompts, whose template text before the first message's content
    (`_template_keep`) overlong="truncate_prompt" keeps, as it keeps bos."""
    examples = _encoded(tok, prompts, completions, add_bos=add_bos, names=names or ("completion",))

    def template_keep(i: int) -> int:  # the template's own leading text differs by row (its first role, a system)
        return _template_keep(tok, chats[i], examples[i][0])

    keep = template_keep if chats is not None and cfg.overlong == "truncate_prompt" else \
        len(tok.encode("", add_bos=add_bos, add_eos=False))  # only a prompt truncation reads keep
    # an example without completions (RL prompts) is measured by its prompt alone
    kept, fitted, _ = fit_lengths([(p, cs or [[]]) for p, cs in examples], max_length=max_length,
                                  overlong=cfg.overlong, keep=keep, where=row_locator(data), names=names,
                                  **({} if allowed is None else {"allowed": allowed}))
    if tuple(names or ()) == ("chosen", "rejected"):
        _check_pairs(data, examples, kept, fitted, max_length)
    return kept, [(Tokens(p), [Tokens(c) for c in cs]) for p, cs in fitted]


def _locating(fn):
    """A batch builder whose row errors name the file and line of the row when `data` is a path."""
    @functools.wraps(fn)
    def wrapper(tok, data, *args, **kwargs):
        with located(data):
            return fn(tok, data, *args, **kwargs)
    return wrapper


@_locating
def sft_batches(tok, data, cfg: TaskConfig, *, max_length: int | None = None) -> BatchIterator:
    """SFT batches: SequenceBatch [batch_size, T] (T bucketed, <= max_length) of [bos] prompt completion eos
    with the loss on the completion and eos. Rows {prompt, completion} or {messages} (the last message
    the assistant's reply to learn; with no `completion` column a `prompt` column beside `messages`, as in
    UltraChat's {prompt, prompt_id, messages}, is left aside, as TRL does). Rows are tokenized and checked
    against max_length here, once (cfg.overlong); with a chat template, a row whose conversation the
    template renders otherwise than prompt then completion is warned of (`_check_continuation`)."""
    rows = _rows(data)
    chat = _use_chat(tok, cfg)
    columns = _columns(rows)
    if "messages" in columns and "completion" not in columns:
        pairs, chats = [], []
        for i, c in enumerate(chat_messages(rows)):
            msgs = [{"role": m.role, "content": m.content} for m in c.messages[:-1]]
            if chat:
                msgs = _with_system(msgs or [{"role": "user", "content": ""}], cfg.system_prompt)
                prompt = _render(tok, msgs, i, add_generation_prompt=True)
            else:
                sys = [Message("system", cfg.system_prompt)] if cfg.system_prompt and (
                    not msgs or msgs[0]["role"] != "system") else []
                prompt = simple_template(sys + list(c.messages[:-1]))
            pairs.append((prompt, c.messages[-1].content))
            chats.append(msgs)
    else:
        pairs = [(p.prompt, p.completion) for p in prompt_completion(_rendered(tok, rows, ["completion"], cfg))]
        chats = _chats(rows, cfg) if chat else None
    if chat:
        _check_continuation(tok, chats, [p for p, _ in pairs], [[c] for _, c in pairs], ["completion"],
                            row_locator(data))
    length = max_length or cfg.max_length
    _, fitted = _fitted(tok, data, [p for p, _ in pairs], [[c] for _, c in pairs], cfg, max_length=length,
                        add_bos=not chat, chats=chats if chat else None)
    pairs = [(p, cs[0]) for p, cs in fitted]
    collate = functools.partial(collate_prompt_completion, tok, max_length=length, add_bos=not chat, add_eos=True)
    return BatchIterator(pairs, cfg.batch_size, collate, seed=cfg.seed)


@_locating
def reward_batches(tok, data, cfg: TaskConfig, *, max_length: int | None = None,
                   share_prompt: bool = False) -> tuple[BatchIterator, str]:
    """(batches, kind): kind "pairs" — RankingBatch [batch_size, 2, T] (chosen rank 0, rejected rank 1; a
    "margin" column fills RankingBatch.margin; share_prompt: the shared-prompt layout [batch_size, W]) from
    {prompt, chosen, rejected} rows — or "scores" — ScoreBatch [batch_size, T] with scores [batch_size]
    from {prompt, response, score} rows."""
    rows = _rows(data)
    chat = _use_chat(tok, cfg)
    length = max_length or cfg.max_length
    chats = _chats(rows, cfg) if chat else None
    if "score" in _columns(rows) and "chosen" not in _columns(rows):
        scored = [(r.prompt, r.response, r.score) for r in
                  scored_responses(_rendered(tok, rows, ["response"], cfg))]
        if chat:
            _check_continuation(tok, chats, [p for p, _, _ in scored], [[r] for _, r, _ in scored], ["response"],
                                row_locator(data))
        kept, fitted = _fitted(tok, data, [p for p, _, _ in scored], [[r] for _, r, _ in scored], cfg,
                               max_length=length, add_bos=not chat, names=("response",), chats=chats)
        scored = [(p, cs[0], scored[i][2]) for i, (p, cs) in zip(kept, fitted)]
        collate = functools.partial(collate_scored, tok, max_length=length, add_bos=not chat)
        return BatchIterator(scored, cfg.batch_size, collate, seed=cfg.seed), "scores"
    rendered = _rendered(tok, rows, ["chosen", "rejected"], cfg)
    pairs = preference_pairs(rendered)
    with _row_errors():  # checked here, as the collator does, not first in the batch that holds the row
        margins = [None if r.get("margin") is None else _finite(r["margin"], f"row {i}: margin")
                   for i, r in enumerate(rendered)]
    if chat:
        _check_continuation(tok, chats, [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs],
                            ["chosen", "rejected"], row_locator(data))
    kept, fitted = _fitted(tok, data, [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs], cfg,
                           max_length=length, add_bos=not chat, names=("chosen", "rejected"), chats=chats)
    items = [((p, *cs), margins[i]) for i, (p, cs) in zip(kept, fitted)]

    def collate(batch):
        ms = [m for _, m in batch]
        return collate_pairs(tok, [p for p, _ in batch], margins=None if all(m is None for m in ms) else
                             [0.0 if m is None else m for m in ms], max_length=length, add_bos=not chat,
                             share_prompt=share_prompt)

    return BatchIterator(items, cfg.batch_size, collate, seed=cfg.seed), "pairs"


def _fitted_preferences(tok, data, prompts: Sequence[str], completions: Sequence[Sequence[str]], cfg, *,
                        max_length: int | None, add_bos: bool, names: Sequence[str] = ("chosen", "rejected"),
                        chats: Sequence[list[dict]] | None = None) -> tuple[list[int], list[int]]:
    """(indices of the rows kept by cfg.overlong, each row's prompt_keep), measured as `collate_preferences`
    (names chosen, rejected) and `collate_kto` (completion) build them ([bos], the prompt cut to
    cfg.max_prompt_length tokens, each completion and eos); the texts stay as they are, since a kept row is
    either short enough or truncated by the collator the same way ("truncate_completion"). chats: the
    messages of chat-template prompts, whose template text before the first message's content
    (`_template_keep`) the prompt's cut keeps (prompt_keep; 0 without a template).
    Errors name the row's file and line: text the tokenizer cannot encode, a row too long, a pair
    truncated to the same tokens (`_check_pairs`), a max_prompt_length within the template's own text."""
    bos = tok.encode("", add_bos=add_bos, add_eos=False)
    n = cfg.max_prompt_length
    examples, keeps = [], []
    encoded = _encoded(tok, prompts, completions, add_bos=False, names=names)
    for i, (prompt, completions) in enumerate(encoded):
        keep = 0
        if n is not None and len(prompt) > n:
            keep = 0 if chats is None else _template_keep(tok, chats[i], prompt)
            if keep >= n:
                raise DataError(f"{row_locator(data)(i)}: max_prompt_length={n} leaves no room for the prompt's text "
                                f"after the chat template's {keep} leading tokens; raise max_prompt_length")
            prompt = cut_prompt(prompt, n, keep)
        examples.append((bos + prompt, completions))
        keeps.append(keep)
    kept, fitted, _ = fit_lengths(examples, max_length=max_length, overlong=cfg.overlong, keep=len(bos),
                                  where=row_locator(data), names=tuple(names),
                                  allowed=("error", "drop", "truncate_completion"))
    if tuple(names) == ("chosen", "rejected"):
        _check_pairs(data, examples, kept, fitted, max_length)
    return kept, keeps


@_locating
def preference_batches(tok, data, cfg: DPOTaskConfig, *, max_length: int | None = None) -> BatchIterator:
    """PreferenceBatch [batch_size, 2, T] (chosen at 0, rejected at 1; with cfg.share_prompt the
    shared-prompt layout [batch_size, W]) from {prompt, chosen, rejected} rows,
    with optional "weight" and "label" columns (per-pair weight, soft label); the prompt is cut from the
    left to max_prompt_length tokens, then, with cfg.overlong="truncate_completion", the completion to fit
    max_length (the collator's own truncation; "error" and "drop" are decided here, when the data set is
    built, and every policy's count is reported here)."""
    rows = _rows(data)
    rendered = _rendered(tok, rows, ["chosen", "rejected"], cfg)
    pairs = preference_pairs(rendered)
    chat = _use_chat(tok, cfg)
    if chat:
        _check_continuation(tok, _chats(rows, cfg), [p.prompt for p in pairs],
                            [[p.chosen, p.rejected] for p in pairs], ["chosen", "rejected"], row_locator(data))
    with _row_errors():  # checked here, as the collator does, not first in the batch that holds the row
        for i, r in enumerate(rendered):
            for field in ("weight", "label"):
                _weight_or_label(i, r.get(field), field)
    length = max_length or cfg.max_length
    kept, keeps = _fitted_preferences(tok, data, [p.prompt for p in pairs], [(p.chosen, p.rejected) for p in pairs],
                                      cfg, max_length=length, add_bos=not chat,
                                      chats=_chats(rows, cfg) if chat else None)
    items = [dict(prompt=pairs[i].prompt, chosen=pairs[i].chosen, rejected=pairs[i].rejected,
                  weight=rendered[i].get("weight"), label=rendered[i].get("label"), prompt_keep=keeps[i])
             for i in kept]
    collate = functools.partial(collate_preferences, tok, max_length=length,
                                max_prompt_length=cfg.max_prompt_length, add_bos=not chat,
                                share_prompt=cfg.share_prompt)
    return BatchIterator(items, cfg.batch_size, collate, seed=cfg.seed)


@_locating
def kto_batches(tok, data, cfg: KTOTaskConfig, *, max_length: int | None = None) -> BatchIterator:
    """KTOBatch [batch_size, 2, T] (each row at 0, its prompt with the next row's completion at 1: z0's mismatched
    pairs, `collate_kto`) from {prompt, completion, label} rows (label: a bool or 0/1, True for a desirable
    completion); truncation and overlong as `preference_batches`. Errors name the row's file and line."""
    rows = _rows(data)
    for i, r in enumerate(rows):
        _get(i, r, "completion")
        _get(i, r, "label")
    rendered = _rendered(tok, rows, ["completion"], cfg)
    with _row_errors():
        desirable = [_desirable(i, r["label"]) for i, r in enumerate(rendered)]
    for i, r in enumerate(rendered):
        _check_str(r["completion"], "completion", i, allow_empty=False)
    prompts, completions = [r["prompt"] for r in rendered], [[r["completion"]] for r in rendered]
    chat = _use_chat(tok, cfg)
    if chat:
        _check_continuation(tok, _chats(rows, cfg), prompts, completions, ["completion"], row_locator(data))
    length = max_length or cfg.max_length
    kept, keeps = _fitted_preferences(tok, data, prompts, completions, cfg, max_length=length, add_bos=not chat,
                                      names=("completion",), chats=_chats(rows, cfg) if chat else None)
    items = [dict(prompt=prompts[i], completion=completions[i][0], desirable=desirable[i], prompt_keep=keeps[i])
             for i in kept]
    if len(items) < 2:
        raise DataError(f"{len(items)} row(s) kept: KTO's batches need at least 2 (z0 reads mismatched pairs)")
    collate = functools.partial(collate_kto, tok, max_length=length, max_prompt_length=cfg.max_prompt_length,
                                add_bos=not chat)
    return BatchIterator(items, cfg.batch_size, collate, seed=cfg.seed)


_RESERVED = ("params", "prompt_tokens", "prompt_mask", "key", "refill", "state", "prompts", "completions",
             *TRL_KEYWORDS)
# The metadata column that carries each prompt's messages to conversational reward functions
# (`conversational_rewards` takes it off again): not a name a data set may use.
MESSAGES_COLUMN = "rljax_prompt_messages"


@dataclass(frozen=True)
class _Prompts:
    """batch_at(position) -> PromptBatch: tokens, mask [batch_size, P] (left-padded) and the extra columns
    as per-prompt lists; reward_format: "text" or "conversational" (then the metadata also hold each
    prompt's messages under MESSAGES_COLUMN)."""

    batches: BatchIterator
    reward_format: str = "text"

    def batch_at(self, position: int) -> PromptBatch:
        return self.batches.batch_at(position)


def _resolve_reward_format(rows: list[dict], wanted: str) -> str:
    """"text" or "conversational" for these rows (`GRPOTaskConfig.reward_format`; "auto" by their prompts)."""
    if wanted != "auto":
        return wanted
    is_text = [isinstance(_get(i, row, "prompt"), str) for i, row in enumerate(rows)]
    if not any(is_text):
        return "conversational"
    if all(is_text):
        return "text"
    raise DataError(f"row {is_text.index(False)}: its prompt is a list of messages, but row {is_text.index(True)}'s "
                    "is a string; with GRPOTaskConfig.reward_format='auto' the reward functions would get prompts and completions "
                    "in two formats: make the prompts alike, or set reward_format to 'text' or 'conversational'")


def conversational_rewards(reward_fn: Callable) -> Callable:
    """`reward_fn` (a function or a `RewardSum`, term by term, so each keeps its name and metrics) called as TRL
    calls it on conversational data: prompts = each prompt's messages (metadata column MESSAGES_COLUMN, taken
    off the columns it is given), completions = [[{"role": "assistant", "content": text}], ...]."""
    if isinstance(reward_fn, RewardSum):
        return RewardSum(tuple((w, conversational_rewards(f)) for w, f in reward_fn.terms))
    if getattr(reward_fn, "reads_text", False):  # a reward model: it reads the text its tokenizer encodes
        return reward_fn

    @functools.wraps(reward_fn)  # its signature is reward_fn's, so `call_reward` calls this as it would reward_fn
    def call(prompts=None, completions=None, **columns):  # each given when reward_fn takes it
        messages = columns.pop(MESSAGES_COLUMN)
        turns = None if completions is None else [[{"role": "assistant", "content": c}] for c in completions]
        return call_reward(reward_fn, [list(m) for m in messages], turns, **columns)

    return call


@_locating
def prompt_batches(tok, data, cfg: TaskConfig, *, max_length: int | None = None):
    """RL prompts: an object with batch_at(position) -> PromptBatch(tokens, mask [batch_size, P] left-padded,
    metadata {column: list}) over {prompt, ...} rows; every column but "prompt" is metadata for the reward
    functions (a row without it gives None). The prompts are tokenized when the data set is built (text the
    tokenizer cannot encode is a DataError naming the row's file and line) and fitted to max_length by
    cfg.overlong ("error", "drop" or "truncate_prompt": the prompt's last tokens, after its bos or its chat
    template's own leading text; None: no limit). cfg.reward_format (GRPOTaskConfig's; "text" for other
    configs): "conversational" adds each prompt's messages (cfg.system_prompt first) to the metadata
    (MESSAGES_COLUMN) for `conversational_rewards`."""
    rows = _rows(data)
    columns = [c for c in _columns(rows) if c != "prompt"]
    clash = [c for c in columns if c in _RESERVED + (MESSAGES_COLUMN,)]
    if clash:
        raise DataError(f"column(s) {clash} clash with the RL iteration's arguments; rename them")
    rendered = _rendered(tok, rows, [], cfg)
    for i, r in enumerate(rendered):
        _check_str(r["prompt"], "prompt", i, allow_empty=False)
    reward_format = _resolve_reward_format(rows, getattr(cfg, "reward_format", "text"))
    if reward_format == "conversational":
        columns.append(MESSAGES_COLUMN)
        rendered = [dict(r, **{MESSAGES_COLUMN: m}) for r, m in zip(rendered, _chats(rows, cfg))]
    chat = _use_chat(tok, cfg)
    kept, fitted = _fitted(tok, data, [r["prompt"] for r in rendered], [[] for _ in rendered], cfg,
                           max_length=max_length, add_bos=not chat, names=("prompt",),
                           allowed=("error", "drop", "truncate_prompt"), chats=_chats(rows, cfg) if chat else None)
    items = [(list(ids), rendered[i]) for i, (ids, _) in zip(kept, fitted)]

    def collate(batch):
        rows = [ids for ids, _ in batch]
        tokens, mask = pad_rows(rows, max(map(len, rows)), tok.pad_id, side="left")  # every prompt ends at the end
        return PromptBatch(tokens=tokens, mask=mask,
                           metadata={c: [r.get(c) for _, r in batch] for c in columns})

    return _Prompts(BatchIterator(items, cfg.batch_size, collate, seed=cfg.seed + 1), reward_format)


def _is_reward_model(x) -> bool:
    """A reward_funcs entry naming a reward model rather than a function: a checkpoint path or hub id, a
    (Model, params, tokenizer) tuple, or a `TaskResult` (of `reward_model`)."""
    return isinstance(x, (str, os.PathLike, TaskResult)) or (isinstance(x, tuple) and len(x) == 3
                                                             and isinstance(x[0], Model))


def reward_model_scorer(rm, *, add_bos: bool = True, dtype: str | None = None, mesh=None) -> Callable:
    """A trained reward model as a reward function (TRL's reward_funcs entry given as a model id): `rm` an HF
    ...ForSequenceClassification checkpoint directory or hub id, a (Model, params, tokenizer) tuple whose model
    has a reward head, or the `TaskResult` of `reward_model`. It reads each prompt's text and completion as the
    `reward_model` task read its rows ([bos when add_bos] prompt completion eos, in the reward model's own
    tokenizer; add_bos False for chat-templated prompts, whose text holds what the template writes first) and
    returns the head at the last token (`rewards.reward_model_reward`; a row longer than the reward model's
    context loses prompt tokens from the left). Named after the checkpoint's directory ("reward_model" for a
    tuple or result), which names its metrics (`reward_<name>_mean`); called with the prompts as text in either
    reward_format (`conversational_rewards` leaves it alone). dtype, mesh: as `load_model`'s, for a checkpoint."""
    from rljax.rewards.learned import reward_model_reward

    name = "reward_model"
    if isinstance(rm, TaskResult):
        rm = (rm.model, rm.params, rm.tokenizer)
    elif isinstance(rm, (str, os.PathLike)):
        name = os.path.basename(os.path.normpath(os.fspath(rm))) or name
    m, params, tok = load_model(rm, dtype=dtype, mesh=mesh) if isinstance(rm, (str, os.PathLike)) else load_model(rm)
    if "reward" not in m.config.heads:
        raise ValueError(f"reward function {name!r}: the model has no reward head; a reward model is an HF "
                         "...ForSequenceClassification checkpoint, the result of rljax.recipes.reward_model, or a "
                         "(Model, params, tokenizer) whose Model has heads including 'reward'")
    scorer = reward_model_reward(m, params, tok, add_bos=add_bos, overlong="truncate_prompt")
    scorer.__name__ = name
    scorer.reads_text = True  # `conversational_rewards` passes it the text
    return scorer


def combine_rewards(reward_funcs, *, reward_models: Callable[[Any], Callable] | None = None) -> Callable:
    """One reward function from `fn`, a list of functions (summed) or of (weight, fn) pairs (weighted sum, TRL's
    reward_weights); each is called as fn(prompts, completions, **metadata) -> [R] rewards (TRL's signature).
    A sum is a `RewardSum`: the RL iteration reports each function's mean (`reward_<name>_mean`), and a
    function may return None for a sample it does not apply to, as in TRL. reward_models(entry) -> fn turns an
    entry naming a reward model (`_is_reward_model`: a path or hub id, a (Model, params, tokenizer), a
    `TaskResult`) into its function (`grpo` passes `reward_model_scorer`); without it such an entry is an error."""
    def term(f):
        if not _is_reward_model(f):
            return f
        if reward_models is None:
            raise TypeError(f"reward function {f!r}: a reward model given here needs reward_models= "
                            "(rljax.recipes.grpo builds its scorer)")
        return reward_models(f)

    if callable(reward_funcs) or _is_reward_model(reward_funcs):
        return term(reward_funcs)
    terms = [(f[0], term(f[1])) if isinstance(f, tuple) and len(f) == 2 else (1.0, term(f)) for f in reward_funcs]
    if len(terms) == 1 and terms[0][0] == 1.0 and callable(terms[0][1]):
        return terms[0][1]
    return RewardSum(tuple(terms))


# ----------------------------------------------------------------------------- running
def _describe(x) -> Any:
    """What config.json records of a model or data argument, to tell a rerun of the same run from another:
    a local path made absolute (the same folder given relative or absolute is the same input), a hub id as
    given; in-memory rows by count and a SHA-256 of their contents (rows of the same count but other
    contents are another data set); a `datasets.Dataset` by its fingerprint (its contents and the
    transforms that made it); a (Model, params, tokenizer) by size and a digest of the params."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        return os.path.abspath(path) if os.path.exists(path) else path
    if isinstance(x, (list, tuple)) and not (len(x) == 3 and isinstance(x[0], Model)):
        text = json.dumps(list(x), sort_keys=True, default=repr)
        return f"<{len(x)} rows, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}>"
    if isinstance(x, tuple):
        h = hashlib.sha256()
        digest_params(x[1], h)
        return f"<{type(x[0]).__name__} {x[0].config.num_params():,} params sha256 {h.hexdigest()[:16]}, {x[2]!r}>"
    fingerprint = getattr(x, "_fingerprint", None)  # datasets.Dataset
    return f"<{type(x).__name__}{f' of {len(x)} rows' if hasattr(x, '__len__') else ''}" \
           f"{f' fingerprint {fingerprint}' if fingerprint else ''}>"


# TaskConfig fields that say how a run is shown and how often it saves, not what it computes: a rerun that
# resumes may change them.
RESUMABLE_CHANGES = ("progress", "log_every", "checkpoint_every", "tensorboard", "wandb", "samples_every",
                     "eval_every", "eval_samples")


def _flat_record(record: dict) -> dict:
    """config.json's {task, model, data, config: {...}} as one level of fields, to compare two runs. A local
    path recorded relative (before `_describe` made paths absolute) is compared as its absolute path."""
    def path(v):
        return os.path.abspath(v) if isinstance(v, str) and not v.startswith("<") and os.path.exists(v) else v

    return {**record.get("config", {}), **{k: path(record.get(k, "<absent>")) for k in ("task", "model", "data")}}


def _field_defaults(config_type) -> dict:
    """{field: its default, as config.json holds it} of a task config's dataclass: a field added to the
    config after a run was saved is read, where that run's config.json lacks it, as its default, the
    behaviour the run had (new fields keep the old behaviour by default), so the run still resumes."""
    from rljax.cli import json_value

    out = {}
    for f in dataclasses.fields(config_type):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v := f.default_factory()) else v
    return json.loads(json.dumps(out, default=json_value))


def _claim_run_dir(d: str, task: str, record: dict, allow_change: bool, added: dict | None = None) -> None:
    """Write `record` to d/config.json, or check it against the one there: a run directory holds one run.
    Another task's run is refused; so is another configuration, model or data set (each differing field
    named) unless allow_change, which continues the run with the new values and appends them to
    config_changes.jsonl. added: {field: value} read for a config field the saved run lacks
    (`_field_defaults`)."""
    from rljax.cli import (CONFIG_CHANGES_FILE, ConfigMismatchError, config_differences, json_value, listed_changes,
                           read_before_rewrite, write_config)

    path = os.path.join(d, "config.json")
    new = json.loads(json.dumps(record, default=json_value))  # as it reads back: tuples become lists
    changes = {}
    old = read_before_rewrite(path)
    if old is not None:
        if old.get("task") != task:
            raise ConfigMismatchError(f"{task}: run_dir {d!r} holds a {old.get('task')!r} run ({path}); a run "
                                      f"directory holds one run: give the {task} run a run_dir of its own (to "
                                      f"start from that run's weights, pass its result's (model, params, "
                                      f"tokenizer) or its exported checkpoint as the model)")
        changes = config_differences(_flat_record(old), _flat_record(new), ignore=RESUMABLE_CHANGES,
                                     added=added or {})
        if changes and not allow_change:
            raise ConfigMismatchError(
                f"{task}: run_dir {d!r} holds a run with another configuration ({listed_changes(changes)}); a rerun "
                f"resumes only the same run. Give this one a new run_dir, or pass allow_change=True to continue the "
                f"saved run with the new values (recorded in {CONFIG_CHANGES_FILE}; a schedule that depends on "
                f"`steps` then differs from one uninterrupted run)")
        if not changes:
            return  # the same run: keep the file as first written
    on_main(f"{task}: writing {path}", write_config, d, new, changes)  # every process checked it; one writes


@contextlib.contextmanager
def _run_dir(run_dir, task: str, cfg, model, data, allow_change: bool = False):
    """Yield the run directory (a temporary one when None, so metrics can be read back) with config.json
    (`_claim_run_dir`: a rerun must be the same run)."""
    if run_dir is None and cfg.wandb is not None and cfg.wandb.mode == "offline":
        raise ValueError(f"{task}: an offline W&B run (cfg.wandb) is written into run_dir; pass run_dir=... "
                         f"(without one it would go to a temporary directory and be deleted)")
    if jax.process_count() > 1 and run_dir is None:
        raise ValueError(f"{task}: {jax.process_count()} processes are running: pass run_dir= on a file system they "
                         "all share (every process writes its part of the checkpoints there; a temporary directory "
                         "would be a different one on each)")
    with contextlib.ExitStack() as stack:
        d = os.fspath(run_dir) if run_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"rljax-{task}-"))
        os.makedirs(d, exist_ok=True)
        _claim_run_dir(d, task, dict(task=task, model=_describe(model), data=_describe(data),
                                     config=dataclasses.asdict(cfg)), allow_change, added=_field_defaults(type(cfg)))
        try:
            yield d
        except BaseException as e:
            if run_dir is None:  # what the loop printed about its checkpoints is about to be deleted
                e.add_note(f"{task}: run_dir=None, so its checkpoints in the temporary {d} are deleted now; pass "
                           f"run_dir=... to keep them and resume")
            raise


def _loaded(task: str, model, cfg: TaskConfig, mesh, head: str | None = None):
    """`load_model` with the task's settings; on several processes the model must have a mesh over all their
    devices (each would otherwise train a copy of its own)."""
    m, params, tok = load_model(model, dtype=cfg.dtype, max_seq_len=cfg.max_seq_len, head=head, mesh=mesh)
    if jax.process_count() > 1 and m.mesh is None:
        raise ValueError(f"{task}: {jax.process_count()} processes are running: pass mesh=make_mesh(...) over all "
                         "their devices (rljax.sharding; data x fsdp a multiple of the process count), or a Model "
                         "built with one")
    return m, params, tok


def _history(run_dir: str, name: str, prefix: str = "") -> list[dict]:
    """Metrics rows of phase `name` (prefix stripped, eval rows left out; with prefix "eval/" the eval rows
    alone), one per step, the last written."""
    sync(f"rljax.recipes: {run_dir} metrics written")  # process 0 writes them; every process reads them back
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return []
    by_step, start = {}, f"{name}/{prefix}"
    for r in read_metrics(run_dir):
        got = {k[len(start):]: v for k, v in r.items() if k.startswith(start) and (prefix or "/eval/" not in k)}
        if got:
            by_step[r["step"]] = dict(got, step=r["step"])
    return [by_step[s] for s in sorted(by_step)]


def _result(state, params, d, name, model, tok, run_dir) -> TaskResult:
    history, evals = _history(d, name), _history(d, name, "eval/")
    metrics, last_eval = ({k: v for k, v in h[-1].items() if k != "step"} if h else {} for h in (history, evals))
    return TaskResult(params=params, metrics=metrics, history=history, model=model, tokenizer=tok, state=state,
                      run_dir=None if run_dir is None else os.fspath(run_dir), eval_metrics=last_eval,
                      eval_history=evals)


def _eval_config(cfg: TaskConfig, **changes) -> TaskConfig:
    """cfg for building eval_data's rows: batch_size 1 (the builders' BatchIterator refuses fewer rows than a
    batch; `held_out_batches` cuts the batches; KTO's 2, the fewest its batches hold) and GRPO's minibatches 1
    (which must divide batch_size x n)."""
    extra = {"minibatches": 1} if isinstance(cfg, GRPOTaskConfig) else {}
    return dataclasses.replace(cfg, batch_size=2 if isinstance(cfg, KTOTaskConfig) else 1, **extra, **changes)


def held_out_batches(it: BatchIterator, model: Model, where: str, *, size: int, split: bool = True,
                     min_rows: int = 1) -> list:
    """Every example of `it` once, in order, as batches of `size` (the last one shorter): the eval
    batches of a task's eval_data. split: the batches are split over the mesh as they are (a loss's), so on
    a mesh the last batch keeps a multiple of the rows the mesh's batch axes (and the processes) split
    (`prompt_multiple`), the rest dropped with a warning naming how many; False: the caller fills them
    (prompts for `reward_eval`). min_rows: a last batch shorter than that joins the one before (KTO's
    batches need 2 rows); too few rows in all is a DataError."""
    from rljax.sampling import prompt_multiple

    examples, m = it.examples, prompt_multiple(model, 1) if split else 1
    chunks = [examples[s:s + size] for s in range(0, len(examples), size)]
    if chunks and len(chunks[-1]) % m:
        keep = len(chunks[-1]) // m * m
        warnings.warn(f"{where}: the last {len(chunks[-1]) - keep} of {len(examples)} rows are left out of the "
                      f"evaluation: the mesh splits a batch's rows {m} ways (give a multiple of {m} rows, or a "
                      f"batch_size that leaves one)", stacklevel=3)
        chunks[-1] = chunks[-1][:keep]
    chunks = [c for c in chunks if c]
    if len(chunks) > 1 and len(chunks[-1]) < min_rows:  # without a mesh (one that splits >= min_rows ways kept more)
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    if not chunks or len(chunks[0]) < min_rows:
        raise DataError(f"{where}: {len(examples)} row(s) to evaluate on; at least {min_rows} needed")
    return [it.collate(c) for c in chunks]


def sft(model, data, cfg: SFTTaskConfig = SFTTaskConfig(), *, eval_data=None, run_dir: str | None = None,
        allow_change: bool = False, mesh=None) -> TaskResult:
    """Supervised fine-tuning of `model` on `data` ({prompt, completion} or {messages} rows) for cfg.steps
    steps of cfg.batch_size rows (`rljax.phases.sft`); metrics: loss, tokens, grad_norm, ... eval_data: rows
    of the same kind, evaluated every cfg.eval_every steps and at the end (`phases.loss_eval`: the loss over
    all their completion tokens), logged as sft/eval/loss and returned as eval_metrics / eval_history."""
    m, params, tok = _loaded("sft", model, cfg, mesh)
    data_it = sft_batches(tok, data, cfg, max_length=_max_length(cfg, m))
    phase_cfg = phases.SFTPhaseConfig(optimizer=cfg.optimizer(), loop=cfg.loop())
    eval_fn = None
    if eval_data is not None:
        held = held_out_batches(sft_batches(tok, eval_data, _eval_config(cfg), max_length=_max_length(cfg, m)), m,
                                "sft: eval_data", size=cfg.batch_size)
        eval_fn = phases.loss_eval(functools.partial(sft_loss, model=m, cfg=phase_cfg.loss), held, model=m)
    state = create_state(m, phase_cfg.optimizer, jax.random.key(cfg.seed), params=params)
    with _run_dir(run_dir, "sft", cfg, model, data, allow_change) as d:
        state = phases.sft(state, data_it, phase_cfg, model=m, run_dir=d, eval_fn=eval_fn)
        return _result(state, state.params, d, "sft", m, tok, run_dir)


def reward_model(model, data, cfg: RewardModelTaskConfig = RewardModelTaskConfig(), *, eval_data=None,
                 run_dir: str | None = None, allow_change: bool = False, mesh=None) -> TaskResult:
    """A reward model: `model` with a "reward" head (added, zero-initialised, when missing) trained on
    preference pairs (Bradley–Terry) or scored responses (squared error), `rljax.phases.train_reward_model`.
    Score texts with `rljax.rewards.reward_model_reward(result.model, result.params, result.tokenizer)`.
    eval_data: rows of the same kind, evaluated every cfg.eval_every steps and at the end (the loss and
    its metrics, e.g. accuracy, over all of them: `phases.loss_eval`), logged as rm/eval/... and returned
    as eval_metrics / eval_history."""
    m, params, tok = _loaded("reward_model", model, cfg, mesh, head="reward")
    data_it, kind = reward_batches(tok, data, cfg, max_length=_max_length(cfg, m), share_prompt=cfg.share_prompt)
    loss = RankingConfig(margin=cfg.margin, centring=cfg.centring) if kind == "pairs" else PointwiseConfig()
    eval_fn = None
    if eval_data is not None:
        eval_it, eval_kind = reward_batches(tok, eval_data, _eval_config(cfg), max_length=_max_length(cfg, m),
                                            share_prompt=cfg.share_prompt)
        if eval_kind != kind:
            raise DataError(f"reward_model: eval_data holds {eval_kind} rows, but data holds {kind} rows")
        eval_fn = phases.loss_eval(functools.partial(reward_model_loss, model=m, cfg=loss),
                                   held_out_batches(eval_it, m, "reward_model: eval_data", size=cfg.batch_size),
                                   model=m)
    opt = cfg.optimizer()
    state = create_state(m, opt, jax.random.key(cfg.seed), params=params)
    with _run_dir(run_dir, "reward_model", cfg, model, data, allow_change) as d:
        state = phases.train_reward_model(state, data_it, phases.RewardModelPhaseConfig(
            loss=loss, optimizer=opt, loop=cfg.loop()), model=m, run_dir=d, eval_fn=eval_fn)
        return _result(state, state.params, d, "rm", m, tok, run_dir)


def dpo(model, data, cfg: DPOTaskConfig = DPOTaskConfig(), *, eval_data=None, run_dir: str | None = None,
        allow_change: bool = False, mesh=None) -> TaskResult:
    """DPO (or cfg.method of its family) of `model` on {prompt, chosen, rejected} rows against the frozen
    starting model (`rljax.phases.preference`); metrics: loss, accuracy, margin, chosen/rejected rewards.
    eval_data: pairs evaluated every cfg.eval_every steps and at the end (the same loss and metrics over all
    of them, against the same reference: `phases.loss_eval`), logged as preference/eval/... and returned as
    eval_metrics / eval_history."""
    return _preference_task("dpo", preference_batches, model, data, cfg, eval_data=eval_data, run_dir=run_dir,
                            allow_change=allow_change, mesh=mesh)


def _preference_task(task: str, batches: Callable, model, data, cfg, *, eval_data, run_dir, allow_change, mesh,
                     min_rows: int = 1, check: Callable | None = None) -> TaskResult:
    """The offline preference recipes (`dpo`, `kto`): cfg.loss() on `batches(tok, data, cfg, max_length=)`
    through `rljax.phases.preference` against the frozen starting model; check(batches, loss), when given,
    vets the training rows once built; eval_data's batches hold at least min_rows rows (`held_out_batches`)."""
    m, params, tok = _loaded(task, model, cfg, mesh)
    loss = cfg.loss()
    data_it = batches(tok, data, cfg, max_length=_max_length(cfg, m))
    if check is not None:
        check(data_it, loss)
    eval_fn = None
    if eval_data is not None:
        held = held_out_batches(batches(tok, eval_data, _eval_config(cfg), max_length=_max_length(cfg, m)),
                                m, f"{task}: eval_data", size=cfg.batch_size, min_rows=min_rows)
        live = loss.needs_reference
        eval_fn = phases.loss_eval(functools.partial(preference_loss, model=m, cfg=loss), held, model=m,
                                   prepare=functools.partial(with_live_reference, model=m, chunk_size=loss.chunk_size)
                                   if live else None, frozen=params if live else None)
    opt = cfg.optimizer()
    state = create_state(m, opt, jax.random.key(cfg.seed), params=params)
    with _run_dir(run_dir, task, cfg, model, data, allow_change) as d:
        state = phases.preference(state, data_it, phases.PreferencePhaseConfig(loss=loss, optimizer=opt,
                                                                               loop=cfg.loop()),
                                  model=m, reference=params, run_dir=d, eval_fn=eval_fn)
        return _result(state, state.params, d, "preference", m, tok, run_dir)


def kto(model, data, cfg: KTOTaskConfig = KTOTaskConfig(), *, eval_data=None, run_dir: str | None = None,
        allow_change: bool = False, mesh=None) -> TaskResult:
    """KTO of `model` on {prompt, completion, label} rows against the frozen starting model (`rljax.phases.preference`
    with `KTOConfig`); metrics: loss, z0, rewards_desirable / rewards_undesirable (β times the log-ratio, the mean
    over each kind), logps_desirable / logps_undesirable. eval_data: rows of the same kind, evaluated every
    cfg.eval_every steps and at the end in batches of batch_size (a last single row joins the batch before:
    z0 needs two), logged as preference/eval/... and returned as eval_metrics / eval_history."""
    def labels(batches, loss):
        """A data set without both labels is refused; λ_D n_D / (λ_U n_U) outside [1, 4/3] is warned of."""
        try:
            check_kto_weights([x["desirable"] for x in batches.examples], loss)
        except ValueError as e:
            raise DataError(f"kto: {e} (the rows' label column)") from None

    return _preference_task("kto", kto_batches, model, data, cfg, eval_data=eval_data, run_dir=run_dir,
                            allow_change=allow_change, mesh=mesh, min_rows=2, check=labels)


def reward_eval(model: Model, tok, held: Sequence[PromptBatch], reward_fn: Callable, *, max_new_tokens: int,
                call_config: RewardCallConfig | None = None, samples: int = 0, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                seed: int = 0, max_steps: int | None = None) -> Callable:
    """An eval_fn for `rljax.phases.rl`: the policy's completions of the held-out prompt batches
    (`PromptBatch`es, the same on every process), scored by reward_fn with the batches' metadata ->
    {"reward_mean", "completion_length" (tokens), and for a `RewardSum` each term's
    "reward_<name>_mean" over the samples it scored}, each a mean over every held-out completion.
    samples: 0 gives each prompt its greedy completion; k >= 1 samples k completions of each at temperature,
    top_p, top_k, min_p (batch j with key fold_in(key(seed), j): the same draws at every evaluation of the same
    params) and adds "reward_best_mean", the mean over the prompts of their best sample's reward (pass@k
    for a 0/1 correctness reward). repetition_penalty (`SampleConfig`'s; 1: off) applies to both. On a mesh a
    batch is filled with copies of its first prompt up to a
    multiple the mesh splits (`prompt_multiple`), their rows dropped. Functions taking trainer_state get
    TrainingProgress(the state's step, max_steps); what they log through log_metric is reported under its name
    (the mean of every value logged in the evaluation), what they log through log_extra is dropped."""
    from rljax.distributed import to_host
    from rljax.rewards.rules import completion_id_lists, score_with_failures, takes_completion_ids
    from rljax.sampling import filled_prompts, sample

    if samples < 0:
        raise ValueError(f"reward_eval: samples must be >= 0 (0: greedy), got {samples}")
    n = max(samples, 1)
    how = dict(temperature=0.0) if samples == 0 else dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                                          min_p=min_p)
    sampling = SampleConfig(max_new_tokens=max_new_tokens, n=n, repetition_penalty=repetition_penalty, **how,
                            **tokenizer_ids(tok))
    decode_prompts = functools.partial(tok.decode_batch, stop_at_eos=False)
    wants_ids = takes_completion_ids(reward_fn)  # read once: it inspects the functions' signatures

    def eval_fn(state) -> dict:
        totals, best, lengths, parts = [], [], [], {name: [] for name in getattr(reward_fn, "names", ())}
        progress = TrainingProgress(int(jax.device_get(state.step)), max_steps)  # one for every batch
        logged: dict[str, list[float]] = {}  # log_metric's values (checked by the function's own RewardLog)
        loggers = {LOG_METRIC: lambda name, value: logged.setdefault(name, []).append(value),
                   LOG_EXTRA: lambda column, values: None}  # no samples table here
        for j, b in enumerate(held):
            real = len(b.tokens)  # filled with copies of the first prompt, so the mesh splits the rows; dropped below
            rows = real * n  # prompt-major: row i is a sample of prompt i // n
            tokens, mask = (np.stack(filled_prompts(list(x), model, n)) for x in (b.tokens, b.mask))
            r = sample(state.policy.params, tokens, mask, jax.random.fold_in(jax.random.key(seed), j), model=model,
                       cfg=sampling)
            ids, length = to_host((r.tokens, r.lengths))
            prompts = decode_prompts(ids[:rows, :r.prompt_length])
            completions = tok.decode_batch(ids[:rows, r.prompt_length:])
            meta = {k: [v for v in vals for _ in range(n)] for k, vals in b.metadata.items()}
            meta[TRAINER_STATE] = progress
            meta.update(loggers)
            if wants_ids:
                meta[COMPLETION_IDS] = completion_id_lists(ids[:rows, r.prompt_length:], length[:rows])
            if isinstance(reward_fn, RewardSum):
                total, terms = reward_fn.score_terms(prompts, completions, call_config=call_config, **meta)
                for name, values in terms.items():
                    parts[name].append(values)
            else:
                total = score_with_failures(reward_fn, prompts, completions, call_config=call_config, **meta).rewards
            totals.append(total)
            best.append(np.asarray(total).reshape(real, n).max(axis=1))
            lengths.append(np.asarray(length[:rows], np.float64))
        out = {"reward_mean": float(np.mean(np.concatenate(totals))),
               "completion_length": float(np.mean(np.concatenate(lengths)))}
        if samples:
            out["reward_best_mean"] = float(np.mean(np.concatenate(best)))
        for name, values in parts.items():
            values = np.concatenate(values)
            if not np.isnan(values).all():
                out[f"reward_{name}_mean"] = float(np.nanmean(values))
        for name, values in logged.items():
            if name in out:
                raise ValueError(f"a reward function logged {name!r} through log_metric, the name of one of the "
                                 "held-out evaluation's own metrics; log it under another name")
            out[name] = float(np.mean(values))
        return out

    return eval_fn


def grpo(model, data, reward_funcs, cfg: GRPOTaskConfig = GRPOTaskConfig(), *, eval_data=None,
         run_dir: str | None = None, allow_change: bool = False, mesh=None) -> TaskResult:
    """On-policy RL with cfg.algorithm (GRPO by default) on the prompts of `data` ({prompt, ...} rows), scored
    by `reward_funcs` (one function, a list summed, or (weight, fn) pairs; each fn(prompts, completions,
    **columns) -> list[float] sees the decoded prompt and completion texts and the row's other columns,
    one entry per sample; on several processes each process's call gets its own samples). An entry may name a
    trained reward model instead of a function, as in TRL: an HF ...ForSequenceClassification checkpoint path or
    hub id, a (Model, params, tokenizer) or the result of `reward_model` (`reward_model_scorer`). `rljax.phases.rl`;
    metrics per iteration: reward_mean, reward_std, kl_k1, kl_k3, entropy,
    completion_length, ... (`make_rl_iteration` lists them). eval_data: {prompt, ...} rows whose greedy
    completions are scored by the same functions every cfg.eval_every iterations and at the end
    (`reward_eval`: reward_mean, each function's, completion_length), logged as rl/eval/... and returned as
    eval_metrics / eval_history."""
    from rljax.losses.actor_critic import with_value_head
    from rljax.rl import create_rl_state

    if cfg.samples_every and run_dir is None:
        raise ValueError(f"GRPOTaskConfig.samples_every={cfg.samples_every}: the samples are written to run_dir/samples, "
                         "but run_dir is None")
    m, params, tok = _loaded("grpo", model, cfg, mesh)
    reward = combine_rewards(reward_funcs, reward_models=functools.partial(
        reward_model_scorer, add_bos=not _use_chat(tok, cfg), dtype=cfg.dtype, mesh=m.mesh))
    rl_cfg = cfg.rl_config(tok)
    needs = rl_cfg.algo.needs()
    if needs.teacher:
        raise ValueError(f"GRPOTaskConfig.algorithm: {rl_cfg.algo.name} distils from a frozen teacher, which the "
                         "grpo recipe does not take: build the state with rljax.rl.create_rl_state(..., "
                         "teacher_params=...) and run rljax.phases.rl (or experiments.rl_arithmetic "
                         "--teacher-run-dir)")
    room = m.config.max_seq_len - cfg.max_new_tokens  # what the KV cache leaves a prompt (< 1: the RL loop says so)
    limit = [n for n in (cfg.max_length, room) if n is not None and n >= 1]
    prompts = prompt_batches(tok, data, cfg, max_length=min(limit) if limit else None)
    if prompts.reward_format == "conversational":
        reward = conversational_rewards(reward)
    eval_fn = None
    if eval_data is not None:
        # the training data's format, so that the reward functions get held-out rows as they get the others
        held = prompt_batches(tok, eval_data, _eval_config(cfg, reward_format=prompts.reward_format),
                              max_length=min(limit) if limit else None)
        eval_fn = reward_eval(m, tok, held_out_batches(held.batches, m, "grpo: eval_data", size=cfg.batch_size,
                                                       split=False), reward,
                              max_new_tokens=cfg.max_new_tokens, call_config=cfg.reward_call,
                              samples=cfg.eval_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                              seed=cfg.seed, max_steps=cfg.steps)
    critic_model = critic_params = None
    if needs.critic:
        critic_model, critic_params = with_value_head(m, params)
    elif needs.values:
        m, params = with_value_head(m, params)
    state = create_rl_state(m, params, rl_cfg, jax.random.key(cfg.seed), critic_model=critic_model,
                            critic_params=critic_params)
    with _run_dir(run_dir, "grpo", cfg, model, data, allow_change) as d:
        state = phases.rl(state, prompts, reward, rl_cfg, model=m, decode=tok.decode_batch,
                          decode_prompts=functools.partial(tok.decode_batch, stop_at_eos=False), loop=cfg.loop(),
                          run_dir=d, critic_model=critic_model, samples_every=cfg.samples_every, eval_fn=eval_fn)
        return _result(state, state.policy.params, d, "rl", m, tok, run_dir)
