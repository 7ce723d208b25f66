"""Offline preference optimisation: DPO and its variants (cDPO, robust DPO, hinge, IPO), SimPO, ORPO, KTO.

Notation as in docs/algorithms.md ("Preference optimisation"): S(y) = Σ_t m_t ℓ_t,
A(y) = S(y)/|y|, ρ = S_θ − S_ref, Δ = ρ_w − ρ_l, h = βΔ, L(z) = softplus(−z).
Whether a method sums or averages token log-probs is `logp_reduction`, with each
method's published default ("sum" for DPO and KTO, "mean" for IPO as in TRL, SimPO
and ORPO); with "mean" the reference's log-probs are averaged over the same tokens.

    dpo / cdpo / robust / hinge / ipo   DPOConfig (objective, label_smoothing, flip_rate)
    simpo                               L(β (A_w − A_l) − γ)                     (no reference)
    orpo                                NLL(y_w) + λ L(log odds_w − log odds_l)  (no reference)
    kto                                 λ_D (1 − σ(β(ρ − z₀))) | λ_U (1 − σ(β(z₀ − ρ)))

Each loss averages over the pairs (or KTO examples) whose completions are not
empty; an empty completion (nothing left after truncation) is masked out and
counted in the `empty` metric instead of producing NaN.

Per-pair weights and soft labels (PreferenceBatch.weight w [B], .label y [B]): a pair's
loss with label y is the expectation over which completion is preferred,
ℓ_y(Δ) = y ℓ(Δ) + (1 − y) ℓ(−Δ) (the sigmoid loss: the cross-entropy y·L(h) + (1 − y)·L(−h),
minimised where σ(h*) = y; IPO: minimised at Δ* = (y − ½)/β), and the loss is the weighted
mean Σ_i w_i v_i ℓ_i / Σ_i w_i v_i over the non-empty pairs (v_i = 1). cDPO's label smoothing
ε is the same mechanism: it smooths the label, ȳ = (1 − ε) y + ε (1 − y) (ȳ = 1 − ε without
labels). The chosen-NLL term (nll_coef, ORPO) stays on the "chosen" completion, weighted
by w; ORPO, whose objective is that NLL, rejects soft labels. Metrics are unweighted.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp

from rljax.data.batch import (CHOSEN_SEGMENT, PROMPT_SEGMENT, REJECTED_SEGMENT, KTOBatch, PreferenceBatch,
                              prompt_prefix_ids)
from rljax.models.logprobs import head_token_stats, sequence_token_stats, target_mask
from rljax.ops.preference_kernels import (hinge_preference, ipo, kto, kto_reference_point, odds_ratio, robust_preference,
                                  sequence_logps, sigmoid_preference, simpo)

LOGP_REDUCTIONS = ("sum", "mean")
DPO_OBJECTIVES = ("sigmoid", "hinge", "ipo")


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in LOGP_REDUCTIONS:
        raise ValueError(f"{name}.logp_reduction: {reduction!r} not in {LOGP_REDUCTIONS}")


@dataclass(frozen=True)
class DPOConfig:
    """DPO (Rafailov et al. 2023) and the variants that change only the function of h = βΔ:

    objective "sigmoid": (1 − ε) L(h) + ε L(−h) with ε = label_smoothing (cDPO; 0 = DPO),
        or, with flip_rate ε > 0, robust DPO ((1 − ε) L(h) − ε L(−h)) / (1 − 2ε);
    objective "hinge": relu(1 − h) (SLiC); objective "ipo": (Δ − 1/(2β))² (β plays τ).
    nll_coef: + c · token-mean NLL of the chosen completions (RPO). reference_free:
    S_ref = 0 (no reference model or precomputed log-probs needed)."""

    beta: float = 0.1
    objective: str = "sigmoid"
    label_smoothing: float = 0.0
    flip_rate: float = 0.0
    logp_reduction: str = "sum"
    nll_coef: float = 0.0
    reference_free: bool = False
    chunk_size: int | None = None

    def __post_init__(self):
        if self.objective not in DPO_OBJECTIVES:
            raise ValueError(f"DPOConfig.objective: {self.objective!r} not in {DPO_OBJECTIVES}")
        _check_reduction("DPOConfig", self.logp_reduction)
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.flip_rate < 0.5:
            raise ValueError(f"DPOConfig.flip_rate: must be in [0, 0.5), got {self.flip_rate}")
        if self.label_smoothing and self.flip_rate:
            raise ValueError("DPOConfig: label_smoothing (cDPO) and flip_rate (robust DPO) are two answers to the "
                             "same label noise; set one")
        if (self.label_smoothing or self.flip_rate) and self.objective != "sigmoid":
            raise ValueError("DPOConfig: label_smoothing and flip_rate apply to objective='sigmoid' only")
        if self.nll_coef < 0:
            raise ValueError(f"DPOConfig.nll_coef: must be >= 0, got {self.nll_coef}")

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free


@dataclass(frozen=True)
class SimPOConfig:
    """SimPO (Meng et al. 2024): L(β (A_θ(y_w) − A_θ(y_l)) − γ), reference-free; paper
    defaults β = 2, γ/β = 0.25. nll_coef as in DPOConfig."""

    beta: float = 2.0
    gamma: float = 0.5
    logp_reduction: str = "mean"
    nll_coef: float = 0.0
    chunk_size: int | None = None
    needs_reference = False

    def __post_init__(self):
        _check_reduction("SimPOConfig", self.logp_reduction)
        if self.beta <= 0:
            raise ValueError(f"SimPOConfig.beta: must be > 0, got {self.beta}")


@dataclass(frozen=True)
class ORPOConfig:
    """ORPO (Hong et al. 2024): NLL(y_w) + λ L(log odds(y_w) − log odds(y_l)), odds = p/(1 − p)
    with log p the averaged log-prob; reference-free. λ = odds_ratio_coef (TRL's default 0.1)."""

    odds_ratio_coef: float = 0.1
    logp_reduction: str = "mean"
    chunk_size: int | None = None
    needs_reference = False

    def __post_init__(self):
        if self.logp_reduction != "mean":
            raise ValueError("ORPOConfig.logp_reduction: odds need a probability, so only 'mean' is defined")
        if self.odds_ratio_coef < 0:
            raise ValueError(f"ORPOConfig.odds_ratio_coef: must be >= 0, got {self.odds_ratio_coef}")


@dataclass(frozen=True)
class KTOConfig:
    """KTO (Ethayarajh et al. 2024) on unpaired binary feedback: z₀ from the batch's
    mismatched pairs (KTOBatch), λ_D = desirable_weight, λ_U = undesirable_weight.
    Keep λ_D n_D / (λ_U n_U) in [1, 4/3] (`check_kto_weights` warns outside)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    logp_reduction: str = "sum"
    chunk_size: int | None = None
    needs_reference = True

    def __post_init__(self):
        _check_reduction("KTOConfig", self.logp_reduction)
        if self.beta <= 0:
            raise ValueError(f"KTOConfig.beta: must be > 0, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("KTOConfig: desirable_weight and undesirable_weight must be > 0")


# The registry of offline preference methods: name -> the Config with that method's defaults.
PREFERENCE_METHODS = {
    "dpo": DPOConfig(),
    "cdpo": DPOConfig(label_smoothing=0.1),
    "robust_dpo": DPOConfig(flip_rate=0.1),
    "hinge": DPOConfig(objective="hinge"),
    "ipo": DPOConfig(objective="ipo", logp_reduction="mean"),
    "simpo": SimPOConfig(),
    "orpo": ORPOConfig(),
    "kto": KTOConfig(),
}


def check_kto_weights(desirable, cfg: KTOConfig) -> float:
    """λ_D n_D / (λ_U n_U) over a data set's labels (1 = desirable); warns outside [1, 4/3]
    (the KTO paper's recommended range) and returns the ratio."""
    n_d = float(sum(1 for d in desirable if d))
    n_u = float(len(desirable) - n_d)
    if n_d == 0 or n_u == 0:
        raise ValueError(f"check_kto_weights: KTO needs desirable and undesirable examples, got {n_d:.0f} "
                         f"desirable and {n_u:.0f} undesirable")
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        warnings.warn(f"KTO: λ_D n_D / (λ_U n_U) = {ratio:.3f} is outside the recommended [1, 4/3] "
                      f"(n_D {n_d:.0f}, n_U {n_u:.0f}); set desirable_weight / undesirable_weight", stacklevel=2)
    return ratio


def shared_prompt_logps(params, tokens, attention_mask, loss_mask, positions, segment_ids, *, model,
                        chunk_size: int | None = None):
    """Per-token completion log-probs of PreferenceBatch's shared-prompt layout: [B, W] rows of
    prompt (segment 1), chosen (2), rejected (3) -> (token_logps [B, 2, W-1], mask [B, 2, W-1]),
    index 0 chosen and 1 rejected as `completion_logps` gives them (entry t scores tokens[t+1]).

    One forward pass in which both completions read the prompt (prefix_segment_ids 1). Token
    t+1 is predicted from the hidden state at t, except the rejected completion's first
    token, which is predicted from the prompt's last slot (P − 1, P the prompt's length)
    exactly as in its own [prompt, rejected] row."""
    chex.assert_equal_shape([tokens, attention_mask, loss_mask, positions, segment_ids])
    chex.assert_rank(tokens, 2)
    hidden, _ = model.forward(params, tokens, attention_mask, positions=positions, segment_ids=segment_ids,
                              prefix_segment_ids=prompt_prefix_ids(segment_ids))
    n_prompt = jnp.sum(segment_ids == PROMPT_SEGMENT, axis=1, dtype=jnp.int32)  # P [B]
    n_chosen = jnp.sum(segment_ids == CHOSEN_SEGMENT, axis=1, dtype=jnp.int32)
    last_prompt = jnp.take_along_axis(hidden, jnp.maximum(n_prompt - 1, 0)[:, None, None], axis=1)  # [B, 1, D]
    # entry t predicts tokens[t+1]; the rejected completion starts at slot P + C
    first_rejected = (jnp.arange(hidden.shape[1] - 1)[None, :] == (n_prompt + n_chosen - 1)[:, None])
    pred = jnp.where(first_rejected[..., None], last_prompt, hidden[:, :-1])
    lp = head_token_stats(params, pred, tokens[:, 1:], model=model, chunk_size=chunk_size)["logprobs"]
    mask = target_mask(loss_mask, attention_mask)
    targets = segment_ids[:, 1:]
    masks = jnp.stack([mask * (targets == CHOSEN_SEGMENT), mask * (targets == REJECTED_SEGMENT)], axis=1)
    return jnp.stack([lp, lp], axis=1) * (masks > 0), masks


def completion_logps(params, tokens, attention_mask, loss_mask, *, model, chunk_size: int | None = None,
                     frozen: tuple[int, ...] = (), positions=None, segment_ids=None):
    """Per-token completion log-probs of [B, 2, T] rows in one forward pass of [2B, T]:
    -> (token_logps [B, 2, T-1], mask [B, 2, T-1]).

    frozen: indices along the pair axis whose log-probs need no gradient (KTO's mismatched
    rows, which feed only the stop-gradient reference point z0). They run in a forward of
    their own under stop_gradient(params), so the backward pass covers only the other rows
    (instead of back-propagating zeros through all of them) and their activations are not
    kept for it. The values are the same; only the split of the batch differs.

    segment_ids, positions [B, W]: the shared-prompt layout (`shared_prompt_logps`)."""
    if segment_ids is not None:
        if frozen:
            raise ValueError("completion_logps: frozen rows need the [B, 2, T] layout, not a shared prompt")
        return shared_prompt_logps(params, tokens, attention_mask, loss_mask, positions, segment_ids, model=model,
                                   chunk_size=chunk_size)
    chex.assert_equal_shape([tokens, attention_mask, loss_mask])
    chex.assert_rank(tokens, 3)
    B, two, T = tokens.shape
    if any(not 0 <= i < two for i in frozen):
        raise ValueError(f"completion_logps: frozen indices {frozen} out of range for a pair axis of {two}")

    def rows(p, tok, attn, loss):  # [B, n, T] -> ([B, n, T-1], [B, n, T-1]) in one forward of [B·n, T]
        n = tok.shape[1]
        flat = lambda x: x.reshape(B * n, T)  # noqa: E731
        lp = sequence_token_stats(p, flat(tok), flat(attn), model=model, chunk_size=chunk_size)["logprobs"]
        return lp.reshape(B, n, T - 1), target_mask(flat(loss), flat(attn)).reshape(B, n, T - 1)

    if not frozen:
        return rows(params, tokens, attention_mask, loss_mask)
    live = [i for i in range(two) if i not in frozen]
    groups = [(live, params), ([i for i in range(two) if i in frozen], jax.lax.stop_gradient(params))]
    per_index = {}
    for idx, p in groups:
        if idx:
            lp, mask = rows(p, tokens[:, idx], attention_mask[:, idx], loss_mask[:, idx])
            per_index.update({i: (lp[:, k], mask[:, k]) for k, i in enumerate(idx)})
    return tuple(jnp.stack([per_index[i][j] for i in range(two)], axis=1) for j in (0, 1))


def reference_logps(params, batch, *, model, chunk_size: int | None = None) -> jax.Array:
    """S_ref: the summed completion log-probs [B, 2] of a PreferenceBatch or KTOBatch under `params`."""
    lp, mask = completion_logps(params, batch.tokens, batch.attention_mask, batch.loss_mask, model=model,
                                chunk_size=chunk_size, **_layout(batch))
    return sequence_logps(lp, mask, "sum")[0]


def with_live_reference(reference, batch, *, model, chunk_size: int | None = None):
    """`batch` with ref_logps = S_ref [B, 2] under the frozen `reference` params (`reference_logps`),
    or as it is where it already has them: the `prepare` of `make_train_step` that evaluates a
    live reference inside the train step's own program (`rljax.phases.preference`)."""
    if batch.ref_logps is not None:
        return batch
    return batch.replace(ref_logps=reference_logps(reference, batch, model=model, chunk_size=chunk_size))


def _layout(batch) -> dict:
    """The shared-prompt layout's fields of a PreferenceBatch for `completion_logps` ({} otherwise)."""
    segment_ids = getattr(batch, "segment_ids", None)
    return {} if segment_ids is None else {"positions": batch.positions, "segment_ids": segment_ids}


def _masked_mean(x, weight):
    """Σ_i w_i x_i / Σ_i w_i (0 when every weight is 0; w may be fractional, so no max(·, 1))."""
    total = jnp.sum(weight)
    return jnp.sum(x * weight) / jnp.where(total > 0, total, 1.0)


def _policy_terms(params, batch, cfg, *, model, frozen: tuple[int, ...] = ()):
    """(S_θ reduced [B, 2], S_ref reduced [B, 2] or 0, lengths [B, 2], valid [B], chosen NLL).

    The NLL is the token mean over the chosen completions of valid pairs, each pair's tokens
    weighted by its PreferenceBatch.weight: Σ_i w_i Σ_t m_it (−ℓ_it) / Σ_i w_i Σ_t m_it."""
    lp, mask = completion_logps(params, batch.tokens, batch.attention_mask, batch.loss_mask, model=model,
                                chunk_size=cfg.chunk_size, frozen=frozen, **_layout(batch))
    logps, lengths = sequence_logps(lp, mask, cfg.logp_reduction)
    valid = jnp.all(lengths > 0, axis=1).astype(jnp.float32)
    ref = 0.0
    if cfg.needs_reference:
        if batch.ref_logps is None:
            raise ValueError(f"{type(cfg).__name__}: the batch has no ref_logps; pass a reference to the "
                             "`preference` phase, precompute them (`cached_reference_logps`), or set "
                             "reference_free=True")
        chex.assert_shape(batch.ref_logps, logps.shape)
        ref = batch.ref_logps.astype(jnp.float32)
        if cfg.logp_reduction == "mean":
            ref = ref / jnp.maximum(lengths, 1.0)
    # token-mean NLL of the chosen completions of valid pairs
    weight = pair_weights(batch, valid) if isinstance(batch, PreferenceBatch) else valid
    chosen_mask = mask[:, 0] * weight[:, None]
    nll = -_masked_mean(lp[:, 0], chosen_mask)
    return logps, ref, lengths, valid, nll


def pair_weights(batch: PreferenceBatch, valid: jax.Array) -> jax.Array:
    """w_i v_i [B]: the batch's per-pair weights (1 when absent) times the non-empty mask."""
    if batch.weight is None:
        return valid
    chex.assert_shape(batch.weight, valid.shape)
    return valid * batch.weight.astype(jnp.float32)


def soft_label_loss(f, x: jax.Array, label: jax.Array | None) -> jax.Array:
    """y f(x) + (1 − y) f(−x): a pairwise loss f of the chosen-minus-rejected score x [B]
    in expectation over the soft label y [B] = P(chosen ≻ rejected); f(x) when label is None."""
    if label is None:
        return f(x)
    y = label.astype(jnp.float32)
    chex.assert_equal_shape([x, y])
    return y * f(x) + (1.0 - y) * f(-x)


def dpo_pair_loss(delta: jax.Array, cfg: DPOConfig, label: jax.Array | None = None) -> jax.Array:
    """ℓ_i [B] of DPOConfig's objective at Δ = ρ_w − ρ_l [B], h = βΔ, for soft labels y [B]
    (None = 1): sigmoid (1 − ε̄) L(h) + ε̄ L(−h) with ε̄ = 1 − ȳ = ε + (1 − y)(1 − 2ε), ε =
    label_smoothing (so y = 1 − ε with ε = 0 is cDPO with ε); robust, hinge and IPO
    y f(Δ) + (1 − y) f(−Δ). The sigmoid loss's minimiser: σ(h*) = ȳ, h* = logit(ȳ)."""
    h = cfg.beta * delta
    if cfg.objective == "ipo":
        return soft_label_loss(lambda d: ipo(d, cfg.beta), delta, label)
    if cfg.objective == "hinge":
        return soft_label_loss(hinge_preference, h, label)
    if cfg.flip_rate > 0:
        return soft_label_loss(lambda x: robust_preference(x, cfg.flip_rate), h, label)
    if label is None:
        return sigmoid_preference(h, cfg.label_smoothing)
    chex.assert_equal_shape([h, label])
    eps = cfg.label_smoothing + (1.0 - label.astype(jnp.float32)) * (1.0 - 2.0 * cfg.label_smoothing)
    return sigmoid_preference(h, eps)


def _pair_metrics(logps, rewards, valid, lengths) -> dict:
    return {
        "rewards_chosen": _masked_mean(rewards[:, 0], valid),
        "rewards_rejected": _masked_mean(rewards[:, 1], valid),
        "margin": _masked_mean(rewards[:, 0] - rewards[:, 1], valid),
        "accuracy": _masked_mean((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32), valid),
        "logps_chosen": _masked_mean(logps[:, 0], valid),
        "logps_rejected": _masked_mean(logps[:, 1], valid),
        "empty": jnp.sum(1.0 - valid),
        "tokens": jnp.sum(lengths),
    }


def dpo_loss(params, batch: PreferenceBatch, *, model, cfg: DPOConfig):
    """Σ_i w_i ℓ_i / Σ_i w_i over the non-empty pairs, ℓ_i = `dpo_pair_loss` of Δ_i = ρ_w − ρ_l
    with the batch's soft label y_i (f by cfg.objective, see DPOConfig; w, y = 1 when the
    batch has none); implicit rewards β ρ. batch: PreferenceBatch [B, 2, T]. Returns (loss, metrics)."""
    logps, ref, lengths, valid, nll = _policy_terms(params, batch, cfg, model=model)
    rho = logps - ref
    per_pair = dpo_pair_loss(rho[:, 0] - rho[:, 1], cfg, batch.label)
    loss = _masked_mean(per_pair, pair_weights(batch, valid)) + cfg.nll_coef * nll
    return loss, dict(_pair_metrics(logps, cfg.beta * rho, valid, lengths), nll=nll)


def simpo_loss(params, batch: PreferenceBatch, *, model, cfg: SimPOConfig):
    """Σ_i w_i ℓ_i / Σ_i w_i over pairs, ℓ = L(β (A_w − A_l) − γ), with a soft label y
    y L(β (A_w − A_l) − γ) + (1 − y) L(β (A_l − A_w) − γ) [+ c · NLL(y_w)]; rewards β A."""
    logps, _, lengths, valid, nll = _policy_terms(params, batch, cfg, model=model)
    diff = logps[:, 0] - logps[:, 1]
    if batch.label is None:
        per_pair = simpo(logps[:, 0], logps[:, 1], cfg.beta, cfg.gamma)
    else:
        per_pair = soft_label_loss(lambda d: simpo(d, jnp.zeros_like(d), cfg.beta, cfg.gamma), diff, batch.label)
    loss = _masked_mean(per_pair, pair_weights(batch, valid)) + cfg.nll_coef * nll
    return loss, dict(_pair_metrics(logps, cfg.beta * logps, valid, lengths), nll=nll)


def orpo_loss(params, batch: PreferenceBatch, *, model, cfg: ORPOConfig):
    """NLL(y_w) + λ · Σ_i w_i L(log odds(A_w) − log odds(A_l)) / Σ_i w_i; rewards A (TRL logs β A).
    Soft labels are rejected: ORPO's objective is the chosen completion's NLL."""
    if batch.label is not None:
        raise ValueError("orpo_loss: PreferenceBatch.label (soft labels) is not defined for ORPO, whose "
                         "objective is the chosen completion's NLL; drop the rows' 'label' or use DPOConfig")
    logps, _, lengths, valid, nll = _policy_terms(params, batch, cfg, model=model)
    ratio = _masked_mean(odds_ratio(logps[:, 0], logps[:, 1]), pair_weights(batch, valid))
    loss = nll + cfg.odds_ratio_coef * ratio
    return loss, dict(_pair_metrics(logps, logps, valid, lengths), nll=nll, odds_ratio_loss=ratio)


def kto_loss(params, batch: KTOBatch, *, model, cfg: KTOConfig):
    """mean over examples of KTO's value loss, z₀ = max(0, mean of the mismatched rows' ρ)
    with no gradient. batch: KTOBatch [B, 2, T] (row 1 = mismatched pairs), B > 1."""
    if batch.tokens.shape[0] < 2:
        raise ValueError("kto_loss: a batch of one has no mismatched pair for the reference point z0; "
                         "use a batch of at least 2")
    # the mismatched rows (index 1) feed only z0, whose gradient is stopped: forward only
    logps, ref, lengths, valid, _ = _policy_terms(params, batch, cfg, model=model, frozen=(1,))
    rho = logps - ref
    # a mismatched row with an empty completion says nothing about z0
    z0 = kto_reference_point(rho[:, 1], (lengths[:, 1] > 0).astype(jnp.float32))
    real = (lengths[:, 0] > 0).astype(jnp.float32)
    per = kto(rho[:, 0], z0, batch.desirable, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    d = batch.desirable.astype(jnp.float32) * real
    u = (1.0 - batch.desirable.astype(jnp.float32)) * real
    metrics = {
        "z0": z0,
        "rewards_desirable": _masked_mean(cfg.beta * rho[:, 0], d),
        "rewards_undesirable": _masked_mean(cfg.beta * rho[:, 0], u),
        "logps_desirable": _masked_mean(logps[:, 0], d),
        "logps_undesirable": _masked_mean(logps[:, 0], u),
        "empty": jnp.sum(1.0 - real),
        "tokens": jnp.sum(lengths[:, 0]),
    }
    return _masked_mean(per, real), metrics


def preference_loss(params, batch, *, model, cfg):
    """The loss for `cfg`'s type: DPOConfig -> dpo_loss, SimPOConfig -> simpo_loss,
    ORPOConfig -> orpo_loss (PreferenceBatch); KTOConfig -> kto_loss (KTOBatch)."""
    for config_type, batch_type, loss in ((DPOConfig, PreferenceBatch, dpo_loss),
                                          (SimPOConfig, PreferenceBatch, simpo_loss),
                                          (ORPOConfig, PreferenceBatch, orpo_loss),
                                          (KTOConfig, KTOBatch, kto_loss)):
        if isinstance(cfg, config_type):
            if not isinstance(batch, batch_type):
                raise ValueError(f"preference_loss: {config_type.__name__} trains on {batch_type.__name__}, "
                                 f"got {type(batch).__name__}")
            return loss(params, batch, model=model, cfg=cfg)
    raise ValueError(f"preference_loss: cfg must be DPOConfig, SimPOConfig, ORPOConfig or KTOConfig, got "
                     f"{type(cfg).__name__}")
