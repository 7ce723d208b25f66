"""Adversarial RLAIF (`rljax.adversarial`): the reward forms, the discriminator's metrics and its training objective
against hand / numpy computations; the failure detector on constructed rows; a non-finite discriminator score
naming the sample; other arguments refused naming the stage and file; the whole pipeline (tiny 1-layer model, a few
steps a stage) whose rows match a recomputation from the returned discriminator and the saved samples, a rerun
redoing nothing (slow); resume after kills between rounds and inside an RL stage bit-identical, and a finished
round's missing samples named (slow); the experiment's --smoke (slow)."""
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.adversarial import (AdversarialConfig, adversarial_reward, adversarial_rlaif, discriminator_metrics,
                               discriminator_reward, discriminator_wins)
from rljax.data.reward_collate import collate_feedback
from rljax.eval import PolicyEvalConfig
from rljax.losses.reward_model import FeedbackConfig, reward_model_loss
from rljax.models import Model, preset
from rljax.models.transformer import add_head
from rljax.pipelines import StageArgumentsError, read_results
from rljax.rewards.learned import sequence_rewards
from rljax.tasks import ARITHMETIC
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def test_reward_forms_match_hand_computed_values():
    z = np.array([-3.0, 0.0, 2.0, -60.0], np.float32)
    d = _sigmoid(z)
    # by hand: log D, -log(1 - D), logit; at z = 0 D = 1/2: log 1/2 and log 2
    np.testing.assert_allclose(discriminator_reward(z, "log_d"), np.log(d), rtol=1e-6)
    np.testing.assert_allclose(discriminator_reward(z, "log_d")[1], -math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(discriminator_reward(z, "neg_log_one_minus_d")[:3], -np.log1p(-d[:3]), rtol=1e-5)
    np.testing.assert_allclose(discriminator_reward(z, "neg_log_one_minus_d")[1], math.log(2.0), rtol=1e-6)
    np.testing.assert_array_equal(discriminator_reward(z, "logit"), z)
    # logit D = log D - log(1 - D): the sum of the other two forms
    np.testing.assert_allclose(discriminator_reward(z, "log_d") + discriminator_reward(z, "neg_log_one_minus_d"), z,
                               rtol=1e-5, atol=1e-5)
    # D rejects a sample (z = -60, D = 8.8e-27): log D stays finite and ~ z, -log(1 - D) ~ e^z ~ 0 (it saturates)
    assert discriminator_reward(z, "log_d")[3] == pytest.approx(-60.0)
    assert 0 <= float(discriminator_reward(z, "neg_log_one_minus_d")[3]) < 1e-25
    # D itself (SeqGAN): σ(z), 1/2 at z = 0, ~e^z when D rejects the sample
    np.testing.assert_allclose(discriminator_reward(z, "d"), d, rtol=1e-6)
    assert float(discriminator_reward(z, "d")[1]) == 0.5
    assert 0 < float(discriminator_reward(z, "d")[3]) < 1e-25
    with pytest.raises(ValueError, match="form 'D' not in"):
        discriminator_reward(z, "D")


def test_discriminator_metrics_match_a_numpy_computation():
    expert = np.array([2.0, -1.0, 0.5, 3.0])  # 3 of 4 called expert
    policy = np.array([-2.0, 1.0, 0.0])  # 2 of 3 called policy (z = 0, D = 1/2, counts as policy)
    m = discriminator_metrics(expert, policy)
    assert m["disc_accuracy_expert"] == 0.75 and m["disc_accuracy_policy"] == pytest.approx(2 / 3)
    assert m["disc_accuracy"] == pytest.approx(0.5 * (0.75 + 2 / 3))
    de, dp = _sigmoid(expert), _sigmoid(policy)
    bce = np.concatenate([-np.log(de), -np.log(1 - dp)])  # -[y log D + (1 - y) log(1 - D)]
    assert m["disc_loss"] == pytest.approx(bce.mean(), rel=1e-6)
    assert m["d_expert_mean"] == pytest.approx(de.mean()) and m["d_policy_mean"] == pytest.approx(dp.mean())
    with pytest.raises(ValueError, match="non-empty 1-d logits"):
        discriminator_metrics(expert, [])


def test_discriminator_objective_is_the_logistic_loss_on_expert_vs_policy_rows():
    """The objective reused for D (reward-model objective "feedback" without IPW) equals −mean[y log D + (1 − y)
    log(1 − D)] computed in numpy from the model's own scores, on a 1-layer model with a non-zero reward head."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=32))
    disc, params = add_head(model, model.init(jax.random.key(0)), "reward")
    params = dict(params, reward_head=0.5 * jax.random.normal(jax.random.key(1), params["reward_head"].shape))
    rows = [("1+2=", "3;answer:3", 1, 1.0), ("1+2=", "4;answer:4", 0, 1.0), ("5*2=", "10;answer:10", 1, 1.0),
            ("5*2=", "x", 0, 1.0)]
    batch = collate_feedback(TOK, rows, max_length=32)
    loss, metrics = reward_model_loss(params, batch, model=disc, cfg=FeedbackConfig(ipw=False))
    z = np.asarray(sequence_rewards(params, batch.tokens, batch.attention_mask, model=disc), np.float64)
    assert np.std(z) > 1e-3  # the scores differ, so the check is not trivial
    y = np.array([1.0, 0.0, 1.0, 0.0])
    d = _sigmoid(z)
    expected = -np.mean(y * np.log(d) + (1 - y) * np.log(1 - d))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["prob_mean"]) == pytest.approx(d.mean(), rel=1e-5)
    # and discriminator_metrics gives the same loss from the split scores
    assert discriminator_metrics(z[[0, 2]], z[[1, 3]])["disc_loss"] == pytest.approx(expected, rel=1e-5)


def test_failure_detector_on_constructed_rows():
    kw = dict(win_accuracy=0.95, win_d_policy=0.1)
    won = dict(disc_accuracy=0.99, d_policy_mean=0.02, reward_std=3.0)
    assert discriminator_wins(won, **kw)
    assert discriminator_wins(dict(won, disc_accuracy=0.95), **kw)  # the threshold is inclusive
    assert not discriminator_wins(dict(won, disc_accuracy=0.94), **kw)  # D does not separate well enough
    # perfect order by a hair, D ~ 1/2 on everything: not a win
    assert not discriminator_wins(dict(disc_accuracy=1.0, d_policy_mean=0.49, reward_std=0.001), **kw)
    # with the std condition: log D's spread stays large (3.0) -> not flat; -log(1 - D)'s vanishes -> flat
    assert not discriminator_wins(won, **kw, win_reward_std=0.05)
    assert discriminator_wins(dict(won, reward_std=0.01), **kw, win_reward_std=0.05)
    with pytest.raises(KeyError, match="no 'd_policy_mean'"):
        discriminator_wins(dict(disc_accuracy=1.0), **kw)
    with pytest.raises(KeyError, match="no 'reward_std'"):
        discriminator_wins(dict(disc_accuracy=1.0, d_policy_mean=0.0), **kw, win_reward_std=0.1)


def test_non_finite_discriminator_score_names_the_sample():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=32))
    disc, params = add_head(model, model.init(jax.random.key(0)), "reward")
    params = dict(params, reward_bias=jnp.full_like(params["reward_bias"], jnp.nan))
    reward = adversarial_reward(disc, params, TOK, form="log_d")
    with pytest.raises(ValueError, match=r"scored 2 sample\(s\) non-finite, the first row 0 \(nan\): prompt '1\+2=', "
                                         r"completion '3;answer:3'"):
        reward(["1+2=", "5*2="], ["3;answer:3", "10"])
    # a finite D: the reward is softplus(z) of the model's own score (encoded as the discriminator's data are)
    ok = dict(params, reward_bias=jnp.zeros_like(params["reward_bias"]))
    batch = collate_feedback(TOK, [("1+2=", "3;answer:3", 1, 1.0)])
    z = float(sequence_rewards(ok, batch.tokens, batch.attention_mask, model=disc)[0])
    got = adversarial_reward(disc, ok, TOK, form="neg_log_one_minus_d")(["1+2="], ["3;answer:3"])
    assert got.shape == (1,) and float(got[0]) == pytest.approx(math.log1p(math.exp(z)), rel=1e-5)


# ----------------------------------------------------------------------------- the pipeline

def _sets(n_sft=32, n_expert=32, n_test=8):
    train, test = ARITHMETIC.split(n_sft + n_expert, n_test, levels=(1,), seed=0)
    return dict(sft_problems=train[:n_sft], expert_problems=train[n_sft:], held_out=test)


def _config(**changes) -> AdversarialConfig:
    base = dict(sft_steps=3, sft_batch_size=8, rounds=2, prompts_per_round=8, disc_steps=2, disc_batch_size=8,
                rl_iterations=2, prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=20,
                evaluation=PolicyEvalConfig(max_new_tokens=20, samples=2), log_every=1, eval_every=1,
                checkpoint_every=1, progress=False)
    return AdversarialConfig(**{**base, **changes})


MODEL = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))


def _run(run_dir, *, kill=None, calls=None, sets=None, params=None, **changes):
    """The pipeline from a fresh 1-layer model. calls records every phase evaluation as (state type, step, whether
    the model has a reward head); kill(calls) -> True raises there (a phase evaluates every step before its
    checkpoint of that step; a phase stopped by an exception saves its last finished step)."""
    calls = [] if calls is None else calls

    def eval_fn(s):
        p = s.policy.params if hasattr(s, "policy") else s.params
        calls.append((type(s).__name__, int(s.step), "reward_head" in p))
        if kill is not None and kill(calls):
            raise Killed(f"evaluation {calls[-1]}")
        return {}

    params = MODEL.init(jax.random.key(0)) if params is None else params
    return adversarial_rlaif(params, _config(**changes), model=MODEL, tokenizer=TOK, task=ARITHMETIC,
                             key=jax.random.key(3), run_dir=run_dir, eval_fn=eval_fn, **(sets or _sets()))


def _same(x, y):
    def host(a):  # PRNG keys (RLState.rng, TrainState.rng) compare as their key data
        return np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a)

    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(host(a), host(b))


def test_other_arguments_are_refused_naming_the_stage_and_file(tmp_path):
    """Killed in the SFT stage's first step, then rerun with another config field or another held-out set: refused
    before anything runs, naming the stage and its stage.json."""
    run, calls = str(tmp_path / "adv"), []
    with pytest.raises(Killed):
        _run(run, calls=calls, kill=lambda c: True)
    saved = json.load(open(os.path.join(run, "sft", "stage.json")))
    assert saved["stage"] == "sft" and saved["config.disc_steps"] == 2 and saved["task"] == "arithmetic"
    calls.clear()
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json was written by other arguments "
                                                  r"\(config\.disc_steps: 2 -> 3"):
        _run(run, calls=calls, disc_steps=3)
    sets = _sets()
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json .*held_out"):
        _run(run, calls=calls, sets=dict(sets, held_out=sets["held_out"][:4]))
    assert calls == []
    with pytest.raises(ValueError, match="AdversarialConfig.reward: 'sigmoid' not in"):
        _config(reward="sigmoid")
    with pytest.raises(ValueError, match="AdversarialConfig.algorithm: 'grpo' not in"):
        _config(algorithm="grpo")
    with pytest.raises(ValueError, match="adversarial_rlaif: expert_problems has 4 problems, the config needs at "
                                         "least 8"):
        _run(str(tmp_path / "other"), sets=dict(sets, expert_problems=sets["expert_problems"][:4]))


@pytest.mark.slow
def test_pipeline_rows_match_a_recomputation_and_a_rerun_redoes_nothing(tmp_path, capsys):
    run = str(tmp_path / "adv")
    calls = []
    state, rows = _run(run, calls=calls)
    # round-1's discriminator continues round-0's state at its own step: an uninterrupted run has nothing to warn
    # about (each round's data differ by design)
    out = capsys.readouterr().out
    assert "[rm] continuing from" in out and "warning" not in out
    assert [r["stage"] for r in rows] == ["sft", "round-0", "round-1"]
    assert read_results(run) == rows
    by = {r["stage"]: r for r in rows}
    assert by["sft"]["sft_steps"] == 3 and by["sft"]["round"] == -1
    assert [by[f"round-{r}"]["disc_steps"] for r in (0, 1)] == [2, 4]  # cumulative: D continues across rounds
    assert [by[f"round-{r}"]["rl_iterations"] for r in (0, 1)] == [2, 4]
    for r in (0, 1):
        row = by[f"round-{r}"]
        assert {"accuracy_greedy", "accuracy_sampled", "gold_score", "kl_to_sft", "disc_accuracy", "reward_std",
                "discriminator_wins"} <= set(row)
        assert row["discriminator_wins"] == discriminator_wins(row, win_accuracy=0.95, win_d_policy=0.1)
    # the last round's discriminator columns, recomputed from the returned D and the saved fresh samples
    saved = json.load(open(os.path.join(run, "round-1", "samples.json")))
    held = _sets()["held_out"]
    assert len(saved["fresh"]) == len(held) and len(saved["policy"]) == len(saved["expert"]) == 8
    assert [e[1] for e in saved["expert"]] == [_sets()["expert_problems"][i].completion
                                                for i in saved["problem_index"]]
    disc_model = add_head(MODEL, MODEL.init(jax.random.key(0)), "reward")[0]
    d = state["discriminator"].params

    def scores(completions):
        batch = collate_feedback(TOK, [(p.prompt, c, 1, 1.0) for p, c in zip(held, completions)], max_length=64)
        return np.asarray(sequence_rewards(d, batch.tokens, batch.attention_mask, model=disc_model), np.float64)

    ze, zp = scores([p.completion for p in held]), scores(saved["fresh"])
    last = by["round-1"]
    acc = 0.5 * (np.mean(ze > 0) + np.mean(zp <= 0))
    assert last["disc_accuracy"] == pytest.approx(acc)
    assert last["d_policy_mean"] == pytest.approx(_sigmoid(zp).mean(), rel=1e-4)
    log_d = -np.logaddexp(0.0, -zp)  # log σ(z)
    assert last["reward_mean"] == pytest.approx(log_d.mean(), rel=1e-4)
    assert last["reward_std"] == pytest.approx(log_d.std(), rel=1e-3, abs=1e-6)
    # a rerun redoes nothing and returns the same rows and state
    calls.clear()
    again, again_rows = _run(run, calls=calls)
    assert calls == [] and again_rows == rows
    _same(state, again)


@pytest.mark.slow
def test_resume_after_kills_between_rounds_and_inside_rl_is_bit_identical(tmp_path):
    calls = []
    full, rows = _run(str(tmp_path / "full"), calls=calls, replay=True)
    rl = [c for c in calls if c[0] == "RLState"]
    assert [c[1] for c in rl] == [1, 2, 3, 4]  # round-0's RL to step 2, round-1's to step 4
    run = str(tmp_path / "killed")
    calls = []
    # just after the round boundary: round-1's first discriminator step (round-0 finished and checkpointed)
    with pytest.raises(Killed):
        _run(run, calls=calls, replay=True, kill=lambda c: c[-1] == ("TrainState", 3, True))
    assert os.path.exists(os.path.join(run, "round-0", "results.json"))
    assert not os.path.exists(os.path.join(run, "round-1", "results.json"))
    calls = []
    # inside round-1's RL stage: its first iteration (step 3)
    with pytest.raises(Killed):
        _run(run, calls=calls, replay=True, kill=lambda c: c[-1] == ("RLState", 3, False))
    assert calls[0] == ("TrainState", 4, True)  # the discriminator resumed after its step 3; the SFT never reran
    # a finished round's samples removed: refused, naming the stage and the file, before anything trains again
    broken = str(tmp_path / "broken")
    shutil.copytree(run, broken)
    os.remove(os.path.join(broken, "round-0", "samples.json"))
    with pytest.raises(FileNotFoundError, match=r"stage 'round-0': its data .*round-0/samples.json is missing; the "
                                                r"stage finished in an earlier run"):
        _run(broken, replay=True)
    calls = []
    resumed, resumed_rows = _run(run, calls=calls, replay=True)
    # the discriminator's phase restored at its last step (only its final evaluation), round-1's RL resumed after
    # its step 3; nothing else ran
    assert calls == [("TrainState", 4, True), ("RLState", 4, False)]
    _same(full, resumed)
    assert resumed_rows == rows and read_results(run) == rows


@pytest.mark.slow
def test_experiment_smoke_writes_the_table_and_reruns_to_it(tmp_path):
    """`python -m experiments.adversarial --smoke`; run again in the same directory it redoes nothing."""
    from experiments import adversarial as ex

    cfg = dict(smoke=True, run_dir=str(tmp_path / "adv"), progress=False)
    res = ex.main(ex.Config(**cfg))
    assert [r["stage"] for r in res["rows"]] == ["sft", "round-0", "round-1"]
    assert read_results(str(tmp_path / "adv")) == res["rows"]
    text = ex.table(res["rows"])
    assert text.splitlines()[0].startswith("| stage | disc_accuracy |") and len(text.splitlines()) == 5
    again = ex.main(ex.Config(**cfg))
    assert again["rows"] == res["rows"]


def test_completions_too_long_for_the_discriminator_are_refused_before_any_stage(tmp_path):
    """bos + prompt + max_new_tokens + eos must fit max_seq_len (the sampler alone accepts one token more, and a
    completion of max_new_tokens tokens would then fail D's scoring mid-run); checked for the longest prompt of
    the expert and held-out problems before anything trains."""
    sets = _sets()
    prompts = [(name, i, ARITHMETIC.prompt(p)) for name in ("expert_problems", "held_out")
               for i, p in enumerate(sets[name])]
    lengths = [len(TOK.encode(q, add_bos=True)) for _, _, q in prompts]
    k = int(np.argmax(lengths))
    name, i, q = prompts[k]
    n = 64 - lengths[k]  # bos + prompt + n = 64 = max_seq_len: no room for eos
    run = str(tmp_path / "adv")
    with pytest.raises(ValueError, match=(
            rf"^adversarial_rlaif: the discriminator cannot score a completion of max_new_tokens={n} tokens: the "
            rf"longest prompt \({name}\[{i}\] '{q.replace('+', '[+]').replace('*', '[*]')}'\) has {lengths[k]} "
            rf"tokens with bos, \+ {n} \+ 1 eos = 65 > the model's max_seq_len=64; use max_new_tokens <= {n - 1} "
            rf"or a longer max_seq_len$")):
        _run(run, max_new_tokens=n, evaluation=PolicyEvalConfig(max_new_tokens=8, samples=2))
    assert not os.path.exists(run)
    # a demonstration longer than the context is named too
    longer = dataclasses.replace(sets["held_out"][1], steps=sets["held_out"][1].steps * 8)  # a 70+ token reference
    long = dict(sets, held_out=sets["held_out"][:1] + [longer])
    with pytest.raises(ValueError, match=r"^adversarial_rlaif: held_out\[1\]'s demonstration \[bos\] prompt reference "
                                         r"\[eos\] has \d+ tokens > the model's max_seq_len=64"):
        _run(run, sets=long)
    assert not os.path.exists(run)


def test_config_refuses_bad_values_naming_the_field():
    for changes, message in ((dict(seed=-1), r"^AdversarialConfig.seed: must be >= 0, got -1$"),
                             (dict(kl_coef=float("inf")), r"^AdversarialConfig.kl_coef: must be finite and >= 0, or "
                                                          r"None, got inf$"),
                             (dict(temperature=float("inf")), r"^AdversarialConfig.temperature: must be finite and > "
                                                              r"0, got inf$")):
        with pytest.raises(ValueError, match=message):
            _config(**changes)
