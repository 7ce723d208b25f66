import os

os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest

from rljax.data import adapters
from rljax.data.arithmetic import Problem, check_answer, check_steps, make_split, split_steps
from rljax.data.synthetic import (
    CORRUPTIONS,
    corrupt,
    corrupt_step,
    gold_score,
    preference_pairs,
    relevance,
    simulated_feedback,
)
from rljax.tokenizer import DEFAULT_ALPHABET


@pytest.fixture(scope="module")
def problems():
    return make_split(400, 0, levels=(1, 2, 3), seed=7)[0]


def test_corruptions(problems):
    rng = np.random.default_rng(0)
    for p in problems[:100]:
        for kind in CORRUPTIONS:
            c = corrupt(p, rng, kind)
            assert set(c) <= set(DEFAULT_ALPHABET), (kind, c)
            assert c != p.completion
            assert check_answer(p, c) == (kind == "verbose"), (kind, p, c)
            if kind == "truncated":
                assert "answer:" not in c and all(check_steps(p, c))
            if kind == "wrong_answer":
                assert all(check_steps(p, c)) and split_steps(c) == list(p.steps)
            if kind == "verbose":
                assert len(c) > len(p.completion)
            if kind == "wrong_step":
                labels = check_steps(p, c)
                steps = split_steps(c)
                assert len(steps) == len(p.steps)
                k = next(i for i, (s, r) in enumerate(zip(steps, p.steps)) if s != r)
                assert labels == [i < k for i in range(len(labels))]
    with pytest.raises(ValueError):
        corrupt(problems[0], rng, "nonsense")


def test_wrong_step_is_internally_consistent():
    p = Problem("23+58*2", ("58*2=116", "23+116=139"), 139, 2)
    assert corrupt_step(p, 0, 1) == "58*2=117;23+117=140;answer:140"
    assert corrupt_step(p, 1, -2) == "58*2=116;23+116=137;answer:137"
    assert check_steps(p, corrupt_step(p, 0, 1)) == [False, False]
    assert check_steps(p, corrupt_step(p, 1, 3)) == [True, False]
    p3 = make_split(50, 0, levels=(3,), seed=1)[0]
    for q in p3:
        for k in range(len(q.steps)):
            labels = check_steps(q, corrupt_step(q, k, 5))
            assert labels == [i < k for i in range(len(q.steps))]


def test_gold_score_known_values():
    p = Problem("23+58*2", ("58*2=116", "23+116=139"), 139, 2)
    ref = p.completion  # "58*2=116;23+116=139;answer:139", 30 chars
    assert gold_score(p, ref) == 1.5
    assert gold_score(p, "58*2=116;23+116=139;answer:140") == pytest.approx(0.5)  # wrong answer, steps right
    assert gold_score(p, "58*2=116") == pytest.approx(0.25)  # half the steps, no answer
    assert gold_score(p, "answer:139") == pytest.approx(1.0)  # bare right answer
    assert gold_score(p, "58*2=117;23+117=140;answer:140") == pytest.approx(0.0)
    verbose = "58*2=116; so;23+116=139; so;answer:139"  # 8 chars longer, fields [T, F, F, F]
    assert gold_score(p, verbose) == pytest.approx(1.0 + 0.5 * 1 / 4 - 0.08)
    for q in make_split(50, 0, seed=3)[0]:
        assert gold_score(q, q.completion) == 1.5


def test_determinism(problems):
    few = problems[:50]
    assert preference_pairs(few, 0) == preference_pairs(few, 0)
    assert preference_pairs(few, 0) != preference_pairs(few, 1)
    assert simulated_feedback(few, 0) == simulated_feedback(few, 0)
    assert simulated_feedback(few, 0) != simulated_feedback(few, 1)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [corrupt(p, a, "wrong_step") for p in few] == [corrupt(p, b, "wrong_step") for p in few]


def _gold_of(problems, pairs):
    return [(gold_score(p, r["chosen"]), gold_score(p, r["rejected"])) for p, r in zip(problems, pairs)]


def test_preference_pairs(problems):
    pairs = preference_pairs(problems, 0, noise_free=True)
    assert len(pairs) == len(problems)
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "gold_margin"}
    for p, r, (gc, gr) in zip(problems, pairs, _gold_of(problems, pairs)):
        assert r["prompt"] == p.prompt and r["chosen"] != r["rejected"]
        assert gc >= gr and r["gold_margin"] == pytest.approx(gc - gr)
    # the rows load through the adapter schema
    assert len(adapters.preference_pairs(pairs)) == len(pairs)

    def agreement(beta):
        rows = preference_pairs(problems, 1, beta=beta)
        margins = np.array([r["gold_margin"] for r in rows])
        margins = margins[margins != 0]
        return float(np.mean(margins > 0))

    assert agreement(50.0) > 0.9
    assert abs(agreement(0.01) - 0.5) < 0.1


def test_simulated_feedback_position_bias_and_ips():
    problems = make_split(800, 0, levels=(1, 2, 3), seed=11)[0]
    rows = simulated_feedback(problems, 0)  # 800 problems x slate of 5 = 4000 impressions
    assert len(rows) == 5 * len(problems)
    keys = {"prompt", "completion", "gold", "like", "accept", "dwell_seconds", "position", "click", "propensity"}
    assert keys <= set(rows[0])
    pos = np.array([r["position"] for r in rows])
    assert set(pos) == {1, 2, 3, 4, 5}
    prop = np.array([r["propensity"] for r in rows])
    np.testing.assert_allclose(prop, 1.0 / pos)
    gold = np.array([r["gold"] for r in rows])
    rel = np.array([relevance(g) for g in gold])
    click = np.array([r["click"] for r in rows], float)
    np.testing.assert_allclose(rel, [r["relevance"] for r in rows])
    ips = click / prop
    buckets = [(0.0, 0.4), (0.4, 0.75), (0.75, 1.01)]
    seen = 0
    for lo, hi in buckets:
        m = (rel >= lo) & (rel < hi)
        if m.sum() < 300:
            continue
        seen += 1
        true = rel[m].mean()
        assert abs(ips[m].mean() - true) < 0.12, (lo, hi, ips[m].mean(), true)
        assert click[m].mean() < 0.7 * true  # raw click rate is biased low
    assert seen >= 2
    # overall: IPS recovers mean relevance, raw clicks do not
    assert abs(ips.mean() - rel.mean()) < 0.05
    assert click.mean() < 0.6 * rel.mean()
    # accept follows relevance
    accept = np.array([r["accept"] for r in rows], float)
    assert abs(accept.mean() - rel.mean()) < 0.04


def test_like_has_a_length_bias(problems):
    def signals(length_bias):
        rows = simulated_feedback(problems, 3, length_bias=length_bias)
        length = np.array([len(r["completion"]) for r in rows], float)
        like = np.array([r["like"] for r in rows], float)
        gold = np.array([r["gold"] for r in rows])
        residual = like - 1.0 / (1.0 + np.exp(-(2.0 * gold - 1.0)))  # like beyond what gold explains
        return rows, length, like, residual

    rows, length, like, residual = signals(0.02)
    assert np.corrcoef(length, like)[0, 1] > 0.1  # the like-rate correlates with length
    assert np.corrcoef(length, residual)[0, 1] > 0.07  # ... beyond gold: the known bias
    assert residual.mean() > 0.05
    _, length0, _, residual0 = signals(0.0)
    np.testing.assert_array_equal(length, length0)  # same candidates, only the like model changes
    assert abs(residual0.mean()) < 0.03
    assert np.corrcoef(length0, residual0)[0, 1] < np.corrcoef(length, residual)[0, 1] - 0.05
    # dwell time grows with length
    dwell = np.array([r["dwell_seconds"] for r in rows])
    assert np.corrcoef(length, np.log(dwell))[0, 1] > 0.5
