"""Faults in the data caught when the data set is built, not hours into a run.

Over-long rows: every row is measured against max_length (the model's max_seq_len by default)
when the batches are built; the `overlong` policy errors naming the row's file and line, drops
(and says how many) or truncates (the prompt from the left, the completion from the right), with
the exact tokens checked by hand. The model refuses a sequence longer than its max_seq_len.
Malformed JSON Lines: one DataError naming the file, the 1-based line and the parse error."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.data.adapters import DataError, load_records, preference_pairs, prompt_completion, row_locator
from rljax.data.batch import SequenceBatch
from rljax.data.lengths import Tokens, fit_example, fit_lengths
from rljax.losses.sft import SFTConfig, sft_loss
from rljax.models import Model, preset
from rljax.recipes import SFTTaskConfig, sft
from rljax.recipes.tasks import DPOTaskConfig, TaskConfig, preference_batches, reward_batches, sft_batches
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def digits(s: str) -> list[int]:
    """CharTokenizer ids of a string of digits, '+' and '=' (one token per character, see the test below)."""
    table = {**{str(d): 3 + d for d in range(10)}, "+": 13, "=": 17}
    return [table[ch] for ch in s]


def test_the_hand_table_is_the_tokenizers():
    assert TOK.encode("0129+=", add_bos=False) == digits("0129+=")
    assert (BOS, EOS, PAD) == (1, 2, 0)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# A long row among short ones: [bos] + 11 prompt chars + 8 completion chars + [eos] = 21 tokens;
# the short rows are [bos] "1+1=" "2" [eos] = 7 tokens.
SHORT = {"prompt": "1+1=", "completion": "2"}
LONG = {"prompt": "12345678+1=", "completion": "12345679"}


# ----------------------------------------------------------------------------- the shared helper
def test_fit_example_policies_on_hand_made_ids():
    prompt, completion = [BOS, 10, 11, 12, 13], [20, 21, 22, EOS]  # 9 tokens, bos kept by truncate_prompt
    kw = dict(max_length=6, keep=1)
    assert fit_example(prompt, [completion], overlong="truncate_prompt", **kw) == ([BOS, 13], [completion])
    assert fit_example(prompt, [completion], overlong="truncate_completion", **kw) == (prompt, [[20]])
    assert fit_example(prompt, [completion], overlong="drop", **kw) is None
    with pytest.raises(DataError, match=r"^row 7: 9 tokens exceed max_length=6$"):
        fit_example(prompt, [completion], overlong="error", where="row 7", **kw)
    # a row that fits is returned as it is, whatever the policy
    assert fit_example(prompt, [completion], overlong="error", max_length=9, keep=1) == (prompt, [completion])


def test_a_shared_prompt_is_cut_by_the_largest_excess_so_both_completions_fit():
    prompt = [BOS, 10, 11, 12, 13]
    chosen, rejected = [20, 21, EOS], [30, 31, 32, 33, EOS]  # 8 and 10 tokens, max 7: cut 3 prompt tokens
    assert fit_example(prompt, [chosen, rejected], max_length=7, overlong="truncate_prompt", keep=1) == (
        [BOS, 13], [chosen, rejected])
    assert fit_example(prompt, [chosen, rejected], max_length=7, overlong="truncate_completion", keep=1) == (
        prompt, [[20, 21], [30, 31]])
    with pytest.raises(DataError, match=r"row 0 \(rejected\): 10 tokens exceed max_length=7"):
        fit_example(prompt, [chosen, rejected], max_length=7, overlong="error", where="row 0",
                    names=("chosen", "rejected"))


def test_a_truncation_that_cannot_fit_the_row_is_an_error_naming_it():
    with pytest.raises(DataError, match=r"^row 4: the completion is 5 tokens, with the prompt's 1 special "
                                        r"token\(s\) more than max_length=4, so overlong='truncate_prompt' "
                                        r"cannot fit it$"):
        fit_example([BOS, 10, 11], [[20, 21, 22, 23, EOS]], max_length=4, overlong="truncate_prompt", keep=1,
                    where="row 4")
    with pytest.raises(DataError, match=r"^row 4: the prompt alone is 4 tokens, max_length=4 leaves no room for the "
                                        r"completion, so overlong='truncate_completion' cannot fit it$"):
        fit_example([BOS, 10, 11, 12], [[20, EOS]], max_length=4, overlong="truncate_completion", where="row 4")
    with pytest.raises(ValueError, match=r"overlong must be one of"):
        fit_lengths([([BOS], [[20]])], max_length=4, overlong="truncate")


def test_fit_lengths_reports_how_many_rows_are_too_long():
    examples = [([BOS, 10], [[20, EOS]]), ([BOS, 10, 11, 12], [[20, 21, EOS]]), ([BOS], [[20, 21, 22, 23, 24]])]
    with pytest.warns(UserWarning, match=r"2 of 3 rows exceed max_length=5 tokens \(longest 7\); 2 dropped"):
        kept, fitted, report = fit_lengths(examples, max_length=5, overlong="drop")
    assert kept == [0] and fitted == [([BOS, 10], [[20, EOS]])]
    assert (report.rows, report.overlong, report.longest, report.dropped, report.truncated) == (3, 2, 7, 2, 0)
    with pytest.raises(DataError, match=r"^row 1: 7 tokens exceed max_length=5; 2 of 3 rows are longer "
                                        r"\(longest 7\)\. Raise max_length, or pass overlong="):
        fit_lengths(examples, max_length=5, overlong="error")


# ----------------------------------------------------------------------------- at build time, from a file
def test_an_overlong_row_is_an_error_at_build_time_naming_its_file_and_line(tmp_path):
    # line 2 is blank (datasets skips it), so the long row, row 2 counted from 0, is on line 4
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(SHORT), "", json.dumps(SHORT), json.dumps(LONG)])
    with pytest.raises(DataError) as err:
        sft_batches(TOK, path, TaskConfig(batch_size=1, max_length=16))
    assert str(err.value).startswith(f"{path}, line 4 (row 2, counted from 0): 21 tokens exceed max_length=16; "
                                     f"1 of 3 rows are longer (longest 21)")


def test_the_sft_entry_point_checks_rows_against_the_models_max_seq_len_before_training(tmp_path):
    model = Model(preset("tiny", vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         mlp_dim=32, max_seq_len=16))
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(SHORT), json.dumps(LONG)])
    with pytest.raises(DataError, match=r"sft\.jsonl, line 2 \(row 1, counted from 0\): 21 tokens exceed "
                                        r"max_length=16"):
        sft((model, None, TOK), path, SFTTaskConfig(steps=1, batch_size=1), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("overlong, prompt, completion", [
    # 21 tokens into 16: the prompt loses its first 5 characters, bos stays
    ("truncate_prompt", [BOS] + digits("678+1="), digits("12345679") + [EOS]),
    # the completion keeps 16 - 12 = 4 tokens, eos is cut
    ("truncate_completion", [BOS] + digits("12345678+1="), digits("1234")),
])
def test_each_truncation_policy_gives_exactly_these_tokens(overlong, prompt, completion):
    with pytest.warns(UserWarning, match=rf"overlong='{overlong}': 1 of 2 rows exceed max_length=16 tokens "
                                         r"\(longest 21\); 1 truncated"):
        it = sft_batches(TOK, [SHORT, LONG], TaskConfig(batch_size=2, max_length=16, overlong=overlong))
    assert it.examples[0] == (Tokens([BOS] + digits("1+1=")), Tokens(digits("2") + [EOS]))  # short: untouched
    assert it.examples[1] == (Tokens(prompt), Tokens(completion))
    batch = it.batch_at(0)  # collation pads what was checked: width 16, loss on the completion tokens
    order = [0, 1] if list(batch.tokens[0, :5]) == [BOS] + digits("1+1=") else [1, 0]
    row = prompt + completion
    np.testing.assert_array_equal(batch.tokens[order[1]], row)
    np.testing.assert_array_equal(batch.loss_mask[order[1]], [0] * len(prompt) + [1] * len(completion))
    np.testing.assert_array_equal(batch.tokens[order[0]], [BOS] + digits("1+1=2") + [EOS] + [PAD] * 9)


def test_drop_leaves_the_row_out_and_says_how_many():
    with pytest.warns(UserWarning, match=r"1 of 3 rows exceed max_length=16 tokens \(longest 21\); 1 dropped"):
        it = sft_batches(TOK, [SHORT, LONG, {"prompt": "2+2=", "completion": "4"}],
                         TaskConfig(batch_size=1, max_length=16, overlong="drop"))
    assert [tuple(c) for _, c in it.examples] == [tuple(digits("2") + [EOS]), tuple(digits("4") + [EOS])]


def test_reward_pairs_cut_their_shared_prompt_and_dpo_refuses_truncate_prompt():
    # [bos] 11 prompt chars, chosen "123" + eos (4) -> 16, rejected "1234567" + eos (8) -> 20: cut 4
    pair = {"prompt": "12345678+1=", "chosen": "123", "rejected": "1234567"}
    with pytest.warns(UserWarning, match=r"1 of 1 rows exceed max_length=16 tokens \(longest 20\); 1 truncated"):
        it, kind = reward_batches(TOK, [pair], TaskConfig(batch_size=1, max_length=16, overlong="truncate_prompt"))
    assert kind == "pairs"
    (prompt, chosen, rejected), _ = it.examples[0]
    assert [list(prompt), list(chosen), list(rejected)] == [[BOS] + digits("5678+1="), digits("123") + [EOS],
                                                            digits("1234567") + [EOS]]
    assert it.batch_at(0).tokens.shape == (1, 2, 16)
    with pytest.raises(DataError, match=r"^row 0 \(rejected\): 20 tokens exceed max_length=16; 1 of 1 rows are "
                                        r"longer \(longest 20\)\. Raise max_length, or pass overlong='drop' or "
                                        r"'truncate_completion'$"):
        preference_batches(TOK, [pair], DPOTaskConfig(batch_size=1, max_length=16, overlong="error"))
    with pytest.raises(ValueError, match=r"overlong must be one of 'error', 'drop', 'truncate_completion'"):
        preference_batches(TOK, [pair], DPOTaskConfig(batch_size=1, max_length=16, overlong="truncate_prompt"))


def test_a_collation_error_says_which_examples_the_batch_rows_are():
    from rljax.data.collate import BatchIterator, collate_prompt_completion

    rows = [("1+1=", "2"), ("2+2=", "4"), ("12345678+1=", "12345679")]  # 7, 7, 21 tokens
    it = BatchIterator(rows, 1, lambda b: collate_prompt_completion(TOK, b, max_length=16), shuffle=False)
    with pytest.raises(ValueError, match=r"row 0: 21 tokens exceed max_length=16") as err:  # the batch's row 0
        it.batch_at(2)
    assert err.value.__notes__ == ["BatchIterator: batch at data position 2; its rows 0..0 are examples [2] "
                                   "(0-based indices into the data set)"]


# ----------------------------------------------------------------------------- the model
def test_the_model_refuses_a_sequence_longer_than_max_seq_len():
    model = Model(preset("tiny", vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         mlp_dim=32, max_seq_len=8))
    params = model.param_shapes()  # shapes only: the check runs at trace time, so nothing is computed

    def batch(T):
        ones = jnp.ones((1, T), jnp.int32)
        return SequenceBatch(tokens=ones * 4, attention_mask=ones, loss_mask=ones)

    def loss(p, b):
        return sft_loss(p, b, model=model, cfg=SFTConfig())[0]

    assert jax.eval_shape(loss, params, batch(8)).shape == ()  # exactly max_seq_len is fine
    msg = r"^sequence length 9 exceeds the model's max_seq_len=8"
    with pytest.raises(ValueError, match=msg):  # under jit the shape is static: refused when traced
        jax.eval_shape(loss, params, batch(9))
    with pytest.raises(ValueError, match=msg):
        jax.eval_shape(lambda p: model(p, jnp.ones((2, 9), jnp.int32)), params)
    with pytest.raises(ValueError, match=r"^sequence length 16384 exceeds the model's max_seq_len=8"):
        jax.eval_shape(loss, params, batch(16384))


# ----------------------------------------------------------------------------- malformed JSON
def test_a_malformed_jsonl_line_is_one_data_error_naming_file_and_line(tmp_path):
    lines = [json.dumps(SHORT), "", json.dumps(SHORT), '{"prompt": "1+1=", "completion": }', json.dumps(SHORT)]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_records(path, cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == f"{path}, line 4: Expecting value at column 34"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no datasets traceback behind it
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4: Expecting value"):  # the task builders too
        sft_batches(TOK, path, TaskConfig(batch_size=1))
    path = write_lines(tmp_path / "list.jsonl", [json.dumps(SHORT), "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl, line 2: expected a JSON object \(one row per line\), got list"):
        load_records(path, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "array.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=r"array\.json, line 3: Expecting ',' delimiter at column 18"):
        load_records(str(path), cache_dir=str(tmp_path / "cache"))


def test_a_bad_row_names_its_1_based_line_and_0_based_row(tmp_path):
    lines = [json.dumps(SHORT), "", "   ", json.dumps(SHORT), json.dumps({"prompt": "1+1="})]
    path = write_lines(tmp_path / "rows.jsonl", lines)
    with pytest.raises(DataError, match=r"^.*rows\.jsonl, line 5 \(row 2, counted from 0\): field 'completion' "
                                        r"is missing \(columns with a value: prompt\)$"):
        prompt_completion(path)
    assert row_locator(path)(0) == f"{path}, line 1 (row 0, counted from 0)"
    assert row_locator(path)(1) == f"{path}, line 4 (row 1, counted from 0)"
    assert row_locator([SHORT])(0) == "row 0"  # not a file: the row index only
    pairs = tmp_path / "pairs.jsonl"
    write_lines(pairs, [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}), "",
                        json.dumps({"prompt": "a", "rejected": "c"})])
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 3 \(row 1, counted from 0\): field 'chosen' is missing"):
        preference_pairs(str(pairs))


def test_pad_rows_pads_each_side_as_the_tokenizer_does():
    """pad_rows(side=...) on hand-made rows: the written arrays, and the same tokens and mask as the
    tokenizer's own encode_batch padding of the texts those rows encode; a per-token column follows its
    row, and an unknown side is named."""
    from rljax.data.collate import pad_rows

    tok = CharTokenizer()
    texts = ["1+2=", "10=", "7"]
    rows = [tok.encode(t) for t in texts]
    for side in ("left", "right"):
        tokens, mask, extra = pad_rows(rows, 6, tok.pad_id, [[1.5] * len(r) for r in rows], side=side)
        want_tokens, want_mask = tok.encode_batch(texts, padding_side=side, length=6)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_array_equal(extra, 1.5 * want_mask)
        assert extra.dtype == np.float32 and tokens.dtype == mask.dtype == np.int32
    p = tok.pad_id
    np.testing.assert_array_equal(pad_rows([[5, 6], [7]], 3, p, side="left")[0], [[p, 5, 6], [p, p, 7]])
    np.testing.assert_array_equal(pad_rows([[5, 6], [7]], 3, p)[0], [[5, 6, p], [7, p, p]])
    with pytest.raises(ValueError, match="pad_rows: side must be 'left' or 'right', got 'up'"):
        pad_rows([[5]], 2, p, side="up")
