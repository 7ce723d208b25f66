"""Collation for reward-model data: ranked pairs and lists, scored responses, verifier and step labels.

Rows are right-padded to a bucketed width (`rljax.buckets.bucket_length`, as `collate_prompt_completion`),
so a run compiles a handful of times. A row is a tuple, an adapter row (`rljax.data.adapters`) or a
dict (`rljax.data.collate.row_fields`). Every bad row raises a `ValueError` that
names its index and what is wrong with it.

Steps of a solution are encoded piece by piece (`encode_steps`): each step's text,
then the separator, so the last token of every step is known exactly for any
tokenizer (a BPE merge across the separator cannot move it). Training
(`collate_steps`) and scoring (`rljax.rewards.learned`) use the same function.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

from rljax.buckets import DEFAULT_MIN_BUCKET
from rljax.data.batch import FeedbackBatch, OutcomeBatch, RankingBatch, ScoreBatch, TokenLabelBatch
from rljax.data.collate import (collate_shared_prompt, encode_prompt_completion, encode_text, pad_rows, padded_width,
                                row_fields)
from rljax.data.lengths import Tokens
from rljax.tokenizer import Tokenizer


def _finite(x, where: str) -> float:
    if isinstance(x, (str, bytes)):  # float("3.5") would parse it: a number was expected, not text
        raise ValueError(f"{where} must be a number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where} is {v}, not a finite number")
    return v


def _check_ranking(i: int, answers: Sequence[str], ranks: Sequence[int]) -> list[int]:
    if len(answers) != len(ranks):
        raise ValueError(f"row {i}: {len(answers)} answers but {len(ranks)} ranks")
    if len(answers) < 2:
        raise ValueError(f"row {i}: a ranking needs at least two answers, got {len(answers)}")
    out = []
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"row {i}: rank of answer {k} must be an integer >= 0 (0 = best), got {r!r}")
        out.append(int(r))
    if len(set(out)) < 2:
        raise ValueError(f"row {i}: every answer has the same rank, so the ranking says nothing")
    seen = {}
    for k, a in enumerate(answers):
        if not isinstance(a, (str, Tokens)) or not a:
            raise ValueError(f"row {i}: answer {k} is empty or not a string: {a!r}")
        if a in seen and out[seen[a]] != out[k]:
            raise ValueError(f"row {i}: answers {seen[a]} and {k} are the same text but ranked differently")
        seen.setdefault(a, k)
    return out


def collate_ranked(tokenizer: Tokenizer, lists: Sequence[tuple[str, Sequence[str], Sequence[int]]], *,
                   answers_per_list: int | None = None, margins: Sequence[float] | None = None,
                   priors: Sequence[Sequence[float]] | None = None, max_length: int | None = None,
                   min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                   add_eos: bool = True, share_prompt: bool = False) -> RankingBatch:
    """(prompt, answers, ranks) lists (tuples, `RankedList`s or dicts) -> RankingBatch [B, K, T]: all answers of a
    prompt in one batch element (InstructGPT's K-wise comparisons; pairs are K = 2).

    share_prompt: RankingBatch's shared-prompt layout instead, [B, W] rows of [bos] prompt and then
    every answer (W bucketed from the longest such row; `length` fixes it; max_length still bounds
    each [prompt, answer] sequence), so the prompt runs once per list: P + Σ_k A_k tokens instead
    of K·P + Σ_k A_k. The scores are the same up to float rounding.

    ranks: 0 = best, larger = worse, equal = tie. K = answers_per_list (fixed, so
    the shape does not change between batches) or the longest list; shorter lists
    get absent answers (rank −1, all padding). priors: one fixed score per answer
    of each list (`RankingBatch.prior`; absent answers get 0). Errors name the row:
    fewer than two answers, all answers tied, a negative or non-integer rank, the
    same text ranked twice differently, an empty answer, a row too long, a prior
    count that differs from the answer count or a non-finite prior.
    """
    if not lists:
        raise ValueError("collate_ranked: no examples")
    lists = [row_fields(i, x, ("prompt", "answers", "ranks")) for i, x in enumerate(lists)]
    checked = [_check_ranking(i, answers, ranks) for i, (_, answers, ranks) in enumerate(lists)]
    K = answers_per_list or max(len(r) for r in checked)
    if any(len(r) > K for r in checked):
        i = next(i for i, r in enumerate(checked) if len(r) > K)
        raise ValueError(f"row {i}: {len(checked[i])} answers exceed answers_per_list={K}")
    encoded, names, rank = [], [], np.full((len(lists), K), -1, np.int32)
    for i, ((prompt, answers, _), ranks) in enumerate(zip(lists, checked)):
        encoded.append([encode_prompt_completion(tokenizer, prompt, answer, i, add_bos=add_bos, add_eos=add_eos,
                                                 field=f"answer {k}") for k, answer in enumerate(answers)])
        names += [f"row {i} answer {k}" for k in range(len(answers))]
        rank[i, :len(ranks)] = ranks
    rows = [ids for answers in encoded for ids, _ in answers]
    shared = {}
    if share_prompt:
        padded_width([len(r) for r in rows], length=None, min_bucket=min_bucket, max_length=max_length, names=names)
        tokens, attn, _, positions, segments = collate_shared_prompt(
            encoded, tokenizer.pad_id, length=length, min_bucket=min_bucket,
            names=[f"row {i} (prompt and its {len(a)} answers)" for i, a in enumerate(encoded)])
        shared = dict(positions=positions, segment_ids=segments)
    else:
        width = padded_width([len(r) for r in rows], length=length, min_bucket=min_bucket, max_length=max_length,
                             names=names)
        flat = iter(rows)
        padded = [next(flat) if k < len(checked[i]) else [] for i in range(len(lists)) for k in range(K)]
        tokens, attn = pad_rows(padded, width, tokenizer.pad_id)
        tokens, attn = tokens.reshape(len(lists), K, width), attn.reshape(len(lists), K, width)
    margin = None
    if margins is not None:
        if len(margins) != len(lists):
            raise ValueError(f"collate_ranked: {len(margins)} margins for {len(lists)} rows")
        margin = np.array([_finite(m, f"row {i}: margin") for i, m in enumerate(margins)], np.float32)
    prior = None
    if priors is not None:
        if len(priors) != len(lists):
            raise ValueError(f"collate_ranked: {len(priors)} prior lists for {len(lists)} rows")
        prior = np.zeros((len(lists), K), np.float32)
        for i, (ps, ranks) in enumerate(zip(priors, checked)):
            if len(ps) != len(ranks):
                raise ValueError(f"row {i}: {len(ps)} priors for {len(ranks)} answers")
            prior[i, :len(ps)] = [_finite(v, f"row {i}: prior of answer {k}") for k, v in enumerate(ps)]
    return RankingBatch(tokens=tokens, attention_mask=attn, rank=rank, margin=margin, prior=prior, **shared)


def collate_pairs(tokenizer: Tokenizer, pairs: Sequence, *, margins: Sequence[float] | None = None,
                  preferences: Sequence[float] | None = None, **kw) -> RankingBatch:
    """(prompt, chosen, rejected) rows (tuples, `PreferencePair`s or dicts) -> RankingBatch with K = 2,
    rank (0, 1) (`collate_ranked`'s options, share_prompt among them, pass through). A pair whose
    chosen equals its rejected is an error naming the row. preferences: [B] soft labels p =
    P(chosen ≻ rejected) in [0, 1] (RankingBatch.preference; "chosen" and "rejected" then only
    name answers 0 and 1), an error naming the row outside [0, 1]."""
    lists = []
    for i, p in enumerate(pairs):
        prompt, chosen, rejected = row_fields(i, p, ("prompt", "chosen", "rejected"))
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(text, (str, Tokens)) or not text:
                raise ValueError(f"row {i}: {name} is empty or not a string: {text!r}")
        if chosen == rejected:
            what = "tokens" if isinstance(chosen, Tokens) else "text"  # Tokens: the data set's fitted rows
            raise ValueError(f"row {i}: chosen and rejected are the same {what}, so the pair says nothing")
        lists.append((prompt, (chosen, rejected), (0, 1)))
    if preferences is None:
        return collate_ranked(tokenizer, lists, answers_per_list=2, margins=margins, **kw)
    p = np.asarray(preferences, np.float64)
    if p.shape != (len(lists),):
        raise ValueError(f"collate_pairs: {p.size} preferences for {len(lists)} pairs")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN included
    if bad.size:
        raise ValueError(f"row {int(bad[0])}: preference {p[bad[0]]} is not a probability in [0, 1]")
    batch = collate_ranked(tokenizer, lists, answers_per_list=2, margins=margins, **kw)
    return batch.replace(preference=p.astype(np.float32))


def _encode_rows(tokenizer: Tokenizer, rows, *, max_length, min_bucket, length, add_bos, add_eos,
                 field: str = "completion"):
    """(prompt, completion) -> right-padded tokens, attention mask, completion mask (errors name the
    completion `field`)."""
    encoded = [encode_prompt_completion(tokenizer, p, c, i, add_bos=add_bos, add_eos=add_eos, field=field)
               for i, (p, c) in enumerate(rows)]
    width = padded_width([len(e[0]) for e in encoded], length=length, min_bucket=min_bucket, max_length=max_length,
                         names=[f"row {i}" for i in range(len(rows))])
    return pad_rows([e[0] for e in encoded], width, tokenizer.pad_id, [e[1] for e in encoded])


def _one_number(v) -> bool:
    """A single score: a Python or NumPy number, or a 0-d array (`np.float32(2)`, `np.array(2.0)` and a 0-d jax
    array alike; len() of a 0-d array is a TypeError, so it cannot be read as a sequence)."""
    return isinstance(v, (numbers.Real, np.number)) or getattr(v, "ndim", None) == 0


def _sequence(v) -> bool:
    """One score per attribute: a sized, non-text value that is not a single number."""
    return not _one_number(v) and not isinstance(v, (str, bytes)) and hasattr(v, "__len__")


def collate_scored(tokenizer: Tokenizer, rows: Sequence[tuple[str, str, object]], *, max_length: int | None = None,
                   min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                   add_eos: bool = True) -> ScoreBatch:
    """(prompt, response, score) rows (tuples, `ScoredResponse`s or dicts) -> ScoreBatch. score: a number (scores
    [B]) or a sequence of A numbers, None for a missing attribute (scores [B, A], score_mask 0
    there); a score of None is a row without a score (score_mask 0). The first row with a
    score decides which (a 0-d array is a number); a row of the other kind, or NaN or
    infinite scores, are errors naming the row."""
    if not rows:
        raise ValueError("collate_scored: no examples")
    rows = [row_fields(i, r, ("prompt", "response", "score")) for i, r in enumerate(rows)]
    first = next((i for i, (_, _, sc) in enumerate(rows) if sc is not None), 0)
    shown = rows[first][2]
    if not (shown is None or _one_number(shown) or _sequence(shown)):
        # (a string's len("3.5") would otherwise be read as 3 attributes)
        raise ValueError(f"row {first}: score must be a number or a sequence of numbers (one per attribute), got "
                         f"{shown!r}")
    multi = shown is not None and _sequence(shown)
    A = len(shown) if multi else 1
    kind = f"a sequence of {A} numbers" if multi else "a single number"
    scores = np.zeros((len(rows), A), np.float32)
    given = np.zeros((len(rows), A), np.float32)
    for i, (_, _, score) in enumerate(rows):
        if score is None:  # no score at all for this row
            continue
        if _one_number(score) if multi else _sequence(score):
            raise ValueError(f"row {i}: score {score!r} is {'a single number' if multi else 'a sequence'} but row "
                             f"{first}'s is {kind}; give every row one number, or every row one per attribute")
        values = list(score) if multi and _sequence(score) else [score]
        if len(values) != A or multi and not _sequence(score):  # (a string is neither kind)
            raise ValueError(f"row {i}: expected {A} score{'s' if A > 1 else ''} (numbers), got {score!r}")
        for a, v in enumerate(values):
            if v is not None:
                scores[i, a], given[i, a] = _finite(v, f"row {i}: score {a}" if multi else f"row {i}: score"), 1.0
    tokens, attn, _ = _encode_rows(tokenizer, [(p, r) for p, r, _ in rows], max_length=max_length,
                                   min_bucket=min_bucket, length=length, add_bos=add_bos, add_eos=add_eos,
                                   field="response")
    if not multi:
        scores, given = scores[:, 0], given[:, 0]
    return ScoreBatch(tokens=tokens, attention_mask=attn, scores=scores, score_mask=given)


def _label(v, where: str) -> float:
    v = _finite(v, where)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {v}")
    return v


def collate_verifier(tokenizer: Tokenizer, rows: Sequence[tuple[str, str, float]], *, max_length: int | None = None,
                     min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                     add_eos: bool = True) -> TokenLabelBatch:
    """(prompt, completion, correct) rows (tuples, `BinaryFeedback`s or dicts) -> TokenLabelBatch for an outcome
    verifier (Cobbe et al.): the label (1 correct, 0 wrong, or a float in [0, 1]) on every
    completion token, so the head learns P(correct | prefix) at each of them."""
    if not rows:
        raise ValueError("collate_verifier: no examples")
    rows = [row_fields(i, r, ("prompt", "completion", "label")) for i, r in enumerate(rows)]
    y = np.float32([_label(correct, f"row {i}: label") for i, (_, _, correct) in enumerate(rows)])
    tokens, attn, loss = _encode_rows(tokenizer, [(p, c) for p, c, _ in rows], max_length=max_length,
                                      min_bucket=min_bucket, length=length, add_bos=add_bos, add_eos=add_eos)
    return TokenLabelBatch(tokens=tokens, attention_mask=attn, loss_mask=loss,
                           labels=(loss * y[:, None]).astype(np.float32), label_mask=loss)


def split_solution(completion: str, separator: str) -> list[str]:
    """A completion's steps: its text split at `separator` (the separator is not part of a
    step; empty pieces, e.g. after a trailing separator, are dropped). A completion with
    no separator is one step."""
    if not separator:
        raise ValueError("split_solution: the separator is empty")
    return [s for s in completion.split(separator) if s]


def encode_steps(tokenizer: Tokenizer, prompt: str, steps: Sequence[str], separator: str, *, row: int = 0,
                 add_bos: bool = True, add_eos: bool = False) -> tuple[list[int], list[int], list[int]]:
    """[bos] prompt step_1 sep step_2 sep ... step_S [eos] -> (ids, completion mask,
    index of the last token of each step). Each piece is encoded on its own. Errors name
    the row: no steps, an empty step, a step containing the separator, a prompt or step that is not
    text or that the tokenizer cannot encode (`rljax.data.collate.encode_text`)."""
    if not steps:
        raise ValueError(f"row {row}: the solution has no steps")
    ids = encode_text(tokenizer, prompt, row, "prompt", add_bos=add_bos, add_eos=False)
    n_prompt, ends = len(ids), []
    sep = encode_text(tokenizer, separator, row, "separator", add_bos=False, add_eos=False)
    for k, step in enumerate(steps):
        if isinstance(step, str) and separator in step:
            raise ValueError(f"row {row}: step {k} contains the separator {separator!r}; split it into steps")
        piece = encode_text(tokenizer, step, row, f"step {k}", add_bos=False, add_eos=False)
        if not piece:
            raise ValueError(f"row {row}: step {k} is empty")
        ids += piece
        ends.append(len(ids) - 1)
        if k < len(steps) - 1:
            ids += sep
    if add_eos:
        ids += tokenizer.encode("", add_bos=False, add_eos=True)
    return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt), ends


def collate_steps(tokenizer: Tokenizer, rows: Sequence[tuple[str, Sequence[str], Sequence[float]]], *, separator: str,
                  max_length: int | None = None, min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None,
                  add_bos: bool = True, add_eos: bool = True) -> TokenLabelBatch:
    """(prompt, steps, step labels) rows (tuples, `StepLabelled`s or dicts) -> TokenLabelBatch for a process reward
    model: label_mask is 1 at the last token of each step, labels hold the step's label there
    (hard 0/1 or soft floats in [0, 1], kept as float32). A label of None is an unlabelled
    step (PRM800K-style data label only some steps): label_mask 0 at its end, so the loss,
    its metrics and `reward_model_eval` leave it out; the step is still encoded as context.
    Errors name the row: label count different from the step count, a label outside [0, 1]
    or NaN, and the `encode_steps` errors."""
    if not rows:
        raise ValueError("collate_steps: no examples")
    encoded, masks, labels, at = [], [], [], []
    rows = [row_fields(i, r, ("prompt", "steps", "labels")) for i, r in enumerate(rows)]
    for i, (prompt, steps, step_labels) in enumerate(rows):
        if isinstance(steps, str):
            raise ValueError(f"row {i}: steps must be a list of strings (use split_solution on a completion)")
        if isinstance(step_labels, (str, bytes)) or not hasattr(step_labels, "__len__"):
            raise ValueError(f"row {i}: labels must be a list with one label (or None) per step, got "
                             f"{type(step_labels).__name__} {step_labels!r:.60}")
        if len(step_labels) != len(steps):
            raise ValueError(f"row {i}: {len(step_labels)} labels for {len(steps)} steps")
        ids, m, ends = encode_steps(tokenizer, prompt, steps, separator, row=i, add_bos=add_bos, add_eos=add_eos)
        y = [0.0] * len(ids)
        mark = [0] * len(ids)
        for k, (e, v) in enumerate(zip(ends, step_labels)):
            if v is not None:  # None: no label, the step end stays out of label_mask
                y[e], mark[e] = _label(v, f"row {i}: label of step {k}"), 1
        encoded.append(ids)
        masks.append(m)
        labels.append(y)
        at.append(mark)
    width = padded_width([len(r) for r in encoded], length=length, min_bucket=min_bucket, max_length=max_length,
                         names=[f"row {i}" for i in range(len(rows))])
    tokens, attn, loss, y, mark = pad_rows(encoded, width, tokenizer.pad_id, masks, labels, at)
    return TokenLabelBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, labels=y.astype(np.float32),
                           label_mask=mark)


FEEDBACK_SIGNALS = ("click", "like", "accept")  # the binary signals of `rljax.data.adapters.Interaction`


def _binary(v, where: str) -> float:
    """A logged binary signal as 0.0 / 1.0: a bool, or a number equal to 0 or 1 (a 0/1 column read
    as int or float). bool(v) would turn 0.2, -1 and the string "false" into 1."""
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (str, bytes)) or not isinstance(v, (numbers.Real, np.number)):
        raise ValueError(f"{where} must be 0/1 or a bool, got {type(v).__name__} {v!r}")
    f = float(v)
    if f not in (0.0, 1.0):
        raise ValueError(f"{where} must be 0/1 or a bool, got {v!r}; a graded signal is not a click/like/accept "
                         "(threshold it into one yourself)")
    return f


def collate_feedback(tokenizer: Tokenizer, rows: Sequence, *, signal: str = "click", max_length: int | None = None,
                     min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                     add_eos: bool = True, ipw: bool = True) -> FeedbackBatch:
    """Logged displays (`Interaction` rows, dicts, or (prompt, completion, signal[, propensity[, position]])
    tuples; `rljax.data.collate.row_fields`) -> FeedbackBatch with the named binary signal (click, like or
    accept, `FEEDBACK_SIGNALS`) as 0/1 and the display's propensity (1 where not logged).

    Each signal value must be a bool or a number equal to 0 or 1; anything else (0.2, -1, "false")
    is an error naming the row. dwell_seconds is not binary and is refused: threshold it into one
    of the binary fields first, e.g. `dataclasses.replace(r, accept=r.dwell_seconds >= 30)`. A row
    without the signal logged, or a propensity outside (0, 1], is an error naming it. Rows that log
    a display position but no propensity get one warning per call (`warnings.warn`, naming the
    first such row): their propensity is taken as 1, so inverse-propensity weighting
    (FeedbackConfig(ipw=True), the default) leaves their position bias in; log P(examined | position)
    as the propensity. ipw: whether the batches train with inverse-propensity weights (pass
    FeedbackConfig.ipw): without them the propensities are not read, and nothing is warned of."""
    if not rows:
        raise ValueError("collate_feedback: no examples")
    if signal not in FEEDBACK_SIGNALS:
        hint = (" (a duration, not a binary signal: threshold it into one of those fields first, e.g. "
                "dataclasses.replace(r, accept=r.dwell_seconds >= 30))") if signal == "dwell_seconds" else ""
        raise ValueError(f"collate_feedback: signal {signal!r} is not one of {FEEDBACK_SIGNALS}{hint}")
    pairs, values, props, unweighted = [], [], [], []
    for i, r in enumerate(rows):
        prompt, completion, v, p, position = row_fields(
            i, r, ("prompt", "completion", signal, "propensity", "position"), required=2)
        if p is None and position is not None:
            unweighted.append(i)
        if v is None:
            raise ValueError(f"row {i}: no {signal!r} signal logged")
        p = 1.0 if p is None else _finite(p, f"row {i}: propensity")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"row {i}: propensity must be in (0, 1], got {p}")
        pairs.append((prompt, completion))
        values.append(_binary(v, f"row {i}: {signal!r} signal"))
        props.append(p)
    if unweighted and ipw:
        warnings.warn(f"collate_feedback: row {unweighted[0]} ({len(unweighted)} of {len(rows)} rows) logs a display "
                      "position but no propensity; the propensity is taken as 1, so inverse-propensity weighting "
                      "(FeedbackConfig(ipw=True)) does not correct their position bias. Log P(examined | position) "
                      "as the propensity", stacklevel=2)
    tokens, attn, _ = _encode_rows(tokenizer, pairs, max_length=max_length, min_bucket=min_bucket, length=length,
                                   add_bos=add_bos, add_eos=add_eos)
    return FeedbackBatch(tokens=tokens, attention_mask=attn, signal=np.float32(values),
                         propensity=np.float32(props))


def collate_outcomes(tokenizer: Tokenizer, rows: Sequence, ref_logprobs, *, max_length: int | None = None,
                     min_bucket: int = DEFAULT_MIN_BUCKET, length: int | None = None, add_bos: bool = True,
                     add_eos: bool = True) -> OutcomeBatch:
    """(prompt, completion, label) rows (tuples, `BinaryFeedback`s or dicts) -> OutcomeBatch for the
    implicit PRM, with the reference's token log-probs from `ref_logprobs(tokens, mask)
    -> [B, T-1]` (e.g. `functools.partial(token_logprobs, ref_params, model=model)`)."""
    if not rows:
        raise ValueError("collate_outcomes: no examples")
    rows = [row_fields(i, r, ("prompt", "completion", "label")) for i, r in enumerate(rows)]
    labels = [_label(y, f"row {i}: label") for i, (_, _, y) in enumerate(rows)]
    tokens, attn, loss = _encode_rows(tokenizer, [(p, c) for p, c, _ in rows], max_length=max_length,
                                      min_bucket=min_bucket, length=length, add_bos=add_bos, add_eos=add_eos)
    ref = np.asarray(ref_logprobs(tokens, attn), np.float32)
    if ref.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(f"collate_outcomes: ref_logprobs gave shape {ref.shape}, expected "
                         f"{(tokens.shape[0], tokens.shape[1] - 1)}")
    return OutcomeBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, labels=np.float32(labels),
                        ref_logprobs=ref)
