"""Batch dataclasses: fixed-shape arrays that flow into jitted steps, and the host-side batches
of the RL iteration (prompts in, rollouts out, what actors hand the learner). Every batch type
of rljax is defined here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SequenceBatch:
    """Token sequences for SFT-style losses.

    tokens, attention_mask, loss_mask: [B, T] int32 (loss_mask 1 on tokens that
    are predicted and count, e.g. completions; prompt tokens 0).
    segment_ids, positions: [B, T] int32 or None; set for packed sequences
    (examples sharing a row attend only within their segment; positions restart).
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    segment_ids: object = None
    positions: object = None


# Segment ids of the shared-prompt layouts (PreferenceBatch, RankingBatch; 0 is padding): the prompt,
# then the completions that read it (a pair's chosen and rejected; a ranked list's answer k).
PROMPT_SEGMENT, CHOSEN_SEGMENT, REJECTED_SEGMENT = 1, 2, 3


def answer_segment(k):
    """The segment id of answer k (0-based) of a ranked list in the shared-prompt layout: k + 2."""
    return k + 2


def prompt_prefix_ids(segment_ids):
    """The model's prefix_segment_ids for a shared-prompt layout's segment_ids [B, W]: every
    completion reads the prompt (PROMPT_SEGMENT), the prompt itself, padding (0) nothing more."""
    return jnp.minimum(segment_ids, PROMPT_SEGMENT)


@struct.dataclass
class RankingBatch:
    """K answers per prompt, ranked, for reward-model training (pairs are K = 2).

    tokens, attention_mask: [B, K, T] int32 (prompt + answer; any padding side);
    rank: [B, K] int32, 0 = best, equal = tie, −1 = absent answer (its row is all
    padding; its score is masked out); margin: [B] float32 or None, a per-list
    margin added to the config's (Llama 2's preference-strength margin); prior:
    [B, K] float32 or None, a fixed score per answer added to the learned one (a
    residual reward model r = r_θ + prior, e.g. the SFT policy's log-likelihood);
    preference: [B] float32 or None, for pairs (K = 2) a soft label p = P(answer 0 ≻
    answer 1) ∈ [0, 1] (an AI judge's probability, annotators' agreement), which the
    pairwise loss reads instead of the ranks (`ranking_loss`).

    Shared-prompt layout (segment_ids set; `collate_ranked(share_prompt=True)`): one row per
    list, tokens, attention_mask, positions, segment_ids [B, W] int32 holding [bos] prompt
    (segment PROMPT_SEGMENT = 1) then answer k (segment answer_segment(k) = k + 2), then
    padding (0); each answer reads the prompt and itself, positions continuing from the
    prompt, and is scored at its last token, as in its own [prompt, answer] row.
    """

    tokens: object
    attention_mask: object
    rank: object
    margin: object = None
    prior: object = None
    positions: object = None
    segment_ids: object = None
    preference: object = None


@struct.dataclass
class ScoreBatch:
    """Responses with human scores (pointwise regression).

    tokens, attention_mask: [B, T] int32; scores: [B] float32 (one attribute) or
    [B, A] for A attributes; score_mask: same shape as scores, 1 where a score is given.
    """

    tokens: object
    attention_mask: object
    scores: object
    score_mask: object


@struct.dataclass
class TokenLabelBatch:
    """Per-position labels for verifiers (ORM) and process reward models (PRM).

    tokens, attention_mask, loss_mask: [B, T] int32 (loss_mask 1 on completion tokens,
    used by the optional joint LM loss); labels: [B, T] float32 in [0, 1], the label
    of the prefix tokens[:t+1] (soft labels stay floats); label_mask: [B, T], 1 where a
    label is given: every completion token for a verifier, the last token of each step
    for a PRM.
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    labels: object
    label_mask: object


@struct.dataclass
class FeedbackBatch:
    """Logged displays with one implicit signal each (click, like, accept).

    tokens, attention_mask: [B, T] int32 (prompt + completion); signal: [B] float32 0/1;
    propensity: [B] float32, P(examined) at the display position (1 where unknown).
    """

    tokens: object
    attention_mask: object
    signal: object
    propensity: object


@struct.dataclass
class OutcomeBatch:
    """Completions with an outcome label, for the implicit PRM (r_θ = β Σ log π_θ / π_ref).

    tokens, attention_mask, loss_mask: [B, T] int32 (loss_mask 1 on completion tokens);
    labels: [B] float32 in [0, 1]; ref_logprobs: [B, T-1] float32, the reference's
    token log-probs (aligned with `token_logprobs`), computed once before training.
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    labels: object
    ref_logprobs: object


@struct.dataclass
class PreferenceBatch:
    """Preference pairs for DPO-style losses, chosen and rejected side by side so one
    forward pass of [2B, T] rows scores both.

    tokens, attention_mask, loss_mask: [B, 2, T] int32, index 0 the chosen (y_w) and 1
    the rejected (y_l) completion of the same prompt (loss_mask 1 on completion tokens);
    ref_logps: [B, 2] float32, the reference's summed completion log-probs S_ref, or
    None (computed by a live reference, or not needed by reference-free losses).
    weight: [B] float32 >= 0 or None (all 1): the loss is the weighted mean over pairs
    Σ_i w_i ℓ_i / Σ_i w_i (e.g. exact expected gradients, importance weights).
    label: [B] float32 in [0, 1] or None (all 1): the soft label y_i = P(chosen ≻ rejected),
    e.g. an AI labeller's probability; the pair's loss becomes y ℓ(y_w ≻ y_l) + (1 − y) ℓ(y_l ≻ y_w)
    (for DPO's sigmoid the cross-entropy y·(−log σ(h)) + (1 − y)·(−log σ(−h))).

    Shared-prompt layout (segment_ids set; `collate_preferences(share_prompt=True)`): one
    row per pair, tokens, attention_mask, loss_mask, positions, segment_ids [B, W] int32,
    holding [bos] prompt (segment PROMPT_SEGMENT = 1), the chosen completion (CHOSEN_SEGMENT
    = 2) and the rejected one (REJECTED_SEGMENT = 3), then padding (segment 0). Each
    completion reads the prompt and itself (the model's prefix_segment_ids) with positions
    continuing from the prompt, so the prompt is computed once per pair instead of twice;
    the losses see the same per-completion log-probs as in the [B, 2, T] layout.
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    ref_logps: object = None
    weight: object = None
    label: object = None
    positions: object = None
    segment_ids: object = None


@struct.dataclass
class KTOBatch:
    """Unpaired binary feedback for KTO, with the mismatched rows of its reference point.

    tokens, attention_mask, loss_mask: [B, 2, T] int32, index 0 the example (x_i, y_i)
    and 1 the mismatched pair (x_i, y_{(i+1) mod B}) made by rotating completions
    within the batch (for z₀); desirable: [B] float32, 1 for desirable and 0 for
    undesirable y_i; ref_logps: [B, 2] float32 summed reference log-probs or None.
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    desirable: object
    ref_logps: object = None


@struct.dataclass
class OREOBatch:
    """Offline trajectories for OREO: one sampled solution per row with its terminal reward.

    tokens, attention_mask, loss_mask: [B, T] int32 (loss_mask 1 on completion tokens);
    rewards: [B] float32, R ∈ {0, 1} (other values only when the collation allowed them);
    step_starts: [B, T] int32, 1 at the first token of every reasoning step (for the
    step-level loss; None without step boundaries). values [B, T-1] (the value model's
    V_t before this step's update) and log_ratios [B, T-1] (ℓ_t of the policy before its
    update) are filled in by the OREO step for its two losses, None in collated data.
    """

    tokens: object
    attention_mask: object
    loss_mask: object
    rewards: object
    step_starts: object = None
    values: object = None
    log_ratios: object = None


@struct.dataclass
class PolicyBatch:
    """What an RL policy loss sees (R rows, T tokens): tokens, attention_mask, loss_mask
    [R, T]; old_logprobs, ref_logprobs [R, T-1] (the sampler's policy and the frozen reference;
    ref may be None without a KL term); advantages [R] (one per sequence) or [R, T-1] (per
    token, GAE); rewards [R]; group_ids [R] (prompt index); actor-critic only: returns and
    old_values [R, T-1] (value targets and the sampler-time values); lag [R] (updates between
    the params that sampled a row and the learner's; None = on-policy)."""

    tokens: object
    attention_mask: object
    loss_mask: object
    old_logprobs: object
    advantages: object
    rewards: object
    group_ids: object
    ref_logprobs: object = None
    returns: object = None
    old_values: object = None
    lag: object = None


@struct.dataclass
class Rollout:
    """What `rljax.sampling.sample` returns (R = rows = prompts × n, T = P + max_new_tokens):
    tokens, attention_mask, loss_mask [R, T] (loss_mask 1 on completion tokens, the stop token
    included); logprobs [R, T-1] under the policy (temperature 1, no truncation; 0 off the
    completion), sampling_logprobs [R, T-1] under the distribution actually sampled from;
    lengths [R], stopped_at_eos [R], group_ids [R] (prompt index); prompt_length P (static)."""

    tokens: Any
    attention_mask: Any
    loss_mask: Any
    logprobs: Any
    sampling_logprobs: Any
    lengths: Any
    stopped_at_eos: Any
    group_ids: Any
    prompt_length: int = struct.field(pytree_node=False)

    @property
    def completions(self):
        """Completion tokens only: [R, max_new_tokens]."""
        return self.tokens[:, self.prompt_length:]


@dataclass(frozen=True)
class PromptBatch:
    """Prompts for one RL iteration: tokens, mask [B, P] (left-padded) and per-prompt metadata lists."""

    tokens: np.ndarray
    mask: np.ndarray
    metadata: dict


@dataclass
class Collected:
    """What the actor side of an RL iteration hands to the learner: the rollout (after
    dynamic-sampling refills), its rewards [R], all sampled rewards / correctness (for
    metrics), the greedy-decode rewards (when the algorithm needs them), the raw (rollout,
    rewards, correct) triples, prompts cut, refill rounds, seconds per stage so far, and the
    samples whose reward call failed and scored RewardCallConfig.failure_value ({"reward": n,
    "accuracy": n}, over every reward call of the collect, refills and greedy decode included),
    and the monitors' scores of every sampled row ({name: [R_all]}, `make_rl_iteration(monitors=)`), beside
    a `RewardSum`'s terms' ({"reward_<name>": [R_all]}, NaN where a term returned None or its call failed),
    and with `make_rl_iteration(on_samples=)` every sampled row's text ({"prompt", "completion",
    "columns", "extra": [R_all]}, `texts`; extra: what the reward functions logged for the row through
    TRL's log_extra) and which of them are trained on (`rows`, indices into them), and what the reward
    functions logged through log_metric ({name: [every value]}, `logged`)."""

    rollout: Any
    rewards: np.ndarray
    all_rewards: np.ndarray
    all_correct: np.ndarray | None
    greedy: np.ndarray | None
    sampled: list
    cut: int
    rounds: int
    times: dict
    failed: dict = field(default_factory=dict)
    monitored: dict = field(default_factory=dict)
    texts: dict | None = None
    rows: np.ndarray | None = None
    logged: dict = field(default_factory=dict)
