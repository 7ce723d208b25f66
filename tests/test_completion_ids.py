"""The completions' token ids for the reward functions that take them (TRL's `completion_ids`), TRL's
`(completion_ids, **kwargs)` form, DAPO's overlong shaping in tokens, and `async def` reward functions."""
import asyncio
import dataclasses

import jax
import numpy as np
import pytest

from rljax.rewards import RewardCallConfig, RewardError, length_penalty, score, weighted_sum
from rljax.rewards.rules import completion_id_lists, takes_completion_ids

PROMPTS, COMPLETIONS = ["p", "q", "r"], ["ab", "c", "dddd"]
IDS = [[5, 6, 2], [7], [8, 8, 8, 8]]  # the stop token 2 counted, as TRL passes them


class SoftOverlong:
    """TRL's `get_soft_overlong_punishment` (DAPO's eq. 13), written out: a callable taking completion_ids."""
    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_len, cache):
        self.max_len, self.cache = max_len, cache

    def __call__(self, completion_ids, **kwargs):
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= self.max_len - self.cache:
                out.append(0.0)
            elif n <= self.max_len:
                out.append((self.max_len - self.cache - n) / self.cache)
            else:
                out.append(-1.0)
        return out


def test_the_functions_that_take_completion_ids_get_them_and_no_other_does():
    seen = {}

    def rljax_form(prompts, completions, completion_ids):  # names the parameter: gets them
        seen["rljax_form"] = completion_ids
        return [float(len(i)) for i in completion_ids]

    def plain(prompts, completions, **kwargs):  # rljax's form with **kwargs: does not
        seen["plain"] = sorted(kwargs)
        return [0.0] * len(completions)

    def trl_form(completions, **kwargs):  # TRL's keyword form with **kwargs: gets them, as TRL passes them to all
        seen["trl_form"] = sorted(kwargs)
        return [float(len(c)) for c in completions]

    meta = dict(completion_ids=IDS, answer=[1, 2, 3])
    np.testing.assert_allclose(score(rljax_form, PROMPTS, COMPLETIONS, completion_ids=IDS), [3.0, 1.0, 4.0])
    np.testing.assert_allclose(score(plain, PROMPTS, COMPLETIONS, **meta), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(score(trl_form, PROMPTS, COMPLETIONS, **meta), [2.0, 1.0, 4.0])
    assert seen == {"rljax_form": IDS, "plain": ["answer"],
                    "trl_form": ["answer", "completion_ids", "log_extra", "log_metric", "prompts"]}
    assert [takes_completion_ids(f) for f in (rljax_form, plain, trl_form, SoftOverlong(4, 2))] == [True, False, True,
                                                                                                   True]
    assert takes_completion_ids(weighted_sum((1.0, plain), (1.0, SoftOverlong(4, 2))))
    assert not takes_completion_ids(weighted_sum((1.0, plain), (1.0, plain)))
    # chunked calls get each chunk's own rows of them
    np.testing.assert_allclose(score(rljax_form, PROMPTS, COMPLETIONS, call_config=RewardCallConfig(batch_size=2),
                                     completion_ids=IDS), [3.0, 1.0, 4.0])

    assert completion_id_lists(np.array([[5, 6, 2, 0], [7, 0, 0, 0], [8, 8, 8, 8]]), np.array([3, 1, 4])) == IDS


def test_trl_s_soft_overlong_punishment_and_length_penalty_in_tokens_by_hand():
    """TRL's docstring example: 90 tokens with L_max = 100, L_cache = 20 score -0.5; the (completion_ids, **kwargs)
    form is called by keyword; length_penalty(unit="tokens") gives the same values."""
    lengths = [70, 80, 81, 90, 100, 101, 300]
    ids = [[1] * n for n in lengths]
    by_hand = [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]
    prompts, texts = ["p"] * len(ids), ["x"] * len(ids)  # one character each: the tokens decide
    np.testing.assert_allclose(score(SoftOverlong(100, 20), prompts, texts, completion_ids=ids), by_hand)
    np.testing.assert_allclose(score(length_penalty(100, cache=20, unit="tokens"), prompts, texts, completion_ids=ids),
                               by_hand, rtol=1e-6)
    np.testing.assert_allclose(score(length_penalty(100, cache=20, unit="tokens", scale=2.0), prompts, texts,
                                     completion_ids=ids), 2 * np.array(by_hand), rtol=1e-6)
    np.testing.assert_allclose(score(length_penalty(100, unit="tokens"), prompts, texts, completion_ids=ids),
                               [0, 0, 0, 0, 0, -1, -1])
    with pytest.raises(ValueError, match="unit must be 'characters' or 'tokens', got 'words'"):
        length_penalty(100, unit="words")


def test_a_function_needing_completion_ids_from_a_caller_without_them_is_an_error_not_a_failure():
    """Even under on_failure="value": a caller that scores text alone cannot give them, which is not a failed
    sample to score failure_value."""
    need = length_penalty(3, unit="tokens")
    for cfg in (None, RewardCallConfig(on_failure="value")):
        with pytest.raises(RewardError, match="takes completion_ids .* which this caller does not have"):
            score(need, PROMPTS, COMPLETIONS, call_config=cfg)
        with pytest.raises(RewardError, match="takes completion_ids"):
            score(weighted_sum((1.0, need), (1.0, lambda p, c, **_: [0.0] * len(c))), PROMPTS, COMPLETIONS,
                  call_config=cfg)
    np.testing.assert_allclose(score(length_penalty(3), PROMPTS, COMPLETIONS), [0, 0, -1])  # characters: no ids


def test_async_reward_functions_are_awaited_also_inside_a_running_event_loop():
    async def judged(prompts, completions, **_):  # e.g. a remote judge awaited per sample
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def trl_async(completions, completion_ids, **kwargs):
        await asyncio.sleep(0)
        return [float(len(i)) for i in completion_ids]

    np.testing.assert_allclose(score(judged, PROMPTS, COMPLETIONS), [2.0, 1.0, 4.0])
    np.testing.assert_allclose(score(trl_async, PROMPTS, COMPLETIONS, completion_ids=IDS), [3.0, 1.0, 4.0])
    np.testing.assert_allclose(score(judged, PROMPTS, COMPLETIONS, call_config=RewardCallConfig(workers=2,
                                                                                                batch_size=1)),
                               [2.0, 1.0, 4.0])

    async def notebook():  # a notebook's cell runs with an event loop running on the main thread
        return score(judged, PROMPTS, COMPLETIONS)

    np.testing.assert_allclose(asyncio.run(notebook()), [2.0, 1.0, 4.0])

    async def broken(prompts, completions, **_):
        raise ConnectionError("judge down")

    with pytest.raises(RewardError, match="judge down"):
        score(broken, PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(score(broken, PROMPTS, COMPLETIONS,
                                     call_config=RewardCallConfig(on_failure="value", failure_value=-1.0)), [-1.0] * 3)


def test_grpo_recipe_passes_each_completion_s_ids_to_the_iteration_and_the_held_out_eval(tmp_path):
    """A reward of TRL's form (completion_ids, **kwargs) in the recipe: the ids it gets are the sampled
    completions' (decoding to the text the sample records hold, as many as their completion_tokens, ending in
    the stop id exactly when the row stopped), so the reward -len(ids) averages to -completion_length in the
    iteration and in the greedy held-out evaluation; a data column named completion_ids is refused."""
    from rljax.data.adapters import DataError
    from rljax.metrics import read_samples
    from rljax.recipes import GRPOTaskConfig, grpo
    from tests.test_recipes_tasks import TOK, small_model

    got = []

    def short(completion_ids, **kwargs):
        got.append(completion_ids)
        return [-float(len(i)) for i in completion_ids]

    rows = [{"prompt": f"{a}*{a}="} for a in range(4)]
    cfg = GRPOTaskConfig(steps=3, batch_size=2, n=4, max_new_tokens=8, progress=False, samples_every=1,
                         temperature=1.0)
    run = tmp_path / "run"
    result = grpo(small_model(), rows, short, cfg, run_dir=str(run), eval_data=rows[:2])
    stops = []
    for step in (1, 2, 3):
        records, ids = read_samples(run, step), got[step - 1]
        assert len(records) == len(ids) == 8
        for r, i in zip(records, ids):
            assert len(i) == r["completion_tokens"] and TOK.decode(i) == r["completion"] and r["reward"] == -len(i)
            assert (i[-1] == TOK.eos_id) == r["stopped"]
            stops.append(r["stopped"])
        assert result.history[step - 1]["reward_mean"] == pytest.approx(-result.history[step - 1]["completion_length"])
    assert 0 < sum(stops) < len(stops)  # rows that stopped and rows cut at max_new_tokens
    evaluated = result.eval_metrics
    assert evaluated["reward_mean"] == pytest.approx(-evaluated["completion_length"])
    assert len(got) == 4 and len(got[3]) == 2  # the held-out eval's call: one greedy completion per prompt

    with pytest.raises(DataError, match="completion_ids"):
        grpo(small_model(), [dict(r, completion_ids=[1]) for r in rows], short, cfg, run_dir=str(tmp_path / "bad"))


def test_rejection_sampling_and_policy_eval_pass_completion_ids():
    from rljax.eval import PolicyEvalConfig, evaluate_policy
    from rljax.sampling import SampleConfig
    from rljax.expert_iteration import RejectionConfig, rejection_sample
    from rljax.data.arithmetic import make_split
    from tests.test_recipes_tasks import TOK, small_model

    model, params, _ = small_model()

    def short(prompts, completions, completion_ids, **_):
        return [-float(len(i)) for i in completion_ids]

    problems = make_split(0, 3, seed=0)[1]
    row = evaluate_policy(params, model, TOK, problems, PolicyEvalConfig(samples=2, max_new_tokens=6),
                          reward_fn=short, rewards={"chars": length_penalty(0)})
    assert row["reward_mean"] == pytest.approx(-row["completion_length"])

    cfg = RejectionConfig(samples=3, threshold=-100.0, require_stop=False, deduplicate=False,
                          sampling=SampleConfig(max_new_tokens=6))
    kept, stats = rejection_sample(params, [p.prompt for p in problems], short, cfg, model=model, tokenizer=TOK,
                                   key=jax.random.key(0))
    assert len(kept) == 9
    lengths = [len(r["completion"]) for r in kept]
    for r, n in zip(kept, lengths):  # one id a character, and the stop token of a row that stopped within 6 tokens
        assert r["reward"] == -min(n + 1, 6)
    assert min(lengths) < 5 and max(lengths) == 6 and stats["truncated"] == lengths.count(6)


def test_scst_s_greedy_baseline_is_scored_on_the_greedy_completions_ids():
    """The iteration's greedy decode (SCST's baseline) reaches a function taking completion_ids with its own ids:
    the baseline equals -(the greedy rollout's lengths) computed apart; metadata named completion_ids is refused."""
    from rljax.rl import RLConfig, make_rl_iteration
    from rljax.sampling import SampleConfig, sample, tokenizer_ids
    from tests.test_recipes_tasks import TOK, small_model

    model, params, _ = small_model()
    sampling = SampleConfig(max_new_tokens=6, n=8, **tokenizer_ids(TOK))
    iteration = make_rl_iteration(model, RLConfig(algorithm="scst", sampling=sampling),
                                  length_penalty(6, cache=6, unit="tokens"), TOK.decode_batch)
    tokens, mask = TOK.encode_batch(["1+2=", "33*4=", "5-"], padding_side="left")
    c = iteration.collect(params, tokens, mask, jax.random.key(0))
    _, k_greedy, _ = jax.random.split(jax.random.key(0), 3)
    g = sample(params, tokens, mask, k_greedy, model=model, cfg=sampling.replace(greedy=True, n=1))
    lengths = np.asarray(g.lengths)
    np.testing.assert_allclose(c.greedy, np.repeat(-lengths / 6, 8))
    np.testing.assert_allclose(c.rewards, -np.asarray(c.rollout.lengths) / 6)
    assert len(set(np.asarray(c.rollout.lengths).tolist())) > 1
    with pytest.raises(ValueError, match="metadata 'completion_ids': the iteration passes the reward functions that "
                                         "take it TRL's completion_ids"):
        iteration.collect(params, tokens, mask, jax.random.key(0), completion_ids=[[1], [2], [3]])


def test_conversational_wrapper_calls_functions_of_any_trl_form():
    """In the conversational format a function taking only `completions` or only `completion_ids` (no **kwargs) is
    called with just those, as for text (the wrapper passed prompts it did not take before)."""
    from rljax.recipes.tasks import MESSAGES_COLUMN, conversational_rewards

    def only_completions(completions):
        return [float(len(c[0]["content"])) for c in completions]

    def only_ids(completion_ids):
        return [float(len(i)) for i in completion_ids]

    def both(prompts, completions, completion_ids, **kwargs):
        return [float(len(p) + len(c) + len(i)) for p, c, i in zip(prompts, completions, completion_ids)]

    messages = {MESSAGES_COLUMN: [[{"role": "user", "content": p}] for p in PROMPTS]}
    np.testing.assert_allclose(score(conversational_rewards(only_completions), PROMPTS, COMPLETIONS, **messages),
                               [2.0, 1.0, 4.0])
    np.testing.assert_allclose(score(conversational_rewards(only_ids), PROMPTS, COMPLETIONS, completion_ids=IDS,
                                     **messages), [3.0, 1.0, 4.0])
    np.testing.assert_allclose(score(conversational_rewards(both), PROMPTS, COMPLETIONS, completion_ids=IDS,
                                     **messages), [5.0, 3.0, 6.0])  # one message, one turn, the ids


def test_trainer_state_reaches_the_functions_that_take_it_once_per_call():
    from rljax.rewards import TrainingProgress

    seen = []

    def curriculum(completions, trainer_state, **kwargs):  # TRL's form: reward shaped by the training's progress
        seen.append(trainer_state)
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    def trl_any(completions, **kwargs):
        seen.append(sorted(kwargs))
        return [0.0] * len(completions)

    def plain(prompts, completions, **columns):  # rljax's form: only what it names
        seen.append(sorted(columns))
        return [1.0] * len(completions)

    progress = TrainingProgress(3, 10)
    np.testing.assert_allclose(score(curriculum, PROMPTS, COMPLETIONS, trainer_state=progress), [0.3] * 3)
    np.testing.assert_allclose(score(curriculum, PROMPTS, COMPLETIONS, trainer_state=progress,
                                     call_config=RewardCallConfig(batch_size=1, workers=2)), [0.3] * 3)
    score(trl_any, PROMPTS, COMPLETIONS, trainer_state=progress, answer=[1, 2, 3])
    score(plain, PROMPTS, COMPLETIONS, trainer_state=progress, answer=[1, 2, 3])
    assert seen == [progress, progress, progress, progress,
                    ["answer", "log_extra", "log_metric", "prompts", "trainer_state"], ["answer"]]
    with pytest.raises(RewardError, match="takes trainer_state .* which this caller does not have"):
        score(curriculum, PROMPTS, COMPLETIONS, call_config=RewardCallConfig(on_failure="value"))


def test_grpo_recipe_passes_the_iteration_and_the_run_s_steps_as_trainer_state(tmp_path):
    """global_step: the iterations done before the one scored (0, 1, 2), max_steps: the run's; the held-out eval
    at the end gets (3, 3); a rerun to 4 steps resumes at iteration 3 with max_steps 4. An iteration called
    directly passes global_step = state.step, max_steps None."""
    from rljax.recipes import GRPOTaskConfig, grpo
    from rljax.rewards import TrainingProgress
    from tests.test_recipes_tasks import small_model

    seen = []

    def curriculum(completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps))
        return [float(trainer_state.global_step)] * len(completions)

    rows = [{"prompt": f"{a}+1="} for a in range(4)]
    cfg = GRPOTaskConfig(steps=3, batch_size=2, n=2, max_new_tokens=3, progress=False)
    run = str(tmp_path / "run")
    result = grpo(small_model(), rows, curriculum, cfg, run_dir=run, eval_data=rows[:2])
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert [h["reward_mean"] for h in result.history] == [0.0, 1.0, 2.0] and result.eval_metrics["reward_mean"] == 3.0
    seen.clear()
    grpo(small_model(), rows, curriculum, dataclasses.replace(cfg, steps=4), run_dir=run, eval_data=rows[:2],
         allow_change=True)
    assert seen == [(3, 4), (4, 4)]

    from rljax.rl import create_rl_state, make_rl_iteration
    from tests.test_recipes_tasks import TOK
    model, params, _ = small_model()
    rl_cfg = cfg.rl_config(TOK)
    it = make_rl_iteration(model, rl_cfg, curriculum, TOK.decode_batch)
    tokens, mask = TOK.encode_batch(["1+1=", "2+1="], padding_side="left")
    seen.clear()
    it(create_rl_state(model, params, rl_cfg, jax.random.key(0)), tokens, mask)
    assert seen == [(0, None)]
    with pytest.raises(TypeError, match="trainer_state: a rljax.rewards.TrainingProgress, got list"):
        it.collect(params, tokens, mask, jax.random.key(0), trainer_state=[1, 2])
    assert TrainingProgress(2) == TrainingProgress(2, None)
