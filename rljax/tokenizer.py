"""Tokenizers for training and sampling: a tiny character tokenizer and a
wrapper around HuggingFace `tokenizers`.

Both share one interface (`Tokenizer`):

  encode(text)            -> list[int]                    (bos prepended by default)
  decode(ids)             -> str                          (ids: list or 1-D array [T])
  encode_batch(texts)     -> (tokens [B, T], mask [B, T])  int32, left or right padded
  decode_batch(ids_2d)    -> list[str]                    (ids_2d: [B, T] or ragged list)

`CharTokenizer` is for synthetic tasks (arithmetic, toy languages) with the
tiny/small model presets, whose vocabulary is 64; `HFTokenizer` loads a
pretrained model's `tokenizer.json`.
"""
from __future__ import annotations

import os
import string
from typing import Any, Iterable, Sequence

import numpy as np
import tokenizers

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "DEFAULT_ALPHABET",
    "UnknownCharacterError",
    "Tokenizer",
    "CharTokenizer",
    "HFTokenizer",
]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_NUM_SPECIAL = 3
# The tiny/small model presets have a 64-entry embedding table.
_PRESET_VOCAB = 64

DEFAULT_ALPHABET = string.digits + "+-*/=()<>.,:;?!'\"" + " \n" + string.ascii_lowercase
assert len(DEFAULT_ALPHABET) + _NUM_SPECIAL <= _PRESET_VOCAB

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class UnknownCharacterError(ValueError):
    """Text contains something the vocabulary cannot represent."""

    def __init__(self, message: str, piece: str, position: int):
        super().__init__(message)
        self.piece = piece
        self.position = position


def _excerpt(text: str, position: int, width: int = 40) -> str:
    """repr of `text`, or of a window around `position` if the text is long."""
    if len(text) <= 2 * width:
        return repr(text)
    lo = max(0, position - width // 2)
    hi = min(len(text), lo + width)
    prefix = "..." if lo > 0 else ""
    suffix = "..." if hi < len(text) else ""
    return f"{prefix}{text[lo:hi]!r}{suffix}"


def _as_id_array(ids: Any) -> np.ndarray:
    """Any list / numpy / jax sequence of ids -> 1-D int64 numpy array [T]."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class Tokenizer:
    """Base class: subclasses set the four attributes and implement
    `encode` and `_decode_kept`."""

    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """text -> ids [T], with bos prepended / eos appended on request."""
        raise NotImplementedError

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = True,
        add_eos: bool = False,
        padding_side: str = "left",
        length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """texts [B] -> (tokens [B, T] int32, attention_mask [B, T] int32).

        T is the longest row, or `length` if given, then rounded up to a
        multiple of `pad_to_multiple_of` (fewer distinct shapes -> fewer
        recompilations). Left padding keeps the last prompt token in the last
        column, which is what generation wants; right padding suits training.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, got a single str")
        if len(texts) == 0:
            raise ValueError("encode_batch got an empty list of texts")
        if padding_side not in ("left", "right"):
            raise ValueError(
                f"padding_side must be 'left' or 'right', got {padding_side!r}"
            )
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")

        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        if length is None:
            width = max(len(r) for r in rows)
        else:
            for i, r in enumerate(rows):
                if len(r) > length:
                    raise ValueError(
                        f"row {i} has {len(r)} tokens, longer than length={length}"
                    )
            width = length
        if pad_to_multiple_of is not None:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            n = len(r)
            if n == 0:
                continue
            if padding_side == "left":
                tokens[i, width - n :] = r
                mask[i, width - n :] = 1
            else:
                tokens[i, :n] = r
                mask[i, :n] = 1
        return tokens, mask

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Any, *, stop_at_eos: bool = True, skip_special: bool = True) -> str:
        """ids [T] (list, numpy or jax array) -> text.

        With `stop_at_eos`, the first eos and everything after it are dropped.
        With `skip_special`, pad and bos (and eos, if kept) are dropped.
        """
        arr = _as_id_array(ids)
        positions = np.arange(arr.shape[0])
        if stop_at_eos and self.pad_id == self.eos_id:
            # With pad == eos, a left-padded row would otherwise "stop" at its
            # first padding token and decode to nothing.
            start = 0
            while start < arr.shape[0] and arr[start] == self.pad_id:
                start += 1
            arr, positions = arr[start:], positions[start:]
        if stop_at_eos:
            hits = np.flatnonzero(arr == self.eos_id)
            if hits.size:
                arr, positions = arr[: hits[0]], positions[: hits[0]]
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            j = int(bad[0])
            raise ValueError(
                f"id {int(arr[j])} at position {int(positions[j])} is outside "
                f"[0, {self.vocab_size})"
            )
        if skip_special:
            special = [self.pad_id, self.eos_id]
            if self.bos_id is not None:
                special.append(self.bos_id)
            arr = arr[~np.isin(arr, special)]
        return self._decode_kept([int(i) for i in arr], skip_special=skip_special)

    def decode_batch(self, ids_2d: Any, **kw: Any) -> list[str]:
        """ids [B, T] (array or list of rows, possibly ragged) -> B texts."""
        if hasattr(ids_2d, "__array__"):  # numpy or jax
            arr = np.asarray(ids_2d)
            if arr.ndim != 2:
                raise ValueError(f"decode_batch expects a 2-D array, got shape {arr.shape}")
            rows: Iterable[Any] = list(arr)
        else:
            rows = ids_2d
        return [self.decode(r, **kw) for r in rows]

    def _decode_kept(self, ids: list[int], *, skip_special: bool) -> str:
        """ids already cut at eos, range-checked and filtered -> text."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per character: 0 pad, 1 bos, 2 eos, then the alphabet in order
    from id 3. `vocab_size = 3 + len(alphabet)`."""

    _SPECIAL_TEXT = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not alphabet:
            raise ValueError("alphabet must not be empty")
        seen: set[str] = set()
        for i, ch in enumerate(alphabet):
            if ch in seen:
                raise ValueError(
                    f"alphabet has repeated character {ch!r} (second at position {i})"
                )
            seen.add(ch)
        self.alphabet = alphabet
        self.pad_id = PAD_ID
        self.bos_id = BOS_ID
        self.eos_id = EOS_ID
        self.vocab_size = _NUM_SPECIAL + len(alphabet)
        self._char_to_id = {ch: _NUM_SPECIAL + i for i, ch in enumerate(alphabet)}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, alphabet={self.alphabet!r})"

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """text -> ids [len(text) + add_bos + add_eos]."""
        lookup = self._char_to_id
        try:
            body = [lookup[ch] for ch in text]
        except KeyError:
            # Only on failure: find which character, so the message can point at it.
            pos = next(i for i, ch in enumerate(text) if ch not in lookup)
            ch = text[pos]
            raise UnknownCharacterError(
                f"unknown character {ch!r} at position {pos} of {_excerpt(text, pos)}",
                ch,
                pos,
            ) from None
        return ([self.bos_id] if add_bos else []) + body + ([self.eos_id] if add_eos else [])

    def _decode_kept(self, ids: list[int], *, skip_special: bool) -> str:
        alphabet = self.alphabet
        return "".join(
            self._SPECIAL_TEXT[i] if i < _NUM_SPECIAL else alphabet[i - _NUM_SPECIAL]
            for i in ids
        )


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from a `tokenizer.json` file, a directory
    holding one, or an already-built object) behind the common interface.

    bos/eos are added by this class, not by the tokenizer's post-processor,
    so `add_bos` / `add_eos` mean the same thing for every model.
    """

    def __init__(
        self,
        path_or_tokenizer: str | os.PathLike[str] | tokenizers.Tokenizer,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        if isinstance(path_or_tokenizer, tokenizers.Tokenizer):
            self.tokenizer = path_or_tokenizer
        else:
            path = os.fspath(path_or_tokenizer)
            if os.path.isdir(path):
                path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            self.tokenizer = tokenizers.Tokenizer.from_file(path)

        eos_id = self._lookup("eos_token", eos_token, _EOS_CANDIDATES)
        if eos_id is None:
            raise ValueError(
                f"could not find an eos token (tried {', '.join(_EOS_CANDIDATES)}); "
                "pass eos_token="
            )
        bos_id = self._lookup("bos_token", bos_token, _BOS_CANDIDATES)
        pad_id = self._lookup("pad_token", pad_token, _PAD_CANDIDATES)
        self.eos_id = eos_id
        self.bos_id = bos_id
        # Many decoder-only models ship without a pad token; padded positions
        # are masked anyway, so eos is a safe filler.
        self.pad_id = eos_id if pad_id is None else pad_id
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

        unk_token = getattr(self.tokenizer.model, "unk_token", None)
        self._unk_token = unk_token
        self._unk_id = self.tokenizer.token_to_id(unk_token) if unk_token else None

    def _lookup(self, arg: str, given: str | None, candidates: Sequence[str]) -> int | None:
        if given is not None:
            tid = self.tokenizer.token_to_id(given)
            if tid is None:
                raise ValueError(f"{arg}={given!r} is not in the tokenizer's vocabulary")
            return tid
        for name in candidates:
            tid = self.tokenizer.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """text -> ids [T]; bos is added only if the tokenizer has one."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if self._unk_id is not None:
            for tid, (start, end) in zip(ids, enc.offsets):
                # A literal unk token string in the text is not an error.
                if tid == self._unk_id and text[start:end] != self._unk_token:
                    piece = text[start:end]
                    raise UnknownCharacterError(
                        f"unknown character(s) {piece!r} at position {start} of "
                        f"{_excerpt(text, start)} (tokenizer produced {self._unk_token!r})",
                        piece,
                        start,
                    )
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _decode_kept(self, ids: list[int], *, skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)
