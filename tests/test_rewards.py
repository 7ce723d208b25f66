"""Rule rewards on hand-written completions; bad reward functions give clear errors."""
import numpy as np
import pytest

from rljax.data.arithmetic import Problem, solve
from rljax.rewards import (RewardError, arithmetic_answer_reward, arithmetic_format_reward, arithmetic_step_reward,
                           length_penalty, score, weighted_sum)

P = Problem("23+58*2", *solve("23+58*2"), level=2)
GOOD = "58*2=116;23+116=139;answer:139"
WRONG = "58*2=116;23+116=140;answer:140"
MESSY = "58 times 2 is 116 answer:139"


def test_answer_and_format_rewards():
    r = score(arithmetic_answer_reward, ["p"] * 4, [GOOD, WRONG, MESSY, ""], problems=[P] * 4)
    np.testing.assert_array_equal(r, [1, 0, 1, 0])
    f = score(arithmetic_format_reward, ["p"] * 5, [GOOD, WRONG, MESSY, "", "answer:7"])
    np.testing.assert_array_equal(f, [1, 1, 0, 0, 1])


def test_step_reward_counts_right_steps_up_to_the_first_mistake():
    completions = [GOOD, WRONG,
                   "58*2=106;23+106=129;answer:129",  # wrong first product, then right arithmetic on it: 0 of 2
                   "23+58=81;81*2=162;answer:162",  # illegal order (+ before *): 0 of 2
                   "58*2=116", "58*2=116;23+116=139;1+1=2;answer:139",  # one of 2; extra steps do not add
                   MESSY, ""]
    r = score(arithmetic_step_reward, ["p"] * len(completions), completions, problems=[P] * len(completions))
    np.testing.assert_array_equal(r, [1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 0.0, 0.0])


def test_length_penalty_and_weighted_sum():
    pen = length_penalty(10, cache=4)
    np.testing.assert_allclose(score(pen, ["p"] * 4, ["a" * 5, "a" * 6, "a" * 8, "a" * 20]), [0, 0, -0.5, -1])
    hard = length_penalty(10)
    np.testing.assert_allclose(score(hard, ["p"] * 2, ["a" * 10, "a" * 11]), [0, -1])
    both = weighted_sum((1.0, arithmetic_answer_reward), (0.5, arithmetic_format_reward))
    np.testing.assert_allclose(score(both, ["p"] * 3, [GOOD, WRONG, MESSY], problems=[P] * 3), [1.5, 0.5, 1.0])


def test_bad_reward_functions_are_reported_with_the_sample():
    def breaks_on_x(prompts, completions, **_):
        return [1.0 / (0 if "x" in c else 1) for c in completions]

    with pytest.raises(RewardError, match=r"ZeroDivisionError.*sample 1: prompt 'q1', completion 'x marks'"):
        score(breaks_on_x, ["q0", "q1"], ["fine", "x marks"])
    with pytest.raises(RewardError, match=r"returned shape \(3,\); expected \(2,\)"):
        score(lambda p, c, **_: [0.0, 1.0, 2.0], ["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match=r"non-finite rewards for 1 sample\(s\), e.g. sample 1 = nan"):
        score(lambda p, c, **_: [0.0, float("nan")], ["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match="metadata 'problems' has 1 entries for 2 samples"):
        score(arithmetic_answer_reward, ["a", "b"], ["c", "d"], problems=[P])
    with pytest.raises(RewardError, match="element 0 is str .high., not a real number"):
        score(lambda p, c, **_: ["high", "low"], ["a", "b"], ["c", "d"])
