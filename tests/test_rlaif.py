"""RLAIF (`rljax.rlaif`): the judge's training rows by hand; the labeller pipeline (tiny 1-layer policy and judge, a
few steps a stage) whose saved AI labels, judge accuracy, label agreement with gold and final accuracy match an
independent recomputation from the returned params, and whose rerun redoes nothing; the direct form rewarding
against the SFT policy's greedy answers; other arguments, overlapping problem sets and a missing input refused
naming the stage and the file; resume after kills between stages and inside the RL stage bit-identical (slow);
the experiment's --smoke (slow). The reward model's soft-label loss against a hand computation, the label
statistics over the trained pairs, bad config values and a judge too short for two answers refused up front."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from rljax.eval import PolicyEvalConfig, complete, load_finished
from rljax.models import Model, preset
from rljax.pipelines import StageArgumentsError, read_results
from rljax.rewards.judge import Judge, JudgeConfig, judge_accuracy, judge_pairwise
from rljax.rlaif import (RLAIF_STAGES, RLAIFConfig, collate_labelled_pairs, judge_training_rows, label_statistics,
                         noise_free_pairs, rlaif, trained_labels)
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import ARITHMETIC
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


def test_judge_training_rows_show_each_pair_in_both_orders_with_the_gold_better_choice_and_gold_is_measured():
    train, _ = ARITHMETIC.split(6, 0, levels=(1,), seed=0)
    pairs = noise_free_pairs(ARITHMETIC, train, seed=0, per_problem=2)
    assert pairs and all(ARITHMETIC.gold_score(p, r["chosen"]) > ARITHMETIC.gold_score(p, r["rejected"])
                         for r in pairs for p in train if ARITHMETIC.prompt(p) == r["prompt"])
    # the measured gold score: the reference scores exactly 1.5 (rljax.data.synthetic.gold_score), a bare
    # truncated chain 0.5 x its right steps' fraction
    p = train[0]
    np.testing.assert_allclose(ARITHMETIC.gold_reward()([p.prompt] * 2, [p.completion, p.completion.split(";")[0]],
                                                        problems=[p, p]), [1.5, 0.5 / len(p.steps)], atol=1e-6)
    cfg = JudgeConfig()
    rows = judge_training_rows(pairs[:1], TOK, cfg)
    r = pairs[0]
    assert [TOK.decode(list(ids)) for ids, _ in rows] == [
        f"{r['prompt']}\n1:{r['chosen']}\n2:{r['rejected']}\nbetter:",
        f"{r['prompt']}\n1:{r['rejected']}\n2:{r['chosen']}\nbetter:"]
    assert [t for _, t in rows] == ["1", "2"] and list(rows[0][0])[0] == TOK.bos_id
    with pytest.raises(ValueError, match=r"not single tokens: 'first' -> "):
        judge_training_rows(pairs, TOK, JudgeConfig(choice_tokens=("first", "2")))


@pytest.fixture(scope="module")
def setup():
    """A 1-layer policy (width 128) and a narrower 1-layer judge (width 64), fresh, and disjoint problem sets."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=96))
    judge = Model(preset("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, mlp_dim=128,
                         vocab_size=TOK.vocab_size, max_seq_len=96))
    train, test = ARITHMETIC.split(64, 4, levels=(1,), seed=0)
    sets = dict(sft=train[:32], judge=train[32:48], rl=train[48:], held_out=test)
    return model, model.init(jax.random.key(0)), judge, judge.init(jax.random.key(1)), sets


def _config(**changes) -> RLAIFConfig:
    base = dict(sft_steps=3, sft_batch_size=8, judge_steps=3, judge_batch_size=8, judge_pairs_per_problem=1,
                held_out_pairs=4, label_prompts=8, rm_steps=2, rm_batch_size=4, rl_iterations=2,
                prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=16,
                evaluation=PolicyEvalConfig(max_new_tokens=16, samples=2), log_every=1, eval_every=1,
                checkpoint_every=1, progress=False)
    return RLAIFConfig(**{**base, **changes})


def _run(setup, run_dir, *, kill=None, calls=None, sets=None, **changes):
    """The pipeline; calls records every phase evaluation as (state type, step, model width: the policy's 128 or
    the judge's 64); kill(calls) -> True raises there (a phase evaluates every step, before its checkpoint)."""
    model, params, judge, judge_params, default_sets = setup
    calls = [] if calls is None else calls

    def eval_fn(s):
        p = s.policy.params if hasattr(s, "policy") else s.params
        calls.append((type(s).__name__, int(s.step), int(p["embedding"].shape[1])))
        if kill is not None and kill(calls):
            raise Killed(f"evaluation {calls[-1]}")
        return {}

    return rlaif(params, _config(**changes), model=model, tokenizer=TOK, task=ARITHMETIC, judge_model=judge,
                 judge_params=judge_params, key=jax.random.key(3), run_dir=run_dir, eval_fn=eval_fn,
                 **(sets or default_sets))


def _same(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_labeller_rows_match_a_recomputation_and_a_rerun_redoes_nothing(setup, tmp_path):
    model, _, judge_model, _, sets = setup
    run, calls = str(tmp_path / "labeller"), []
    state, rows = _run(setup, run, calls=calls)
    assert [r["stage"] for r in rows] == list(RLAIF_STAGES["labeller"])
    assert read_results(run) == rows
    by = {r["stage"]: r for r in rows}
    assert by["sft"]["sft_steps"] == by["judge"]["judge_steps"] == 3 and by["rl-labeller"]["rl_iterations"] == 2
    for stage in ("sft", "rl-labeller"):
        assert {"accuracy_greedy", "accuracy_sampled", "gold_score", "completion_length", "kl_to_start"} <= set(
            by[stage])
    # the judge row, recomputed from the returned judge on the held-out gold pairs
    judge = Judge(judge_model, state["judge"], TOK, JudgeConfig())
    held = noise_free_pairs(ARITHMETIC, sets["held_out"], 10_000)
    again = judge_accuracy(judge, held)
    assert by["judge"]["judge_accuracy"] == again["judge_accuracy"]
    assert by["judge"]["judge_position_consistency"] == again["judge_position_consistency"]
    # the saved AI labels: two SFT samples per prompt, p order-averaged, recomputed by the returned judge
    labels = json.load(open(os.path.join(run, "reward-model", "labels.json")))
    assert len(labels) == 8 and [x["prompt"] for x in labels] == [ARITHMETIC.prompt(p) for p in sets["rl"][:8]]
    j = judge_pairwise(judge, [x["prompt"] for x in labels], [x["a"] for x in labels], [x["b"] for x in labels])
    np.testing.assert_allclose([x["p"] for x in labels], j.p, atol=1e-6)
    for x in labels:
        assert x["p"] == pytest.approx(0.5 * (x["p_ab"] + 1 - x["p_ba"]))
        assert x["consistent"] == ((x["p_ab"] > 0.5) == (x["p_ba"] < 0.5))
    # every distinct pair fits the reward model (96 tokens) and min_confidence is 0: all are trained on
    distinct = [x for x in labels if x["a"] != x["b"]]
    decided = [x for x in distinct if x["gold_a"] != x["gold_b"] and x["p"] != 0.5]
    row = by["reward-model"]
    assert row["labelled_pairs"] == row["distinct_pairs"] == len(distinct) and row["rm_steps"] == 2
    assert row["rm_pairs_too_long"] == 0 and row["gold_decided_pairs"] == len(decided)
    assert row["label_position_consistency"] == pytest.approx(np.mean([x["consistent"] for x in distinct]))
    if decided:
        assert row["label_gold_agreement"] == pytest.approx(np.mean([(x["p"] > 0.5) == (x["gold_a"] > x["gold_b"])
                                                                     for x in decided]))
    # the last row's greedy accuracy, recomputed from the returned policy with task.check
    greedy = complete(state["labeller"], model, TOK, [p.prompt for p in sets["held_out"]], max_new_tokens=16)
    assert by["rl-labeller"]["accuracy_greedy"] == np.mean([ARITHMETIC.check(p, t) for p, t in zip(sets["held_out"], greedy)])
    calls.clear()
    again_state, again_rows = _run(setup, run, calls=calls)
    assert calls == [] and again_rows == rows
    _same(state, again_state)


@pytest.mark.slow
def test_direct_form_rewards_the_judge_probability_against_the_sft_greedy_answer(setup, tmp_path):
    model, _, judge_model, _, sets = setup
    run = str(tmp_path / "direct")
    state, rows = _run(setup, run, form="direct")
    assert [r["stage"] for r in rows] == list(RLAIF_STAGES["direct"])
    assert not os.path.exists(os.path.join(run, "reward-model")) and rows[-1]["form"] == "direct"
    # the baseline is the SFT policy's greedy answer (the SFT phase's final checkpoint) to every RL prompt
    sft = load_finished(os.path.join(run, "sft-policy"), create_state(model, OptimizerConfig(), jax.random.key(0)),
                        steps=3)
    baseline = json.load(open(os.path.join(run, "rl-direct", "baseline.json")))
    prompts = [p.prompt for p in sets["rl"]]
    assert list(baseline) == prompts
    assert list(baseline.values()) == complete(sft.params, model, TOK, prompts, max_new_tokens=16)
    # the RL phase's logged reward of iteration 1 is the judge's p(sample > baseline); it lies in (0, 1)
    metrics = [json.loads(line) for line in open(os.path.join(run, "rl-direct-policy", "metrics.jsonl"))]
    rewards = [m["rl/reward_mean"] for m in metrics if "rl/reward_mean" in m]
    assert rewards and all(0 < r < 1 for r in rewards)


def test_other_arguments_overlaps_and_missing_inputs_are_refused(setup, tmp_path):
    """Killed at the first SFT step, then rerun with another config field or problem set: refused naming the
    stage and its stage.json before anything runs; judge problems that are held out; bad config values."""
    _, _, _, _, sets = setup
    run, calls = str(tmp_path / "r"), []
    with pytest.raises(Killed):
        _run(setup, run, calls=calls, kill=lambda c: True)
    saved = json.load(open(os.path.join(run, "sft", "stage.json")))
    assert saved["stage"] == "sft" and saved["config.judge_steps"] == 3 and saved["task"] == "arithmetic"
    calls.clear()
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json was written by other arguments "
                                                  r"\(config\.judge_steps: 3 -> 4"):
        _run(setup, run, calls=calls, judge_steps=4)
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json .*config.form: 'labeller' -> "
                                                  r"'direct'"):
        _run(setup, run, calls=calls, form="direct")
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json .*judge: "):
        _run(setup, run, calls=calls, sets=dict(sets, judge=sets["judge"][:8]))
    assert calls == []
    with pytest.raises(ValueError, match=r"rlaif: 2 judge problems are also held out"):
        _run(setup, str(tmp_path / "o"), sets=dict(sets, judge=sets["judge"] + sets["held_out"][:2]))
    with pytest.raises(ValueError, match=r"rlaif: rl has 16 problems, the config needs at least 32"):
        _run(setup, str(tmp_path / "o"), label_prompts=32)
    with pytest.raises(ValueError, match=r"RLAIFConfig.form: 'other'"):
        _config(form="other")
    with pytest.raises(ValueError, match=r"RLAIFConfig.samples_per_prompt: grpo compares"):
        _config(samples_per_prompt=1)


@pytest.mark.slow
def test_resumes_bit_identically_after_kills_between_and_inside_stages(setup, tmp_path):
    calls = []
    full, rows = _run(setup, str(tmp_path / "full"), calls=calls)
    assert [c[1] for c in calls if c[0] == "RLState"] == [1, 2]
    run = str(tmp_path / "killed")
    calls = []
    # between stages: the reward model's first step (sft and judge finished and checkpointed)
    with pytest.raises(Killed):
        _run(setup, run, calls=calls, kill=lambda c: len(c) == 3 + 3 + 1)  # 3 SFT evals, 3 judge evals, RM step 1
    assert calls[-1] == ("TrainState", 1, 128) and calls[3][2] == 64
    assert json.load(open(os.path.join(run, "judge", "results.json")))["stage"] == "judge"
    assert os.path.exists(os.path.join(run, "reward-model", "labels.json"))
    calls = []
    # inside the RL stage: its second iteration
    with pytest.raises(Killed):
        _run(setup, run, calls=calls, kill=lambda c: c[-1] == ("RLState", 2, 128))
    assert calls[0] == ("TrainState", 2, 128)  # the reward model resumed after its step 1; sft and judge skipped
    calls = []
    resumed, resumed_rows = _run(setup, run, calls=calls)
    assert calls == [("RLState", 2, 128)]  # the RL stage resumed after iteration 1; nothing else ran
    _same(full, resumed)
    assert resumed_rows == rows and read_results(run) == rows
    # a missing input: the labels the reward model trained on, removed while its stage is unfinished
    run2 = str(tmp_path / "missing")
    with pytest.raises(Killed):
        _run(setup, run2, kill=lambda c: len(c) == 3 + 3 + 2)
    os.remove(os.path.join(run2, "reward-model", "labels.json"))
    with pytest.raises(FileNotFoundError, match=r"stage 'reward-model': its input .*reward-model/labels.json is "
                                                r"missing, but its phase already trained on it"):
        _run(setup, run2)
    shutil.rmtree(run2)


@pytest.mark.slow
def test_experiment_smoke_writes_the_table_and_reruns_to_it(tmp_path):
    """`python -m experiments.rlaif --smoke --form both` (every stage); run again in the same directory it redoes nothing."""
    from experiments import rlaif as ex

    for form in ("both",):
        cfg = dict(smoke=True, form=form, run_dir=str(tmp_path / form), progress=False)
        res = ex.main(ex.Config(**cfg))
        assert [r["stage"] for r in res["rows"]] == list(RLAIF_STAGES[form])
        assert read_results(str(tmp_path / form)) == res["rows"]
        again = ex.main(ex.Config(**cfg))
        assert again["rows"] == res["rows"]


def test_config_refuses_bad_values_naming_the_field():
    for changes, message in (
            (dict(algorithm="ppo"), r"^RLAIFConfig.algorithm: 'ppo' needs a value head, which the RLAIF RL stages do "
                                    r"not build"),
            (dict(algorithm="on_policy_distill"), r"^RLAIFConfig.algorithm: 'on_policy_distill' needs a teacher"),
            (dict(algorithm="trpo"), r"^RLAIFConfig.algorithm: 'trpo' needs a value head and a critic"),
            (dict(algorithm="nope"), r"^RLAIFConfig.algorithm: 'nope' is not a registry algorithm"),
            (dict(algorithm="rloo", samples_per_prompt=1), r"^RLAIFConfig.samples_per_prompt: rloo compares the "
                                                           r"samples of a prompt, so it needs >= 2, got 1$"),
            (dict(temperature=0.0), r"^RLAIFConfig.temperature: must be finite and > 0, got 0.0$"),
            (dict(temperature=-1.0), r"^RLAIFConfig.temperature: must be finite and > 0, got -1.0$"),
            (dict(temperature=float("nan")), r"^RLAIFConfig.temperature: must be finite and > 0, got nan$"),
            (dict(label_temperature=float("inf")), r"^RLAIFConfig.label_temperature: must be finite and > 0, got inf$"),
            (dict(kl_coef=float("nan")), r"^RLAIFConfig.kl_coef: must be finite and >= 0, or None"),
            (dict(kl_coef=-0.1), r"^RLAIFConfig.kl_coef: must be finite and >= 0, or None .*got -0.1$"),
            (dict(seed=-1), r"^RLAIFConfig.seed: must be >= 0, got -1$"),
            (dict(min_confidence=float("nan")), r"^RLAIFConfig.min_confidence: must be in \[0, 0.5\), got nan$")):
        with pytest.raises(ValueError, match=message):
            _config(**changes)
    # a critic-free algorithm that compares no group takes one sample a prompt
    assert _config(algorithm="reinforce", samples_per_prompt=1).samples_per_prompt == 1


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def test_soft_labels_train_the_reward_model_by_the_hand_computed_soft_bradley_terry_loss():
    """The reward model trains on the judge's soft p (RankingBatch.preference, `ranking_loss`): L = mean −[p log σ(Δ)
    + (1 − p) log σ(−Δ)], Δ = r(a) − r(b), with the rewards from the RL scorer (`reward_model_reward`, another
    encoding path) and log σ in float64."""
    from rljax.data.reward_collate import collate_pairs
    from rljax.losses.reward_model import RankingConfig, ranking_loss
    from rljax.models.transformer import add_head
    from rljax.rewards.learned import reward_model_reward

    base = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))
    rm, params = add_head(base, base.init(jax.random.key(0)), "reward")
    # a non-zero head, so the rewards differ between answers (a zero head gives Δ = 0 and log 2 for any p)
    params = dict(params, reward_head=jax.random.normal(jax.random.key(1), params["reward_head"].shape))
    rows = [dict(prompt="3+4=", a="7;answer:7", b="8;answer:8", p=0.9),
            dict(prompt="12*3=", a="36;answer:36", b="6", p=0.2),
            dict(prompt="9-1=", a="8", b="9;answer:9", p=0.5),
            dict(prompt="7+7=", a="14", b="41;answer:41", p=1.0)]
    batch = collate_labelled_pairs(TOK, rows)
    loss, metrics = ranking_loss(params, batch, model=rm, cfg=RankingConfig())
    score = reward_model_reward(rm, params, TOK)
    ra = np.asarray(score([r["prompt"] for r in rows], [r["a"] for r in rows]), np.float64)
    rb = np.asarray(score([r["prompt"] for r in rows], [r["b"] for r in rows]), np.float64)
    delta, p = ra - rb, np.array([r["p"] for r in rows])
    assert np.all(np.abs(delta) > 1e-3)
    want = -np.mean(p * _log_sigmoid(delta) + (1 - p) * _log_sigmoid(-delta))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # accuracy over the pairs whose label picks an answer (p != ½): sign Δ against p > ½; margin: Δ on p's side
    decided = p != 0.5
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(((delta > 0) == (p > 0.5))[decided]))
    assert float(metrics["margin"]) == pytest.approx(np.mean((delta * np.sign(p - 0.5))[decided]), rel=1e-5)
    # p = 1 on every pair is the hard Bradley–Terry loss of the same pairs ranked (a listed first)
    hard = collate_labelled_pairs(TOK, [dict(r, p=1.0) for r in rows])
    bt, _ = ranking_loss(params, collate_pairs(TOK, [(r["prompt"], r["a"], r["b"]) for r in rows]), model=rm,
                         cfg=RankingConfig())
    assert float(ranking_loss(params, hard, model=rm, cfg=RankingConfig())[0]) == pytest.approx(float(bt), rel=1e-6)
    with pytest.raises(ValueError, match=r"^row 1: preference nan is not a probability in \[0, 1\]$"):
        collate_labelled_pairs(TOK, [rows[0], dict(rows[1], p=float("nan"))])
    for cfg, match in ((RankingConfig(margin=1.0), "a soft label already says how strong"),
                       (RankingConfig(objective="plackett_luce"), "takes objective='pairwise'")):
        with pytest.raises(ValueError, match=match):
            ranking_loss(params, batch, model=rm, cfg=cfg)


def test_label_statistics_cover_the_trained_pairs_with_ties_excluded():
    def row(a, b, p, gold_a, gold_b, consistent):
        return dict(prompt="q", a=a, b=b, p=p, gold_a=gold_a, gold_b=gold_b, consistent=consistent)

    labels = [row("x", "x", 0.9, 1.0, 0.0, True),     # identical answers: not trained
              row("x", "y", 0.52, 1.0, 0.0, True),    # |p − ½| < 0.05: not trained
              row("x", "y", 0.8, 1.0, 0.0, True),     # trained, picks a, gold a: agrees
              row("x", "y", 0.1, 1.0, 0.0, False),    # trained, picks b, gold a: disagrees
              row("x", "y", 0.5, 0.0, 1.0, False),    # trained (soft label ½), a tie: out of the agreement
              row("x", "y", 0.9, 0.5, 0.5, True),     # trained, gold tie: out of the agreement
              row("x", "zzzz", 0.05, 0.0, 1.0, True)]  # too long for the reward model: not trained
    fits = lambda r: len(r["b"]) < 4  # noqa: E731
    strict = trained_labels(labels, 0.05, fits)  # also drops 0.52 and the tie 0.5
    assert [len(strict[k]) for k in ("distinct", "confident", "trained")] == [6, 4, 3]
    assert label_statistics(strict["trained"]) == dict(label_position_consistency=2 / 3, label_gold_agreement=0.5,
                                                       gold_decided_pairs=2, label_ties=0)
    chosen = trained_labels(labels, 0.0, fits)
    assert [len(chosen[k]) for k in ("distinct", "confident", "trained")] == [6, 6, 5]
    # trained: 0.52 (agrees), 0.8 (agrees), 0.1 (disagrees), 0.5 (a tie), 0.9 (a gold tie); consistent 3 of 5
    assert label_statistics(chosen["trained"]) == dict(label_position_consistency=0.6, label_gold_agreement=2 / 3,
                                                       gold_decided_pairs=3, label_ties=1)
    assert label_statistics([]) == dict(label_position_consistency=None, label_gold_agreement=None,
                                        gold_decided_pairs=0, label_ties=0)


def test_a_judge_too_short_for_two_answers_is_refused_before_any_stage(setup, tmp_path):
    model, params, _, _, sets = setup
    short = Model(preset("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, mlp_dim=128,
                         vocab_size=TOK.vocab_size, max_seq_len=40))
    questions = [ARITHMETIC.prompt(p) for p in sets["rl"][:8]]
    empty = [len(TOK.encode(f"{q}\n1:\n2:\nbetter:", add_bos=True)) for q in questions]
    longest = int(np.argmax(empty))
    run = str(tmp_path / "short")
    message = (rf"^rlaif: the judge cannot compare two sampled answers of max_new_tokens=16 tokens: the longest "
               rf"comparison prompt without its answers \(question '{questions[longest].replace('+', '[+]')}', with "
               rf"the template and specials\) has {empty[longest]} tokens, \+ 2 x 16 = {empty[longest] + 32} > the "
               rf"judge's max_seq_len=40; use max_new_tokens <= {(40 - empty[longest]) // 2} or a judge with a "
               rf"longer max_seq_len$")
    with pytest.raises(ValueError, match=message):
        rlaif(params, _config(), model=model, tokenizer=TOK, task=ARITHMETIC, judge_model=short,
              judge_params=short.init(jax.random.key(1)), key=jax.random.key(3), run_dir=run, **sets)
    assert not os.path.exists(run)  # nothing ran, nothing was written
