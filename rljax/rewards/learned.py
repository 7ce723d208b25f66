"""Learned rewards: a trained reward model, verifier or process reward model as a reward
function for the RL loop, step-score aggregation, best-of-N and majority vote.

A scorer has the rule rewards' signature (`rljax.rewards.rules`):

    scorer(prompts: list[str], completions: list[str], **metadata) -> float32[B]

It re-encodes the text exactly as the reward data were collated
(`rljax.data.reward_collate`: [bos] prompt completion [eos]; steps piece by piece),
pads rows and the row count to bucketed sizes (`rljax.buckets`), and runs one jitted
forward per call, so scoring compiles a handful of times over a run.

On several processes a scorer runs on the process's own devices (`rljax.distributed.process_local`,
done when it is built, a collective: build it on every process at the same point), so each process
can score rows of its own, as the RL iteration's reward calls do.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax.buckets import bucket_length
from rljax.data.collate import encode_prompt_completion, pad_rows
from rljax.data.reward_collate import encode_steps, split_solution
from rljax.distributed import check_process_local, process_local
from rljax.models.logprobs import target_mask, token_logprobs
from rljax.ops.preference_kernels import sequence_logps
from rljax.rewards.rules import score
from rljax.sampling import scorer_at_index

STEP_AGGREGATIONS = ("min", "product", "mean", "last")
OVERLONG = ("error", "truncate_prompt")  # what a scorer does with a row longer than its limit


def aggregate_steps(probs: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Solution score from step scores p_1..p_S (probabilities of a correct prefix):
    probs, mask [B, S] -> [B]. min, product Π p, mean, or the last present step.
    Known: Π p ≤ min p; with one step all four agree. A row without steps scores 0."""
    if mode not in STEP_AGGREGATIONS:
        raise ValueError(f"aggregate_steps: mode {mode!r} not in {STEP_AGGREGATIONS}")
    m = mask.astype(bool)
    p = probs.astype(jnp.float32)
    any_step = m.any(axis=1)
    if mode == "min":
        out = jnp.where(m, p, jnp.inf).min(axis=1)
    elif mode == "product":
        out = jnp.exp(jnp.where(m, jnp.log(jnp.maximum(p, 1e-30)), 0.0).sum(axis=1))
    elif mode == "mean":
        out = jnp.where(m, p, 0.0).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)
    else:
        last = m.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)
        out = p[jnp.arange(p.shape[0]), last]
    return jnp.where(any_step, out, 0.0)


class NormaliserState(NamedTuple):
    """Running count, mean and sum of squared deviations (Welford / Chan et al.)."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


class RewardNormaliser(NamedTuple):
    """optax-style pair: init() -> state; update(state, rewards [B]) -> (normalised [B], state).
    Rewards are standardised with the statistics of every batch so far, this one included."""

    init: Callable
    update: Callable


def running_normaliser(*, eps: float = 1e-6, shift_mean: bool = True) -> RewardNormaliser:
    """(r − mean) / (std + eps) with the running mean and (population) std over all rewards
    seen, this batch included (shift_mean=False: r / (std + eps), keeping the sign of every
    reward). Rewards [B] (or any shape: every entry counts once).

    While every reward seen is the same (std 0: one reward, or a constant reward so far)
    there is no spread to divide by and the rewards are left unscaled, as `whiten` does:
    r − mean = 0 with shift_mean, r without. Dividing by eps would turn a first batch of
    rewards 1.0 into 1e6."""

    def init() -> NormaliserState:
        return NormaliserState(jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0))

    def update(state: NormaliserState, rewards):
        r = jnp.asarray(rewards, jnp.float32)
        if r.size == 0:
            raise ValueError("running_normaliser.update: no rewards (an empty batch has no statistics)")
        n = jnp.float32(r.size)
        # a constant batch takes its value as its mean exactly: r.mean() of eight 0.7s is off by
        # float32 rounding, which would leave m2 ≈ 1e-14 > 0 and read as spread below
        flat = r.reshape(-1)
        varies_b = flat.max() > flat.min()
        mean_b = jnp.where(varies_b, flat.mean(), flat[0])
        m2_b = jnp.where(varies_b, jnp.square(flat - mean_b).sum(), 0.0)
        total = state.count + n
        delta = mean_b - state.mean
        mean = state.mean + delta * (n / total)  # n / total = 1 on the first batch: mean = mean_b exactly
        m2 = state.m2 + m2_b + jnp.square(delta) * state.count * n / total
        new = NormaliserState(total, mean, m2)
        spread = m2 > 0  # False while every reward seen is equal (then delta = 0 and m2_b = 0 exactly)
        std = jnp.sqrt(m2 / total)
        centred = jnp.where(spread, r - mean, 0.0) if shift_mean else r
        return centred / jnp.where(spread, std + eps, 1.0), new

    return RewardNormaliser(init, update)


class _RowLimit(NamedTuple):
    """How a scorer fits its rows: at most `limit` tokens (`what` names the limit in errors);
    overlong "error" or "truncate_prompt" (drop prompt tokens after the first `keep`, the
    tokenizer's leading specials such as bos, so the completion is scored whole)."""

    name: str
    limit: int
    what: str
    overlong: str
    keep: int


def _row_limit(name: str, model, tokenizer, max_length: int | None, overlong: str, add_bos: bool) -> _RowLimit:
    """max_length, else (and never above) the model's max_seq_len: a wider batch is refused by the
    forward pass with no row named, so the scorer checks its rows against the limit first."""
    if overlong not in OVERLONG:
        raise ValueError(f"{name}: overlong {overlong!r} not in {OVERLONG}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"{name}: max_length must be >= 1 or None, got {max_length}")
    context = model.config.max_seq_len
    limit, what = ((max_length, f"max_length={max_length}") if max_length is not None and max_length <= context
                   else (context, f"the model's max_seq_len={context}"))
    return _RowLimit(name, limit, what, overlong, len(tokenizer.encode("", add_bos=add_bos, add_eos=False)))


def _fit_row(fit: _RowLimit, i: int, ids: list[int], n_prompt: int) -> tuple[list[int], int]:
    """Row i ([specials] prompt completion, its first n_prompt tokens the prompt) within fit.limit
    -> (ids, how many prompt tokens were dropped). Too long is an error naming the row, its
    length and the limit; with overlong "truncate_prompt" the prompt loses tokens from its left
    (after the leading specials) and the completion is kept whole, an error if that is not enough."""
    if len(ids) <= fit.limit:
        return ids, 0
    if fit.overlong == "error":
        raise ValueError(f"{fit.name}: row {i}: {len(ids)} tokens exceed {fit.what}; shorten the row or pass "
                         "overlong='truncate_prompt' to keep the prompt's last tokens")
    cut = len(ids) - fit.limit
    if cut > n_prompt - fit.keep:
        raise ValueError(f"{fit.name}: row {i}: {len(ids)} tokens exceed {fit.what} even with the whole prompt "
                         f"cut: the completion alone has {len(ids) - n_prompt} tokens (+{fit.keep} leading "
                         "special tokens kept)")
    return ids[:fit.keep] + ids[fit.keep + cut:], cut


def _batch_rows(rows: Sequence[Sequence[int]], pad_id: int, *others: Sequence[Sequence[int]], min_bucket: int,
                limit: int):
    """Pad rows (each already within `limit`, `_fit_row`) to a bucketed width and the row count
    to a bucketed size (extra rows are one pad token), so the jitted scorer sees few shapes.
    `others` are per-token lists padded alongside with 0 (e.g. completion masks).
    -> (tokens, mask, *others, B real rows)."""
    B = len(rows)
    width = bucket_length(max(map(len, rows)), minimum=min_bucket, maximum=limit)
    extra = bucket_length(B, minimum=1) - B
    rows = list(rows) + [[pad_id]] * extra
    padded = pad_rows(rows, width, pad_id, *(list(o) + [[0]] * extra for o in others))
    return (*padded, B)


def _own_devices(name: str, model, params):
    """(model, current): the model and a zero-argument function giving the params, both on this
    process's own devices (`process_local`; on one process as they are). params may be a
    zero-argument callable read at every call: what it returns must already be the process's own
    (`check_process_local`), since gathering them in a call would be a collective."""
    if callable(params):
        model = process_local(model)[0]
        return model, lambda: check_process_local(params(), name)
    model, params = process_local(model, params)
    return model, lambda: params


def _check_pairs(name: str, prompts: Sequence[str], completions: Sequence[str]) -> None:
    """One prompt per completion (zip would silently score only the shorter list's length)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{name}: {len(prompts)} prompts but {len(completions)} completions; pass one prompt per "
                         "completion (repeat a prompt for each of its completions)")


def _encode_fitted(tokenizer, fit: _RowLimit, prompts, completions, add_bos: bool, add_eos: bool):
    """[bos] prompt completion [eos] of every pair, each within fit -> (ids, completion masks) lists."""
    rows, masks = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids, cm = encode_prompt_completion(tokenizer, p, c, i, add_bos=add_bos, add_eos=add_eos)
        ids, cut = _fit_row(fit, i, ids, cm.index(1))
        rows.append(ids)
        masks.append(cm[cut:])  # the dropped tokens were prompt tokens (mask 0): any cut 0s will do
    return rows, masks


def reward_model_reward(model, params, tokenizer, *, probability: bool = False, min_bucket: int = 16,
                        max_length: int | None = None, overlong: str = "error", add_bos: bool = True,
                        add_eos: bool = True):
    """A trained reward model (ranking or pointwise) or outcome verifier as a reward
    function: the reward head read at the last real token of [bos] prompt completion
    [eos]; σ(r) with probability=True (a verifier's P(correct)). For several
    attributes (reward_outputs > 1) the scorer returns [B, A].

    Rows hold at most max_length tokens (default and cap: the model's max_seq_len); a
    longer row is an error naming its index in the call, its length and the limit, or
    with overlong="truncate_prompt" loses prompt tokens from the left (bos kept) so the
    completion is scored whole (a reward model with a shorter context than the policy).

    params may be a zero-argument callable returning the current params: the scorer
    then reads them at every call, so a reward model refreshed during RL (iterative
    RLHF) is scored without rebuilding or recompiling anything."""
    model, current = _own_devices("reward_model_reward", model, params)
    forward = jax.jit(functools.partial(sequence_rewards, model=model))
    fit = _row_limit("reward_model_reward", model, tokenizer, max_length, overlong, add_bos)

    def scorer(prompts, completions, **_):
        _check_pairs("reward_model_reward", prompts, completions)
        rows, _ = _encode_fitted(tokenizer, fit, prompts, completions, add_bos, add_eos)
        tokens, mask, B = _batch_rows(rows, tokenizer.pad_id, min_bucket=min_bucket, limit=fit.limit)
        r = np.asarray(forward(current(), tokens, mask))[:B]
        return 1 / (1 + np.exp(-r)) if probability else r

    scorer.__name__ = "reward_model_reward"  # how a RewardError names it (e.g. on a non-finite score)
    return scorer


def completion_likelihood(params, tokens, mask, completion_mask, *, model, reduction: str = "mean"):
    """S(y|x) = Σ_t log π(y_t | x, y_<t) over the completion's tokens ("sum") or S / |y|
    ("mean"): tokens, mask, completion_mask [B, T] -> [B] float32."""
    lp = token_logprobs(params, tokens, mask, model=model)
    return sequence_logps(lp, target_mask(completion_mask, mask), reduction)[0]


def likelihood_reward(model, params, tokenizer, *, reference=None, beta: float = 1.0, reduction: str = "mean",
                      min_bucket: int = 16, max_length: int | None = None, overlong: str = "error",
                      add_bos: bool = True, add_eos: bool = True):
    """A language model's likelihood of the completion as a reward:

        r = β · A_θ(y|x)                     reference None (SimPO's implicit reward with
                                             reduction "mean"; the SFT policy's own
                                             likelihood as a prior for `RankingBatch.prior`)
        r = β · (S_θ(y|x) − S_ref(y|x))      with `reference` params (DPO's implicit reward
                                             with reduction "sum")

    where S is the summed and A = S / |y| the mean completion log-prob ("sum" | "mean",
    [eos] counted as a completion token, so an empty completion scores log π(eos | x)).
    Text is encoded, batched and fitted to max_length (overlong) as by `reward_model_reward`;
    params (and reference) may be zero-argument callables read at every call. -> scorer(prompts, completions, **_)
    -> float32 [B]."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"likelihood_reward: reduction {reduction!r} not in ('sum', 'mean')")
    if not beta > 0:
        raise ValueError(f"likelihood_reward: beta must be > 0, got {beta}")
    ref = None if reference is None else _own_devices("likelihood_reward", model, reference)[1]
    model, current = _own_devices("likelihood_reward", model, params)
    forward = jax.jit(functools.partial(completion_likelihood, model=model, reduction=reduction))
    fit = _row_limit("likelihood_reward", model, tokenizer, max_length, overlong, add_bos)

    def scorer(prompts, completions, **_):
        _check_pairs("likelihood_reward", prompts, completions)
        rows, masks = _encode_fitted(tokenizer, fit, prompts, completions, add_bos, add_eos)
        tokens, mask, completion, B = _batch_rows(rows, tokenizer.pad_id, masks, min_bucket=min_bucket,
                                                  limit=fit.limit)
        s = np.asarray(forward(current(), tokens, mask, completion), np.float32)
        if ref is not None:
            s = s - np.asarray(forward(ref(), tokens, mask, completion), np.float32)
        return beta * s[:B]

    return scorer


def sequence_rewards(params, tokens, mask, *, model):
    """The reward head at each row's last real token: [B, T] -> [B] ([B, A] with several attributes).
    The last layer runs at that token only (`Model.last_hidden`)."""
    return model.token_rewards(params, model.last_hidden(params, tokens, mask))


def prm_search_scorer(model, skip_ids: Sequence[int]) -> Callable:
    """A process reward model as `value_guided_beam_search`'s scorer: `scorer(prm_params, tokens,
    attention_mask) -> [R]`, the reward head's logit z = logit P(prefix correct) at each row's last
    step-text token,

        z_{t*},  t* = the last real token not in skip_ids (`rljax.sampling.scored_index`)

    The PRM's labels sit on each step's last text token (`collate_steps`), never on the separator
    or eos, while the search's candidates end in a step end or a stop token; read at the last token
    (`sequence_rewards`) the head would be read where it was never trained. skip_ids: the search's
    step_end_ids and stop ids (eos_id, *stop_ids), single tokens. σ(z) is monotone, so the ranking
    is P(correct)'s. tokens, attention_mask [R, T]."""
    return scorer_at_index(model, model.token_rewards, skip_ids, "prm_search_scorer",
                           "the search's step_end_ids and stop ids")


def token_probabilities(params, tokens, mask, *, model):
    """σ of the reward head at every position (a verifier's or PRM's P(correct)): [B, T] -> [B, T]."""
    hidden, _ = model.forward(params, tokens, mask)
    return jax.nn.sigmoid(model.token_rewards(params, hidden))


def step_scorer(model, params, tokenizer, *, separator: str, min_bucket: int = 16, max_length: int | None = None,
                overlong: str = "error", add_bos: bool = True, add_eos: bool = True, name: str = "step_scorer"):
    """A process reward model's step scores: `scores(prompts, completions)` -> one [S_i]
    array per completion, σ(r) at the last token of each of its steps (split at
    `separator`, encoded as in `collate_steps`); a completion with no step text gets an
    empty array. Rows are fitted to max_length (overlong) as by `reward_model_reward`;
    params may be a zero-argument callable read at every call (a refreshed PRM). name: what errors call
    it (`prm_reward` passes its own)."""
    model, current = _own_devices(name, model, params)
    forward = jax.jit(functools.partial(token_probabilities, model=model))
    fit = _row_limit(name, model, tokenizer, max_length, overlong, add_bos)

    def scores(prompts: Sequence[str], completions: Sequence[str]) -> list[np.ndarray]:
        _check_pairs(name, prompts, completions)
        rows, ends = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            steps = split_solution(c, separator)
            if steps:
                ids, m, e = encode_steps(tokenizer, p, steps, separator, row=i, add_bos=add_bos, add_eos=add_eos)
                n_prompt = m.index(1)
            else:
                ids, e = tokenizer.encode(p, add_bos=add_bos, add_eos=add_eos), []
                n_prompt = len(ids)  # no step to keep: only the prompt can be cut
            ids, cut = _fit_row(fit, i, ids, n_prompt)
            rows.append(ids)
            ends.append([k - cut for k in e])  # the step ends move left with the dropped prompt tokens
        tokens, mask, _ = _batch_rows(rows, tokenizer.pad_id, min_bucket=min_bucket, limit=fit.limit)
        probs = np.asarray(forward(current(), tokens, mask))
        return [probs[i, e] for i, e in enumerate(ends)]

    return scores


def stack_step_scores(per: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`step_scorer`'s ragged [S_i] arrays -> (probs, mask) [N, max S_i] float32, zero-padded,
    ready for `aggregate_steps`."""
    S = max(1, max(len(p) for p in per))
    probs = np.zeros((len(per), S), np.float32)
    mask = np.zeros((len(per), S), np.float32)
    for i, p in enumerate(per):
        probs[i, :len(p)], mask[i, :len(p)] = p, 1
    return probs, mask


def prm_reward(model, params, tokenizer, *, separator: str, aggregation: str = "min", **kw):
    """A process reward model as a reward function: step scores (`step_scorer`, whose options
    kw pass through: max_length, overlong, ...; params may be a zero-argument callable)
    aggregated by min | product | mean | last (`aggregate_steps`); a completion without
    steps scores 0."""
    if aggregation not in STEP_AGGREGATIONS:
        raise ValueError(f"prm_reward: aggregation {aggregation!r} not in {STEP_AGGREGATIONS}")
    scores = step_scorer(model, params, tokenizer, separator=separator, name="prm_reward", **kw)

    def scorer(prompts, completions, **_):
        probs, mask = stack_step_scores(scores(prompts, completions))
        return np.asarray(aggregate_steps(jnp.asarray(probs), jnp.asarray(mask), aggregation))

    return scorer


def best_of_n(prompts: Sequence[str], candidates: Sequence[Sequence[str]], scorer, **metadata) -> list[int]:
    """Index of the highest-scoring candidate for each prompt (first on ties):

        out[p] = argmax_j s[p, j],   s = scorer(prompts repeated, candidates flattened) as [P][N_p]

    candidates [P][N_p] (N_p >= 1, may differ per prompt) are scored in one call as Σ N_p rows,
    through `rljax.rewards.rules.score`: the scorer must return one finite real number per row
    (a [rows, A] multi-attribute score, too few or too many values, or NaN/inf is a RewardError
    naming the scorer: NaN would otherwise win np.argmax, and a flattened [rows, A] would pair
    prompts with the wrong scores). metadata are per-prompt lists, repeated for each candidate.
    Errors name the prompt: no candidates, a string instead of a list of candidates."""
    if len(prompts) != len(candidates):
        raise ValueError(f"best_of_n: {len(prompts)} prompts but {len(candidates)} candidate lists")
    for k, vals in metadata.items():
        if len(vals) != len(prompts):
            raise ValueError(f"best_of_n: metadata {k!r} has {len(vals)} entries for {len(prompts)} prompts")
    for i, cs in enumerate(candidates):
        if isinstance(cs, str):
            raise ValueError(f"best_of_n: prompt {i}: candidates must be a list of strings, got the string {cs!r}")
        if len(cs) == 0:
            raise ValueError(f"best_of_n: prompt {i} has no candidates, so there is nothing to pick")
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_c = [c for cs in candidates for c in cs]
    meta = {k: [v for v, cs in zip(vals, candidates) for _ in cs] for k, vals in metadata.items()}
    s = score(scorer, flat_p, flat_c, **meta)  # float32 [Σ N_p], checked
    out, at = [], 0
    for cs in candidates:
        out.append(int(np.argmax(s[at:at + len(cs)])))
        at += len(cs)
    return out


def majority_vote(candidates: Sequence[Sequence[str]], extract: Callable[[str], object]) -> list[int]:
    """Self-consistency baseline: for each prompt, the index of the first candidate whose
    extracted answer is the most common one (answers that extract to None do not vote;
    with no votes, candidate 0)."""
    out = []
    for cs in candidates:
        answers = [extract(c) for c in cs]
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            out.append(0)
            continue
        top = max(votes.values())
        winner = next(a for a in answers if a is not None and votes[a] == top)
        out.append(answers.index(winner))
    return out
