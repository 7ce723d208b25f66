"""Collation (examples -> fixed-shape padded arrays) and a resumable batch iterator."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np

from rljax.buckets import bucket_length
from rljax.data.batch import SequenceBatch

T = TypeVar("T")


def collate_prompt_completion(tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int | None = None,
                              min_bucket: int = 16, add_bos: bool = True, add_eos: bool = True,
                              length: int | None = None) -> SequenceBatch:
    """(prompt, completion) pairs -> right-padded SequenceBatch.

    Row = [bos] prompt completion [eos]; loss_mask is 1 on completion tokens and
    eos. Width T = `length` if given, else the longest row rounded up to a power
    of two (>= min_bucket, <= max_length) so that a run compiles a few times.
    A row longer than max_length raises an error naming it.
    """
    if not pairs:
        raise ValueError("collate_prompt_completion: no examples")
    rows, masks = [], []
    for i, (prompt, completion) in enumerate(pairs):
        p = tokenizer.encode(prompt, add_bos=add_bos, add_eos=False)
        c = tokenizer.encode(completion, add_bos=False, add_eos=add_eos)
        if not c:
            raise ValueError(f"row {i}: the completion is empty (nothing to learn)")
        if max_length is not None and len(p) + len(c) > max_length:
            raise ValueError(f"row {i}: {len(p) + len(c)} tokens exceed max_length={max_length}")
        rows.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    longest = max(map(len, rows))
    if length is None:
        length = bucket_length(longest, minimum=min_bucket, maximum=max_length)
    elif longest > length:
        raise ValueError(f"row {int(np.argmax([len(r) for r in rows]))}: {longest} tokens exceed length={length}")
    B = len(rows)
    tokens = np.full((B, length), tokenizer.pad_id, np.int32)
    attn = np.zeros((B, length), np.int32)
    loss = np.zeros((B, length), np.int32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)], attn[i, :len(r)], loss[i, :len(r)] = r, 1, m
    return SequenceBatch(tokens=tokens, attention_mask=attn, loss_mask=loss)


class BatchIterator(Generic[T]):
    """Fixed-size batches over `examples`, reshuffled every epoch from `seed`.

    Batch number n (the data position, counted from 0 over all epochs) is a pure
    function of (examples, batch_size, seed, n): `batch_at(n)`. A resumed run
    continues at exactly the batch it stopped at by passing the saved position.
    The last incomplete batch of an epoch is dropped (fixed shapes).
    """

    def __init__(self, examples: Sequence[T], batch_size: int, collate: Callable[[list[T]], object], *,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"BatchIterator: {len(examples)} examples are fewer than batch_size={batch_size}")
        self.examples, self.batch_size, self.collate = list(examples), batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = len(self.examples) // batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a permutation drawn from (seed, epoch)."""
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def indices_at(self, position: int) -> np.ndarray:
        epoch, k = divmod(int(position), self.batches_per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch_at(self, position: int):
        return self.collate([self.examples[i] for i in self.indices_at(position)])

    def iterate(self, start: int = 0) -> Iterator[tuple[int, object]]:
        """(position, batch) pairs from `start` on, forever."""
        position = int(start)
        while True:
            yield position, self.batch_at(position)
            position += 1
