"""Preference optimisation around the phase: reference log-probs computed once and cached on
disk, and the best/worst pairing of sampled answers that online DPO (`rljax.pipelines.online_dpo`)
trains on.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Callable, Sequence

import numpy as np

from rljax.checkpoint import atomic_path, digest_params
from rljax.cpu_dots import jit_full_sequence
from rljax.data.preference_collate import _KTO_FIELDS, _PAIR_FIELDS, _row
from rljax.distributed import on_main, to_host
from rljax.losses.preference import reference_logps
from rljax.models.transformer import check_positions


def _digest_batch(batch, h) -> None:
    for name in ("tokens", "attention_mask", "loss_mask"):
        arr = np.asarray(getattr(batch, name))
        h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())


def cached_reference_logps(params, rows: Sequence, collate: Callable, *, model, cache_dir: str | None = None,
                           batch_size: int = 32, chunk_size: int | None = None) -> np.ndarray:
    """S_ref of every row, computed once: [N, 2] float32 (chosen, rejected for pairs; the
    row and its mismatched pair for KTO rows with a fixed "mismatched" completion).

    rows are collated in order, `batch_size` at a time, by `collate` (e.g.
    `functools.partial(collate_preferences, tokenizer)`). With cache_dir the result is
    stored as ref_logps-<key>.npy, key = SHA-256 of the reference parameters, the model's
    configuration (`model.config`: architecture, RoPE, compute dtype), chunk_size and the
    collated tokens and masks, so a changed model, data set, tokenizer or truncation
    never reuses a stale file; the file is written atomically (temporary + rename).
    Attach the result with `with_reference`. KTO rows need a fixed "mismatched"
    completion (`rljax.data.preference_collate.fixed_mismatch`): the collator refuses
    cached values without one, since the mismatched pairing would differ by batch.
    """
    if not rows:
        raise ValueError("cached_reference_logps: no rows")
    batches = [collate(list(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]
    for b in batches:
        check_positions(b, model.config.max_seq_len, "cached_reference_logps")
    path = None
    if cache_dir is not None:
        h = hashlib.sha256()
        digest_params(params, h)
        h.update(f"model|{model.config!r}|chunk_size|{chunk_size}".encode())  # same params, other function
        for b in batches:
            _digest_batch(b, h)
        path = os.path.join(cache_dir, f"ref_logps-{h.hexdigest()[:32]}.npy")
        if os.path.exists(path):
            out = np.load(path)
            if out.shape == (len(rows), 2):
                return out
    fn = jit_full_sequence(functools.partial(reference_logps, model=model, chunk_size=chunk_size),
                           dtype=model.config.dtype)
    out = np.concatenate([to_host(fn(params, b.replace(ref_logps=None))) for b in batches]).astype(np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise ValueError(f"cached_reference_logps: row {bad} has a non-finite reference log-prob {out[bad]}")
    if path is not None:  # several processes computed the same values: one writes them
        on_main(f"cached_reference_logps: writing {path}", _save_npy, path, out)
    return out


def _save_npy(path: str, values: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, values)


def with_reference(rows: Sequence, ref: np.ndarray) -> list[dict]:
    """rows (tuples, adapter rows or dicts) as dicts carrying their "ref_logps" (a row of `ref`)."""
    ref = np.asarray(ref)
    if ref.shape != (len(rows), 2):
        raise ValueError(f"with_reference: ref_logps of shape {ref.shape} for {len(rows)} rows; expected "
                         f"({len(rows)}, 2)")
    out = []
    for r, lp in zip(rows, ref):
        if isinstance(r, dict):
            d = dict(r)
        elif hasattr(r, "__dataclass_fields__"):
            d = {k: getattr(r, k) for k in r.__dataclass_fields__}
            if "label" in d:  # BinaryFeedback
                d["desirable"] = d.pop("label")
        else:  # positional: (prompt, chosen, rejected, ...) or KTO's (prompt, completion, desirable, ...)
            r = tuple(r)
            kto = len(r) >= 3 and not isinstance(r[2], str)
            fields = _row(len(out), r, _KTO_FIELDS if kto else _PAIR_FIELDS, 3)
            d = {k: v for k, v in fields.items() if v is not None}  # weights, labels, mismatched kept
        d["ref_logps"] = (float(lp[0]), float(lp[1]))
        out.append(d)
    return out


def best_worst_pairs(prompts: Sequence[str], answers: Sequence[Sequence[str]], scores: np.ndarray) -> list[dict]:
    """The highest- against the lowest-scored answer of every prompt (the first of equals);
    prompts whose answers all score the same, or whose best and worst texts are equal, or
    which have an empty answer at either end, give no pair."""
    out = []
    for p, ans, s in zip(prompts, answers, np.asarray(scores, np.float64)):
        i, j = int(np.argmax(s)), int(np.argmin(s))
        if s[i] > s[j] and ans[i] != ans[j] and ans[i] and ans[j]:
            out.append({"prompt": p, "chosen": ans[i], "rejected": ans[j], "margin": float(s[i] - s[j])})
    return out
