"""Reward-model losses: ranked pairs and lists, human scores, outcome verifiers, process reward models.

Every loss reads the "reward" head (`Model.rewards` at the last real token found
from the attention mask, `Model.token_rewards` at chosen positions), so one
trained head serves as a sequence reward, a verifier and a PRM, and
`critic_from_reward_model` can start a critic from it. Notation as in
docs/algorithms.md: L(z) = −log σ(z) = softplus(−z), r = the head's output.

    ranking (pairs, K-wise lists):  mean over lists of mean_{(i ≻ j)} L(r_i − r_j − m)  [+ c · (r_i + r_j)²]
                                    (r = r_θ + prior when the batch carries a fixed prior per answer)
    Plackett–Luce:                  mean over lists of Σ_k [logsumexp_{j≥k} r_τ(j) − r_τ(k)]   (strict orders: no margin, no ties)
    pointwise:                      ½ mean over given scores of (r_a − s_a)²
    verifier (ORM):                 mean over completion tokens of BCE(r_t, y)  [+ λ_LM · NLL]
    process reward model (PRM):     mean over step ends of BCE(r_t, y_step)
    implicit feedback:              mean over displays of BCE(r, c / P(examined))   (IPW, unbiased for relevance)
    implicit PRM:                   mean over completions of BCE(β Σ_t log π_θ/π_ref, y)   (the LM head is the PRM)
"""
from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rljax.data.batch import (FeedbackBatch, OutcomeBatch, RankingBatch, ScoreBatch, TokenLabelBatch, answer_segment,
                              prompt_prefix_ids)
from rljax.models.logprobs import head_token_stats, target_mask
from rljax.ops.aggregate import aggregate
from rljax.ops.implicit_rewards import implicit_q, ipw_targets
from rljax.ops.ranking import (binary_cross_entropy, pair_centring, pairwise_ranking, plackett_luce,
                               preferred_pairs, tied_lists)

RANKING_OBJECTIVES = ("pairwise", "plackett_luce")
LABEL_LOSSES = ("bce", "mse")


def _need_reward_head(model, name: str) -> None:
    if "reward" not in model.config.heads:
        raise ValueError(f"{name}: the model has no reward head; build it with "
                         f"config.heads including 'reward' (got {model.config.heads})")


@dataclass(frozen=True)
class RankingConfig:
    """objective: "pairwise" (Bradley–Terry; a K-wise list contributes all its
    preferred pairs, InstructGPT; tied answers are "no preference") or "plackett_luce"
    (the likelihood of a strict order of each list's answers: a list with tied answers
    and a preference is refused, see `ranking_loss`); margin m (added to
    RankingBatch.margin when given; pairwise objective only: Plackett–Luce has no margin
    term, so a margin with it is refused rather than ignored); centring c of Eisenstein et al.
    (docs/algorithms.md suggests c ≈ 0.01; pairwise objective only)."""

    objective: str = "pairwise"
    margin: float = 0.0
    centring: float = 0.0

    def __post_init__(self):
        if self.objective not in RANKING_OBJECTIVES:
            raise ValueError(f"RankingConfig.objective: {self.objective!r} not in {RANKING_OBJECTIVES}")
        if self.centring < 0:
            raise ValueError(f"RankingConfig.centring: must be >= 0, got {self.centring}")
        if self.centring and self.objective != "pairwise":
            raise ValueError("RankingConfig.centring: only defined for objective='pairwise'")
        if self.margin and self.objective != "pairwise":
            raise ValueError(f"RankingConfig.margin: only defined for objective='pairwise' (Plackett–Luce has no "
                             f"margin term), got margin={self.margin} with objective={self.objective!r}")


def shared_prompt_hidden(params, batch: RankingBatch, *, model) -> jax.Array:
    """hidden [B, K, D] at the last token of each answer of RankingBatch's shared-prompt layout
    (tokens, segment_ids [B, W]; answer k is segment answer_segment(k), reading the prompt's
    segment and its own); an absent answer reads slot 0 (its score is masked by rank −1)."""
    chex.assert_equal_shape([batch.tokens, batch.segment_ids, batch.positions])
    K = batch.rank.shape[1]
    seg = batch.segment_ids
    slots = jnp.arange(seg.shape[1])
    is_answer = seg[:, None, :] == answer_segment(jnp.arange(K))[None, :, None]  # [B, K, W]
    last = jnp.max(jnp.where(is_answer, slots, 0), axis=-1)  # [B, K]
    hidden, _ = model.forward(params, batch.tokens, batch.attention_mask, positions=batch.positions, segment_ids=seg,
                              prefix_segment_ids=prompt_prefix_ids(seg), read_at=last)
    return hidden


def ranking_scores(params, batch: RankingBatch, *, model) -> jax.Array:
    """r for every answer of every list in one forward: tokens [B, K, T] -> [B, K] float32
    (absent answers, rank −1, score 0); r = r_θ + prior when the batch carries a prior, so
    the loss, its metrics and `reward_model_eval` all rank the reward the scorer will give.
    In the shared-prompt layout (tokens [B, W], segment_ids set) each answer is read at its
    last token in one pass over the row (`shared_prompt_hidden`)."""
    chex.assert_equal_shape([batch.tokens, batch.attention_mask])
    if batch.segment_ids is not None:
        r = model.token_rewards(params, shared_prompt_hidden(params, batch, model=model))
        chex.assert_rank(r, 2)  # [B, K]: a ranking needs one scalar per answer (reward_outputs = 1)
    else:
        chex.assert_rank(batch.tokens, 3)
        B, K, T = batch.tokens.shape
        tokens, mask = batch.tokens.reshape(B * K, T), batch.attention_mask.reshape(B * K, T)
        r = model.token_rewards(params, model.last_hidden(params, tokens, mask))  # the last layer at the last token only
        chex.assert_rank(r, 1)  # a ranking needs one scalar per answer (reward_outputs = 1)
        r = r.reshape(B, K)
    if batch.prior is not None:
        chex.assert_equal_shape([batch.prior, batch.rank])
        r = r + batch.prior.astype(jnp.float32)
    return jnp.where(batch.rank >= 0, r, 0.0)


def refuse_plackett_luce_input(batch: RankingBatch) -> None:
    """Plackett–Luce scores strict orders only: a batch with margins, or (when the ranks are
    concrete, i.e. outside jit) a list with tied answers and a preference, is an error naming
    the field or row. Inside jit the ranks are traced and a tied list's loss is NaN
    (`plackett_luce`): `rljax.phases.train_reward_model` therefore checks each host batch with
    this before its step, so a tied list is named rather than its step skipped as non-finite."""
    if batch.margin is not None:
        raise ValueError("ranking_loss: batch.margin is set (collate_ranked / collate_pairs(margins=...)) but "
                         "objective='plackett_luce' has no margin term; collate without margins or use "
                         "objective='pairwise'")
    if isinstance(batch.rank, jax.core.Tracer):
        return
    rank = np.asarray(batch.rank)
    rows = np.flatnonzero(np.asarray(tied_lists(rank)))
    if rows.size:
        i = int(rows[0])
        raise ValueError(f"ranking_loss: row {i}: ranks {rank[i].tolist()} tie two answers (of {rows.size} such "
                         "rows); objective='plackett_luce' needs a strict order of each list's answers (its "
                         "likelihood would depend on the order the tied answers are listed in); use "
                         "objective='pairwise', which reads a tie as no preference")


def _refuse_soft_input(batch: RankingBatch, cfg: RankingConfig) -> None:
    """A soft preference is one probability per pair, read by the pairwise objective's own
    loss; margins (a strength of a hard preference) and K > 2 lists have no place in it."""
    if cfg.objective != "pairwise":
        raise ValueError(f"ranking_loss: batch.preference (soft labels) takes objective='pairwise' (the soft "
                         f"Bradley–Terry cross-entropy), got {cfg.objective!r}")
    if batch.margin is not None or cfg.margin:
        raise ValueError("ranking_loss: batch.preference (soft labels) with a margin (RankingConfig.margin or "
                         "batch.margin): a soft label already says how strong the preference is; drop the margin")
    if batch.rank.shape[-1] != 2:
        raise ValueError(f"ranking_loss: batch.preference is P(answer 0 ≻ answer 1) of a pair, but the lists hold "
                         f"{batch.rank.shape[-1]} answers")


def ranking_loss(params, batch: RankingBatch, *, model, cfg: RankingConfig):
    """Reward-model loss on ranked lists (pairs are K = 2); scores r [B, K] from
    `ranking_scores`, rank [B, K] (0 best, −1 absent):

        pairwise:       mean over live lists of mean_{(i ≻ j)} L(r_i − r_j − m)  [+ c · (r_i + r_j)²]
        plackett_luce:  mean over live lists of Σ_k [logsumexp_{j≥k} r_τ(j) − r_τ(k)]
        soft pairs:     mean over pairs of −[p log σ(Δ) + (1 − p) log σ(−Δ)] = softplus(Δ) − p Δ
                        [+ c · (r_0 + r_1)²], Δ = r_0 − r_1, p = batch.preference [B]

    The soft Bradley–Terry loss (Lee et al. 2023 train RLAIF's reward model on the AI judge's
    probability, not its argmax) is minimised at Δ = logit p: p = 1 is the hard loss softplus(−Δ),
    p = ½ asks for no margin; it takes objective "pairwise" and no margin,
    and its accuracy counts a pair right when Δ's sign agrees with p > ½ (½ for Δ = 0), over the
    pairs with p ≠ ½, its margin the mean Δ signed by the label's side.

    with m = cfg.margin (+ batch.margin [B] when given). A list is live when it has a
    preferred pair; lists whose answers all tie count for nothing. Plackett–Luce needs a
    strict order: a batch with margins, or a list that ties two answers and prefers
    others, is an error naming the field or row (inside jit, where the ranks are traced,
    such a list's loss is NaN, so the step is skipped as non-finite). Returns (loss,
    metrics): accuracy (over preferred pairs, 1 scored in the right order, ½ scored
    equal, as `reward_model_eval`'s pairwise_accuracy), margin (mean r_i − r_j over
    pairs), reward_mean / reward_std over present answers. With batch.prior [B, K] the
    ranked score is r_θ + prior (`ranking_scores`): the head learns only what the
    fixed prior (e.g. the SFT policy's log-likelihood, `likelihood_reward`) gets
    wrong, and every metric is of the sum."""
    _need_reward_head(model, "ranking_loss")
    if batch.segment_ids is None:  # (the shared-prompt layout's rows hold every answer)
        chex.assert_equal_shape([batch.rank, batch.tokens[..., 0]])
    if cfg.objective == "plackett_luce":
        refuse_plackett_luce_input(batch)
    if batch.preference is not None:
        _refuse_soft_input(batch, cfg)
    scores = ranking_scores(params, batch, model=model)
    if batch.preference is not None:
        return _soft_pair_loss(scores, batch, cfg)
    pairs = preferred_pairs(batch.rank).astype(jnp.float32)
    if cfg.objective == "plackett_luce":
        per_list = plackett_luce(scores, batch.rank)
    else:
        margin = cfg.margin if batch.margin is None else cfg.margin + batch.margin
        per_list, _ = pairwise_ranking(scores, batch.rank, margin)
    live = (pairs.sum(axis=(1, 2)) > 0).astype(jnp.float32)
    n_lists = jnp.maximum(live.sum(), 1.0)
    loss = (per_list * live).sum() / n_lists
    if cfg.centring:
        loss = loss + cfg.centring * (pair_centring(scores, batch.rank) * live).sum() / n_lists
    diff = scores[:, :, None] - scores[:, None, :]
    total_pairs = jnp.maximum(pairs.sum(), 1.0)
    present = (batch.rank >= 0).astype(jnp.float32)
    mean = (scores * present).sum() / jnp.maximum(present.sum(), 1.0)
    var = (jnp.square(scores - mean) * present).sum() / jnp.maximum(present.sum(), 1.0)
    # a pair scored equal counts half (a coin flip would order it), as in reward_model_eval: at a
    # zero-initialised head every pair ties, and counting ties wrong would read as 0 accuracy
    right = (diff > 0) + 0.5 * (diff == 0)
    metrics = {"loss": loss, "accuracy": (right * pairs).sum() / total_pairs,
               "margin": (diff * pairs).sum() / total_pairs, "reward_mean": mean, "reward_std": jnp.sqrt(var)}
    return loss, metrics


def _soft_pair_loss(scores, batch: RankingBatch, cfg: RankingConfig):
    """`ranking_loss` of soft-labelled pairs: scores [B, 2], batch.preference [B]."""
    p = jnp.asarray(batch.preference, jnp.float32)
    delta = scores[:, 0] - scores[:, 1]
    live = jnp.all(batch.rank >= 0, axis=1).astype(jnp.float32)  # a padding list (absent answers) counts for nothing
    n = jnp.maximum(live.sum(), 1.0)
    per_pair = binary_cross_entropy(delta, p)
    if cfg.centring:
        per_pair = per_pair + cfg.centring * jnp.square(scores[:, 0] + scores[:, 1])
    loss = (per_pair * live).sum() / n
    side = jnp.sign(p - 0.5)  # +1: answer 0 preferred, -1: answer 1, 0: no preference
    decided = live * jnp.abs(side)
    right = jnp.where(delta == 0, 0.5, (delta * side > 0).astype(jnp.float32))
    present = (batch.rank >= 0).astype(jnp.float32)
    mean = (scores * present).sum() / jnp.maximum(present.sum(), 1.0)
    var = (jnp.square(scores - mean) * present).sum() / jnp.maximum(present.sum(), 1.0)
    n_decided = jnp.maximum(decided.sum(), 1.0)
    metrics = {"loss": loss, "accuracy": (right * decided).sum() / n_decided,
               "margin": (delta * side * decided).sum() / n_decided, "reward_mean": mean, "reward_std": jnp.sqrt(var)}
    return loss, metrics


@dataclass(frozen=True)
class PointwiseConfig:
    """huber_delta δ: None for the squared error ½ e², else Huber's loss (½ e² for |e| ≤ δ,
    δ (|e| − ½ δ) beyond), which keeps a few wild human ratings from dominating."""

    huber_delta: float | None = None

    def __post_init__(self):
        if self.huber_delta is not None and self.huber_delta <= 0:
            raise ValueError(f"PointwiseConfig.huber_delta: must be positive or None, got {self.huber_delta}")


def pointwise_loss(params, batch: ScoreBatch, *, model, cfg: PointwiseConfig = PointwiseConfig()):
    """mean over given scores of ½ (r_a − s_a)² (or Huber): scores [B] (reward_outputs = 1)
    or [B, A] (reward_outputs = A). Returns (loss, metrics: loss, mae)."""
    _need_reward_head(model, "pointwise_loss")
    chex.assert_equal_shape([batch.tokens, batch.attention_mask])
    chex.assert_equal_shape([batch.scores, batch.score_mask])
    r = model.token_rewards(params, model.last_hidden(params, batch.tokens, batch.attention_mask))
    if r.shape != batch.scores.shape:
        raise ValueError(f"pointwise_loss: the reward head gives {r.shape[1:] or 'one score'} per response but the "
                         f"batch has scores of shape {batch.scores.shape}; set TransformerConfig.reward_outputs "
                         "to the number of attributes")
    m = batch.score_mask.astype(jnp.float32)
    err = (r - batch.scores.astype(jnp.float32)) * m
    count = jnp.maximum(m.sum(), 1.0)
    if cfg.huber_delta is None:
        per = 0.5 * jnp.square(err)
    else:
        a = jnp.abs(err)
        per = jnp.where(a <= cfg.huber_delta, 0.5 * jnp.square(err), cfg.huber_delta * (a - 0.5 * cfg.huber_delta))
    loss = per.sum() / count
    return loss, {"loss": loss, "mae": jnp.abs(err).sum() / count}


@dataclass(frozen=True)
class TokenLabelConfig:
    """loss: "bce" on the head's logit (default) or "mse" on σ(r) (Cobbe et al.'s
    choice); lm_coef λ of a joint LM loss on the completion tokens (verifiers; needs
    the "lm" head)."""

    loss: str = "bce"
    lm_coef: float = 0.0

    def __post_init__(self):
        if self.loss not in LABEL_LOSSES:
            raise ValueError(f"TokenLabelConfig.loss: {self.loss!r} not in {LABEL_LOSSES}")
        if self.lm_coef < 0:
            raise ValueError(f"TokenLabelConfig.lm_coef: must be >= 0, got {self.lm_coef}")


def token_label_loss(params, batch: TokenLabelBatch, *, model, cfg: TokenLabelConfig):
    """Per-position classification of the reward head: the outcome verifier (labels on
    every completion token, all equal to the answer's correctness) and the process
    reward model (a label at the last token of each step) are this loss on differently
    collated batches (`collate_verifier`, `collate_steps`).

        L = mean_{t: label_mask} ℓ(r_t, y_t) + λ_LM · mean_{completion} −log π(y_{t+1})

    ℓ = softplus(r) − y r (BCE) or (σ(r) − y)². Returns (loss, metrics: loss, label_loss,
    accuracy of σ(r) > ½ against y > ½, mean predicted probability, lm_nll)."""
    _need_reward_head(model, "token_label_loss")
    chex.assert_equal_shape([batch.tokens, batch.attention_mask, batch.loss_mask, batch.labels, batch.label_mask])
    hidden, _ = model.forward(params, batch.tokens, batch.attention_mask)
    r = model.token_rewards(params, hidden)
    chex.assert_equal_shape([r, batch.labels])
    y = batch.labels.astype(jnp.float32)
    m = (batch.label_mask * batch.attention_mask).astype(jnp.float32)
    p = jax.nn.sigmoid(r)
    per_token = binary_cross_entropy(r, y) if cfg.loss == "bce" else jnp.square(p - y)
    label_loss = aggregate(per_token, m, "token_mean")
    metrics = {"label_loss": label_loss, "accuracy": aggregate(((p > 0.5) == (y > 0.5)).astype(jnp.float32), m,
                                                                 "token_mean"),
               "prob_mean": aggregate(p, m, "token_mean")}
    loss = label_loss
    if cfg.lm_coef:
        if "lm" not in model.config.heads:
            raise ValueError("token_label_loss: lm_coef > 0 needs the 'lm' head")
        lp = head_token_stats(params, hidden[:, :-1], batch.tokens[:, 1:], model=model)["logprobs"]
        nll = aggregate(-lp, target_mask(batch.loss_mask, batch.attention_mask), "token_mean")
        loss = loss + cfg.lm_coef * nll
        metrics["lm_nll"] = nll
    metrics["loss"] = loss
    return loss, metrics


@dataclass(frozen=True)
class FeedbackConfig:
    """ipw: weight each signal by 1 / P(examined) (inverse-propensity weighting, Joachims et
    al. 2017) so the model learns relevance, not position bias; False trains on the raw
    signal (the naive model). min_propensity clips the weights at 1 / min_propensity."""

    ipw: bool = True
    min_propensity: float = 0.05

    def __post_init__(self):
        if not 0.0 < self.min_propensity <= 1.0:
            raise ValueError(f"FeedbackConfig.min_propensity: must be in (0, 1], got {self.min_propensity}")


def feedback_loss(params, batch: FeedbackBatch, *, model, cfg: FeedbackConfig):
    """mean_b [softplus(r_b) − y_b r_b], y = c / max(p, p_min) with IPW, else c. The loss is
    linear in y, so its expectation over clicks equals the BCE against relevance: the
    minimiser is σ(r) = relevance (IPW) or P(examined) · relevance (naive). Returns (loss,
    metrics: loss, target_mean, prob_mean)."""
    _need_reward_head(model, "feedback_loss")
    chex.assert_equal_shape([batch.signal, batch.propensity])
    r = model.token_rewards(params, model.last_hidden(params, batch.tokens, batch.attention_mask))
    y = ipw_targets(batch.signal, batch.propensity, min_propensity=cfg.min_propensity) if cfg.ipw \
        else batch.signal.astype(jnp.float32)
    loss = binary_cross_entropy(r, y).mean()
    return loss, {"loss": loss, "target_mean": y.mean(), "prob_mean": jax.nn.sigmoid(r).mean()}


@dataclass(frozen=True)
class ImplicitPRMConfig:
    """beta β of the implicit reward r_θ(y) = β Σ_t log π_θ(y_t)/π_ref(y_t) (Yuan et al. 2024
    train with the outcome cross-entropy; β = 0.05 there)."""

    beta: float = 0.05

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"ImplicitPRMConfig.beta: must be positive, got {self.beta}")


def implicit_prm_loss(params, batch: OutcomeBatch, *, model, cfg: ImplicitPRMConfig):
    """Outcome cross-entropy on the implicit reward of a language model: mean_b BCE(r_θ(y_b),
    label_b), r_θ = β Σ_t m_t (log π_θ − log π_ref). After training, the step rewards are
    `implicit_step_rewards` (q at one step end minus q at the previous one). Returns
    (loss, metrics: loss, reward_mean, accuracy of r_θ > 0 against label > ½)."""
    chex.assert_equal_shape([batch.tokens, batch.attention_mask, batch.loss_mask])
    hidden, _ = model.forward(params, batch.tokens, batch.attention_mask)
    lp = head_token_stats(params, hidden[:, :-1], batch.tokens[:, 1:], model=model)["logprobs"]
    chex.assert_equal_shape([lp, batch.ref_logprobs])
    mask = target_mask(batch.loss_mask, batch.attention_mask)
    r = implicit_q(lp, batch.ref_logprobs, mask, cfg.beta)[:, -1]
    y = batch.labels.astype(jnp.float32)
    loss = binary_cross_entropy(r, y).mean()
    return loss, {"loss": loss, "reward_mean": r.mean(), "accuracy": ((r > 0) == (y > 0.5)).mean()}


# Reward-model objectives by name, in the style of the algorithm and preference registries:
# name -> default config; the config's type picks the loss (`reward_model_loss`).
REWARD_MODEL_OBJECTIVES = {
    "bradley_terry": RankingConfig(),
    "plackett_luce": RankingConfig(objective="plackett_luce"),
    "pointwise": PointwiseConfig(),
    "verifier": TokenLabelConfig(),
    "prm": TokenLabelConfig(),
    "feedback": FeedbackConfig(),
    "implicit_prm": ImplicitPRMConfig(),
}


def reward_model_loss(params, batch, *, model, cfg):
    """The loss for `cfg`'s type: RankingConfig -> ranking_loss (RankingBatch),
    PointwiseConfig -> pointwise_loss (ScoreBatch), TokenLabelConfig -> token_label_loss
    (TokenLabelBatch: verifiers and process reward models), FeedbackConfig ->
    feedback_loss (FeedbackBatch), ImplicitPRMConfig -> implicit_prm_loss (OutcomeBatch)."""
    for config_type, batch_type, loss in ((RankingConfig, RankingBatch, ranking_loss),
                                          (PointwiseConfig, ScoreBatch, pointwise_loss),
                                          (TokenLabelConfig, TokenLabelBatch, token_label_loss),
                                          (FeedbackConfig, FeedbackBatch, feedback_loss),
                                          (ImplicitPRMConfig, OutcomeBatch, implicit_prm_loss)):
        if isinstance(cfg, config_type):
            if not isinstance(batch, batch_type):
                raise ValueError(f"reward_model_loss: {config_type.__name__} trains on {batch_type.__name__}, "
                                 f"got {type(batch).__name__}")
            return loss(params, batch, model=model, cfg=cfg)
    raise ValueError(f"reward_model_loss: cfg must be RankingConfig, PointwiseConfig, TokenLabelConfig, "
                     f"FeedbackConfig or ImplicitPRMConfig, got {type(cfg).__name__}")
