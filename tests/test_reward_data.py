"""Reward-model collation: layouts checked by hand, bad rows named."""
import numpy as np
import pytest

from rljax.data.adapters import Interaction, PreferencePair, interaction_logs
from rljax.data.reward_collate import (collate_feedback, collate_pairs, collate_ranked, collate_scored, collate_steps,
                                       collate_verifier, encode_steps, split_solution)
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


def _text(ids, mask):
    return TOK.decode([int(t) for t, m in zip(ids, mask) if m], skip_special=False, stop_at_eos=False)


def test_pairs_and_lists_layout():
    b = collate_pairs(TOK, [("1+1=", "2", "3"), PreferencePair("2*3=", "6", "5;answer:5")], margins=[0.5, 1.0],
                      min_bucket=4)
    assert b.tokens.shape == (2, 2, 16) and b.rank.tolist() == [[0, 1], [0, 1]]
    assert TOK.decode(b.tokens[1, 1]) == "2*3=5;answer:5"
    np.testing.assert_allclose(b.margin, [0.5, 1.0])
    lists = collate_ranked(TOK, [("1+1=", ["2", "3", "4"], [0, 1, 1]), ("2+2=", ["4", "5"], [0, 1])],
                           answers_per_list=4, min_bucket=4)
    assert lists.tokens.shape == (2, 4, 8)
    assert lists.rank.tolist() == [[0, 1, 1, -1], [0, 1, -1, -1]]
    assert lists.attention_mask[1, 2:].sum() == 0  # absent answers are all padding
    assert [TOK.decode(t) for t in lists.tokens[0, :3]] == ["1+1=2", "1+1=3", "1+1=4"]
    from rljax.data.adapters import RankedList, ScoredResponse, StepLabelled

    same = collate_ranked(TOK, [RankedList("1+1=", ("2", "3", "4"), (0, 1, 1)), RankedList("2+2=", ("4", "5"), (0, 1))],
                          answers_per_list=4, min_bucket=4)
    np.testing.assert_array_equal(same.tokens, lists.tokens)
    assert lists.prior is None
    with_prior = collate_ranked(TOK, [("1+1=", ["2", "3", "4"], [0, 1, 1]), ("2+2=", ["4", "5"], [0, 1])],
                                answers_per_list=4, priors=[[-0.5, -2.0, -3.0], [-0.25, -4.0]])
    np.testing.assert_array_equal(with_prior.prior, [[-0.5, -2.0, -3.0, 0.0], [-0.25, -4.0, 0.0, 0.0]])
    assert with_prior.prior.dtype == np.float32
    assert collate_scored(TOK, [ScoredResponse("1=", "1", 0.5)]).scores.tolist() == [0.5]
    steps = collate_steps(TOK, [StepLabelled("1=", ("a", "b"), (0.5, 1.0))], separator=";")
    assert steps.labels[0][steps.label_mask[0] > 0].tolist() == [0.5, 1.0]


@pytest.mark.parametrize("rows,match", [
    ([("1=", "2", "2")], "row 0: chosen and rejected are the same"),
    ([("1=", "2", "3"), ("1=", "", "3")], "row 1: chosen is empty"),
])
def test_bad_pairs_are_named(rows, match):
    with pytest.raises(ValueError, match=match):
        collate_pairs(TOK, rows)


@pytest.mark.parametrize("lists,match", [
    ([("p", ["a"], [0])], "row 0: a ranking needs at least two answers"),
    ([("p", ["a", "b"], [0, 1]), ("p", ["a", "b"], [1, 1])], "row 1: every answer has the same rank"),
    ([("p", ["a", "b"], [0, -1])], "row 0: rank of answer 1"),
    ([("p", ["a", "b", "a"], [0, 1, 2])], "row 0: answers 0 and 2 are the same text"),
    ([("p", ["a", "b"], [0])], "row 0: 2 answers but 1 ranks"),
    ([("p", ["a", ""], [0, 1])], "row 0: answer 1 is empty"),
    ([], "no examples"),
])
def test_bad_rankings_are_named(lists, match):
    with pytest.raises(ValueError, match=match):
        collate_ranked(TOK, lists)


@pytest.mark.parametrize("priors,match", [
    ([[0.0, 1.0]], "1 prior lists for 2 rows"),
    ([[0.0, 1.0], [0.0]], "row 1: 1 priors for 2 answers"),
    ([[0.0, 1.0], [0.0, float("nan")]], "row 1: prior of answer 1 is nan"),
])
def test_bad_priors_are_named(priors, match):
    with pytest.raises(ValueError, match=match):
        collate_ranked(TOK, [("p", ["a", "b"], [0, 1]), ("q", ["c", "d"], [1, 0])], priors=priors)


def test_scored_one_and_several_attributes_and_bad_scores():
    b = collate_scored(TOK, [("1=", "1", 0.5), ("2=", "2", 3)], min_bucket=4)
    np.testing.assert_allclose(b.scores, [0.5, 3.0])
    np.testing.assert_allclose(b.score_mask, [1, 1])
    m = collate_scored(TOK, [("1=", "1", (0.5, None)), ("2=", "2", [1, 2])], min_bucket=4)
    np.testing.assert_allclose(m.scores, [[0.5, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(m.score_mask, [[1, 0], [1, 1]])
    with pytest.raises(ValueError, match="row 1: score is nan"):
        collate_scored(TOK, [("1=", "1", 0.5), ("2=", "2", float("nan"))])
    with pytest.raises(ValueError, match="row 1: expected 2 scores"):
        collate_scored(TOK, [("1=", "1", (0.5, 1)), ("2=", "2", (1,))])
    # a string is not read as a sequence of len("3.5") = 3 attributes
    with pytest.raises(ValueError, match=r"row 0: score must be a number or a sequence of numbers .* got '3.5'"):
        collate_scored(TOK, [("1=", "1", "3.5")])
    with pytest.raises(ValueError, match=r"row 1: score must be a number, got '3.5'"):
        collate_scored(TOK, [("1=", "1", 0.5), ("2=", "2", "3.5")])


def test_feedback_signals_are_binary_and_checked():
    rows = [Interaction("q", "a", click=True, like=False), ("q", "b", 0, 0.5), ("q", "c", 1.0, None),
            ("q", "d", np.int64(1), 1.0), ("q", "e", np.bool_(False), 0.25)]
    b = collate_feedback(TOK, rows)
    np.testing.assert_array_equal(b.signal, np.float32([1, 0, 1, 1, 0]))  # by hand
    np.testing.assert_array_equal(b.propensity, np.float32([1, 0.5, 1, 1, 0.25]))
    # bool() would have made every one of these 1
    for i, bad in enumerate(("false", -1, 0.2, 2)):
        with pytest.raises(ValueError, match=rf"row 1: 'click' signal must be 0/1 or a bool, got .*{bad}"):
            collate_feedback(TOK, [("q", "a", 1, None), ("q", "b", bad, None)])
    logs = interaction_logs([{"prompt": "q", "completion": "a", "dwell_seconds": 0.4},
                             {"prompt": "q", "completion": "b", "dwell_seconds": 30.0}])
    with pytest.raises(ValueError, match=r"signal 'dwell_seconds' is not one of \('click', 'like', 'accept'\) "
                                         r"\(a duration, not a binary signal: threshold it"):
        collate_feedback(TOK, logs, signal="dwell_seconds")
    with pytest.raises(ValueError, match=r"signal 'clik' is not one of \('click', 'like', 'accept'\)$"):
        collate_feedback(TOK, logs, signal="clik")
    # the documented way: threshold the duration into a binary field yourself
    import dataclasses
    thresholded = [dataclasses.replace(r, accept=r.dwell_seconds >= 10) for r in logs]
    np.testing.assert_array_equal(collate_feedback(TOK, thresholded, signal="accept").signal, [0.0, 1.0])


def test_verifier_labels_every_completion_token():
    b = collate_verifier(TOK, [("1+1=", "2", 1), ("1+1=", "33", 0.25)], min_bucket=4)
    assert b.labels.dtype == np.float32
    # row 1: [bos] 1+1= 3 3 [eos] -> completion tokens (incl. eos) at 5, 6, 7
    assert b.label_mask[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(b.labels[1], [0, 0, 0, 0, 0, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(b.label_mask, b.loss_mask)
    with pytest.raises(ValueError, match="row 0: label must be in"):
        collate_verifier(TOK, [("1=", "1", 2)])


def test_steps_are_labelled_at_their_last_token_and_soft_labels_stay_floats():
    steps = split_solution("2*3=6;1+6=7;answer:7", ";")
    assert steps == ["2*3=6", "1+6=7", "answer:7"]
    ids, mask, ends = encode_steps(TOK, "1+2*3=", steps, ";")
    assert TOK.decode(ids) == "1+2*3=2*3=6;1+6=7;answer:7"
    assert [TOK.decode([ids[e]], skip_special=False) for e in ends] == ["6", "7", "7"]
    assert [TOK.decode(ids[:e + 1]) for e in ends] == ["1+2*3=2*3=6", "1+2*3=2*3=6;1+6=7",
                                                        "1+2*3=2*3=6;1+6=7;answer:7"]
    b = collate_steps(TOK, [("1+2*3=", steps, [1.0, 0.375, 0.125])], separator=";")
    assert b.labels.dtype == np.float32
    where = np.flatnonzero(b.label_mask[0])
    assert where.tolist() == ends
    np.testing.assert_array_equal(b.labels[0, where], np.float32([1.0, 0.375, 0.125]))
    assert b.labels[0].sum() == pytest.approx(1.5)  # nothing else is labelled
    # a solution without a separator is one step
    assert split_solution("answer:7", ";") == ["answer:7"]


@pytest.mark.parametrize("row,match", [
    (("p", ["a", "b"], [1.0]), "row 0: 1 labels for 2 steps"),
    (("p", [], []), "row 0: the solution has no steps"),
    (("p", ["a", ""], [1, 0]), "row 0: step 1 is empty"),
    (("p", ["a;b"], [1]), "row 0: step 0 contains the separator"),
    (("p", ["a"], [float("nan")]), "row 0: label of step 0 is nan"),
    (("p", "a;b", [1, 1]), "row 0: steps must be a list"),
])
def test_bad_step_rows_are_named(row, match):
    with pytest.raises(ValueError, match=match):
        collate_steps(TOK, [row], separator=";")
