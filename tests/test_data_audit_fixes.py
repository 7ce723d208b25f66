"""Fixes from the data-pipeline audit, each checked against values worked out by hand and the exact error text:
collators read dict rows by key (not their column names), JSON Lines split at "\\n" only and read past a
UTF-8 byte-order mark, bad pairs and per-row columns refused when the data set is built (naming file and
line), tokenization errors naming the row and field, `load_records` of a list keeping every column, Unigram
tokenizers refusing unknown characters, and 0.0 / 1.0 labels accepted."""
from __future__ import annotations

import json
import math
import re
from collections import namedtuple

import numpy as np
import pytest

from rljax.data.adapters import (BinaryFeedback, DataError, Interaction, PromptCompletion, binary_feedback,
                                 interaction_logs, load_records, prompt_completion, row_locator)
from rljax.data.collate import collate_prompt_completion
from rljax.data.lengths import Tokens
from rljax.data.preference_collate import collate_kto, collate_preferences
from rljax.data.reward_collate import (collate_feedback, collate_pairs, collate_ranked, collate_scored, collate_steps,
                                       collate_verifier, encode_steps)
from rljax.recipes.tasks import DPOTaskConfig, TaskConfig, preference_batches, reward_batches, sft_batches
from rljax.tasks.math import read_problems
from rljax.tokenizer import CharTokenizer, HFTokenizer, UnknownCharacterError

TOK = CharTokenizer()
BOS, EOS, PAD = 1, 2, 0


def ids(text: str) -> list[int]:
    """CharTokenizer ids by hand: digits are 3 + digit, then the punctuation of DEFAULT_ALPHABET."""
    alphabet = "0123456789+-*/=()<>.,:;?!'\"" + " \n" + "abcdefghijklmnopqrstuvwxyz"
    return [3 + alphabet.index(ch) for ch in text]


def write_jsonl(path, lines) -> str:
    """`lines` (dicts, or raw strings written as they are) one a line, as UTF-8 with raw non-ASCII text."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n"
                            for ln in lines), encoding="utf-8")
    return str(path)


def raises(exc, message: str):
    """pytest.raises matching the whole message exactly."""
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------ 1. dict rows are read by key


def test_hand_ids_match_the_tokenizer():
    assert ids("1+1=2") == TOK.encode("1+1=2", add_bos=False) == [4, 13, 4, 17, 5]


def test_collate_prompt_completion_reads_dict_rows_by_key():
    b = collate_prompt_completion(TOK, [{"prompt": "1+1=", "completion": "2"}])
    want = [BOS] + ids("1+1=2") + [EOS]
    assert b.tokens[0, :len(want)].tolist() == want and set(b.tokens[0, len(want):].tolist()) <= {PAD}
    assert b.loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1] + [0] * (b.tokens.shape[1] - 7)
    assert TOK.decode(b.tokens[0]) == "1+1=2"
    assert TOK.decode(b.tokens[0][b.loss_mask[0] == 1]) == "2"
    # an adapter row and a namedtuple (read by attribute) give the same batch as the dict and the tuple
    Row = namedtuple("Row", ["completion", "prompt"])  # fields in the other order: read by name
    for row in (("1+1=", "2"), PromptCompletion("1+1=", "2"), Row(completion="2", prompt="1+1=")):
        other = collate_prompt_completion(TOK, [row])
        assert np.array_equal(other.tokens, b.tokens) and np.array_equal(other.loss_mask, b.loss_mask)


def test_collate_pairs_reads_dict_rows_by_key():
    b = collate_pairs(TOK, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert TOK.decode(b.tokens[0, 0]) == "1+1=2" and TOK.decode(b.tokens[0, 1]) == "1+1=3"
    assert b.tokens[0, 0, :7].tolist() == [BOS] + ids("1+1=2") + [EOS]
    assert b.rank.tolist() == [[0, 1]]


def test_reward_collators_read_dict_rows_as_their_tuples():
    cases = [
        (collate_ranked, [{"prompt": "1", "answers": ["a", "bb", "c"], "ranks": [0, 2, 1]}],
         [("1", ["a", "bb", "c"], [0, 2, 1])], {}),
        (collate_scored, [{"prompt": "1", "response": "a", "score": 0.5}, {"prompt": "2", "response": "b",
                                                                           "score": None}],
         [("1", "a", 0.5), ("2", "b", None)], {}),
        (collate_verifier, [{"prompt": "1", "completion": "ab", "label": 0.25}], [("1", "ab", 0.25)], {}),
        (collate_steps, [{"prompt": "1=", "steps": ["2+2", "4"], "labels": [1.0, None]}],
         [("1=", ["2+2", "4"], [1.0, None])], {"separator": ";"}),
        (collate_feedback, [{"prompt": "1", "completion": "a", "click": 1, "propensity": 0.5},
                            {"prompt": "2", "completion": "b", "click": False}],
         [("1", "a", 1, 0.5), ("2", "b", False, None)], {}),
    ]
    for collate, dicts, tuples, kw in cases:
        got, want = collate(TOK, dicts, **kw), collate(TOK, tuples, **kw)
        for name in ("tokens", "attention_mask"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (collate.__name__, name)
    # by hand: the verifier's row is [bos] 1 a b [eos], its label on the completion and eos
    b = collate_verifier(TOK, [{"prompt": "1", "completion": "ab", "label": 0.25}])
    assert b.tokens[0, :5].tolist() == [BOS] + ids("1ab") + [EOS]
    assert b.labels[0, :5].tolist() == [0, 0, 0.25, 0.25, 0.25]
    b = collate_feedback(TOK, cases[-1][1])
    assert b.signal.tolist() == [1.0, 0.0] and b.propensity.tolist() == [0.5, 1.0]


def test_missing_fields_and_wrong_length_tuples_name_row_and_field():
    with raises(ValueError, "row 0: missing field 'rejected'"):
        collate_pairs(TOK, [{"prompt": "1", "chosen": "2"}])
    with raises(ValueError, "row 1: missing field 'completion'"):
        collate_prompt_completion(TOK, [{"prompt": "1", "completion": "2"}, {"prompt": "1", "answer": "2"}])
    with raises(ValueError, "row 1: expected 2 fields ('prompt', 'completion'), got 3"):
        collate_prompt_completion(TOK, [("1", "2"), ("1", "2", "3")])
    with raises(ValueError, "row 0: expected 3 fields ('prompt', 'response', 'score'), got 2"):
        collate_scored(TOK, [("1", "a")])
    with raises(ValueError, "row 0: missing field 'chosen'"):
        collate_pairs(TOK, [PromptCompletion("1", "2")])
    with raises(ValueError, "row 0: expected a dict, a tuple or an adapter row with fields ('prompt', 'completion'), "
                            "got str '12'"):
        collate_prompt_completion(TOK, ["12"])
    # the preference collators keep their own rules: optional fields, None counted as missing
    with raises(ValueError, "row 0: expected 3 to 6 fields ('prompt', 'chosen', 'rejected', 'ref_logps', 'weight', "
                            "'label'), got 2"):
        collate_preferences(TOK, [("1", "2")])
    with raises(ValueError, "row 0: missing field 'chosen'"):
        collate_preferences(TOK, [{"prompt": "1", "chosen": None, "rejected": "3"}])


def test_collate_pairs_says_tokens_for_equal_tokens():
    same = Tokens(ids("2") + [EOS])
    with raises(ValueError, "row 0: chosen and rejected are the same tokens, so the pair says nothing"):
        collate_pairs(TOK, [(Tokens([BOS] + ids("1=")), same, Tokens(list(same)))])
    with raises(ValueError, "row 0: chosen and rejected are the same text, so the pair says nothing"):
        collate_pairs(TOK, [{"prompt": "1=", "chosen": "2", "rejected": "2"}])


def test_kto_still_reads_binary_feedback_label_as_desirable():
    b = collate_kto(TOK, [BinaryFeedback("1", "a", True), BinaryFeedback("2", "bc", False)])
    assert b.desirable.tolist() == [1.0, 0.0]
    assert b.tokens[0, 0, :4].tolist() == [BOS] + ids("1a") + [EOS]


# ------------------------------------------------------------------ 2. JSON Lines: "\n" only, BOM


SEPARATORS = {"prompt": "one\u2028two\u2029three", "completion": "a\u0085b"}


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [SEPARATORS, "", {"prompt": "p", "completion": "c"}])
    want = [PromptCompletion(SEPARATORS["prompt"], SEPARATORS["completion"]), PromptCompletion("p", "c")]
    assert prompt_completion(path) == want
    assert load_records(path).to_list() == [SEPARATORS, {"prompt": "p", "completion": "c"}]
    # the blank line 2 is counted: row 1 is on line 3
    assert row_locator(path)(1) == f"{path}, line 3 (row 1, counted from 0)"


def test_jsonl_line_numbers_with_crlf_and_separators(tmp_path):
    path = tmp_path / "crlf.jsonl"
    text = "\r\n".join([json.dumps(SEPARATORS, ensure_ascii=False), "", '{"prompt": "p", "completion": "c"}',
                        '{"prompt": "p", "completion": }']) + "\r\n"
    path.write_bytes(text.encode("utf-8"))
    with raises(DataError, f"{path}, line 4: Expecting value at column 31"):
        prompt_completion(str(path))
    path.write_bytes(text.rsplit("\r\n", 2)[0].encode("utf-8") + b"\r\n")  # the bad line left out
    assert prompt_completion(str(path))[0] == PromptCompletion(SEPARATORS["prompt"], SEPARATORS["completion"])
    assert row_locator(str(path))(1) == f"{path}, line 3 (row 1, counted from 0)"


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode("utf-8"))
    for path in (str(jsonl), str(array)):
        assert prompt_completion(path) == [PromptCompletion("a", "b"), PromptCompletion("c", "d")]
        assert load_records(path).to_list() == rows
    assert row_locator(str(jsonl))(1) == f"{jsonl}, line 2 (row 1, counted from 0)"


def test_read_problems_splits_at_newlines_only_and_skips_a_bom(tmp_path):
    path = tmp_path / "gsm.jsonl"
    lines = [json.dumps({"question": "a\u2028b", "answer": "x\n#### 3"}, ensure_ascii=False), "",
             json.dumps({"question": "c", "answer": "y\n#### 4"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    problems = read_problems(str(path), "gsm8k")
    assert [(p.question, p.solution, p.answer) for p in problems] == [("a\u2028b", "x", "3"), ("c", "y", "4")]
    path.write_bytes("\n".join(lines + ['{"question": "d\u2028", "answer"}']).encode("utf-8"))
    with raises(DataError, f"{path}:4: not valid JSON (Expecting ':' delimiter)"):
        read_problems(str(path), "gsm8k")


# ------------------------------------------------------------------ 3. checks when the data set is built


def test_pairs_truncated_to_the_same_tokens_are_refused_when_built(tmp_path):
    rows = [{"prompt": "r", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "abcdefgh yes",
                                                              "rejected": "abcdefgh no"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [rows[0], "", rows[1]])
    # [bos] q leaves max_length=6 room for 4 completion tokens: both keep "abcd", the texts differ only past them
    message = (f"{path}, line 3 (row 1, counted from 0): chosen and rejected are the same tokens after truncation "
               "to max_length=6; raise max_length or drop the row")
    with raises(DataError, message), pytest.warns(UserWarning, match="1 truncated"):
        reward_batches(TOK, path, TaskConfig(batch_size=1, max_length=6, overlong="truncate_completion"))
    with raises(DataError, message), pytest.warns(UserWarning, match="1 truncated"):
        preference_batches(TOK, path, DPOTaskConfig(batch_size=1, max_length=6, overlong="truncate_completion"))
    # max_length=12 leaves room for 10: "abcdefgh y" and "abcdefgh n" differ, so the data set is built, and the
    # batch holds the two completions cut as by hand
    with pytest.warns(UserWarning, match="1 truncated"):
        it, _ = reward_batches(TOK, path, TaskConfig(batch_size=2, max_length=12, overlong="truncate_completion"))
    row = it.indices_at(0).tolist().index(1)
    batch = it.batch_at(0)
    assert batch.tokens[row, 0, :12].tolist() == [BOS] + ids("qabcdefgh y")
    assert batch.tokens[row, 1, :12].tolist() == [BOS] + ids("qabcdefgh n")


def test_margin_weight_and_label_are_checked_when_built(tmp_path):
    good = {"prompt": "1", "chosen": "2", "rejected": "3", "margin": 1.0, "weight": 1.0, "label": 1.0}
    path = tmp_path / "cols.jsonl"
    for bad, task, message in [
        ({"margin": "high"}, "reward", "margin must be a number, got 'high'"),
        ({"margin": math.inf}, "reward", "margin is inf, not a finite number"),
        ({"weight": -2}, "dpo", "weight must be finite and >= 0, got -2"),
        ({"label": 1.7}, "dpo", "label (P(chosen preferred)) must be in [0, 1], got 1.7"),
        ({"weight": "heavy"}, "dpo", "weight must be a number, got 'heavy'"),
    ]:
        # (json.dumps writes inf as Infinity, which Python's json reads back)
        write_jsonl(path, [good] * 5 + [dict(good, **bad)])
        with raises(DataError, f"{path}, line 6 (row 5, counted from 0): {message}"):
            if task == "reward":
                reward_batches(TOK, str(path), TaskConfig(batch_size=2, max_length=16))
            else:
                preference_batches(TOK, str(path), DPOTaskConfig(batch_size=2, max_length=16))
    # a list of dicts: the row as counted from 0
    with raises(DataError, "row 1: margin must be a number, got 'high'"):
        reward_batches(TOK, [good, dict(good, margin="high")], TaskConfig(batch_size=1, max_length=16))
    # good values still reach the batch
    it, _ = reward_batches(TOK, [dict(good, margin=0.5), dict(good, margin=None)],
                           TaskConfig(batch_size=2, max_length=16))
    assert sorted(it.batch_at(0).margin.tolist()) == [0.0, 0.5]


# ------------------------------------------------------------------ 4. tokenization errors name the row and field


def test_collator_encode_errors_name_row_and_field():
    with raises(UnknownCharacterError, "row 1: completion: unknown character 'F' at position 0 of 'Four'") as info:
        collate_prompt_completion(TOK, [("1", "2"), ("2", "Four")])
    assert (info.value.piece, info.value.position) == ("F", 0)
    assert isinstance(info.value.__cause__, UnknownCharacterError)
    with raises(UnknownCharacterError, "row 0: prompt: unknown character 'X' at position 1 of '1X'"):
        collate_prompt_completion(TOK, [("1X", "2")])
    with raises(UnknownCharacterError, "row 0: rejected: unknown character 'N' at position 0 of 'No'"):
        collate_preferences(TOK, [("1", "yes", "No")])
    with raises(UnknownCharacterError, "row 1: answer 1: unknown character 'B' at position 0 of 'B'"):
        collate_ranked(TOK, [("1", ["a", "b"], [0, 1]), ("1", ["a", "B"], [0, 1])])
    with raises(UnknownCharacterError, "row 3: step 1: unknown character 'X' at position 0 of 'X'"):
        encode_steps(TOK, "1=", ["2", "X"], ";", row=3)
    with raises(ValueError, "row 0: the prompt is missing (None)"):
        collate_prompt_completion(TOK, [(None, "a")])
    with raises(ValueError, "row 0: the completion must be a string, got int 5"):
        collate_prompt_completion(TOK, [("a", 5)])
    with raises(ValueError, "row 0: the response is missing (None)"):
        collate_scored(TOK, [("p", None, 1.0)])
    with raises(ValueError, "row 0: the prompt is missing (None)"):
        collate_steps(TOK, [(None, ["a"], [1])], separator=";")


def test_builder_encode_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "upper.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 5
                       + [{"prompt": "2+2=", "completion": "Four"}])
    with raises(DataError, f"{path}, line 6 (row 5, counted from 0): completion: unknown character 'F' at position 0 "
                           "of 'Four'") as info:
        sft_batches(TOK, path, TaskConfig(batch_size=2, max_length=32))
    assert isinstance(info.value.__cause__, UnknownCharacterError)  # chained, not lost
    rows = [{"prompt": "1", "response": "a", "score": 1.0}, {"prompt": "1", "response": "Yes", "score": 0.0}]
    with raises(DataError, "row 1: response: unknown character 'Y' at position 0 of 'Yes'"):
        reward_batches(TOK, rows, TaskConfig(batch_size=1, max_length=32))
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}]
    with raises(DataError, "row 0: prompt: unknown character 'Q' at position 0 of 'Q'"):
        preference_batches(TOK, rows, DPOTaskConfig(batch_size=1, max_length=32))
    with raises(DataError, "row 0: chosen: unknown character 'A' at position 0 of 'A'"):
        preference_batches(TOK, [{"prompt": "q", "chosen": "A", "rejected": "b"}],
                           DPOTaskConfig(batch_size=1, max_length=32))


# ------------------------------------------------------------------ 5. load_records of a list of dicts


def test_load_records_of_a_list_keeps_every_column():
    rows = [{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": "y", "weight": 0.5}]
    ds = load_records(rows)
    assert ds.column_names == ["prompt", "completion", "weight"]
    assert ds.to_list() == [{"prompt": "a", "completion": "x", "weight": None},
                            {"prompt": "b", "completion": "y", "weight": 0.5}]


def test_load_records_of_a_list_names_the_row_of_another_type():
    with pytest.raises(DataError) as info:
        load_records([{"prompt": "a"}, {"prompt": None}, {"prompt": "b"}, {"prompt": 1}, {"prompt": "c"}])
    assert str(info.value).startswith("row 3: field 'prompt' is int 1, but the rows before it hold str there; a "
                                      "column holds one type (")
    with pytest.raises(DataError) as info:
        load_records([{"x": 1, "y": [1]}, {"x": 2, "y": 3}])
    assert str(info.value).startswith("row 1: field 'y' is int 3, but the rows before it hold list there; a column "
                                      "holds one type (")
    with raises(DataError, "row 1: expected a dict, got str"):
        load_records([{"x": 1}, "x"])


# ------------------------------------------------------------------ 6. Unigram tokenizers refuse unknown text


def test_unigram_unknown_characters_raise(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0),
             ("o", -2.0), ("▁hello", -1.0)]
    t = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.add_special_tokens(["<s>", "</s>", "<unk>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    assert tok.encode("hello", add_bos=False) == [8]  # "▁hello", by the vocabulary above
    with raises(UnknownCharacterError, "unknown character(s) 'zzz' at position 6 of 'hello zzz' (tokenizer "
                                       "produced '<unk>')") as info:
        tok.encode("hello zzz")
    assert (info.value.piece, info.value.position) == ("zzz", 6)
    assert tok.encode("hello<unk>", add_bos=False) == [8, 0]  # the unk token's own text is no error


# ------------------------------------------------------------------ 7. 0.0 / 1.0 labels


def test_float_zero_one_labels_are_accepted(tmp_path):
    rows = [{"prompt": "a", "completion": "x", "label": v} for v in (1.0, 0.0, np.float64(1.0), np.float32(0.0), 1)]
    assert [r.label for r in binary_feedback(rows)] == [True, False, True, False, True]
    assert BinaryFeedback("a", "x", 1.0).label is True
    for bad, shown in ((0.5, "float 0.5"), (math.nan, "float nan"), (2, "int 2"), ("1", "str '1'")):
        with raises(DataError, f"row 0: field 'label' must be a bool or 0/1, got {shown}"):
            binary_feedback([{"prompt": "a", "completion": "x", "label": bad}])
    # Parquet of an int column with a missing value, as pandas writes it: float64
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"], "label": pa.array([1.0, 0.0])}), path)
    assert binary_feedback(str(path)) == [BinaryFeedback("a", "x", True), BinaryFeedback("b", "y", False)]
    logs = interaction_logs([{"prompt": "a", "completion": "x", "click": 1.0, "like": 0.0}])
    assert logs == [Interaction("a", "x", like=False, click=True)]


def test_kto_labels_and_step_labels_of_the_wrong_kind_name_their_row():
    from rljax.data.preference_collate import collate_kto
    from rljax.data.reward_collate import collate_steps

    b = collate_kto(TOK, [("1", "a", np.float32(1.0)), ("2", "bc", np.int64(0))])
    assert b.desirable.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"^row 0: desirable must be a boolean or 0/1, got array\(\[1\]\)$"):
        collate_kto(TOK, [("1", "a", np.array([1])), ("2", "bc", 0)])
    with pytest.raises(ValueError, match=r"^row 0: labels must be a list with one label \(or None\) per step, got "
                                         r"NoneType None$"):
        collate_steps(TOK, [("1=", ["2+2", "4"], None)], separator=";")
