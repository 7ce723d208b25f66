"""Row lengths checked once, when a data set is built, not when its batch is drawn.

Every row is tokenized when the data set is built (`rljax.recipes.tasks.sft_batches` and
friends) and measured against `max_length` (by default the model's `max_seq_len`). A row
that does not fit is handled by a named policy, `overlong`:

- ``"error"`` (the default): a `DataError` naming the first such row by its place in the
  source (file and line when known, `rljax.data.adapters.row_locator`) and saying how many
  rows are too long, before anything trains;
- ``"drop"``: such rows are left out, and a warning says how many;
- ``"truncate_prompt"``: the prompt loses tokens from its left (its end, next to the
  completion, is kept; leading special tokens such as bos stay), the completion is kept whole;
- ``"truncate_completion"``: the completion loses tokens from its right (eos included, so the
  row no longer teaches stopping), the prompt is kept whole.

A truncation that cannot fit the row (the completion alone, or the prompt alone, is too long)
is an error naming the row. An example is one prompt shared by one or more completions (SFT:
one; a preference pair: chosen and rejected); "truncate_prompt" cuts the shared prompt by the
largest excess so every completion fits after the same prompt, and "drop" drops the example
when any of its completions is too long.

Rows that were checked are handed to the collators as `Tokens` (ids with their special
tokens), so a row is tokenized once and collation pads what was checked.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rljax.data.adapters import DataError

__all__ = ["OVERLONG", "Tokens", "LengthReport", "check_overlong", "fit_example", "fit_lengths"]

OVERLONG = ("error", "drop", "truncate_prompt", "truncate_completion")


class Tokens(tuple):
    """Text that is already tokenized (special tokens included, e.g. a prompt's bos, a
    completion's eos). The collators take it in place of a string and use the ids as they are."""

    __slots__ = ()


@dataclass(frozen=True)
class LengthReport:
    """What the build-time check found: `rows` examples checked against `max_length` tokens,
    `overlong` of them longer (the longest `longest` tokens), of which `dropped` were left out
    and `truncated` cut to fit."""

    rows: int
    max_length: int | None
    overlong: int = 0
    longest: int = 0
    dropped: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        if not self.overlong:
            return f"all {self.rows} rows fit max_length={self.max_length} tokens"
        done = "dropped" if self.dropped else "truncated"
        return (f"{self.overlong} of {self.rows} rows exceed max_length={self.max_length} tokens "
                f"(longest {self.longest}); {self.dropped or self.truncated} {done}")


def check_overlong(overlong: str, allowed: Sequence[str] = OVERLONG) -> str:
    if overlong not in allowed:
        raise ValueError(f"overlong must be one of {', '.join(repr(a) for a in allowed)}, got {overlong!r}")
    return overlong


def fit_example(prompt: Sequence[int], completions: Sequence[Sequence[int]], *, max_length: int, overlong: str,
                keep: int = 0, where: str = "row", names: Sequence[str] | None = None
                ) -> tuple[list[int], list[list[int]]] | None:
    """One example (a prompt's ids, its first `keep` of them special tokens such as bos, and the
    ids of each completion) fitted to `max_length` by the `overlong` policy (module docstring):
    the (prompt, completions) to use, or None when the example is dropped. `where` and `names`
    (one per completion) name the row in errors."""
    prompt, completions = list(prompt), [list(c) for c in completions]
    lengths = [len(prompt) + len(c) for c in completions]
    if max(lengths) <= max_length:
        return prompt, completions
    if overlong == "drop":
        return None
    if names is None:
        names = [f"completion {k}" for k in range(len(completions))]
    if overlong == "truncate_prompt":
        excess = max(lengths) - max_length
        body = len(prompt) - keep
        if body < excess:
            k = max(range(len(completions)), key=lambda k: len(completions[k]))
            raise DataError(f"{where}: the {'completion' if len(completions) == 1 else names[k]} is "
                            f"{len(completions[k])} tokens, with the prompt's {keep} special token(s) more than "
                            f"max_length={max_length}, so overlong='truncate_prompt' cannot fit it")
        return prompt[:keep] + prompt[keep + excess:], completions
    if overlong == "truncate_completion":
        room = max_length - len(prompt)
        if room < 1:
            raise DataError(f"{where}: the prompt alone is {len(prompt)} tokens, max_length={max_length} leaves no "
                            f"room for the completion, so overlong='truncate_completion' cannot fit it")
        return prompt, [c[:room] for c in completions]
    k = max(range(len(completions)), key=lambda k: lengths[k])
    part = "" if len(completions) == 1 else f" ({names[k]})"
    raise DataError(f"{where}{part}: {lengths[k]} tokens exceed max_length={max_length}")


def fit_lengths(examples: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *, max_length: int | None,
                overlong: str = "error", keep: int | Callable[[int], int] = 0,
                where: Callable[[int], str] = lambda i: f"row {i}",
                names: Sequence[str] | None = None, allowed: Sequence[str] = OVERLONG
                ) -> tuple[list[int], list[tuple[list[int], list[list[int]]]], LengthReport]:
    """Every example (prompt ids, [completion ids, ...]) measured against `max_length` and handled
    by `overlong` (see the module docstring): (indices of the examples kept, their fitted
    (prompt, completions), a `LengthReport`). `where(i)` names example i in errors (its file
    and line when known). With overlong="error" the error also says how many examples are too
    long, so one run tells the whole story; "drop" and the truncations warn with the report.
    keep: the leading prompt tokens a truncation keeps (bos), or keep(i) for example i, asked of
    too-long examples only (a chat template's own leading text differs from row to row).
    max_length=None checks nothing."""
    check_overlong(overlong, allowed)
    keep_of = keep if callable(keep) else (lambda i: keep)
    if max_length is None:
        return list(range(len(examples))), [(list(p), [list(c) for c in cs]) for p, cs in examples], \
            LengthReport(rows=len(examples), max_length=None)
    sizes = [max(len(p) + len(c) for c in cs) for p, cs in examples]
    over = [i for i, n in enumerate(sizes) if n > max_length]
    report = LengthReport(rows=len(examples), max_length=max_length, overlong=len(over),
                          longest=max(sizes, default=0) if over else 0,
                          dropped=len(over) if overlong == "drop" else 0,
                          truncated=len(over) if overlong.startswith("truncate") else 0)
    if over and overlong == "error":
        i = over[0]
        try:
            fit_example(*examples[i], max_length=max_length, overlong="error", keep=keep_of(i), where=where(i),
                        names=names)
        except DataError as e:
            others = " or ".join(repr(a) for a in allowed if a != "error")
            raise DataError(f"{e}; {report.overlong} of {report.rows} rows are longer (longest {report.longest}). "
                            f"Raise max_length, or pass overlong={others}") from None
    kept, fitted = [], []
    for i, (p, cs) in enumerate(examples):
        if sizes[i] <= max_length:  # the common case: no need to name the row
            kept.append(i)
            fitted.append((list(p), [list(c) for c in cs]))
            continue
        out = fit_example(p, cs, max_length=max_length, overlong=overlong, keep=keep_of(i), where=where(i),
                          names=names)
        if out is not None:
            kept.append(i)
            fitted.append(out)
    if over:
        # Not an error by request, but a run should still say it changed the data.
        warnings.warn(f"overlong={overlong!r}: {report}", stacklevel=3)
    return kept, fitted, report
