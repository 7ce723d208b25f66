"""Collation (examples -> fixed-shape padded arrays) and a resumable batch iterator."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np

from rljax.buckets import DEFAULT_MIN_BUCKET, bucket_length
from rljax.data.batch import PROMPT_SEGMENT, SequenceBatch, answer_segment
from rljax.data.lengths import Tokens
from rljax.tokenizer import Tokenizer, UnknownCharacterError

T = TypeVar("T")
_ABSENT = object()  # a field a row does not have (None is a value)


def row_fields(i: int, row, names: Sequence[str], *, required: int | None = None,
               aliases: Mapping[str, str] | None = None) -> tuple:
    """Row `i`'s fields `names`, in that order: from a dict (any Mapping: a `datasets.Dataset` row,
    `load_records(...).to_list()`) by key, from a tuple or list by position, or from any other object
    (an adapter row of `rljax.data.adapters`, a namedtuple) by attribute; `aliases` maps a field to
    the attribute an adapter row keeps it under (BinaryFeedback's "label" is KTO's "desirable").
    The first `required` names (default: all) must be present; the others read None when absent
    (a tuple may leave them out). A value of None is returned as it is (the caller decides what
    None means). A missing required field, or a tuple of another length, is a ValueError naming
    the row and the field(s)."""
    required = len(names) if required is None else required
    if isinstance(row, (str, bytes)):
        raise ValueError(f"row {i}: expected a dict, a tuple or an adapter row with fields {tuple(names)}, got "
                         f"{type(row).__name__} {row!r:.60}")
    if isinstance(row, Mapping):
        values = [row[n] if n in row else _ABSENT for n in names]
    elif isinstance(row, Sequence) and not hasattr(row, "_fields"):  # positional (a namedtuple goes by name)
        if not required <= len(row) <= len(names):
            count = len(names) if required == len(names) else f"{required} to {len(names)}"
            raise ValueError(f"row {i}: expected {count} fields {tuple(names)}, got {len(row)}")
        values = list(row) + [None] * (len(names) - len(row))
    else:
        aliases = aliases or {}
        values = [getattr(row, n) if hasattr(row, n) else getattr(row, aliases.get(n, n), _ABSENT) for n in names]
    for n, v in zip(names[:required], values):
        if v is _ABSENT:
            raise ValueError(f"row {i}: missing field {n!r}")
    return tuple(None if v is _ABSENT else v for v in values)


def encode_text(tokenizer: Tokenizer, text, row: int, field: str, *, add_bos: bool, add_eos: bool) -> list[int]:
    """The ids of row `row`'s `field`: a string tokenized ([bos] text [eos] on request), `Tokens` (tokenized
    when the data set was built, specials included) as they are. Anything else (None: a missing value)
    is a ValueError naming the row and the field; a tokenizer's ValueError (an `UnknownCharacterError`
    keeps its type, piece and position) is raised again with "row {row}: {field}: " before its message."""
    if isinstance(text, Tokens):
        return list(text)
    if text is None:
        raise ValueError(f"row {row}: the {field} is missing (None)")
    if not isinstance(text, str):
        raise ValueError(f"row {row}: the {field} must be a string, got {type(text).__name__} {text!r:.60}")
    try:
        return tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos)
    except UnknownCharacterError as e:
        raise UnknownCharacterError(f"row {row}: {field}: {e}", e.piece, e.position) from e
    except ValueError as e:
        raise ValueError(f"row {row}: {field}: {e}") from e


def encode_prompt_completion(tokenizer: Tokenizer, prompt: str, completion: str, row: int, *, add_bos: bool,
                             add_eos: bool, field: str = "completion") -> tuple[list[int], list[int]]:
    """[bos] prompt completion [eos] -> (ids, completion mask); a completion of no token at all (empty, and no
    eos added) is an error naming the row (an empty text with eos is one token: a scored sample that stopped at
    once; SFT data refuse it, `collate_prompt_completion`).
    A prompt or completion given as `Tokens` (tokenized when the data set was built, specials
    included) is used as it is; other values and tokenizer errors are errors naming the row and
    field (`encode_text`)."""
    p = encode_text(tokenizer, prompt, row, "prompt", add_bos=add_bos, add_eos=False)
    c = encode_text(tokenizer, completion, row, field, add_bos=False, add_eos=add_eos)
    if not c:
        raise ValueError(f"row {row}: the {field} is empty (nothing to learn)")
    return p + c, [0] * len(p) + [1] * len(c)


def pack_shared_prompt(row: int, encodings: Sequence[tuple[list[int], list[int]]]):
    """Completions of one prompt, each encoded as ([bos] prompt completion, completion mask), ->
    one row of the shared-prompt layout: (ids, loss mask, positions, segment ids) lists holding
    the prompt once (segment PROMPT_SEGMENT) and then completion k (segment answer_segment(k)),
    its positions continuing from the prompt's. The encodings must carry the same prompt, which
    is checked (an error names the row). With no prompt token at all (an empty prompt without
    bos) the first token of every completion but the first keeps no prediction in the loss
    mask, as the first one's has none in its own row."""
    n = encodings[0][1].index(1)
    for k, (ids, mask) in enumerate(encodings):
        if mask.index(1) != n or ids[:n] != encodings[0][0][:n]:
            raise ValueError(f"row {row}: completions 0 and {k} encode different prompts, so they cannot share one")
    ids, loss, positions, segments = [], [], [], []
    for k, (c_ids, c_mask) in enumerate(encodings):
        start = 0 if k == 0 else n
        ids += c_ids[start:]
        loss += c_mask[start:] if n or k == 0 else [0] + c_mask[1:]
        positions += list(range(start, len(c_ids)))
        segments += [PROMPT_SEGMENT] * (n - start) + [answer_segment(k)] * (len(c_ids) - n)
    return ids, loss, positions, segments


def collate_shared_prompt(examples: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int, *, length: int | None,
                          min_bucket: int, names: Sequence[str]) -> list[np.ndarray]:
    """Each example's completions of one prompt (`pack_shared_prompt`'s encodings) -> tokens,
    attention_mask, loss_mask, positions, segment_ids [B, W] of the shared-prompt layout. Each
    [prompt, completion] sequence already fits max_length; a row holds several of them, so W is
    bucketed without that cap (`length` fixes it; a row that does not fit is named by `names`;
    the model's length check exempts packed rows)."""
    packed = [pack_shared_prompt(i, encodings) for i, encodings in enumerate(examples)]
    width = padded_width([len(p[0]) for p in packed], length=length, min_bucket=min_bucket, max_length=None,
                         names=names)
    return pad_rows([p[0] for p in packed], width, pad_id, *([p[k] for p in packed] for k in (1, 2, 3)))


def padded_width(lengths: Sequence[int], *, length: int | None, min_bucket: int, max_length: int | None,
                 names: Sequence[str]) -> int:
    """The padded width: `length` if given, else the longest row's bucketed width
    (`rljax.buckets.bucket_length`: powers of two up to 64, then four widths an octave);
    a row that does not fit is an error naming it."""
    for name, n in zip(names, lengths):
        if max_length is not None and n > max_length:
            raise ValueError(f"{name}: {n} tokens exceed max_length={max_length}")
        if length is not None and n > length:
            raise ValueError(f"{name}: {n} tokens exceed length={length}")
    return length if length is not None else bucket_length(max(lengths), minimum=min_bucket, maximum=max_length)


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, *others: Sequence[Sequence],
             side: str = "right") -> list[np.ndarray]:
    """Pad token rows to `width`: [tokens, attention_mask, *others] as [len(rows), width] arrays
    (`others` are per-token lists, int32 or float32 as given, padded with 0). side="right" (training
    rows) or "left" (prompts for sampling: every row ends in the last column)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_rows: side must be 'left' or 'right', got {side!r}")
    B = len(rows)
    tokens = np.full((B, width), pad_id, np.int32)
    attn = np.zeros((B, width), np.int32)
    outs = [np.zeros((B, width), np.float32 if any(isinstance(v, float) for r in o for v in r) else np.int32)
            for o in others]
    def at(n):  # the columns a row of n values fills
        return slice(width - n, width) if side == "left" else slice(0, n)

    for i, r in enumerate(rows):
        tokens[i, at(len(r))], attn[i, at(len(r))] = r, 1
        for out, o in zip(outs, others):
            out[i, at(len(o[i]))] = o[i]
    return [tokens, attn, *outs]


def collate_prompt_completion(tokenizer: Tokenizer, pairs: Sequence, *, max_length: int | None = None,
                              min_bucket: int = DEFAULT_MIN_BUCKET, add_bos: bool = True, add_eos: bool = True,
                              length: int | None = None) -> SequenceBatch:
    """(prompt, completion) rows (tuples, `PromptCompletion`s or dicts, `row_fields`) -> right-padded
    SequenceBatch.

    Row = [bos] prompt completion [eos]; loss_mask is 1 on completion tokens and
    eos. Width T = `length` if given, else the longest row rounded up to its bucket
    (`rljax.buckets.bucket_length`, >= min_bucket, <= max_length) so that a run compiles a few times.
    A row longer than max_length raises an error naming it, as does an empty completion text (it
    would train on eos alone: usually a data bug; an intended "stop at once" example is not
    plain text here, give it as `Tokens` [eos]), a missing field, a value that is not text and
    text the tokenizer cannot encode.
    """
    if not pairs:
        raise ValueError("collate_prompt_completion: no examples")
    pairs = [row_fields(i, r, ("prompt", "completion")) for i, r in enumerate(pairs)]
    for i, (_, c) in enumerate(pairs):
        if isinstance(c, str) and not c:
            raise ValueError(f"row {i}: the completion is empty (training would teach eos alone); drop the row, "
                             "or give the completion as Tokens([eos_id]) if stopping at once is what it teaches")
    encoded = [encode_prompt_completion(tokenizer, p, c, i, add_bos=add_bos, add_eos=add_eos)
               for i, (p, c) in enumerate(pairs)]
    rows, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    width = padded_width([len(r) for r in rows], length=length, min_bucket=min_bucket, max_length=max_length,
                   names=[f"row {i}" for i in range(len(rows))])
    tokens, attn, loss = pad_rows(rows, width, tokenizer.pad_id, masks)
    return SequenceBatch(tokens=tokens, attention_mask=attn, loss_mask=loss)


def _ordered_draws(n: int, k: int, limit: int) -> int:
    """n! / (n − k)! (the ordered draws of k of n items), or limit + 1 once it exceeds `limit`."""
    out = 1
    for f in range(n, n - k, -1):
        out *= f
        if out > limit:
            return limit + 1
    return out


class BatchIterator(Generic[T]):
    """Fixed-size batches over `examples`, reshuffled every epoch from `seed`.

    Batch number n (the data position, counted from 0 over all epochs) is a pure
    function of (examples, batch_size, seed, n): `batch_at(n)`. A resumed run
    continues at exactly the batch it stopped at by passing the saved position.
    Shuffled, the last incomplete batch of an epoch is dropped (fixed shapes; the next
    epoch's permutation brings those rows back). Unshuffled (`shuffle=False`), the rows
    are one cycle read in order: batch n holds rows nB .. nB + B − 1 (mod N), so a data
    set that batch_size does not divide wraps into the next pass and no row is left out.

    Collated batches are memoised by their example indices (the same rows in the same
    order give the same batch, so results are bit-identical to collating again) when
    every distinct batch fits in `cache` entries: without shuffling the D =
    N / gcd(N, batch_size) batches of the cycle recur; with shuffling a batch is
    an ordered draw of batch_size of the N examples, D = N! / (N − batch_size)!, so only
    tiny data sets recur. A data set that is one batch with shuffle=False is collated
    once. `collate` must be a pure function of its rows (cache=0 otherwise), and
    callers must not mutate a returned batch in place (it is handed out again).
    """

    def __init__(self, examples: Sequence[T], batch_size: int, collate: Callable[[list[T]], object], *,
                 seed: int = 0, shuffle: bool = True, cache: int = 64):
        if batch_size < 1:
            raise ValueError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"BatchIterator: {len(examples)} examples are fewer than batch_size={batch_size}")
        if cache < 0:
            raise ValueError(f"BatchIterator: cache must be >= 0, got {cache}")
        if seed < 0:
            raise ValueError(f"BatchIterator: seed must be >= 0, got {seed}")
        self.examples, self.batch_size, self.collate = list(examples), batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = len(self.examples) // batch_size
        n = len(self.examples)
        distinct = _ordered_draws(n, batch_size, cache) if shuffle else n // math.gcd(n, batch_size)
        self._cache: dict[tuple[int, ...], object] | None = {} if distinct <= cache else None

    def description(self) -> dict:
        """What fixes batch n besides the rows' contents: {"examples", "batch_size", "seed", "shuffle"} (kept in
        a phase's checkpoints; resuming with other values is said, `rljax.phases.run_loop`)."""
        return {"examples": len(self.examples), "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle}

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a permutation drawn from (seed, epoch)."""
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def indices_at(self, position: int) -> np.ndarray:
        """The example indices of batch `position` (see the class docstring)."""
        if not self.shuffle:
            return (np.arange(self.batch_size) + int(position) * self.batch_size) % len(self.examples)
        epoch, k = divmod(int(position), self.batches_per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch_at(self, position: int):
        """The collated batch at data position `position` (memoised, see the class docstring).
        An error from `collate` gets a note mapping its rows ("row 2" is the batch's row 2) to
        the examples' indices, which are the data set's rows."""
        indices = self.indices_at(position)
        key = tuple(int(i) for i in indices)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        try:
            batch = self.collate([self.examples[i] for i in key])
        except Exception as e:
            # Collators number rows within the batch; only the iterator knows which examples they are.
            e.add_note(f"BatchIterator: batch at data position {position}; its rows 0..{len(key) - 1} are "
                       f"examples {list(key)} (0-based indices into the data set)")
            raise
        if self._cache is not None:
            self._cache[key] = batch
        return batch

    def iterate(self, start: int = 0) -> Iterator[tuple[int, object]]:
        """(position, batch) pairs from `start` on, forever."""
        position = int(start)
        while True:
            yield position, self.batch_at(position)
            position += 1
