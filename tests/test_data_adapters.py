import os

os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import re

import datasets
import numpy as np
import pytest

from rljax.data.adapters import (
    BinaryFeedback,
    Chat,
    DataError,
    Message,
    PreferencePair,
    PromptCompletion,
    ScoredResponse,
    binary_feedback,
    chat_messages,
    chat_to_prompt_completion,
    load_records,
    preference_pairs,
    prompt_completion,
    row_locator,
    scored_responses,
)
from rljax.data.adapters import _folder_splits

PC_ROWS = [{"prompt": "1+2=", "completion": "1+2=3;answer:3"}, {"prompt": "", "completion": "hi"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


@pytest.mark.parametrize("writer,name", [(_write_json, "d.json"), (_write_jsonl, "d.jsonl"),
                                         (_write_parquet, "d.parquet")])
def test_load_file_and_directory(tmp_path, cache, writer, name):
    folder = tmp_path / "data"
    folder.mkdir()
    path = writer(folder / name, PC_ROWS)
    for source in (path, str(path), folder):
        ds = load_records(source, cache_dir=cache)
        assert isinstance(ds, datasets.Dataset)
        assert ds.to_list() == PC_ROWS
        assert prompt_completion(ds) == [PromptCompletion("1+2=", "1+2=3;answer:3"), PromptCompletion("", "hi")]


def test_directory_of_several_files_and_split(tmp_path, cache):
    """Files that name no split are all "train" (as datasets.load_dataset reads the folder); asking for
    another split is an error naming the folder and the split it has."""
    folder = tmp_path / "d"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", PC_ROWS[:1])
    _write_jsonl(folder / "b.jsonl", PC_ROWS[1:])
    assert load_records(folder, cache_dir=cache).to_list() == PC_ROWS
    assert datasets.load_dataset(str(folder), split="train", cache_dir=str(cache)).to_list() == PC_ROWS
    with pytest.raises(ValueError, match=r"directory '.*d' has no 'test' split, only 'train' \(a\.jsonl, b\.jsonl\)"):
        load_records(folder, split="test", cache_dir=cache)


TRAIN_ROWS = [{"prompt": "tr1", "completion": "a"}, {"prompt": "tr2", "completion": "b"}]
TEST_ROWS = [{"prompt": "TEST1", "completion": "c"}]


def _hub_folder(tmp_path, kind):
    """The audit's folders: hub-style Parquet shards data/{train,test}-00000-of-00001.parquet, or
    train.jsonl and test.jsonl side by side."""
    folder = tmp_path / f"hub_{kind}"
    (folder / "data").mkdir(parents=True)
    if kind == "parquet":
        _write_parquet(folder / "data" / "train-00000-of-00001.parquet", TRAIN_ROWS)
        _write_parquet(folder / "data" / "test-00000-of-00001.parquet", TEST_ROWS)
    else:
        _write_jsonl(folder / "train.jsonl", TRAIN_ROWS)
        _write_jsonl(folder / "test.jsonl", TEST_ROWS)
    return folder


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_folder_gives_the_rows_of_the_split_asked_for(tmp_path, cache, kind):
    """A folder holding a train and a test split gives each split its own rows (once mixed: the test
    rows came with split="train" and split="test" alike), as datasets.load_dataset(folder, split=...) does;
    a split it does not have is an error naming the folder and the splits it has."""
    folder = _hub_folder(tmp_path, kind)
    for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        assert load_records(folder, split=split, cache_dir=cache).to_list() == rows
        assert datasets.load_dataset(str(folder), split=split, cache_dir=str(cache)).to_list() == rows
    assert prompt_completion(str(folder)) == [PromptCompletion("tr1", "a"), PromptCompletion("tr2", "b")]
    assert prompt_completion(load_records(folder, split="test", cache_dir=cache)) == [PromptCompletion("TEST1", "c")]
    # a row is located in its own split's file
    train, test = (("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet") if kind == "parquet"
                   else ("train.jsonl", "test.jsonl"))
    where = (lambda f, k: f"{folder / f}, row {k} (counted from 0)") if kind == "parquet" else \
        (lambda f, k: f"{folder / f}, line {k + 1} (row {k}, counted from 0)")
    assert row_locator(folder)(1) == where(train, 1)
    assert row_locator(folder, split="test")(0) == where(test, 0)
    with pytest.raises(ValueError, match=rf"directory '.*hub_{kind}' has no 'validation' split, only "
                                         rf"'train' \({re.escape(train)}\), 'test' \({re.escape(test)}\)"):
        load_records(folder, split="validation", cache_dir=cache)


@pytest.mark.parametrize("layout", [
    ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl", "data/extra-00000-of-00001.jsonl",
     "other.jsonl"],
    ["train.jsonl", "test.jsonl", "other.jsonl"],
    ["train/a.jsonl", "test/b.jsonl", "c.jsonl"],
    ["my_train/a.jsonl", "dev-set/b.jsonl", "eval2/c.jsonl", "x/validation/d.jsonl"],
    ["trainer.jsonl", "testing.jsonl", "my-dev.jsonl", "val.json", "evaluation_1.jsonl", "training.jsonl"],
    ["x/train.jsonl", "x/y_test_z.jsonl", "contest.jsonl", "latest.jsonl"],
    ["valid/a.jsonl", "train2/b.jsonl", "sub/valid.jsonl"],
    [".hidden/train.jsonl", "__pycache__/test.jsonl", "a.jsonl", "b.jsonl"],
])
def test_folder_splits_follow_datasets_file_name_conventions(tmp_path, layout):
    """Which file goes to which split, against datasets' own resolver (get_data_patterns, then the
    patterns resolved), which datasets.load_dataset(folder) uses."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(tmp_path / name, PC_ROWS[:1])
    want = DataFilesDict.from_patterns(get_data_patterns(str(tmp_path)), base_path=str(tmp_path))
    want = {str(split): sorted(os.path.relpath(f, tmp_path) for f in files) for split, files in want.items()}
    got = {split: sorted(os.path.relpath(f, tmp_path) for f in _folder_splits(tmp_path, str(tmp_path))[split])
           for split in want}
    assert list(_folder_splits(tmp_path, str(tmp_path))) == list(want)
    assert got == want


def test_load_passthrough_and_list():
    ds = datasets.Dataset.from_list(PC_ROWS)
    assert load_records(ds) is ds
    assert load_records(PC_ROWS).to_list() == PC_ROWS


def test_missing_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_records(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        load_records("train.parquet")
    # "folder/name" with no suffix, where the folder is here: a missing local file, not a hub id to look up
    (tmp_path / "data").mkdir()
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match="'data/train'"):
            load_records("data/train")


def test_chat_messages(tmp_path, cache):
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "2+2="},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    chats = chat_messages(load_records(_write_jsonl(tmp_path / "c.jsonl", rows), cache_dir=cache))
    assert chats == [
        Chat((Message("system", "be brief"), Message("user", "2+2="), Message("assistant", "4"))),
        Chat((Message("user", "hi"), Message("assistant", "hello"))),
    ]
    pc = chat_to_prompt_completion(chats[0])
    assert pc == PromptCompletion("system: be brief\nuser: 2+2=\nassistant: ", "4")
    assert chat_to_prompt_completion(chats[1]).prompt == "user: hi\nassistant: "
    custom = chat_to_prompt_completion(chats[1], template=lambda ms: "|".join(m.content for m in ms))
    assert custom == PromptCompletion("hi", "hello")


def test_preference_scored_binary(tmp_path, cache):
    pref = [{"prompt": "p", "chosen": "good", "rejected": "bad", "extra": 1}]
    assert preference_pairs(load_records(_write_parquet(tmp_path / "p.parquet", pref), cache_dir=cache)) == [
        PreferencePair("p", "good", "bad")]
    scored = [{"q": "p1", "r": "a", "s": 2}, {"q": "p2", "r": "b", "s": 0.25}]
    out = scored_responses(load_records(_write_json(tmp_path / "s.json", scored), cache_dir=cache),
                           prompt_field="q", response_field="r", score_field="s")
    assert out == [ScoredResponse("p1", "a", 2.0), ScoredResponse("p2", "b", 0.25)]
    assert all(isinstance(r.score, float) for r in out)
    fb = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "d", "label": False}]
    assert binary_feedback(load_records(_write_jsonl(tmp_path / "b.jsonl", fb), cache_dir=cache)) == [
        BinaryFeedback("p", "c", True), BinaryFeedback("p", "d", False)]
    ints = binary_feedback([{"prompt": "p", "completion": "c", "label": 1},
                            {"prompt": "p", "completion": "c", "label": 0}])
    assert [r.label for r in ints] == [True, False]
    assert all(isinstance(r.label, bool) for r in ints)


def _ok_pref(**kw):
    return {"prompt": "p", "chosen": "a", "rejected": "b", **kw}


@pytest.mark.parametrize("fn,rows,row,words", [
    (preference_pairs, [_ok_pref(), _ok_pref(), _ok_pref(), {"prompt": "p", "rejected": "b"}], 3,
     ["field 'chosen' is missing", "columns with a value: prompt, rejected"]),
    (preference_pairs, [_ok_pref(), _ok_pref(chosen=5)], 1, ["'chosen'", "string", "int"]),
    (prompt_completion, [PC_ROWS[0], PC_ROWS[0], {"prompt": "p", "completion": ""}], 2,
     ["field 'completion' is empty"]),
    (scored_responses, [{"prompt": "p", "response": "r", "score": 1}] * 5
     + [{"prompt": "p", "response": "r", "score": "high"}], 5, ["field 'score' must be a number, got str 'high'"]),
    (scored_responses, [{"prompt": "p", "response": "r", "score": True}], 0, ["'score'", "bool"]),
    (binary_feedback, [{"prompt": "p", "completion": "c", "label": 2}], 0, ["'label'", "2"]),
    (binary_feedback, [{"prompt": "p", "completion": "c", "label": "yes"}], 0, ["'label'"]),
    (chat_messages, [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}], 1,
     ["messages[0].role", "bot"]),
    (chat_messages, [{"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}], 0,
     ["'messages'", "assistant", "'user'"]),
    (chat_messages, [{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}], 0,
     ["messages[0].content", "string"]),
    (chat_messages, [{"messages": []}], 0, ["'messages'", "empty"]),
    (chat_messages, [{"msgs": []}], 0, ["'messages' is missing"]),
])
def test_bad_rows(fn, rows, row, words):
    with pytest.raises(DataError) as err:
        fn(rows)
    msg = str(err.value)
    assert msg.startswith(f"row {row}: "), msg
    for w in words:
        assert w in msg, msg


def test_bad_rows_through_a_file(tmp_path, cache):
    rows = [{"prompt": "p", "completion": "c", "label": 1}, {"prompt": "p", "completion": "c", "label": 2}]
    with pytest.raises(DataError, match=r"row 1: field 'label'"):
        binary_feedback(load_records(_write_jsonl(tmp_path / "b.jsonl", rows), cache_dir=cache))
    # a key missing from one JSONL row becomes None in the Dataset: reported as missing or null
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "rejected": "b"}]
    with pytest.raises(DataError, match=r"row 1: field 'chosen' is missing or null \(columns with a value: prompt, "
                                        r"rejected\)"):
        preference_pairs(load_records(_write_jsonl(tmp_path / "p.jsonl", rows), cache_dir=cache))


def test_dataclasses_are_frozen_and_validated():
    pc = PromptCompletion("a", "b")
    with pytest.raises(AttributeError):
        pc.prompt = "x"
    with pytest.raises(DataError, match="completion"):
        PromptCompletion("a", "")
    with pytest.raises(DataError, match="role"):
        Message("robot", "x")
    with pytest.raises(DataError, match="assistant"):
        Chat((Message("user", "x"),))


def test_reward_model_shapes_from_files(tmp_path, cache):
    from rljax.data.adapters import (Interaction, RankedList, StepLabelled, interaction_logs, ranked_lists,
                                     step_labelled)

    lists = [{"prompt": "p", "answers": ["a", "b", "c"], "ranks": [0, 2, 1]}]
    assert ranked_lists(load_records(_write_parquet(tmp_path / "r.parquet", lists), cache_dir=cache)) == [
        RankedList("p", ("a", "b", "c"), (0, 2, 1))]
    steps = [{"prompt": "p", "steps": ["2*3=6", "answer:6"], "labels": [0.375, 1]}]
    out = step_labelled(load_records(_write_jsonl(tmp_path / "s.jsonl", steps), cache_dir=cache))
    assert out == [StepLabelled("p", ("2*3=6", "answer:6"), (0.375, 1.0))]
    assert all(isinstance(v, float) for v in out[0].labels)
    # PRM800K-style: the steps after the first error unlabelled; collate_steps keeps them out of label_mask
    from rljax.data.reward_collate import collate_steps
    from rljax.tokenizer import CharTokenizer

    steps = [{"prompt": "p", "steps": ["2*3=7", "7+1=8", "answer:8"], "labels": [0, None, None]}]
    out = step_labelled(load_records(steps))
    assert out == [StepLabelled("p", ("2*3=7", "7+1=8", "answer:8"), (0.0, None, None))]
    batch = collate_steps(CharTokenizer(), out, separator="\n")
    assert int(np.asarray(batch.label_mask).sum()) == 1 and float(np.asarray(batch.labels).max()) == 0.0
    logs = [{"prompt": "p", "completion": "c", "click": 1, "position": 3, "propensity": 1 / 3},
            {"prompt": "p", "completion": "d", "like": False, "dwell_seconds": 2.5}]
    assert interaction_logs(load_records(_write_jsonl(tmp_path / "i.jsonl", logs), cache_dir=cache)) == [
        Interaction("p", "c", click=True, position=3, propensity=1 / 3),
        Interaction("p", "d", like=False, dwell_seconds=2.5)]


@pytest.mark.parametrize("fn,rows,row,words", [
    ("ranked_lists", [{"prompt": "p", "answers": ["a", "b"], "ranks": [0, 1]},
                      {"prompt": "p", "answers": ["a", "b"], "ranks": [1, 1]}], 1, ["'ranks'", "different ranks"]),
    ("ranked_lists", [{"prompt": "p", "answers": [], "ranks": []}], 0, ["'ranks'", "two answers"]),
    ("ranked_lists", [{"prompt": "p", "answers": ["a", "b"], "ranks": [0]}], 0, ["1 ranks for 2 answers"]),
    ("ranked_lists", [{"prompt": "p", "answers": ["a", ""], "ranks": [0, 1]}], 0, ["'answers[1]' is empty"]),
    ("ranked_lists", [{"prompt": "p", "answers": ["a", "b"], "ranks": [0, -1]}], 0, ["'ranks[1]'", ">= 0"]),
    ("step_labelled", [{"prompt": "p", "steps": ["a", "b"], "labels": [1]}], 0, ["1 labels for 2 steps"]),
    ("step_labelled", [{"prompt": "p", "steps": [], "labels": []}], 0, ["'steps' is empty"]),
    ("step_labelled", [{"prompt": "p", "steps": ["a"], "labels": [float("nan")]}], 0, ["'labels[0]'", "finite"]),
    ("step_labelled", [{"prompt": "p", "steps": ["a"], "labels": [1.5]}], 0, ["'labels[0]'", "[0, 1]"]),
    ("step_labelled", [{"prompt": "p", "steps": "a;b", "labels": [1, 1]}], 0, ["'steps' must be a list"]),
    ("interaction_logs", [{"prompt": "p", "completion": "c"}], 0, ["no signal logged"]),
    ("interaction_logs", [{"prompt": "p", "completion": "c", "click": 1, "position": 0}], 0, ["'position'"]),
    ("interaction_logs", [{"prompt": "p", "completion": "c", "click": 1, "propensity": 0.0}], 0,
     ["'propensity'", "(0, 1]"]),
    ("interaction_logs", [{"prompt": "p", "completion": "c", "dwell_seconds": -1}], 0, ["'dwell_seconds'"]),
])
def test_bad_reward_model_rows(fn, rows, row, words):
    import rljax.data.adapters as adapters

    with pytest.raises(DataError) as err:
        getattr(adapters, fn)(rows)
    msg = str(err.value)
    assert msg.startswith(f"row {row}: "), msg
    for w in words:
        assert w in msg, msg
