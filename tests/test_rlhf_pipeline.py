"""The RLHF pipeline (`rljax.rlhf`): the RL iteration's monitors (the gold score logged beside the proxy) against a
mean computed by hand; a reward model's non-finite score reported with its prompt and completion; other arguments
refused naming the stage and the file. Slow (the whole pipeline compiles an SFT step, a reward-model step, the
sampler, the PPO update and the evaluations: about a minute a run on 2 shared CPU cores): one run per stage row whose
numbers match a recomputation (the reward model's held-out accuracy, the held-out gold mean, the controller's β
from the logged KLs by its rule), a rerun redoing nothing, resume after kills between and inside stages
bit-identical, iterative RLHF's rounds, and the experiment's --smoke."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.eval import PolicyEvalConfig, complete
from rljax.models import Model, add_head, preset
from rljax.pipelines import StageArgumentsError, read_results
from rljax.rewards.rules import RewardError, score_with_failures
from rljax.rlhf import PLOTTED, RLHFConfig, ppo_metrics, rlhf_pipeline
from rljax.state import OptimizerConfig
from rljax.tasks import ARITHMETIC
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


# ----------------------------------------------------------------------------- fast
def test_rl_iteration_logs_each_monitor_mean_over_the_sampled_rows():
    """A one-token bandit: the reward is the arm's value, the monitor another function of the arm; the iteration
    reports the monitor's mean over the samples it drew (recomputed from the sampled tokens)."""
    from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
    from rljax.sampling import SampleConfig

    model = Model(preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64))
    params = model.init(jax.random.key(0))
    cfg = RLConfig(algorithm="reinforce", sampling=SampleConfig(max_new_tokens=1, n=4, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"))
    seen = []

    def decode(ids):
        return [" ".join(str(int(t)) for t in row) for row in np.asarray(ids)]

    def reward(prompts, completions, **_):
        return [float(int(c.split()[0]) % 3) for c in completions]

    def gold(prompts, completions, **_):
        arms = [int(c.split()[0]) for c in completions]
        seen.append(arms)
        return [float(a % 5 == 0) for a in arms]

    prompts = np.ones((2, 1), np.int32)
    watched = make_rl_iteration(model, cfg, reward, decode, monitors={"gold": gold})
    _, metrics = watched(create_rl_state(model, params, cfg, jax.random.key(1)), prompts, None, jax.random.key(2))
    assert len(seen) == 1 and len(seen[0]) == 8  # called once, on the 2 prompts x 4 samples
    assert metrics["gold_mean"] == pytest.approx(np.mean([x % 5 == 0 for x in seen[0]]))
    assert metrics["reward_mean"] == pytest.approx(np.mean([x % 3 for x in seen[0]]))  # the same samples
    with pytest.raises(ValueError, match="monitors: 'accuracy' is not a usable name"):
        make_rl_iteration(model, cfg, reward, decode, monitors={"accuracy": gold})
    with pytest.raises(ValueError, match="monitors: 'completion' is a field of the sample records"):
        make_rl_iteration(model, cfg, reward, decode, monitors={"completion": gold})


def test_a_reward_model_scoring_non_finite_names_the_prompt_and_completion():
    """A reward model whose head is NaN (a diverged refresh, say): scoring it the way the RL iteration and
    evaluate_policy do raises naming the reward function, the sample, its prompt and its completion."""
    from rljax.rewards.learned import reward_model_reward

    model = Model(preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64,
                         vocab_size=TOK.vocab_size, max_seq_len=64))
    rm, params = add_head(model, model.init(jax.random.key(0)), "reward")
    bad = dict(params, reward_bias=jnp.full_like(params["reward_bias"], jnp.nan))
    scorer = reward_model_reward(rm, bad, TOK)
    with pytest.raises(RewardError, match=r"reward function reward_model_reward returned non-finite rewards for 2 "
                                          r"sample\(s\), e.g. sample 0 = nan \(prompt '1\+2=', completion "
                                          r"'3;answer:3'\)"):
        score_with_failures(scorer, ["1+2=", "2+2="], ["3;answer:3", "4"])
    fine = score_with_failures(reward_model_reward(rm, params, TOK), ["1+2="], ["3"])  # zero head: 0
    np.testing.assert_array_equal(fine.rewards, [0.0])


SAMPLING_TOKENS = 20


def _config(**changes) -> RLHFConfig:
    base = dict(sft_steps=3, sft_batch_size=8, rm_steps=2, rm_batch_size=8, ppo_iterations=3, prompts_per_iteration=4,
                samples_per_prompt=2, max_new_tokens=SAMPLING_TOKENS, ppo_epochs=1, ppo_minibatches=2, kl_init=0.1,
                kl_target=0.5, kl_horizon=40, refresh_prompts=4, refresh_samples=2, refresh_batch_size=2,
                evaluation=PolicyEvalConfig(max_new_tokens=SAMPLING_TOKENS, samples=2), log_every=1, eval_every=1,
                checkpoint_every=1, progress=False)
    return RLHFConfig(**{**base, **changes})


def _sets():
    train, test = ARITHMETIC.split(96, 8, levels=(1,), seed=0)
    return dict(sft_problems=train[:32], rm_problems=train[32:64], rl_problems=train[64:], held_out=test)


def _run(model, params, run_dir, *, kill=None, calls=None, sets=None, **changes):
    """The pipeline; calls records every phase evaluation as (state type, step); kill(calls) -> True raises there
    (a phase evaluates every step before checkpointing it; a phase stopped by an exception saves its last finished
    step)."""
    calls = [] if calls is None else calls

    def eval_fn(s):
        calls.append((type(s).__name__, int(s.step)))
        if kill is not None and kill(calls):
            raise Killed(f"evaluation {calls[-1]}")
        return {}

    return rlhf_pipeline(params, _config(**changes), model=model, tokenizer=TOK, task=ARITHMETIC,
                         key=jax.random.key(3), run_dir=run_dir, eval_fn=eval_fn, **(sets or _sets()))


def _model():
    return Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))


def test_other_arguments_are_refused_naming_the_stage_and_file(tmp_path):
    """Killed in the SFT stage's first step, then rerun with another config field or another held-out set: refused
    before anything runs, naming the stage and its stage.json."""
    model = _model()
    params = model.init(jax.random.key(0))
    run, calls = str(tmp_path / "rlhf"), []
    with pytest.raises(Killed):
        _run(model, params, run, calls=calls, kill=lambda calls: True)
    saved = json.load(open(os.path.join(run, "sft", "stage.json")))
    assert saved["stage"] == "sft" and saved["config.rm_steps"] == 2 and saved["task"] == "arithmetic"
    calls.clear()
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json was written by other arguments "
                                                  r"\(config\.rm_steps: 2 -> 4"):
        _run(model, params, run, calls=calls, rm_steps=4)
    with pytest.raises(StageArgumentsError, match=r"stage 'sft': .*sft/stage.json .*held_out"):
        _run(model, params, run, calls=calls, sets=dict(_sets(), held_out=_sets()["held_out"][:4]))
    assert calls == []
    with pytest.raises(ValueError, match="RLHFConfig.refresh_samples: a ranked list compares samples"):
        _config(refresh_samples=1)
    with pytest.raises(ValueError, match="rlhf_pipeline: rl_problems has 2 problems, the config needs at least 4"):
        _run(model, params, str(tmp_path / "other"), sets=dict(_sets(), rl_problems=_sets()["rl_problems"][:2]))


# ----------------------------------------------------------------------------- slow: the whole pipeline
@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One uninterrupted run (fixed reward model, 3 PPO iterations) and the calls its phases' evaluations saw."""
    model = _model()
    params = model.init(jax.random.key(0))
    run, calls = str(tmp_path_factory.mktemp("rlhf") / "full"), []
    state, rows = _run(model, params, run, calls=calls)
    return dict(model=model, params=params, run=run, calls=calls, state=state, rows=rows)


def _same(x, y):
    def raw(a):  # PRNG keys (TrainState.rng) compare by their key data
        return np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)

    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(raw(a), raw(b))


@pytest.mark.slow
def test_table_has_a_row_per_stage_matching_a_recomputation(full):
    from rljax.rewards.learned import reward_model_reward
    from rljax.data.synthetic import preference_pairs

    run, rows, state, model = full["run"], full["rows"], full["state"], full["model"]
    sets, cfg = _sets(), _config()
    assert [r["stage"] for r in rows] == ["sft", "reward-model", "ppo"]
    assert read_results(run) == rows
    table = open(os.path.join(run, "results.md")).read().splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| stage |")
    by = {r["stage"]: r for r in rows}
    assert by["sft"]["sft_steps"] == 3 and by["reward-model"]["rm_steps"] == 2 and by["ppo"]["rl_iterations"] == 3
    assert [c for c in full["calls"] if c[0] == "RLState"] == [("RLState", i) for i in (1, 2, 3)]

    # the reward model's held-out accuracy: the noise-free pairs of the held-out problems scored by the returned
    # reward model, a pair right when chosen scores above rejected (ties half)
    held = [r for r in preference_pairs(sets["held_out"], cfg.seed + 1, noise_free=True, task=ARITHMETIC)
            if r["chosen"] != r["rejected"] and r["gold_margin"] != 0]
    rm_model, _ = add_head(model, full["params"], "reward")
    score = reward_model_reward(rm_model, state["reward_model"].params, TOK)
    chosen = score([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = score([r["prompt"] for r in held], [r["rejected"] for r in held])
    right = np.mean((chosen > rejected) + 0.5 * (chosen == rejected))
    assert by["reward-model"]["rm_held_out_pairs"] == len(held) > 0
    assert by["reward-model"]["rm_pairwise_accuracy"] == pytest.approx(right, abs=1e-12)

    # the PPO row's held-out gold and proxy means, from samples drawn again with evaluate_policy's key
    from rljax.losses.actor_critic import with_value_head

    value_model, _ = with_value_head(model, full["params"])
    prompts = [p.prompt for p in sets["held_out"]]
    texts = complete(state["policy"].policy.params, value_model, TOK, prompts, max_new_tokens=SAMPLING_TOKENS, n=2,
                     temperature=1.0, key=jax.random.key(7), batch_size=len(prompts))
    problems = [p for p in sets["held_out"] for _ in range(2)]
    gold = np.mean([ARITHMETIC.gold_score(p, t) for p, t in zip(problems, texts)])
    assert by["ppo"]["gold_mean"] == pytest.approx(gold, rel=1e-6)
    assert by["ppo"]["accuracy_sampled"] == np.mean([ARITHMETIC.check(p, t) for p, t in zip(problems, texts)])
    proxy = np.mean(score([p.prompt for p in problems], texts))
    assert by["ppo"]["proxy_mean"] == pytest.approx(proxy, rel=1e-5)

    # β per iteration: the controller's rule by hand on the logged KLs, β_{i+1} = β_i (1 + clip(KL_i / target − 1,
    # ±0.2) · B / horizon), B = 4 prompts x 2 samples; the β after the last iteration is the state's
    logged = ppo_metrics(run)
    assert sorted(logged) == [1, 2, 3]
    beta = cfg.kl_init
    for i in (1, 2, 3):
        assert logged[i]["rl/kl_coef"] == pytest.approx(beta, rel=1e-6), i
        error = np.clip(logged[i]["rl/kl_per_sequence"] / cfg.kl_target - 1, -0.2, 0.2)
        beta = beta * (1 + error * 8 / cfg.kl_horizon)
    assert by["ppo"]["beta"] == pytest.approx(beta, rel=1e-6)
    assert beta != pytest.approx(cfg.kl_init, rel=1e-3)  # the controller moved it
    # the row's training numbers are the logged ones; gold is logged beside the proxy every iteration
    assert by["ppo"]["train_proxy_first"] == logged[1]["rl/reward_mean"]
    assert by["ppo"]["train_gold_last"] == logged[3]["rl/gold_mean"]
    assert by["ppo"]["train_kl_last"] == logged[3]["rl/kl_per_sequence"]
    assert all(k in logged[i] for k in PLOTTED for i in (1, 2, 3))
    assert os.path.getsize(os.path.join(run, "rlhf.png")) > 0


@pytest.mark.slow
def test_a_rerun_redoes_nothing_and_resumes_bit_identically_after_kills(full, tmp_path):
    model, params = full["model"], full["params"]
    calls = []
    again, again_rows = _run(model, params, full["run"], calls=calls)
    assert calls == [] and again_rows == full["rows"]
    _same(full["state"], again)

    run = str(tmp_path / "killed")
    calls = []
    # between stages: at the reward model's first evaluation (sft finished and checkpointed)
    with pytest.raises(Killed):
        _run(model, params, run, calls=calls, kill=lambda c: c[-1][0] == "TrainState" and len(c) == 4)
    assert calls[:3] == [("TrainState", 1), ("TrainState", 2), ("TrainState", 3)]
    assert json.load(open(os.path.join(run, "sft", "results.json")))["stage"] == "sft"
    assert not os.path.exists(os.path.join(run, "reward-model", "results.json"))
    calls = []
    # inside PPO: at its second iteration's evaluation (iteration 1 checkpointed, 2 saved as the phase stops)
    with pytest.raises(Killed):
        _run(model, params, run, calls=calls, kill=lambda c: c[-1] == ("RLState", 2))
    assert calls[0] == ("TrainState", 2)  # the reward model resumed after its step 1 (saved as the kill stopped it)
    calls = []
    resumed, rows = _run(model, params, run, calls=calls)
    assert calls == [("RLState", 3)]  # PPO resumed after its iteration 2; nothing else ran
    _same(full["state"], resumed)
    assert rows == full["rows"] and read_results(run) == full["rows"]


@pytest.mark.slow
def test_iterative_rlhf_records_a_row_per_round_and_refreshes_the_reward_model(tmp_path):
    model = _model()
    params = model.init(jax.random.key(0))
    run = str(tmp_path / "iterative")
    state, rows = _run(model, params, run, refresh_every=1, ppo_iterations=2)
    assert [r["stage"] for r in rows] == ["sft", "reward-model", "ppo-round-0", "ppo-round-1"]
    by = {r["stage"]: r for r in rows}
    assert by["ppo-round-0"]["round"] == 0 and "new_lists" not in by["ppo-round-0"]
    lists = json.load(open(os.path.join(run, "ppo-round-1", "lists.json")))["lists"]
    assert by["ppo-round-1"]["new_lists"] == len(lists) and 0 <= by["ppo-round-1"]["rm_accuracy_on_policy"] <= 1
    for prompt, answers, ranks in lists:  # gold-ranked samples of the policy: rank 0 = the best gold score
        problem = next(p for p in _sets()["rl_problems"][:4] if p.prompt == prompt)
        scores = [ARITHMETIC.gold_score(problem, a) for a in answers]
        assert [sorted(set(scores), reverse=True).index(s) for s in scores] == ranks
    # the refresh trained max(epochs 2 x new lists / batch 2, 1) more steps
    assert int(state["reward_model"].step) == (2 + max(2 * len(lists) // 2, 1) if lists else 2)
    assert by["ppo-round-0"]["rl_iterations"] == 1 and by["ppo-round-1"]["rl_iterations"] == 2
    # a finished round's input removed: the rerun names the stage and the file
    os.remove(os.path.join(run, "ppo-round-1", "lists.json"))
    with pytest.raises(FileNotFoundError, match=r"stage 'ppo-round-1': its data .*ppo-round-1/lists.json is missing"):
        _run(model, params, run, refresh_every=1, ppo_iterations=2)


@pytest.mark.slow
def test_experiment_smoke_writes_the_table_and_reruns_to_it(tmp_path):
    """`python -m experiments.rlhf_pipeline --smoke`; run again in the same directory it redoes nothing."""
    from experiments import rlhf_pipeline as ex

    cfg = dict(smoke=True, run_dir=str(tmp_path / "rlhf"), progress=False)
    res = ex.main(ex.Config(**cfg))
    assert [r["stage"] for r in res["rows"][0]] == ["sft", "reward-model", "ppo"]
    assert read_results(str(tmp_path / "rlhf" / "seed-0")) == res["rows"][0]
    s, rows = res["summary"]["per_seed"][0], res["rows"][0]
    assert s["gold_end"] == rows[-1]["gold_mean"] and s["proxy_start"] == rows[1]["proxy_mean"]
    assert s["gold_change"] == pytest.approx(rows[-1]["gold_mean"] - rows[1]["gold_mean"])
    logs = [str(tmp_path / "rlhf" / "seed-0" / d / "metrics.jsonl") for d in ("sft", "reward_model", "policy")]
    before = [open(f).read() for f in logs]
    again = ex.main(ex.Config(**cfg))
    assert again["rows"] == res["rows"]
    assert [open(f).read() for f in logs] == before  # no phase ran again (each would append its steps)


@pytest.mark.slow  # 60-120 s: every stage of the smoke in three processes at once
def test_study_on_two_processes_equals_one_process_on_the_same_mesh(tmp_path):
    """`python -m experiments.rlhf_pipeline --smoke --mesh-data 2 --mesh-fsdp 2` as two processes (2 simulated CPU
    devices each, connected through the RLJAX_* variables) and as one process with 4 devices: one run directory
    (process 0's name), the same stage rows (strings and counts exactly, numbers up to float rounding) and summary
    in results.json, one plot, and the table printed by process 0 alone."""
    from test_multihost import run_study_on_two_processes_and_one
    from test_multiprocess_phases import _close_rows

    smoke = ["experiments.rlhf_pipeline", "--smoke", "--mesh-data", "2", "--mesh-fsdp", "2", "--no-progress",
             "--no-tensorboard"]
    multi, single = run_study_on_two_processes_and_one(tmp_path, smoke, timeout=600)
    results = {name: json.loads((d / "results.json").read_text()) for name, d in (("m", multi), ("s", single))}
    assert [r["stage"] for r in results["s"]["rows"]["0"]] == ["sft", "reward-model", "ppo"]
    # the reward model's scores (the proxy: a head over d_model features, ~0.04 here) keep the float32 rounding
    # of sums the two layouts order differently: 1e-5 absolute
    loose = {"kl_": 1e-4, "proxy": 1e-5, "train_proxy": 1e-5, "train_kl": 1e-4}
    _close_rows(results["m"]["rows"]["0"], results["s"]["rows"]["0"], "rlhf_pipeline", loose)
    for key, want in results["s"]["summary"]["mean"].items():
        tol = 1e-4 if "kl" in key else 1e-5 if "proxy" in key else 1e-6
        np.testing.assert_allclose(results["m"]["summary"]["mean"][key], want, rtol=1e-5, atol=tol, err_msg=key)
    assert (multi / "seed-0" / "rlhf.png").exists() == (single / "seed-0" / "rlhf.png").exists()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("proc0", "proc1", "single")}
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in logs["proc0"] and "| stage |" in logs["proc0"]
    assert "rlhf_pipeline: task" not in logs["proc1"] and "| stage |" not in logs["proc1"]
