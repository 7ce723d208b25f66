"""Evaluating reward models: pairwise accuracy, calibration, rank correlation with a gold scorer."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from rljax.data.batch import RankingBatch, ScoreBatch, TokenLabelBatch
from rljax.distributed import to_host
from rljax.losses.reward_model import ranking_scores
from rljax.ops.ranking import preferred_pairs
from rljax.rewards.learned import sequence_rewards, token_probabilities


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of x, ties sharing their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks.
    NaN when either input is constant or holds a NaN (a NaN has no rank: argsort would place it
    last and the result would read as a number). x, y [n]; other lengths are an error."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.size} values against {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def expected_calibration_error(probs, labels, *, bins: int = 10) -> float:
    """Σ_b (n_b / n) |mean_b(p) − mean_b(y)| over `bins` equal-width bins of the predicted
    probability (labels may be soft). 0 for a perfectly calibrated predictor. probs and labels
    [n] in [0, 1]; a value outside it is an error naming its index, where a bin would have
    dropped it while n still counted it; a NaN (a diverged model's score) gives NaN."""
    p, y = np.asarray(probs, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"expected_calibration_error: {p.size} probabilities against {y.size} labels")
    for name, v in (("probs", p), ("labels", y)):
        bad = np.flatnonzero((v < 0) | (v > 1))
        if bad.size:
            raise ValueError(f"expected_calibration_error: {name}[{int(bad[0])}] = {v[bad[0]]} is not in [0, 1]")
    if len(p) == 0 or np.isnan(p).any() or np.isnan(y).any():
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            err += sel.sum() / len(p) * abs(p[sel].mean() - y[sel].mean())
    return float(err)


def reward_model_eval(model, batches: Sequence, *, params_of=lambda state: state.params):
    """An eval_fn for `train_reward_model`: `eval_fn(state) -> dict` over held-out batches.

    RankingBatch: pairwise_accuracy (preferred pairs scored in the right order, ties in
    score count half; of r_θ + prior when the batch carries a prior). ScoreBatch (e.g.
    gold scores of held-out responses): spearman (rank correlation of the predicted with
    the given scores, first attribute) and mae.
    TokenLabelBatch (verifier or PRM labels): calibration_error (ECE of σ(r) at the
    labelled positions, 10 bins) and label_accuracy (σ(r) > ½ against y > ½)."""
    rank_fn = jax.jit(functools.partial(ranking_scores, model=model))
    score_fn = jax.jit(functools.partial(sequence_rewards, model=model))
    prob_fn = jax.jit(functools.partial(token_probabilities, model=model))

    def eval_fn(state) -> dict:
        params = params_of(state)
        right = pairs = 0.0
        predicted, given, probs, labels = [], [], [], []
        for b in batches:
            if isinstance(b, RankingBatch):
                s = to_host(rank_fn(params, b))  # r_θ + prior when the batch has one
                pair = np.asarray(preferred_pairs(np.asarray(b.rank)))
                diff = s[:, :, None] - s[:, None, :]
                right += float(((diff > 0) + 0.5 * (diff == 0))[pair].sum())
                pairs += float(pair.sum())
            elif isinstance(b, ScoreBatch):
                r = to_host(score_fn(params, b.tokens, b.attention_mask))
                sc, m = np.asarray(b.scores), np.asarray(b.score_mask) > 0
                r, sc, m = (r[:, 0], sc[:, 0], m[:, 0]) if sc.ndim == 2 else (r, sc, m)
                predicted.append(r[m])
                given.append(sc[m])
            elif isinstance(b, TokenLabelBatch):
                p = to_host(prob_fn(params, b.tokens, b.attention_mask))
                m = (np.asarray(b.label_mask) * np.asarray(b.attention_mask)) > 0
                probs.append(p[m])
                labels.append(np.asarray(b.labels)[m])
            else:
                raise ValueError(f"reward_model_eval: unknown batch type {type(b).__name__}")
        out = {}
        if pairs:
            out["pairwise_accuracy"] = right / pairs
        if predicted:
            r, sc = np.concatenate(predicted), np.concatenate(given)
            out["spearman"], out["mae"] = spearman(r, sc), float(np.abs(r - sc).mean())
        if probs:
            p, y = np.concatenate(probs), np.concatenate(labels)
            out["calibration_error"] = expected_calibration_error(p, y)
            out["label_accuracy"] = float(((p > 0.5) == (y > 0.5)).mean())
        return out

    return eval_fn


def best_of_n_kl(n) -> np.ndarray:
    """KL(π_bon ‖ π) of best-of-n sampling (Gao et al. 2022): log n − (n − 1) / n."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def fit_overoptimisation(d, reward, form: str) -> tuple[float, float]:
    """Least-squares (α, β) of Gao et al.'s gold-reward curves against d = √KL (docs/algorithms.md):
    form "bon": R(d) = d (α − β d); form "rl": R(d) = d (α − β log d). Both are linear in
    (α, β); points with d = 0 carry no information and are dropped. The curves peak at
    d* = α / 2β (bon) and e^{α/β − 1} (rl)."""
    d, r = np.asarray(d, np.float64), np.asarray(reward, np.float64)
    keep = d > 0
    d, r = d[keep], r[keep]
    if form == "bon":
        X = np.stack([d, -d * d], axis=1)
    elif form == "rl":
        X = np.stack([d, -d * np.log(d)], axis=1)
    else:
        raise ValueError(f"fit_overoptimisation: form {form!r} not in ('bon', 'rl')")
    if len(d) < 2:
        raise ValueError("fit_overoptimisation: need at least two points with d > 0")
    (alpha, beta), *_ = np.linalg.lstsq(X, r, rcond=None)
    return float(alpha), float(beta)
