"""The R1 pipeline (`rljax.r1`): the rule and mixed rewards against hand-computed cases; the whole pipeline
(tiny 1-layer teacher and student, a few steps a stage) writing one results row per stage, whose rejection
stats and final accuracy match an independent recomputation from the saved samples and the returned params;
a rerun redoing nothing; other arguments refused naming the stage and the file; resume after kills between
and inside stages bit-identical (slow); the experiment's --smoke (slow)."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.eval import PolicyEvalConfig, complete
from rljax.expert_iteration import RejectionConfig
from rljax.models import Model, preset
from rljax.phases import LoopConfig, SFTPhaseConfig, sft
from rljax.pipelines import StageArgumentsError, read_results
from rljax.r1 import R1_STAGES, R1Config, mixed_reward, r1_pipeline, rule_reward
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import ARITHMETIC
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
OPT = OptimizerConfig(lr=3e-3, schedule="constant")
STAGES = list(R1_STAGES)  # every stage: the tests train the reward model and give the student its own cold start


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


def test_rule_and_mixed_rewards_match_hand_computed_values():
    train, _ = ARITHMETIC.split(2, 0, levels=(1,), seed=0)
    p = train[0]
    right, wrong, malformed = p.completion, p.completion.replace("answer:", "answer:9"), "no answer"
    completions = [right, wrong, malformed]
    problems = [p, p, p]
    rule = rule_reward(ARITHMETIC, format_weight=0.5)
    np.testing.assert_allclose(rule([p.prompt] * 3, completions, problems=problems), [1.5, 0.5, 0.0])
    lang = rule_reward(ARITHMETIC, format_weight=0.0, language_weight=2.0,
                       language_reward=lambda prompts, completions, **_: np.array([0.25] * len(completions)))
    np.testing.assert_allclose(lang([p.prompt] * 3, completions, problems=problems), [1.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="language_weight is 1.0 but no language_reward"):
        rule_reward(ARITHMETIC, language_weight=1.0)
    seen = []

    def rm(prompts, completions):
        seen.append(list(completions))
        return np.array([10.0 + len(c) for c in completions])

    mixed = mixed_reward(rule, rm)
    out = mixed([p.prompt] * 3, completions, problems=problems, general=[False, True, False])
    np.testing.assert_allclose(out, [1.5, 10.0 + len(wrong), 0.0])
    assert seen == [[wrong]]  # the reward model scores only the general rows
    with pytest.raises(ValueError, match="non-finite reward nan for row 0 .general=True"):
        mixed_reward(rule, lambda ps, cs: np.full(len(cs), np.nan))([p.prompt], [right], problems=[p], general=[True])


@pytest.fixture(scope="module")
def setup():
    """A 1-layer teacher 'pretrained' by 300 SFT steps on level-1 arithmetic (a base that gets a few answers right,
    so rejection sampling keeps some samples), a fresh 1-layer student, and the problem sets."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))
    student = Model(preset("tiny", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, vocab_size=TOK.vocab_size,
                           max_seq_len=64))
    train, test = ARITHMETIC.split(256 + 64, 8, levels=(1,), seed=0)
    collate = functools.partial(collate_prompt_completion, TOK, max_length=64)
    state = create_state(model, OPT, jax.random.key(0))
    data = BatchIterator([(p.prompt, p.completion) for p in train[:256]], 16, collate, seed=0)
    state = sft(state, data, SFTPhaseConfig(optimizer=OPT, loop=LoopConfig(steps=300, log_every=300, progress=False)),
                model=model)
    sets = dict(cold_start=train[:64], reasoning=train[64:256], general=train[256:], held_out=test)
    return model, jax.device_get(state.params), student, student.init(jax.random.key(1)), sets


SAMPLING = SampleConfig(max_new_tokens=20, temperature=1.0, **tokenizer_ids(TOK))


def _config(**changes) -> R1Config:
    base = dict(cold_start_steps=3, sft_batch_size=8, rl_iterations=2, prompts_per_iteration=4, samples_per_prompt=2,
                max_new_tokens=20, rejection_prompts=16,
                rejection=RejectionConfig(samples=4, max_per_prompt=2, prompts_per_batch=16, sampling=SAMPLING),
                rs_sft_steps=3, general_sft_rows=8, rm_steps=2, rm_batch_size=8, mixed_iterations=2,
                student_start_steps=2, distill_prompts=16,
                distill_rejection=RejectionConfig(samples=4, max_per_prompt=2, prompts_per_batch=16,
                                                  sampling=SAMPLING),
                distill_sft_steps=2, distill_iterations=2, evaluation=PolicyEvalConfig(max_new_tokens=20, samples=2),
                log_every=1, eval_every=1, checkpoint_every=1, progress=False)
    return R1Config(**{**base, **changes})


def _run(setup, run_dir, *, kill=None, calls=None, **changes):
    """The pipeline from the warm base. calls records every phase evaluation as (state type, step, model width:
    the teacher's 128 or the student's 64); kill(calls) -> True raises there (a phase evaluates every step, before
    its checkpoint of that step; a phase stopped by an exception saves its last finished step)."""
    model, params, student, student_params, sets = setup
    calls = [] if calls is None else calls

    def eval_fn(s):
        params = s.policy.params if hasattr(s, "policy") else s.params
        calls.append((type(s).__name__, int(s.step), int(params["embedding"].shape[1])))
        if kill is not None and kill(calls):
            raise Killed(f"evaluation {calls[-1]}")
        return {}

    return r1_pipeline(params, _config(**changes), model=model, tokenizer=TOK, task=ARITHMETIC, student_model=student,
                       student_params=student_params, key=jax.random.key(3), run_dir=run_dir, eval_fn=eval_fn, **sets)


def _same(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_pipeline_table_has_a_row_per_stage_matching_a_recomputation(setup, tmp_path):
    model, params, student, _, sets = setup
    run = str(tmp_path / "r1")
    calls = []
    state, rows = _run(setup, run, calls=calls)
    assert [r["stage"] for r in rows] == STAGES
    assert read_results(run) == rows
    table = open(os.path.join(run, "results.md")).read().splitlines()
    assert len(table) == 2 + len(STAGES) and table[0].startswith("| stage |")
    for r in rows:
        if r["stage"] != "reward-model":
            assert {"accuracy_greedy", "accuracy_sampled", "reward_mean", "completion_length", "kl_to_start"} <= set(r)
    by = {r["stage"]: r for r in rows}
    assert by["cold-start"]["sft_steps"] == 3 and by["rejection-sft"]["sft_steps"] == 3  # from the base: a fresh state
    assert by["rl-reasoning"]["rl_iterations"] == by["rl-mixed"]["rl_iterations"] == 2
    assert by["reward-model"]["rm_steps"] == 2 and 0 <= by["reward-model"]["rm_pairwise_accuracy"] <= 1
    assert by["distill-on-policy"]["rl_iterations"] == 2 and "kl_to_teacher" in by["distill-on-policy"]
    # rejection sampling, recomputed from the saved samples: every kept one right, well formed, distinct, <= cap
    for stage in ("rejection-sft", "distill-sft"):
        saved = json.load(open(os.path.join(run, stage, "samples.json")))
        row, kept = by[stage], saved["rows"]
        assert row["samples"] == 16 * 4 and row["kept"] == len(kept) == row["trained_kept"]
        assert row["kept_fraction"] == len(kept) / 64
        per = {}
        for x in kept:
            p = sets["reasoning"][x["prompt_index"]]
            assert x["prompt"] == p.prompt and ARITHMETIC.check(p, x["completion"])
            assert ARITHMETIC.well_formed(x["completion"])
            per.setdefault(x["prompt_index"], []).append(x["completion"])
        assert all(len(v) == len(set(v)) <= 2 for v in per.values())
        assert row["prompts_with_kept"] == len(per)
    # the tokens each distillation trained the student on, counted another way: SFT from the rows of its batches
    # (each completion's characters + EOS), on-policy from the per-iteration completion lengths it logged
    kept = [(x["prompt"], x["completion"]) for x in json.load(open(os.path.join(run, "distill-sft", "samples.json")))[
        "rows"]]
    order = BatchIterator(kept, min(8, len(kept)), lambda rows: rows, seed=0 + STAGES.index("distill-sft"))
    assert by["distill-sft"]["train_tokens"] == sum(len(kept[i][1]) + 1 for p in range(2)
                                                    for i in order.indices_at(p))  # one token a character
    logged = [json.loads(line) for line in open(os.path.join(run, "distill-on-policy-policy", "metrics.jsonl"))]
    lengths = {r["step"]: r["rl/completion_length"] for r in logged if "rl/completion_length" in r}
    assert sorted(lengths) == [1, 2]
    assert by["distill-on-policy"]["train_tokens"] == round(sum(lengths.values()) * 4 * 2)
    assert 0 < by["distill-on-policy"]["train_tokens"] <= 2 * 4 * 2 * 20
    print(json.dumps(rows, indent=1))
    # the last row's accuracies, recomputed from the returned student with task.check
    last = by["distill-on-policy"]
    prompts = [p.prompt for p in sets["held_out"]]
    greedy = complete(state["student_on_policy"], student, TOK, prompts, max_new_tokens=20)
    assert last["accuracy_greedy"] == np.mean([ARITHMETIC.check(p, t) for p, t in zip(sets["held_out"], greedy)])
    sampled = complete(state["student_on_policy"], student, TOK, prompts, max_new_tokens=20, n=2, temperature=1.0,
                       key=jax.random.key(7), batch_size=len(prompts))  # evaluate_policy's key: fold_in(key(seed), 0)
    assert last["accuracy_sampled"] == np.mean([ARITHMETIC.check(sets["held_out"][i // 2], t)
                                                for i, t in enumerate(sampled)])
    # a rerun redoes nothing and returns the same rows and state
    calls.clear()
    again, again_rows = _run(setup, run, calls=calls)
    assert calls == [] and again_rows == rows
    _same(state, again)
    # other arguments: refused naming the first stage and its file; nothing runs
    with pytest.raises(StageArgumentsError, match=r"stage 'cold-start': .*cold-start/stage.json was written by other "
                                                  r"arguments \(config\.rs_sft_steps: 3 -> 4"):
        _run(setup, run, calls=calls, rs_sft_steps=4)
    assert calls == []


def test_other_arguments_are_refused_naming_the_stage_and_file(tmp_path):
    """Killed in the first stage's first SFT step, then rerun with another config field or another held-out set:
    refused before anything runs, naming the stage and its stage.json (a fresh 1-layer base: seconds)."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))
    train, test = ARITHMETIC.split(256 + 64, 8, levels=(1,), seed=0)
    sets = dict(cold_start=train[:64], reasoning=train[64:256], general=train[256:], held_out=test)
    fresh = (model, model.init(jax.random.key(0)), model, model.init(jax.random.key(1)), sets)
    run, calls = str(tmp_path / "r1"), []
    with pytest.raises(Killed):
        _run(fresh, run, calls=calls, kill=lambda calls: True)
    saved = json.load(open(os.path.join(run, "cold-start", "stage.json")))
    assert saved["stage"] == "cold-start" and saved["config.rs_sft_steps"] == 3 and saved["task"] == "arithmetic"
    calls.clear()
    with pytest.raises(StageArgumentsError, match=r"stage 'cold-start': .*cold-start/stage.json was written by other "
                                                  r"arguments \(config\.rs_sft_steps: 3 -> 4"):
        _run(fresh, run, calls=calls, rs_sft_steps=4)
    with pytest.raises(StageArgumentsError, match=r"stage 'cold-start': .*cold-start/stage.json .*held_out"):
        _run(fresh[:4] + (dict(sets, held_out=test[:4]),), run, calls=calls)
    assert calls == []
    with pytest.raises(ValueError, match="R1Config.samples_per_prompt: GRPO compares"):
        _config(samples_per_prompt=1)
    with pytest.raises(ValueError, match=r"R1Config.algorithm: 'grpoo' is not a registry algorithm"):
        _config(algorithm="grpoo")  # refused with the config, not when the first RL stage starts
    with pytest.raises(ValueError, match="r1_pipeline: reasoning has 10 problems, the config needs at least 16"):
        _run(fresh[:4] + (dict(sets, reasoning=train[:10]),), str(tmp_path / "other"))
    # a student the teacher cannot score (a larger vocabulary): refused before the first stage, not at the last
    wide = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size + 8, max_seq_len=64))
    with pytest.raises(ValueError, match=rf"r1_pipeline: model \(the teacher of student_model\): its vocab_size "
                                         rf"{TOK.vocab_size} is smaller than the policy's {TOK.vocab_size + 8}"):
        _run((model, fresh[1], wide, wide.init(jax.random.key(1)), sets), str(tmp_path / "wide"))
    assert not os.path.exists(tmp_path / "wide")


def test_r1_samples_rejection_at_its_own_length_and_distils_at_temperature_1():
    """A RejectionConfig without sampling samples at R1Config's max_new_tokens and temperature; the distillation
    stage's RL config samples at temperature 1 whatever R1Config.temperature is."""
    from rljax.expert_iteration import DEFAULT_REJECTION_SAMPLING
    from rljax.pipeline_steps import stage_rl_config

    r = RejectionConfig(samples=4)
    assert r.sampling is None and r.sampling_or(SAMPLING).sampling is SAMPLING
    assert RejectionConfig(sampling=SAMPLING).sampling_or(DEFAULT_REJECTION_SAMPLING).sampling is SAMPLING
    cfg = R1Config(temperature=0.7)
    assert cfg.rejection.sampling is None and cfg.distill_rejection.sampling is None
    stage_rl_config("grpo", OptimizerConfig(), tokenizer=TOK, max_new_tokens=8, samples_per_prompt=2, temperature=0.7)
    with pytest.raises(ValueError, match="on_policy_distill estimates KL"):
        stage_rl_config("on_policy_distill", OptimizerConfig(), tokenizer=TOK, max_new_tokens=8, samples_per_prompt=2,
                        temperature=0.7, teacher_coef=1.0)


def test_a_stages_kl_coef_of_zero_turns_the_penalty_off_and_none_keeps_the_algorithms():
    """stage_rl_config: kl_coef None keeps GRPO's β = 0.04 (PPO's 0.05 in the reward); 0 sets β = 0."""
    from rljax.pipeline_steps import stage_rl_config

    def beta(algorithm, kl_coef):
        algo = stage_rl_config(algorithm, OptimizerConfig(), tokenizer=TOK, max_new_tokens=8, samples_per_prompt=2,
                               temperature=1.0, kl_coef=kl_coef).algo
        return (algo.estimator.config if algo.kl_in == "reward" else algo.loss.config).kl_coef

    assert beta("grpo", None) == 0.04 and beta("grpo", 0.0) == 0.0 and beta("grpo", 0.2) == 0.2
    assert beta("ppo", None) == 0.05 and beta("ppo", 0.0) == 0.0
    assert R1Config().kl_coef is None
    with pytest.raises(ValueError, match=r"R1Config.kl_coef: must be >= 0 or None"):
        _config(kl_coef=-1.0)


@pytest.mark.slow
def test_pipeline_resumes_bit_identically_after_kills_between_and_inside_stages(setup, tmp_path):
    calls = []
    full, rows = _run(setup, str(tmp_path / "full"), calls=calls)
    teacher_rl = [c for c in calls if c[0] == "RLState" and c[2] == 128]
    assert [c[1] for c in teacher_rl] == [1, 2, 1, 2]  # rl-reasoning, then rl-mixed
    run = str(tmp_path / "killed")
    calls = []
    # between stages: at rl-mixed's first evaluation (reward-model finished, rl-mixed's step 1 not checkpointed yet
    # when the kill comes, and saved as the last finished step while the phase stops)
    with pytest.raises(Killed):
        _run(setup, run, calls=calls, kill=lambda c: sum(x[0] == "RLState" and x[2] == 128 for x in c) == 3)
    assert json.load(open(os.path.join(run, "reward-model", "results.json")))["stage"] == "reward-model"
    assert not os.path.exists(os.path.join(run, "rl-mixed", "results.json"))
    calls = []
    # inside a stage: the last one's (distill-on-policy, the student's RL) first iteration
    with pytest.raises(Killed):
        _run(setup, run, calls=calls, kill=lambda c: c[-1] == ("RLState", 1, 64))
    assert calls[0] == ("RLState", 2, 128)  # rl-mixed resumed after its step 1
    assert os.path.exists(os.path.join(run, "distill-sft", "samples.json"))
    assert not os.path.exists(os.path.join(run, "distill-on-policy", "results.json"))
    calls = []
    resumed, resumed_rows = _run(setup, run, calls=calls)
    assert calls == [("RLState", 2, 64)]  # distill-on-policy resumed after its step 1; nothing else ran
    _same(full, resumed)
    assert resumed_rows == rows and read_results(run) == rows


@pytest.mark.slow
def test_experiment_smoke_writes_the_table_and_reruns_to_it(tmp_path):
    """`python -m experiments.r1_pipeline --smoke`; run again in the same directory it redoes nothing."""
    from experiments import r1_pipeline as ex

    cfg = dict(smoke=True, run_dir=str(tmp_path / "r1"), progress=False)
    res = ex.main(ex.Config(**cfg))
    assert [r["stage"] for r in res["rows"]] == STAGES
    assert read_results(str(tmp_path / "r1")) == res["rows"]
    again = ex.main(ex.Config(**cfg))
    assert again["rows"] == res["rows"]


def test_arithmetic_train_rl_needs_a_teacher_run_exactly_for_on_policy_distill(tmp_path):
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig, train_rl

    sft = tmp_path / "sft"
    sft.mkdir()
    with pytest.raises(ValueError, match="--teacher-run-dir: on_policy_distill distils from a teacher"):
        train_rl(RLArithmeticConfig(algo="on_policy_distill", sft_run_dir=str(sft), run_dir=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="--teacher-run-dir: no directory"):
        train_rl(RLArithmeticConfig(algo="on_policy_distill", sft_run_dir=str(sft), teacher_run_dir=str(tmp_path / "x"),
                                    run_dir=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="--teacher-run-dir: grpo uses no teacher"):
        train_rl(RLArithmeticConfig(algo="grpo", sft_run_dir=str(sft), teacher_run_dir=str(sft),
                                    run_dir=str(tmp_path / "a")))
    assert not os.path.exists(tmp_path / "a")  # refused before anything was written


@pytest.mark.slow
def test_arithmetic_train_rl_distils_on_policy_from_a_teacher_run(tmp_path):
    """`python -m experiments.rl_arithmetic --algo on_policy_distill --teacher-run-dir <SFT run> --smoke`: the
    student is the smoke SFT run, the teacher another SFT run of a larger model (its own preset)."""
    from rljax.recipes.arithmetic_runs import RLArithmeticConfig, SFTArithmeticConfig, train_rl, train_sft

    teacher = str(tmp_path / "teacher")
    train_sft(SFTArithmeticConfig(smoke=True, preset="tiny", steps=20, run_dir=teacher, progress=False,
                                  evaluate=False))
    res = train_rl(RLArithmeticConfig(algo="on_policy_distill", smoke=True, sft_run_dir=str(tmp_path / "student"),
                                      teacher_run_dir=teacher, run_dir=str(tmp_path / "rl"), progress=False))
    lines = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    kl = [x["rl/teacher_kl_per_sequence"] for x in lines if "rl/teacher_kl_per_sequence" in x]
    assert len(kl) == 3 and all(np.isfinite(kl)) and res["accuracy_rl"] is not None


def test_hf_mode_refuses_too_few_problems_naming_the_counts(tmp_path):
    """--model with a data file smaller than the sets it must fill: an error naming the file and the sum."""
    from experiments import r1_pipeline as ex

    cfg = ex.Config(model="fixture", cold_start=4, reasoning=4, general=4, n_test=2, progress=False)
    with pytest.raises(ValueError, match=r"gsm8k_tiny.jsonl has 8 problems; --cold-start 4 \+ --reasoning 4 \+ "
                                         r"--general 4 \+ --n-test 2 = 14 are needed"):
        ex.setup(cfg, str(tmp_path))


@pytest.mark.slow
def test_experiment_runs_on_an_hf_checkpoint_with_gsm8k_rows(tmp_path):
    """`python -m experiments.r1_pipeline --smoke --model fixture`: every stage on the HF fixture (a random Qwen2
    with the tokenizer fixture) and the GSM8K fixture, prompts through the chat template; a rerun redoes nothing."""
    from experiments import r1_pipeline as ex

    run = str(tmp_path / "r1hf")
    res = ex.main(ex.Config(smoke=True, model="fixture", run_dir=run, progress=False))
    assert [r["stage"] for r in res["rows"]] == STAGES and read_results(run) == res["rows"]
    assert json.load(open(os.path.join(run, "cold-start", "stage.json")))["task"] == "math-think"
    samples = json.load(open(os.path.join(run, "rejection-sft", "samples.json")))
    assert samples["stats"]["samples"] == 8 * 2 and samples["stats"]["prompts"] == 8  # rejection_prompts x samples
    assert res["rows"][3]["stage"] == "reward-model" and 0 <= res["rows"][3]["rm_pairwise_accuracy"] <= 1
    again = ex.main(ex.Config(smoke=True, model="fixture", run_dir=run, progress=False))
    assert again["rows"] == res["rows"]


@pytest.mark.slow  # 60-150 s: every stage of the HF smoke in three processes at once
def test_experiment_on_two_processes_equals_one_process_on_the_same_mesh(tmp_path):
    """`python -m experiments.r1_pipeline --smoke --model fixture --mesh-data 2 --mesh-fsdp 2` as two processes (2
    simulated CPU devices each, connected through the RLJAX_* variables) and as one process with 4 devices: one run
    directory (process 0's name), the same stage table (strings and counts exactly, numbers up to float rounding)
    in results.json, and the table printed by process 0 alone."""
    from test_multihost import run_study_on_two_processes_and_one
    from test_multiprocess_phases import _close_rows

    smoke = ["experiments.r1_pipeline", "--smoke", "--model", "fixture", "--mesh-data", "2", "--mesh-fsdp", "2",
             "--no-progress", "--no-tensorboard"]
    multi, single = run_study_on_two_processes_and_one(tmp_path, smoke, timeout=600)
    rows = {name: json.loads((d / "results.json").read_text())["rows"] for name, d in (("m", multi), ("s", single))}
    assert [r["stage"] for r in rows["s"]] == STAGES
    _close_rows(rows["m"], rows["s"], "r1_pipeline")
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("proc0", "proc1", "single")}
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in logs["proc0"] and "| stage |" in logs["proc0"]
    assert "r1_pipeline: task" not in logs["proc1"] and "| stage |" not in logs["proc1"]
