"""Automatic process labels (Math-Shepherd): hand-computed with a toy completer; batched = per-prefix."""
import jax
import numpy as np
import pytest

from rljax.data.arithmetic import parse_answer
from rljax.data.reward_collate import collate_steps, split_solution
from rljax.models import Model, preset
from rljax.rewards.process_labels import label_steps, model_completer
from rljax.sampling import SampleConfig
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
TABLE = {  # prefix (prompt included) -> 4 continuations
    "1+2*3=2*3=6;": ["1+6=7;answer:7", "answer:9", "answer:7", "answer:1"],
    "1+2*3=2*3=6;1+6=8;": ["answer:8"] * 4,
    "1+2*3=2*3=6;1+6=7;": ["answer:7", "answer:7", "answer:6", "answer:7"],
}


def toy_completer(prefixes, n, key):
    assert n == 4
    return [TABLE[p] for p in prefixes]


def test_labels_equal_hand_computed_ones_and_stay_floats():
    prompts = ["1+2*3=", "1+2*3="]
    solutions = [["2*3=6", "1+6=8", "answer:8"], ["2*3=6", "1+6=7", "answer:7"]]
    check = lambda m, completion: parse_answer(completion) == 7  # noqa: E731
    labels = label_steps(prompts, solutions, check, toy_completer, n=4, separator=";", key=jax.random.key(0))
    # step 1: 2 of 4 continuations reach 7; step 2 of the first solution: none (8); last step: the solution itself
    assert labels[0].soft == (0.5, 0.0, 0.0) and labels[0].hard == (1.0, 0.0, 0.0)
    assert labels[1].soft == (0.5, 0.75, 1.0) and labels[1].hard == (1.0, 1.0, 1.0)
    batch = collate_steps(TOK, [(p, s, lab.soft) for p, s, lab in zip(prompts, solutions, labels)], separator=";")
    np.testing.assert_array_equal(batch.labels[1][batch.label_mask[1] > 0], np.float32([0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="solution 1: expected a non-empty list of steps"):
        label_steps(prompts, [["a"], []], check, toy_completer, n=4, separator=";", key=jax.random.key(0))


def test_steps_with_the_separator_or_empty_are_refused_and_plain_steps_give_the_hand_prefixes():
    """OREO's steps keep their separator ("1+2;", "=3"): joined again with ";" they made the prefix
    "q:1+2;;" (a doubled separator) that collate_steps never trains on; now an error naming the step."""
    from rljax.oreo_training import split_keeping_separator

    seen = []

    def complete(prefixes, n, key):
        seen.extend(prefixes)
        return [["3"] * n for _ in prefixes]

    check = lambda m, completion: completion.endswith("=3")  # noqa: E731
    oreo_steps = split_keeping_separator("1+2;=3", ";")
    assert oreo_steps == ["1+2;", "=3"]
    with pytest.raises(ValueError, match=r"solution 0: step 0 contains the separator ';' \('1\+2;'\)"):
        label_steps(["q:"], [oreo_steps], check, complete, n=2, separator=";", key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"solution 1: step 0 is empty or not a string: ''"):
        label_steps(["q:", "q:"], [["1+2"], ["", "=3"]], check, complete, n=2, separator=";", key=jax.random.key(0))
    assert seen == []  # refused before any completion was sampled
    # the PRM form of the same solution (split_solution drops the separator): by hand, the one proper prefix
    # is "q:" + "1+2" + ";"; both continuations "3" end "…;3", not "=3", so step 1 scores 0; the last step
    # is the solution "1+2;=3" itself, which is right
    labels = label_steps(["q:"], [split_solution("1+2;=3", ";")], check, complete, n=2, separator=";",
                         key=jax.random.key(0))
    assert seen == ["q:1+2;"]
    assert labels[0].soft == (0.0, 1.0) and labels[0].hard == (0.0, 1.0)


def test_model_completer_labels_all_prefixes_in_one_batch_like_one_at_a_time():
    model = Model(preset("tiny", n_layers=1))
    params = model.init(jax.random.key(0))
    cfg = SampleConfig(max_new_tokens=6, greedy=True, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    calls = []
    base = model_completer(model, params, TOK, cfg)

    def counted(prefixes, n, key):
        calls.append(len(prefixes))
        return base(prefixes, n, key)

    prompts = ["1+2*3=", "4*5=", "9-3="]
    solutions = [["2*3=6", "1+6=7", "answer:7"], ["4*5=20", "answer:20"], ["answer:6"]]
    check = lambda m, completion: len(completion) % 2 == 0  # noqa: E731  (arbitrary, deterministic)
    batched = label_steps(prompts, solutions, check, counted, n=2, separator=";", key=jax.random.key(1))
    assert calls == [3]  # the three proper prefixes in one call
    one_by_one = [label_steps([p], [s], lambda _, c, m=m: check(m, c), base, n=2, separator=";",
                              key=jax.random.key(1))[0] for m, (p, s) in enumerate(zip(prompts, solutions))]
    assert batched == one_by_one
    assert [lab.soft for lab in batched] == [(0.0, 1.0, 1.0), (0.0, 1.0), (1.0,)]  # mixed, so the match means something
    assert {v for lab in batched for v in lab.soft[:-1]} <= {0.0, 1.0}  # greedy: both continuations agree
