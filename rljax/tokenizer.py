"""Tokenizers for training and sampling: a tiny character tokenizer and a
wrapper around HuggingFace `tokenizers`.

Both share one interface, the `Tokenizer` protocol (what the collators and the
sampler rely on; any object with these members works, runtime-checkable with
isinstance):

  encode(text)            -> list[int]                    (bos prepended by default)
  decode(ids)             -> str                          (ids: list or 1-D array [T])
  encode_batch(texts)     -> (tokens [B, T], mask [B, T])  int32, left or right padded
  decode_batch(ids_2d)    -> list[str]                    (ids_2d: [B, T] or ragged list)

and `eos_ids` (a tuple): the ids that end a completion; decode stops at the first of them.

`CharTokenizer` is for synthetic tasks (arithmetic, toy languages) with the
tiny/small model presets, whose vocabulary is 64; `HFTokenizer` loads a
pretrained model's `tokenizer.json`, and `HFTokenizer.from_pretrained(dir)` also
reads `tokenizer_config.json` (special tokens, whether to add bos, chat templates)
and `generation_config.json` (the stop ids), and renders the model's chat template
with `apply_chat_template` exactly as Hugging Face `transformers` does.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import tokenizers

from rljax.chat_template import ChatTemplateError, render_chat_template

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "DEFAULT_ALPHABET",
    "UnknownCharacterError",
    "ChatTemplateError",
    "Tokenizer",
    "BaseTokenizer",
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
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Where transformers keeps chat templates besides tokenizer_config.json; files take precedence.
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_CHAT_TEMPLATE_DIR = "additional_chat_templates"


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


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer interface the collators (`rljax.data`), the sampler and the phases use.

    pad_id: the id padding fills rows with (masked out by attention_mask, never learned).
    bos_id: the id `add_bos` prepends, or None for a tokenizer without one.
    eos_id: the id `add_eos` appends (the end of a completion that the model learns to emit).
    eos_ids: every id that ends a completion (the sampler's stop ids, `decode`'s stop), eos_id among them.
    vocab_size: V; every id is in [0, V) (the model's vocabulary must be at least V).
    """

    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a completion."""
        ...

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """text -> ids [T]: [bos_id if add_bos] + tokens of text + [eos_id if add_eos]; encode("")
        is just the requested specials (the collators take the bos this way)."""
        ...

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True, add_eos: bool = False,
                     padding_side: str = "left", length: int | None = None,
                     pad_to_multiple_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """texts [B] -> (tokens [B, T] int32 padded with pad_id, attention_mask [B, T] int32, 1 on
        real tokens); padding_side "left" (prompts for sampling) or "right"; T = the longest
        row or `length`, rounded up to a multiple of pad_to_multiple_of."""
        ...

    def decode(self, ids: Any, *, stop_at_eos: bool = True, skip_special: bool = True) -> str:
        """ids [T] (list or 1-D integer array) -> text, cut at the first of eos_ids when
        stop_at_eos, with pad/bos/eos left out when skip_special."""
        ...

    def decode_batch(self, ids_2d: Any, **kw: Any) -> list[str]:
        """ids [B, T] (array or ragged lists) -> B texts, `decode` of each row with `kw`."""
        ...


class BaseTokenizer:
    """Shared implementation of the `Tokenizer` protocol: subclasses set the four attributes
    and implement `encode` and `_decode_kept`."""

    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a completion (the sampler's stop ids); `eos_id` is the one `add_eos` appends."""
        return (self.eos_id,)

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

        With `stop_at_eos`, the first id in `eos_ids` and everything after it are dropped.
        With `skip_special`, pad and bos (and eos ids, if kept) are dropped.
        """
        arr = _as_id_array(ids)
        positions = np.arange(arr.shape[0])
        eos_ids = list(self.eos_ids)
        if stop_at_eos and self.pad_id in eos_ids:
            # With pad == eos, a left-padded row would otherwise "stop" at its
            # first padding token and decode to nothing.
            start = 0
            while start < arr.shape[0] and arr[start] == self.pad_id:
                start += 1
            arr, positions = arr[start:], positions[start:]
        if stop_at_eos:
            hits = np.flatnonzero(np.isin(arr, eos_ids))
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
            special = [self.pad_id, *eos_ids]
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


class CharTokenizer(BaseTokenizer):
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


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, path: Path, field: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict
    ({"content": "<s>", ...}, older configs) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: field {field!r} must be a string, an AddedToken dict with 'content', or null; "
                     f"got {value!r}")


def _eos_token_ids(value: Any, path: Path, vocab_size: int) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id`: an int, a list of ints, or null -> a tuple."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{path}: field 'eos_token_id' must be an int or a list of ints, got {value!r}")
        if not 0 <= v < vocab_size:
            raise ValueError(f"{path}: field 'eos_token_id' has id {v}, outside the vocabulary [0, {vocab_size})")
    return tuple(dict.fromkeys(values))  # ordered, without repeats


def _chat_templates(directory: Path, config: Mapping, config_path: Path) -> str | dict[str, str] | None:
    """The chat template(s) as transformers loads them: `chat_template.jinja` (named "default") and
    `additional_chat_templates/NAME.jinja` replace tokenizer_config.json's `chat_template`, which is a
    string or a list of {"name", "template"}; one template -> a string, several -> {name: source}."""
    files: dict[str, str] = {}
    default = directory / _CHAT_TEMPLATE_FILE
    if default.is_file():
        files["default"] = default.read_text(encoding="utf-8")
    extra = directory / _CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files

    raw = config.get("chat_template")
    if raw is None or isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise ValueError(f"{config_path}: field 'chat_template' must be a string or a list of "
                         f"{{'name', 'template'}} dicts, got {type(raw).__name__}")
    named: dict[str, str] = {}
    for i, entry in enumerate(raw):
        if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)):
            raise ValueError(f"{config_path}: field 'chat_template[{i}]' must be a dict with string 'name' and "
                             f"'template', got {entry!r:.80}")
        named[entry["name"]] = entry["template"]
    return named


class HFTokenizer(BaseTokenizer):
    """A `tokenizers.Tokenizer` (from a `tokenizer.json` file, a directory
    holding one, or an already-built object) behind the common interface.

    bos/eos are added by this class, not by the tokenizer's post-processor,
    so `add_bos` / `add_eos` mean the same thing for every model.

    Built directly, special tokens are found by name (or given); `from_pretrained`
    reads them, the chat template(s) and the stop ids from the model's config files.
    Attributes besides the common ones:

      add_bos_token   whether `encode(add_bos=True)` prepends bos (the model's convention)
      eos_ids         stop ids: generation_config's `eos_token_id`s, then `eos_id` if not among them
      special_tokens  {"bos_token": "<s>", ...}: the named special tokens chat templates see
      chat_template   Jinja source, {name: source} for several templates, or None
    """

    def __init__(
        self,
        path_or_tokenizer: str | os.PathLike[str] | tokenizers.Tokenizer,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
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
        self.add_bos_token = True
        self._eos_ids = (eos_id,)
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.special_tokens = {
            name: self.tokenizer.id_to_token(tid)
            for name, tid in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id))
            if tid is not None
        }

        self._unk_token, self._unk_id = self._unknown_token()

    def _unknown_token(self) -> tuple[str | None, int | None]:
        """(token, id) the model writes for text its vocabulary lacks, (None, None) if it has none (it then
        falls back to bytes, or drops the text). WordPiece, WordLevel and BPE models name the token
        (`model.unk_token`); a Unigram model (SentencePiece) keeps only its id, `unk_id` in the tokenizer
        JSON, which `tokenizers` exposes on no attribute."""
        model = self.tokenizer.model
        token = getattr(model, "unk_token", None)
        if token:
            return token, self.tokenizer.token_to_id(token)
        if isinstance(model, tokenizers.models.Unigram):
            unk_id = json.loads(self.tokenizer.to_str())["model"].get("unk_id")
            if unk_id is not None:
                return self.tokenizer.id_to_token(unk_id), unk_id
        return None, None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> "HFTokenizer":
        """Load a Hugging Face model directory: `tokenizer.json` (required), `tokenizer_config.json`,
        `chat_template.jinja` / `additional_chat_templates/*.jinja` and `generation_config.json`
        (each optional).

        From tokenizer_config.json, as transformers reads it: the named special tokens (`bos_token`,
        `eos_token`, `pad_token`, ...; a missing or null entry means the model has none, so e.g. Qwen
        gets no bos), `add_bos_token` (when absent: whether tokenizer.json's post-processor prepends
        a token, which is then the bos; when present it is honoured, as transformers' model-specific
        tokenizers do, although its generic backend (5.24) keeps tokenizer.json's post-processor), and
        `chat_template`. From generation_config.json: `eos_token_id` (int or list), the ids
        generation stops at (`eos_ids`). eos is the config's `eos_token`, else the first generation
        eos id, else found by name; pad falls back to eos. Errors name the file and the field.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory not found: {str(directory)!r}")
        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(tok_path))
        vocab_size = backend.get_vocab_size(with_added_tokens=True)

        cfg_path = directory / "tokenizer_config.json"
        has_config = cfg_path.is_file()
        config = _read_json(cfg_path) if has_config else {}
        named = {k: _token_text(config.get(k), cfg_path, k) for k in _NAMED_SPECIAL_TOKENS}
        for k in ("bos_token", "eos_token", "pad_token"):
            if named[k] is not None and backend.token_to_id(named[k]) is None:
                raise ValueError(f"{cfg_path}: field {k!r} = {named[k]!r} is not in tokenizer.json's vocabulary")

        gen_path = directory / "generation_config.json"
        gen_eos = _eos_token_ids(_read_json(gen_path).get("eos_token_id"), gen_path, vocab_size) \
            if gen_path.is_file() else ()

        eos_token = named["eos_token"]
        if eos_token is None and gen_eos:
            eos_token = backend.id_to_token(gen_eos[0])
        out = cls(backend, eos_token=eos_token, bos_token=named["bos_token"], pad_token=named["pad_token"],
                  chat_template=_chat_templates(directory, config, cfg_path))
        if has_config:
            # transformers gives a model without a bos entry no bos; guessing one by name would
            # prepend a token the model never saw in training.
            out.bos_id = None if named["bos_token"] is None else backend.token_to_id(named["bos_token"])
            out.special_tokens = {k: v for k, v in named.items() if v is not None}

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # transformers then keeps tokenizer.json's post-processor, so whatever it prepends is the
            # bos actually used, even when the config names none.
            plain = backend.encode("a", add_special_tokens=False).ids
            full = backend.encode("a", add_special_tokens=True).ids
            prepends = len(full) > len(plain) and full[0] != plain[0]
            if prepends and out.bos_id is None:
                out.bos_id = full[0]
            add_bos = prepends and full[0] == out.bos_id
        elif not isinstance(add_bos, bool):
            raise ValueError(f"{cfg_path}: field 'add_bos_token' must be true or false, got {add_bos!r}")
        out.add_bos_token = bool(add_bos) and out.bos_id is not None
        out._eos_ids = gen_eos + ((out.eos_id,) if out.eos_id not in gen_eos else ())
        return out

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

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, eos_ids={self.eos_ids})"
        )

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """text -> ids [T]; bos is added only if the tokenizer has one and the model adds it
        (`add_bos_token`)."""
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
        if add_bos and self.add_bos_token and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _decode_kept(self, ids: list[int], *, skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------ chat templates
    def get_chat_template(self, chat_template: str | None = None, *, tools: Any = None) -> str:
        """The Jinja source to render, chosen as transformers does: `chat_template` names one of
        several templates or is itself a template; otherwise the model's single template, or among
        several the "tool_use" one when tools are given, else "default"."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ChatTemplateError(f"this tokenizer has several chat templates ({', '.join(sorted(own))}) and "
                                    "none is named 'default'; pass chat_template=<name>")
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ChatTemplateError("this tokenizer has no chat template (no 'chat_template' in "
                                    "tokenizer_config.json and no chat_template.jinja); pass chat_template=")
        return own

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template -> text, or
        its ids with `tokenize=True` (the template writes bos and other control tokens itself, so
        nothing is added). `add_generation_prompt` appends the assistant header so the model's
        reply comes next. Extra keyword arguments become template variables (e.g.
        `enable_thinking=False`). See `rljax.chat_template` for what the template sees.
        Raises ChatTemplateError: no template, a message without role or content (naming its
        index), or a template that raises.
        """
        source = self.get_chat_template(chat_template, tools=tools)
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, tools=tools, documents=documents, **kwargs)
        return self.encode(text, add_bos=False) if tokenize else text
