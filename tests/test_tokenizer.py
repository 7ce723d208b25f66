"""Tests for rljax.tokenizer: exact ids, padding layouts and error messages."""
from __future__ import annotations

import string

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from rljax.tokenizer import (
    BOS_ID,
    DEFAULT_ALPHABET,
    EOS_ID,
    PAD_ID,
    CharTokenizer,
    HFTokenizer,
    UnknownCharacterError,
)


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


# ---------------------------------------------------------------- CharTokenizer


def test_default_alphabet_and_vocab_size(tok):
    assert DEFAULT_ALPHABET == (
        "0123456789" + "+-*/=()<>.,:;?!'\"" + " \n" + string.ascii_lowercase
    )
    assert len(DEFAULT_ALPHABET) == 55
    assert tok.vocab_size == 58
    assert tok.vocab_size <= 64
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)


def test_exact_ids_by_hand(tok):
    # '0'..'9' -> 3..12, '+' 13, '-' 14, '*' 15, '/' 16, '=' 17, ' ' 30, '\n' 31, 'a' 32, 'z' 57
    assert tok.encode("0", add_bos=False) == [3]
    assert tok.encode("9", add_bos=False) == [12]
    assert tok.encode("12+3=15") == [1, 4, 5, 13, 6, 17, 4, 8]
    assert tok.encode("1*2", add_eos=True) == [1, 4, 15, 5, 2]
    assert tok.encode("a z\n", add_bos=False) == [32, 30, 57, 31]
    assert tok.encode("", add_bos=True, add_eos=True) == [1, 2]


@pytest.mark.parametrize("text", ["23+58*2=139", "(7-3)/2=2", "what is 4*4? 16.", "x\ny"])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_eos=True)
    assert len(ids) == len(text) + 2
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_decode_jax_array(tok):
    import jax.numpy as jnp

    ids = jnp.asarray(tok.encode("1+1=2", add_eos=True), dtype=jnp.int32)
    assert tok.decode(ids) == "1+1=2"


def test_decode_stops_at_eos_and_skips_specials(tok):
    # pad pad bos '4' '2' eos '7' pad
    ids = [0, 0, 1, 7, 5, 2, 10, 0]
    assert tok.decode(ids) == "42"
    assert tok.decode(ids, stop_at_eos=False) == "427"
    assert tok.decode(ids, skip_special=False) == "<pad><pad><bos>42"
    assert tok.decode(ids, stop_at_eos=False, skip_special=False) == (
        "<pad><pad><bos>42<eos>7<pad>"
    )
    assert tok.decode([]) == ""
    assert tok.decode([2, 5]) == ""


def test_decode_batch(tok):
    arr = np.array([[0, 1, 4, 13, 4, 2], [1, 6, 17, 6, 2, 9]], dtype=np.int32)
    assert tok.decode_batch(arr) == ["1+1", "3=3"]
    assert tok.decode_batch(arr, stop_at_eos=False) == ["1+1", "3=36"]
    # Ragged list of rows is accepted too.
    assert tok.decode_batch([[1, 3], [1, 4, 5, 2]]) == ["0", "12"]


def test_encode_batch_left_padding(tok):
    tokens, mask = tok.encode_batch(["1+2", "10"], padding_side="left")
    # "1+2" -> bos 4 13 5 ; "10" -> bos 4 3
    np.testing.assert_array_equal(tokens, np.array([[1, 4, 13, 5], [0, 1, 4, 3]]))
    np.testing.assert_array_equal(mask, np.array([[1, 1, 1, 1], [0, 1, 1, 1]]))
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    assert tok.decode_batch(tokens) == ["1+2", "10"]


def test_encode_batch_right_padding(tok):
    tokens, mask = tok.encode_batch(["1+2", "10"], padding_side="right", add_eos=True)
    np.testing.assert_array_equal(tokens, np.array([[1, 4, 13, 5, 2], [1, 4, 3, 2, 0]]))
    np.testing.assert_array_equal(mask, np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
    assert tokens.dtype == np.int32 and mask.dtype == np.int32


def test_encode_batch_length_and_multiple(tok):
    tokens, mask = tok.encode_batch(["1", "22"], length=5, padding_side="right")
    np.testing.assert_array_equal(tokens, [[1, 4, 0, 0, 0], [1, 5, 5, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])

    # Longest row is 3 tokens -> rounded up to 4.
    tokens, mask = tok.encode_batch(["1", "22"], pad_to_multiple_of=4)
    assert tokens.shape == (2, 4)
    np.testing.assert_array_equal(tokens, [[0, 0, 1, 4], [0, 1, 5, 5]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])

    # length is rounded up as well.
    tokens, _ = tok.encode_batch(["1"], length=5, pad_to_multiple_of=4)
    assert tokens.shape == (1, 8)

    # Already a multiple: unchanged.
    tokens, _ = tok.encode_batch(["123"], pad_to_multiple_of=4)
    assert tokens.shape == (1, 4)


def test_encode_batch_errors(tok):
    with pytest.raises(ValueError, match=r"row 1 has 4 tokens.*length=3"):
        tok.encode_batch(["12", "123"], length=3)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["1"], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        tok.encode_batch([])


def test_unknown_character_message(tok):
    with pytest.raises(ValueError) as info:
        tok.encode("abc Z")
    msg = str(info.value)
    assert "'Z'" in msg and "position 4" in msg
    assert isinstance(info.value, UnknownCharacterError)
    assert (info.value.piece, info.value.position) == ("Z", 4)

    long_text = "1" * 500 + "#" + "2" * 500
    with pytest.raises(ValueError, match=r"'#' at position 500") as info:
        tok.encode(long_text)
    assert len(str(info.value)) < 200


def test_decode_out_of_range(tok):
    with pytest.raises(ValueError, match=r"id 58 at position 2"):
        tok.decode([1, 3, 58])
    with pytest.raises(ValueError, match=r"id -1 at position 0"):
        tok.decode([-1, 3])
    # Anything after eos is cut off before the range check.
    assert tok.decode([1, 3, 2, 99]) == "0"


def test_duplicate_alphabet_char():
    with pytest.raises(ValueError, match="'b'"):
        CharTokenizer("abcb")
    small = CharTokenizer("ab")
    assert small.vocab_size == 5
    assert small.encode("ba") == [1, 4, 3]


# ---------------------------------------------------------------- HFTokenizer

_VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "[UNK]": 3,
    "the": 4,
    "cat": 5,
    "sat": 6,
    "on": 7,
    "mat": 8,
}


def _build_wordlevel(vocab=_VOCAB) -> tokenizers.Tokenizer:
    t = tokenizers.Tokenizer(models.WordLevel(dict(vocab), unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([k for k in ("<pad>", "<s>", "</s>", "[UNK]") if k in vocab])
    return t


@pytest.fixture
def hf_dir(tmp_path):
    _build_wordlevel().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_hf_loads_from_file_and_dir(hf_dir):
    for src in (hf_dir / "tokenizer.json", str(hf_dir), _build_wordlevel()):
        t = HFTokenizer(src)
        assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
        assert t.vocab_size == 9


def test_hf_encode_decode(hf_dir):
    t = HFTokenizer(hf_dir)
    assert t.encode("the cat sat") == [1, 4, 5, 6]
    assert t.encode("the cat sat", add_bos=False, add_eos=True) == [4, 5, 6, 2]
    assert t.decode([1, 4, 5, 6, 2, 8]) == "the cat sat"
    assert t.decode([1, 4, 5, 6, 2, 8], stop_at_eos=False) == "the cat sat mat"
    assert t.decode(np.array([0, 0, 1, 7, 4, 8])) == "on the mat"
    assert t.decode_batch(np.array([[1, 4, 5, 2], [0, 1, 8, 2]])) == ["the cat", "mat"]


def test_hf_encode_batch(hf_dir):
    t = HFTokenizer(hf_dir)
    tokens, mask = t.encode_batch(["the cat sat on the mat", "the mat"], padding_side="left")
    np.testing.assert_array_equal(
        tokens, [[1, 4, 5, 6, 7, 4, 8], [0, 0, 0, 0, 1, 4, 8]]
    )
    np.testing.assert_array_equal(mask, [[1] * 7, [0, 0, 0, 0, 1, 1, 1]])
    tokens, mask = t.encode_batch(
        ["cat", "the mat"], padding_side="right", add_eos=True, pad_to_multiple_of=8
    )
    np.testing.assert_array_equal(
        tokens, [[1, 5, 2, 0, 0, 0, 0, 0], [1, 4, 8, 2, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])


def test_hf_unknown_word(hf_dir):
    t = HFTokenizer(hf_dir)
    with pytest.raises(ValueError, match=r"'dog' at position 4") as info:
        t.encode("the dog sat")
    assert info.value.position == 4


def test_hf_missing_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        HFTokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)  # directory without tokenizer.json


def test_hf_explicit_tokens(hf_dir):
    with pytest.raises(ValueError, match="<\\|eot\\|>"):
        HFTokenizer(hf_dir, eos_token="<|eot|>")
    with pytest.raises(ValueError, match="'<nope>'"):
        HFTokenizer(hf_dir, pad_token="<nope>")
    t = HFTokenizer(hf_dir, eos_token="[UNK]", pad_token="</s>")
    assert (t.eos_id, t.pad_id) == (3, 2)


def test_hf_fallbacks():
    # No bos, no pad: bos_id is None and pad falls back to eos.
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hi": 2, "there": 3}
    t = HFTokenizer(_build_wordlevel(vocab))
    assert (t.bos_id, t.eos_id, t.pad_id) == (None, 0, 0)
    assert t.encode("hi there") == [2, 3]
    tokens, mask = t.encode_batch(["hi", "hi there"], add_eos=True)
    np.testing.assert_array_equal(tokens, [[0, 2, 0], [2, 3, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1]])
    # Leading pads equal to eos must not end decoding early.
    assert t.decode_batch(tokens) == ["hi", "hi there"]

    # No eos at all: must ask for eos_token.
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(_build_wordlevel({"[UNK]": 0, "hi": 1}))


def test_hf_unknown_position_counts_characters_not_bytes():
    vocab = {"</s>": 0, "[UNK]": 1, "café": 2, "au": 3, "lait": 4}
    t = HFTokenizer(_build_wordlevel(vocab))
    assert t.decode(t.encode("café au lait")) == "café au lait"
    # 'é' is 2 bytes in UTF-8; the position must still be a character index.
    with pytest.raises(ValueError, match=r"'noir' at position 5"):
        t.encode("café noir")


def test_char_and_hf_tokenizers_satisfy_the_protocol(hf_dir):
    import inspect

    from rljax.data.collate import collate_prompt_completion
    from rljax.data.preference_collate import collate_preferences
    from rljax.tokenizer import Tokenizer

    for tok in (CharTokenizer(), HFTokenizer(hf_dir)):
        assert isinstance(tok, Tokenizer)
        assert isinstance(tok.eos_ids, tuple) and tok.eos_id in tok.eos_ids

    class Partial:  # no decode_batch, eos_ids, ...
        pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 8

        def encode(self, text, *, add_bos=True, add_eos=False):
            return []

    assert not isinstance(Partial(), Tokenizer)
    for collate in (collate_prompt_completion, collate_preferences):
        assert inspect.signature(collate).parameters["tokenizer"].annotation == "Tokenizer"
