"""Collation for preference optimisation: pairs (DPO family) and unpaired binary feedback (KTO).

A pair row is `(prompt, chosen, rejected)`, a `PreferencePair` from the adapters, or a
dict with those keys; an optional fourth field / "ref_logps" key carries the
reference's summed log-probs (S_ref(y_w), S_ref(y_l)) precomputed by
`rljax.reference.cached_reference_logps`; optional "weight" (a finite number >= 0, the
pair's weight in the loss's weighted mean) and "label" (a soft label in [0, 1], the
probability that chosen is preferred) keys or fields fill PreferenceBatch.weight and
.label (rows without them count 1; a batch where no row has one leaves it None). A KTO row is `(prompt, completion,
desirable)`, a `BinaryFeedback`, or a dict, optionally with "mismatched" (the
completion paired with this prompt for z₀; default: the next row's completion in the
batch, rotating by one) and "ref_logps".

Truncation follows the usual recipe: the prompt is cut from the left to
`max_prompt_length` tokens (its last tokens are kept), then the completion from the
right so the row fits `max_length`. A dict row's optional "prompt_keep" key (an int) keeps that
many leading prompt tokens through the cut (a chat template's own leading text: the recipes
set it), the cut then falling after them. A completion that ends up empty is an error naming
the row and field, never a silent NaN.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rljax.buckets import DEFAULT_MIN_BUCKET
from rljax.data.batch import KTOBatch, PreferenceBatch
from rljax.data.collate import collate_shared_prompt, encode_text, pad_rows, padded_width, row_fields
from rljax.tokenizer import Tokenizer

_PAIR_FIELDS = ("prompt", "chosen", "rejected", "ref_logps", "weight", "label")
_KTO_FIELDS = ("prompt", "completion", "desirable", "mismatched", "ref_logps")


def _row(i: int, row, names: tuple[str, ...], required: int) -> dict:
    """A row (a dict, an adapter row or a tuple of `required` to all fields, `rljax.data.collate.row_fields`)
    as {field: value}; a required field that is missing or None is an error naming the row and field."""
    out = dict(zip(names, row_fields(i, row, names, required=required,
                                     aliases={"desirable": "label"})))  # BinaryFeedback calls it label
    for n in names[:required]:
        if out[n] is None:
            raise ValueError(f"row {i}: missing field {n!r}")
    return out


def _text(i: int, value, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"row {i}: {field} must be a string, got {type(value).__name__}")
    return value


def cut_prompt(ids: Sequence[int], max_prompt_length: int, keep: int = 0) -> list[int]:
    """A prompt longer than max_prompt_length tokens cut to it: its first `keep` tokens (a chat template's
    leading text; keep < max_prompt_length) and its last max_prompt_length − keep."""
    return list(ids[:keep]) + list(ids[len(ids) - (max_prompt_length - keep):])


def encode_truncated(tokenizer: Tokenizer, prompt: str, completion: str, row: int, field: str, *,
                     max_length: int | None, max_prompt_length: int | None, add_bos: bool = True,
                     add_eos: bool = True, prompt_keep: int = 0) -> tuple[list[int], list[int]]:
    """[bos] prompt completion [eos] with the prompt cut to max_prompt_length tokens, its first
    prompt_keep and its last max_prompt_length − prompt_keep (a chat template's leading text kept,
    the cut after it; prompt_keep 0: the last tokens), and the completion from the right to fit
    max_length -> (ids, completion mask). An empty completion, before or after truncation, is an
    error naming the row, as are text the tokenizer cannot encode, a value that is not text
    (`rljax.data.collate.encode_text`) and a max_prompt_length that leaves nothing after the kept tokens."""
    p = encode_text(tokenizer, prompt, row, "prompt", add_bos=False, add_eos=False)
    bos = tokenizer.encode("", add_bos=add_bos, add_eos=False)
    c = encode_text(tokenizer, completion, row, field, add_bos=False, add_eos=add_eos)
    if not completion or not c:
        raise ValueError(f"row {row}: the {field} is empty (nothing to compare)")
    if max_prompt_length is not None and len(p) > max_prompt_length:
        if prompt_keep >= max_prompt_length:
            raise ValueError(f"row {row}: max_prompt_length={max_prompt_length} leaves no room for the prompt's text "
                             f"after its {prompt_keep} leading template tokens; raise max_prompt_length")
        p = cut_prompt(p, max_prompt_length, prompt_keep)
    if max_length is not None and len(bos) + len(p) + len(c) > max_length:
        c = c[:max(max_length - len(bos) - len(p), 0)]
        if not c:
            raise ValueError(f"row {row}: the {field} is empty after truncation (prompt of {len(p)} tokens, "
                             f"max_length={max_length}); lower max_prompt_length or raise max_length")
    ids = bos + p + c
    return ids, [0] * (len(bos) + len(p)) + [1] * len(c)


def _ref(i: int, value, n: int = 2):
    if value is None:
        return None
    ref = np.asarray(value, np.float32).reshape(-1)
    if ref.shape != (n,) or not np.all(np.isfinite(ref)):
        raise ValueError(f"row {i}: ref_logps must be {n} finite numbers, got {value!r}")
    return ref


def _weight_or_label(i: int, value, field: str) -> float:
    """A row's "weight" (finite, >= 0) or "label" (in [0, 1]) as a float; 1 when absent."""
    if value is None:
        return 1.0
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row {i}: {field} must be a number, got {value!r}") from None
    if field == "weight" and not (np.isfinite(v) and v >= 0):
        raise ValueError(f"row {i}: weight must be finite and >= 0, got {value!r}")
    if field == "label" and not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"row {i}: label (P(chosen preferred)) must be in [0, 1], got {value!r}")
    return v


def _per_pair(rows: list[dict], field: str) -> np.ndarray | None:
    """[B] float32 of the rows' `field` (1 where absent), or None when no row has it."""
    if all(r[field] is None for r in rows):
        return None
    return np.array([_weight_or_label(i, r[field], field) for i, r in enumerate(rows)], np.float32)


def _stack(rows_per_example: list[list[tuple[list[int], list[int]]]], refs: list, tokenizer: Tokenizer, *, length,
           min_bucket, max_length, names) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    flat = [r for rows in rows_per_example for r in rows]
    width = padded_width([len(ids) for ids, _ in flat], length=length, min_bucket=min_bucket, max_length=max_length,
                         names=names)
    tokens, attn, loss = pad_rows([ids for ids, _ in flat], width, tokenizer.pad_id, [m for _, m in flat])
    B = len(rows_per_example)
    shape = (B, 2, width)
    return tokens.reshape(shape), attn.reshape(shape), loss.reshape(shape), _stack_refs(refs)


def _stack_refs(refs: list) -> np.ndarray | None:
    """The rows' ref_logps as [B, 2] float32, None when no row has them; some but not all is an error."""
    if any(r is None for r in refs) and not all(r is None for r in refs):
        i = next(k for k, r in enumerate(refs) if r is None)
        raise ValueError(f"row {i}: has no ref_logps while other rows of the batch do")
    return None if refs[0] is None else np.stack(refs).astype(np.float32)


def collate_preferences(tokenizer: Tokenizer, rows: Sequence, *, max_length: int | None = None,
                        max_prompt_length: int | None = None, min_bucket: int = DEFAULT_MIN_BUCKET,
                        length: int | None = None, add_bos: bool = True, add_eos: bool = True,
                        share_prompt: bool = False) -> PreferenceBatch:
    """Pair rows -> PreferenceBatch [B, 2, T] (chosen at index 0, rejected at 1), right-padded
    to a bucketed width, with optional per-pair weight and soft label [B] (see the module
    docstring). Errors name the row: a missing field, an empty completion (also after
    truncation), chosen identical to rejected, bad ref_logps, a weight that is negative or
    not finite, a label outside [0, 1].

    share_prompt: PreferenceBatch's shared-prompt layout instead, [B, W] rows of [bos] prompt,
    chosen, rejected (W bucketed from the longest such row; `length` fixes it), so the
    policy and the reference run each prompt once: P + C + R tokens a pair instead of
    2P + C + R. The losses and reference log-probs are the same up to float rounding."""
    if not rows:
        raise ValueError("collate_preferences: no examples")
    encoded, refs, names, parsed = [], [], [], []
    for i, raw in enumerate(rows):
        r = _row(i, raw, _PAIR_FIELDS, 3)
        parsed.append(r)
        prompt = _text(i, r["prompt"], "prompt")
        chosen, rejected = _text(i, r["chosen"], "chosen"), _text(i, r["rejected"], "rejected")
        if chosen == rejected:
            raise ValueError(f"row {i}: chosen and rejected are the same text, so the pair says nothing")
        keep = _prompt_keep(i, raw)
        encoded.append([encode_truncated(tokenizer, prompt, text, i, field, max_length=max_length,
                                         max_prompt_length=max_prompt_length, add_bos=add_bos, add_eos=add_eos,
                                         prompt_keep=keep)
                        for field, text in (("chosen", chosen), ("rejected", rejected))])
        if encoded[-1][0][0] == encoded[-1][1][0]:  # texts differ only past the cut: the pair says nothing either
            raise ValueError(f"row {i}: chosen and rejected are the same tokens after truncation to "
                             f"max_length={max_length}; raise max_length or drop the row")
        refs.append(_ref(i, r["ref_logps"]))
        names += [f"row {i} chosen", f"row {i} rejected"]
    weight, label = _per_pair(parsed, "weight"), _per_pair(parsed, "label")
    if share_prompt:
        ref = _stack_refs(refs)
        tokens, attn, loss, positions, segments = collate_shared_prompt(
            encoded, tokenizer.pad_id, length=length, min_bucket=min_bucket,
            names=[f"row {i} (prompt, chosen, rejected)" for i in range(len(encoded))])
        return PreferenceBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, ref_logps=ref, weight=weight,
                               label=label, positions=positions, segment_ids=segments)
    tokens, attn, loss, ref = _stack(encoded, refs, tokenizer, length=length, min_bucket=min_bucket,
                                     max_length=max_length, names=names)
    return PreferenceBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, ref_logps=ref, weight=weight,
                           label=label)


def _desirable(i: int, value) -> float:
    """A KTO row's label as 1.0 / 0.0: a bool or a real number equal to 0 or 1 (numpy scalars included);
    anything else (an array, a string, 0.5, None) is a ValueError naming the row."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float, np.integer, np.floating))
                                               and value in (0, 1)):
        return float(value)
    raise ValueError(f"row {i}: desirable must be a boolean or 0/1, got {value!r}")


def _prompt_keep(i: int, raw) -> int:
    """A dict row's "prompt_keep" (the leading prompt tokens a cut keeps), 0 for other rows and without one."""
    keep = (raw.get("prompt_keep") if isinstance(raw, Mapping) else None) or 0
    if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or keep < 0:
        raise ValueError(f"row {i}: prompt_keep must be a whole number >= 0, got {keep!r}")
    return int(keep)


def collate_kto(tokenizer: Tokenizer, rows: Sequence, *, max_length: int | None = None,
                max_prompt_length: int | None = None, min_bucket: int = DEFAULT_MIN_BUCKET,
                length: int | None = None, add_bos: bool = True, add_eos: bool = True) -> KTOBatch:
    """KTO rows -> KTOBatch [B, 2, T]: index 0 (x_i, y_i), index 1 the mismatched pair
    (x_i, y_(i+1) mod B) (or the row's own "mismatched" completion). Needs B >= 2."""
    if len(rows) < 2:
        raise ValueError(f"collate_kto: KTO's reference point z0 needs mismatched pairs from other rows of the "
                         f"batch; got a batch of {len(rows)}, use at least 2")
    parsed = [_row(i, raw, _KTO_FIELDS, 3) for i, raw in enumerate(rows)]
    encoded, refs, names, desirable = [], [], [], []
    B = len(parsed)
    for i, r in enumerate(parsed):
        prompt, completion = _text(i, r["prompt"], "prompt"), _text(i, r["completion"], "completion")
        if r["ref_logps"] is not None and r["mismatched"] is None:
            # the cached value of the mismatched pair belongs to whichever row followed this one when it
            # was computed; batches are drawn in another order, so z0 would read other completions' values
            raise ValueError(f"row {i}: has ref_logps but no fixed 'mismatched' completion, so its cached "
                             "mismatched log-prob belongs to another pairing; give the rows a fixed one with "
                             "fixed_mismatch(rows, seed) before cached_reference_logps")
        other = r["mismatched"] if r["mismatched"] is not None else parsed[(i + 1) % B]["completion"]
        keep = _prompt_keep(i, rows[i])
        encoded.append([encode_truncated(tokenizer, prompt, text, i, field, max_length=max_length,
                                         max_prompt_length=max_prompt_length, add_bos=add_bos, add_eos=add_eos,
                                         prompt_keep=keep)
                        for field, text in (("completion", completion),
                                            ("mismatched completion", _text(i, other, "mismatched")))])
        refs.append(_ref(i, r["ref_logps"]))
        desirable.append(_desirable(i, r["desirable"]))
        names += [f"row {i} completion", f"row {i} mismatched"]
    tokens, attn, loss, ref = _stack(encoded, refs, tokenizer, length=length, min_bucket=min_bucket,
                                     max_length=max_length, names=names)
    return KTOBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, desirable=np.asarray(desirable, np.float32),
                    ref_logps=ref)


def fixed_mismatch(rows: Sequence, seed: int) -> list[dict]:
    """KTO rows with a "mismatched" completion drawn once over the whole data set (a random
    rotation: row i gets the completion of row σ(i) ≠ i), so the mismatched rows are a
    function of the data alone and their reference log-probs can be precomputed."""
    parsed = [_row(i, raw, _KTO_FIELDS, 3) for i, raw in enumerate(rows)]
    if len(parsed) < 2:
        raise ValueError(f"fixed_mismatch: need at least 2 rows, got {len(parsed)}")
    order = np.random.default_rng(seed).permutation(len(parsed))
    partner = np.empty(len(parsed), np.int64)
    partner[order] = np.roll(order, -1)  # a single cycle: nobody is paired with itself
    return [dict(r, mismatched=parsed[int(j)]["completion"]) for r, j in zip(parsed, partner)]
