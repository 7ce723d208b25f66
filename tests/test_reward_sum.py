"""RewardSum: a weighted sum of reward functions whose terms the RL iteration scores and reports apart, and
whose terms may return None for a sample they do not apply to (TRL's convention)."""
import dataclasses
import os
import functools

import jax
import numpy as np
import pytest

from rljax.models import Model, preset
from rljax.recipes.tasks import combine_rewards
from rljax.rewards import RewardCallConfig, RewardError, RewardSum, score, weighted_sum
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig

PROMPTS = ["a", "b", "c", "d"]
COMPLETIONS = ["x", "yy", "zzz", "wwww"]


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def only_ab(prompts, completions, **_):  # applies to prompts "a" and "b" alone
    return [10.0 if p in "ab" else None for p in prompts]


def test_sum_skips_the_terms_that_return_none_by_hand():
    s = weighted_sum((0.5, length), (2.0, only_ab))
    # a: 0.5*1 + 2*10, b: 0.5*2 + 2*10, c and d: only the length term
    np.testing.assert_allclose(s(PROMPTS, COMPLETIONS), [20.5, 21.0, 1.5, 2.0])
    np.testing.assert_allclose(score(s, PROMPTS, COMPLETIONS), [20.5, 21.0, 1.5, 2.0])
    assert s.__name__ == "0.5*length + 2*only_ab"


def test_no_term_scoring_a_sample_is_an_error_naming_it():
    with pytest.raises(RewardError, match=r"no term of the reward 1\*only_ab \+ 1\*only_ab_too scored 2 sample\(s\): "
                                          r"every term returned None for sample 2 \(sample 2: prompt 'c'"):
        def only_ab_too(prompts, completions, **_):
            return only_ab(prompts, completions)
        weighted_sum((1.0, only_ab), (1.0, only_ab_too))(PROMPTS, COMPLETIONS)


def test_none_alone_and_nan_in_a_term_are_still_refused():
    with pytest.raises(RewardError, match="element 2 is NoneType None.*allowed only for a term of a sum"):
        score(only_ab, PROMPTS, COMPLETIONS)

    def nan_reward(prompts, completions, **_):  # a NaN is a bug, not "does not apply"
        return [float("nan")] + [1.0] * 3

    with pytest.raises(RewardError, match="nan_reward returned non-finite rewards for 1 sample"):
        weighted_sum((1.0, length), (1.0, nan_reward))(PROMPTS, COMPLETIONS)


def test_names_weights_and_bad_terms():
    def fmt(prompts, completions, **_):
        return [0.0] * len(completions)

    s = RewardSum(((1, fmt), (1.0, fmt), (2, lambda p, c, **_: [0.0] * len(c)),
                   (1.0, functools.partial(length))))
    assert s.names == ("fmt", "fmt_2", "lambda", "length")
    assert s.terms[0] == (1.0, fmt) and isinstance(s.terms[0][0], float)
    with pytest.raises(ValueError, match="term 1's weight must be a finite real number, got nan"):
        RewardSum(((1.0, fmt), (float("nan"), fmt)))
    with pytest.raises(TypeError, match="term 0's reward function 3 is not callable"):
        RewardSum(((1.0, 3),))
    with pytest.raises(ValueError, match="term 0 must be a \\(weight, reward_fn\\) pair"):
        RewardSum((fmt,))
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum()
    # the recipe's list: one function alone stays itself, several (or a weighted one) make a RewardSum
    assert combine_rewards([fmt]) is fmt and combine_rewards(fmt) is fmt
    both = combine_rewards([fmt, (0.5, length)])
    assert isinstance(both, RewardSum) and both.terms == ((1.0, fmt), (0.5, length))
    with pytest.raises(TypeError, match="is not callable"):
        combine_rewards([fmt, 3])


def _bandit():
    model = Model(preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64))
    params = model.init(jax.random.key(0))
    return model, params


def _decode(ids):
    return [" ".join(str(int(t)) for t in row) for row in np.asarray(ids)]


def _arms(completions):
    return [int(c.split()[0]) for c in completions]


def test_rl_iteration_reports_each_term_over_the_samples_it_scored():
    """A one-token bandit, the reward a sum of the arm mod 3 (every sample) and 10 x (arm is even) for the samples
    of the first prompt only (None for the second): reward_mean, each term's mean and std recomputed from the
    arms the functions saw."""
    model, params = _bandit()
    cfg = RLConfig(algorithm="reinforce", sampling=SampleConfig(max_new_tokens=1, n=4, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
    seen = []

    def mod3(prompts, completions, **_):
        seen.append(_arms(completions))
        return [float(a % 3) for a in _arms(completions)]

    def even_first(prompts, completions, which, **_):
        return [10.0 * (a % 2 == 0) if w == 0 else None for a, w in zip(_arms(completions), which)]

    reward = weighted_sum((1.0, mod3), (0.5, even_first))
    iteration = make_rl_iteration(model, cfg, reward, _decode)
    _, metrics = iteration(create_rl_state(model, params, cfg, jax.random.key(1)), np.ones((2, 1), np.int32), None,
                           jax.random.key(2), which=[0, 1])
    arms = np.array(seen[0])
    assert len(seen) == 1 and arms.shape == (8,)  # each term called once on the 2 prompts x 4 samples
    m3, ev = arms % 3, 10.0 * (arms[:4] % 2 == 0)
    total = m3 + np.concatenate([0.5 * ev, np.zeros(4)])
    assert metrics["reward_mean"] == pytest.approx(total.mean())
    assert metrics["reward_std"] == pytest.approx(total.std())
    assert metrics["reward_mod3_mean"] == pytest.approx(m3.mean()) and metrics["reward_mod3_std"] == pytest.approx(m3.std())
    assert metrics["reward_even_first_mean"] == pytest.approx(ev.mean())  # over the first prompt's 4 samples
    assert metrics["reward_even_first_std"] == pytest.approx(ev.std())

    # a term that applies to no sample of the iteration: its metrics are left out, the rest as before
    _, metrics = iteration(create_rl_state(model, params, cfg, jax.random.key(1)), np.ones((2, 1), np.int32), None,
                           jax.random.key(2), which=[1, 1])
    assert "reward_even_first_mean" not in metrics and metrics["reward_mean"] == pytest.approx((np.array(seen[1]) % 3).mean())

    with pytest.raises(ValueError, match="monitors: 'reward_mod3' is the metric name of a term"):
        make_rl_iteration(model, cfg, reward, _decode, monitors={"reward_mod3": mod3})


def test_a_failed_term_call_scores_the_sample_failure_value_once():
    """on_failure="value", one call per sample: a term raising on the odd arms makes those samples' reward
    failure_value (not the other term's value plus it), counts each once, and leaves them out of its mean."""
    model, params = _bandit()
    cfg = RLConfig(algorithm="reinforce", sampling=SampleConfig(max_new_tokens=1, n=4, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"),
                   reward_call=RewardCallConfig(on_failure="value", failure_value=-7.0, batch_size=1))
    seen = []

    def arm(prompts, completions, **_):
        seen.extend(_arms(completions))
        return [float(a) for a in _arms(completions)]

    def fragile(prompts, completions, **_):
        if any(a % 2 for a in _arms(completions)):
            raise ConnectionError("judge down")
        return [1.0] * len(completions)

    iteration = make_rl_iteration(model, cfg, weighted_sum((1.0, arm), (1.0, fragile)), _decode)
    _, metrics = iteration(create_rl_state(model, params, cfg, jax.random.key(1)), np.ones((2, 1), np.int32), None,
                           jax.random.key(2))
    arms = np.array(seen)
    odd = arms % 2 == 1
    assert 0 < odd.sum() < 8  # the key draws both kinds of arm
    assert metrics["reward_mean"] == pytest.approx(np.where(odd, -7.0, arms + 1.0).mean())
    assert metrics["reward_failed"] == odd.sum()
    assert metrics["reward_arm_mean"] == pytest.approx(arms.mean())
    assert metrics["reward_fragile_mean"] == 1.0


# ----------------------------------------------------------------------------- the grpo recipe's reward formats
def test_grpo_recipe_gives_conversational_rows_trl_s_message_format():
    """Message-list prompts: the reward functions get each prompt's messages and each completion as one
    assistant message (TRL's conversational format), the same samples as reward_format="text" gives as text
    (same seed); a list of two such functions keeps each one's metrics; the held-out evaluation calls them
    in the same format."""
    from rljax.recipes import GRPOTaskConfig, grpo
    from tests.test_recipes_tasks import small_model

    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a + 1}="}], "answer": 2 * a + 1} for a in range(3)]
    got = {"conversational": [], "text": []}

    def record(fmt):
        def correct(prompts, completions, answer, **_):
            got[fmt].append((list(prompts), list(completions), list(answer)))
            text = [c[0]["content"] for c in completions] if fmt == "conversational" else completions
            return [float(str(a) in t) for t, a in zip(text, answer)]
        return correct

    def length(completions, **kwargs):  # TRL's form: called by keyword
        return [float(len(c[0]["content"])) for c in completions]

    cfg = GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=4, progress=False, system_prompt="add")
    conv = grpo(small_model(), rows, [record("conversational"), (0.5, length)], cfg, eval_data=rows[:1])
    text = grpo(small_model(), rows, record("text"), dataclasses.replace(cfg, reward_format="text"))
    (c_prompts, c_completions, c_answer), held = got["conversational"]  # the iteration's call, then the eval's
    assert held[0] == [[{"role": "system", "content": "add"}] + rows[0]["prompt"]] and held[2] == [rows[0]["answer"]]
    assert len(held[1]) == 1 and held[1][0][0]["role"] == "assistant"  # the greedy completion, as a message
    (t_prompts, t_completions, t_answer), = got["text"]
    assert c_answer == t_answer
    by_answer = {r["answer"]: r["prompt"] for r in rows}
    assert c_prompts == [[{"role": "system", "content": "add"}] + by_answer[a] for a in c_answer]
    assert c_completions == [[{"role": "assistant", "content": t}] for t in t_completions]
    # the text the model read: simple_template's (a CharTokenizer has no chat template)
    assert t_prompts == [f"system: add\nuser: {m[0]['content']}\nassistant: " for m in (by_answer[a] for a in t_answer)]
    lengths = [len(t) for t in t_completions]
    assert conv.metrics["reward_length_mean"] == pytest.approx(np.mean(lengths))
    assert conv.metrics["reward_correct_mean"] == pytest.approx(text.metrics["reward_mean"])
    assert conv.metrics["reward_mean"] == pytest.approx(text.metrics["reward_mean"] + 0.5 * np.mean(lengths))


def test_grpo_recipe_reward_format_for_text_prompts_and_mixed_rows():
    from rljax.data.adapters import DataError
    from rljax.recipes import GRPOTaskConfig, grpo
    from rljax.recipes.tasks import MESSAGES_COLUMN, prompt_batches
    from tests.test_recipes_tasks import TOK, small_model

    seen = []

    def reward(prompts, completions, **columns):
        seen.append((prompts, completions, sorted(columns)))
        return [0.0] * len(completions)

    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": 4}]
    cfg = GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=2, progress=False, reward_format="conversational")
    grpo(small_model(), rows, reward, cfg)
    prompts, completions, columns = seen[0]
    assert sorted(p[0]["content"] for p in prompts) == ["1+1=", "1+1=", "2+2=", "2+2="]  # a string: one user message
    assert all(p == [{"role": "user", "content": p[0]["content"]}] for p in prompts)
    assert all(c[0]["role"] == "assistant" for c in completions) and columns == ["answer"]  # the messages taken off

    mixed = rows + [{"prompt": [{"role": "user", "content": "3+3="}], "answer": 6}]
    with pytest.raises(DataError, match="row 2: its prompt is a list of messages, but row 0's is a string"):
        prompt_batches(TOK, mixed, GRPOTaskConfig(batch_size=1))
    assert prompt_batches(TOK, mixed, GRPOTaskConfig(batch_size=1, reward_format="text")).reward_format == "text"
    with pytest.raises(DataError, match=f"'{MESSAGES_COLUMN}'.* clash"):
        prompt_batches(TOK, [{"prompt": "1+1=", MESSAGES_COLUMN: 1}], GRPOTaskConfig(batch_size=1))
    with pytest.raises(ValueError, match="GRPOTaskConfig.reward_format: one of"):
        GRPOTaskConfig(reward_format="chat")


def test_grpo_recipe_writes_every_kth_iteration_s_samples(tmp_path):
    """samples_every=2 over 3 iterations writes iteration 2's file alone: the rows trained on, each with the
    reward functions' values (None where one returned None) summing to its reward; a rerun with more steps and
    another samples_every resumes (a display setting) at step 3 and writes iteration 4's."""
    from rljax.metrics import read_samples, samples_path
    from rljax.recipes import GRPOTaskConfig, grpo
    from tests.test_recipes_tasks import small_model

    rows = [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(4)]

    def correct(prompts, completions, answer, **_):
        return [float(str(a) in c) if a % 2 else None for c, a in zip(completions, answer)]

    def length(prompts, completions, **_):
        return [len(c) / 4 for c in completions]

    cfg = GRPOTaskConfig(steps=3, batch_size=2, n=2, max_new_tokens=3, progress=False, samples_every=2)
    run = tmp_path / "run"
    grpo(small_model(), rows, [correct, (0.5, length)], cfg, run_dir=str(run))
    assert sorted(os.listdir(run / "samples")) == ["iteration-000002.jsonl"]
    records = read_samples(run, 2)
    assert len(records) == 4 and [r["group"] for r in records] == [0, 0, 1, 1]
    for r in records:
        a = r["columns"]["answer"]
        assert r["prompt"] == f"{a - 1}+1=" and r["reward_length"] == len(r["completion"]) / 4
        assert r["reward_correct"] == (float(str(a) in r["completion"]) if a % 2 else None)
        assert r["reward"] == pytest.approx((r["reward_correct"] or 0.0) + 0.5 * r["reward_length"])
    grpo(small_model(), rows, [correct, (0.5, length)], dataclasses.replace(cfg, steps=4, samples_every=1),
         run_dir=str(run), allow_change=True)
    assert sorted(os.listdir(run / "samples")) == [f"iteration-00000{i}.jsonl" for i in (2, 4)]
    assert samples_path(run, 4) == str(run / "samples" / "iteration-000004.jsonl") and len(read_samples(run, 4)) == 4
    with pytest.raises(ValueError, match="samples_every=2: the samples are written to run_dir/samples, but run_dir is "
                                         "None"):
        grpo(small_model(), rows, correct, cfg)
    with pytest.raises(ValueError, match="samples_every: must be >= 0"):
        GRPOTaskConfig(samples_every=-1)


def test_trl_style_reward_functions_are_called_by_keyword():
    """TRL calls reward functions by keyword, and its documented form is `def f(completions, **kwargs)`: such a
    function gets the completions (positionally it would have got the prompts, then failed); one that takes
    prompts gets them; the (prompts, completions) form, lambdas and callables keep the positional call."""
    from rljax.rewards.rules import call_reward

    def reward_len(completions, **kwargs):  # TRL's docs' example
        return [-abs(3 - len(c)) for c in completions]

    def with_prompts(completions, prompts, answer):
        return [float(p[0] == c[0]) + a for p, c, a in zip(prompts, completions, answer)]

    def no_prompts(completions, answer):
        return [float(str(a) in c) for c, a in zip(completions, answer)]

    class Scorer:
        def __call__(self, prompts, completions, **_):
            return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]

    prompts, completions = ["ab", "c"], ["abcd", "x"]
    np.testing.assert_allclose(score(reward_len, prompts, completions), [-1.0, -2.0])
    np.testing.assert_allclose(score(with_prompts, prompts, completions, answer=[1, 2]), [2.0, 2.0])
    np.testing.assert_allclose(score(no_prompts, prompts, completions, answer=[3, 4]), [0.0, 0.0])
    np.testing.assert_allclose(score(Scorer(), prompts, completions), [6.0, 2.0])
    np.testing.assert_allclose(score(lambda p, c, **_: [len(x) for x in c], prompts, completions), [4.0, 1.0])
    np.testing.assert_allclose(weighted_sum((1.0, reward_len), (2.0, Scorer()))(prompts, completions), [11.0, 2.0])
    assert call_reward(functools.partial(no_prompts, answer=[5, 6]), prompts, ["5", "x"]) == [1.0, 0.0]


def test_score_terms_under_a_failure_policy_matches_the_rl_iteration_s_rule():
    """RewardSum.score_terms (what __call__ and the recipes' held-out evaluation use): a sample whose call of
    any term failed scores failure_value, and that term's value there is NaN; the others as by hand."""
    def fragile(prompts, completions, **_):
        if any(c == "yy" for c in completions):
            raise ConnectionError("down")
        return [1.0] * len(completions)

    total, parts = weighted_sum((0.5, length), (1.0, fragile)).score_terms(
        PROMPTS, COMPLETIONS, call_config=RewardCallConfig(on_failure="value", failure_value=-3.0, batch_size=1))
    np.testing.assert_allclose(total, [1.5, -3.0, 2.5, 3.0])
    np.testing.assert_allclose(parts["length"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(parts["fragile"], [1.0, np.nan, 1.0, 1.0])
