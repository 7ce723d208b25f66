"""--task in the experiments and the shared SFT / RL runs (rljax.recipes.arithmetic_runs): arithmetic keeps its
problems and rewards, an old run directory without a `task` field resumes as arithmetic, a study on an SFT run
of another task or a task without steps where steps are needed is an error naming both, default run
directories carry no ":", and each experiment's --smoke run on countdown reports numbers that agree with
the task's own checks applied to what it generated (slow tier)."""
import collections
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rljax import tasks
from rljax.cli import ConfigMismatchError, save_config
from rljax.data.arithmetic import make_split
from rljax.recipes.arithmetic_runs import (RLArithmeticConfig, SFTArithmeticConfig, load_sft, read_sft_config,
                                           rule_reward, sft_split, train_rl)
from rljax.rewards import arithmetic_answer_reward, arithmetic_format_reward, arithmetic_step_reward, weighted_sum
from rljax.tasks import ARITHMETIC, COUNTDOWN, SORTING, Task
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


# ----------------------------------------------------------------------------- arithmetic unchanged
def test_arithmetic_split_and_rule_reward_are_the_old_ones():
    cfg = SFTArithmeticConfig(levels=(1, 2), n_train=60, n_test=12, seed=3)
    task, train, test = sft_split(cfg)
    assert task is ARITHMETIC and (train, test) == make_split(60, 12, levels=(1, 2), seed=3)
    rng = np.random.default_rng(0)
    completions = [ARITHMETIC.candidate(p, rng, ARITHMETIC.kinds[i % 5]) for i, p in enumerate(train)]
    completions[:3] = ["", "answer:", "3+4=7;answer:7"]  # malformed, partial, an unrelated chain
    prompts = [p.prompt for p in train]
    for step in (0.0, 0.3):
        old = weighted_sum((1.0, arithmetic_answer_reward), (0.1, arithmetic_format_reward),
                           *([(step, arithmetic_step_reward)] if step else []))
        new = rule_reward(ARITHMETIC, step)(prompts, completions, problems=train)
        np.testing.assert_array_equal(new, old(prompts, completions, problems=train))
    assert len(set(new.tolist())) > 3  # right, wrong, partly right: the comparison is not all one value


def test_run_dir_without_task_field_resumes_as_arithmetic(tmp_path):
    """A config.json saved before `task` existed: the same run today (task "arithmetic") resumes, another
    task is a mismatch naming the field, and the SFT config read back from it is an arithmetic run."""
    cfg = SFTArithmeticConfig(run_dir=str(tmp_path), steps=7)
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k != "task"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    save_config(cfg, str(tmp_path))  # no error, and the file is kept as first written
    assert "task" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ConfigMismatchError, match="task: 'arithmetic' -> 'countdown'"):
        save_config(dataclasses.replace(cfg, task="countdown"), str(tmp_path))
    assert read_sft_config(str(tmp_path)).task == "arithmetic" and read_sft_config(str(tmp_path)).steps == 7
    rl = RLArithmeticConfig(sft_run_dir=str(tmp_path))
    rl_old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(rl))).items() if k != "task"}
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "config.json").write_text(json.dumps(rl_old))
    save_config(rl, str(tmp_path / "rl"))


def test_study_on_an_sft_run_of_another_task_names_both(tmp_path):
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    old = dataclasses.asdict(SFTArithmeticConfig(run_dir=str(sft_dir)))
    del old["task"]  # an old arithmetic run
    (sft_dir / "config.json").write_text(json.dumps(old, default=list))
    with pytest.raises(ValueError, match=r"--task 'countdown', but the SFT run in .* was trained on task "
                                         r"'arithmetic': pass --task arithmetic"):
        load_sft(str(sft_dir), TOK, task="countdown")
    from experiments import oreo_arithmetic, preference_arithmetic, reward_models

    for study, cfg in ((reward_models, reward_models.Config(task="countdown", parts=("bt",))),
                       (oreo_arithmetic, oreo_arithmetic.Config(task="countdown", parts=("compare",))),
                       (preference_arithmetic, preference_arithmetic.Config(task="countdown"))):
        cfg.sft_run_dir, cfg.run_root = str(sft_dir), str(tmp_path / "runs")
        with pytest.raises(ValueError, match="trained on task 'arithmetic'"):
            study.main(cfg)
    with pytest.raises(ValueError, match="trained on task 'arithmetic'"):
        train_rl(RLArithmeticConfig(task="countdown", sft_run_dir=str(sft_dir), run_root=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made


@dataclasses.dataclass(frozen=True)
class Word:
    prompt: str
    completion: str
    level: int


FLAT = Task(name="flat", generate=lambda rng, level: Word(f"echo {rng.randint(0, 999)}=", "", level),
            key=lambda p: p.prompt, extract=lambda c: c.strip(), check=lambda p, c: c.strip() == p.prompt[5:-1],
            gold_score=lambda p, c: 0.0, corrupt=lambda p, rng, kind: "x", corruptions=("wrong_answer",),
            reference=lambda p: p.prompt[5:-1], separator=None)


def test_a_task_without_steps_where_steps_are_needed_names_the_task_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "flat", FLAT)
    from experiments import oreo_arithmetic, reward_models

    where = dict(sft_run_dir=str(tmp_path / "none"), run_root=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"--parts bon \(its process reward model\) needs a task with steps, and "
                                         r"task 'flat' has none"):
        reward_models.main(reward_models.Config(task="flat", parts=("bon",), **where))
    with pytest.raises(ValueError, match=r"--level step .* task 'flat' has none"):
        oreo_arithmetic.main(oreo_arithmetic.Config(task="flat", parts=("compare",), **where))
    with pytest.raises(ValueError, match=r"--parts search .* task 'flat' has none"):
        oreo_arithmetic.main(oreo_arithmetic.Config(task="flat", parts=("search",), level="token", **where))
    with pytest.raises(ValueError, match=r"--step-reward 0.5 needs a task with steps, and task 'flat' has none"):
        train_rl(RLArithmeticConfig(task="flat", step_reward=0.5, **where))
    with pytest.raises(ValueError, match="--step-reward 0.2 .* 'flat'"):
        rule_reward(FLAT, 0.2)
    # token-level OREO needs no steps: it gets as far as the missing SFT run
    with pytest.raises(FileNotFoundError, match="--sft-run-dir"):
        oreo_arithmetic.main(oreo_arithmetic.Config(task="flat", parts=("compare",), level="token", **where))
    with pytest.raises(ValueError, match="unknown task 'countdwn'; known tasks: arithmetic, countdown"):
        train_rl(RLArithmeticConfig(task="countdwn", **where))
    assert not (tmp_path / "runs").exists()


def test_grpo_gain_plan_names_the_task():
    from experiments import grpo_gain

    line = grpo_gain.plan(grpo_gain.Config(task="countdown"))
    assert "SFT of the tiny model on countdown" in line and "time not measured for the tiny preset on countdown" \
        in line
    assert grpo_gain.estimate_seconds(grpo_gain.Config()) is not None  # arithmetic: measured as before
    assert grpo_gain.changed_settings(grpo_gain.Config(task="sorting")) == {"task": "sorting"}


def test_noisy_pairs_follow_the_task_gold_score():
    from experiments.preference_arithmetic import noisy_pairs

    problems = SORTING.split(200, 0, levels=(1, 2), seed=0)[0]
    by_prompt = {p.prompt: p for p in problems}
    pairs = noisy_pairs(problems, 0.0, seed=1, task=SORTING)
    assert len(pairs) > 100
    for r in pairs:
        p = by_prompt[r["prompt"]]
        margin = SORTING.gold_score(p, r["chosen"]) - SORTING.gold_score(p, r["rejected"])
        assert margin > 0 and margin == pytest.approx(r["gold_margin"])


def test_sft_reports_the_task_check_of_its_greedy_outputs(tmp_path, monkeypatch):
    """train_sft on sorting with the decoder replaced by known texts (a right answer for every other
    problem, a corruption for the rest): both accuracies are the fraction sorting's check accepts, here
    2 of 4, which the arithmetic check would score 0; the run directory is sft_sorting-<time>."""
    import rljax.eval
    from experiments import sft_arithmetic

    test = SORTING.split(256, 4, levels=(1,), seed=0)[1]  # the smoke's sizes: the same test problems
    outputs = {p.prompt: (SORTING.reference(p) if i % 2 == 0 else
                          SORTING.candidate(p, np.random.default_rng(i), "wrong_step")) for i, p in enumerate(test)}

    def complete(params, model, tok, prompts, **kw):
        return [outputs[q] for q in prompts for _ in range(kw.get("n", 1))]

    monkeypatch.setattr(rljax.eval, "complete", complete)
    res = sft_arithmetic.main(sft_arithmetic.Config(task="sorting", smoke=True, steps=1, n_test=4, warmup_steps=0,
                                                    run_root=str(tmp_path), progress=False))
    (name,) = os.listdir(tmp_path)
    assert name.startswith("sft_sorting-") and res["run_dir"] == str(tmp_path / name)
    assert res["accuracy_before"] == res["accuracy_after"] == 0.5
    assert [e["output"] for e in res["examples"]] == [outputs[p.prompt] for p in test]
    assert json.loads((tmp_path / name / "config.json").read_text())["task"] == "sorting"


def test_default_run_dir_of_a_reasoning_gym_task_has_no_colon(tmp_path):
    pytest.importorskip("reasoning_gym")
    from experiments import sft_arithmetic

    res = sft_arithmetic.main(sft_arithmetic.Config(task="rg:leg_counting", preset="tiny", steps=1, batch_size=2,
                                                    n_train=4, n_test=2, evaluate=False, warmup_steps=0,
                                                    run_root=str(tmp_path), progress=False))
    (name,) = os.listdir(tmp_path)
    assert name.startswith("sft_rg-leg_counting-") and ":" not in name and res["run_dir"].endswith(name)


# ----------------------------------------------------------------------------- the smokes on countdown (slow)
@pytest.fixture(scope="module")
def countdown_sft(tmp_path_factory):
    """One SFT --smoke run on countdown (5 held-out problems: every one is among the 5 examples it saves),
    in a default run directory; the studies below start from it."""
    from experiments import sft_arithmetic

    root = tmp_path_factory.mktemp("countdown")
    res = sft_arithmetic.main(sft_arithmetic.Config(task="countdown", smoke=True, n_test=5, run_root=str(root),
                                                    progress=False))
    return root, res


def _held_out(run_dir: str):
    sft_cfg = read_sft_config(run_dir)
    task, _, test = sft_split(sft_cfg)
    return sft_cfg, task, test


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_sft_and_rl_smoke_on_countdown(countdown_sft):
    from experiments import rl_arithmetic
    from rljax.eval import complete
    from rljax.metrics import read_metrics

    root, sft = countdown_sft
    assert os.path.basename(sft["run_dir"]).startswith("sft_countdown-")
    sft_cfg, task, test = _held_out(sft["run_dir"])
    assert task is COUNTDOWN and sft_cfg.task == "countdown" and len(test) == 5
    # the reported accuracy is countdown's check of the saved greedy outputs, which the final params reproduce
    outs = [e["output"] for e in sft["examples"]]
    assert [e["prompt"] for e in sft["examples"]] == [p.prompt for p in test]
    assert sft["accuracy_after"] == pytest.approx(np.mean([COUNTDOWN.check(p, o) for p, o in zip(test, outs)]))
    model, params, _ = load_sft(sft["run_dir"], TOK, task="countdown")
    assert complete(params, model, TOK, [p.prompt for p in test], max_new_tokens=sft_cfg.max_new_tokens) == outs

    res = rl_arithmetic.main(rl_arithmetic.Config(task="countdown", smoke=True, sft_run_dir=sft["run_dir"],
                                                  run_root=str(root), progress=False))
    assert os.path.basename(res["run_dir"]).startswith("rl_countdown-grpo-")
    assert res["accuracy_sft"] == sft["accuracy_after"]  # the same params, test problems and decode
    rows = [r for r in read_metrics(res["run_dir"]) if "rl/reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # reward = countdown's answer check + 0.1 * its format check; accuracy is the answer term
    assert all(0.0 <= r["rl/reward_mean"] - r["rl/accuracy"] <= 0.1 + 1e-6 for r in rows)
    with pytest.raises(ValueError, match="--task 'sorting', but the SFT run"):
        rl_arithmetic.main(rl_arithmetic.Config(task="sorting", smoke=True, sft_run_dir=sft["run_dir"],
                                                run_root=str(root / "other"), progress=False))


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_reward_models_best_of_n_smoke_on_countdown(countdown_sft):
    """Part bon on countdown: the reported sample accuracy, pass@N and majority vote equal countdown's check
    and a vote over its extracted answer expressions, recomputed here from the same samples."""
    from experiments import reward_models

    root, sft = countdown_sft
    cfg = reward_models.Config(task="countdown", smoke=True, parts=("bon",), sft_run_dir=sft["run_dir"],
                               run_root=str(root), progress=False)
    res = reward_models.main(cfg)
    assert os.path.basename(res["run_dir"]).startswith("reward_models-countdown-")
    _, _, test = _held_out(sft["run_dir"])
    model, params, _ = load_sft(sft["run_dir"], TOK)
    bp, n_max = test[:cfg.bon_problems], max(cfg.bon_n)
    cands = reward_models._samples(params, model, TOK, bp, n_max, cfg,
                                   jax.random.fold_in(jax.random.key(cfg.seed + 10), 3))
    right = np.array([[COUNTDOWN.check(p, c) for c in cs] for p, cs in zip(bp, cands)])
    bon = res["bon"]
    assert bon["sample_accuracy"] == pytest.approx(right.mean())
    table = {int(k): v for k, v in bon["table"].items()}
    assert table[1]["pass@n"] == pytest.approx(right.mean()) and len(set(table[1].values())) == 1
    assert table[4]["pass@n"] == pytest.approx(right.any(axis=1).mean())

    def vote(p, cs):
        answers = [COUNTDOWN.extract(c) for c in cs]
        counts = collections.Counter(a for a in answers if a is not None)
        if not counts:
            return COUNTDOWN.check(p, cs[0])
        best = max(counts.values())
        return COUNTDOWN.check(p, cs[next(i for i, a in enumerate(answers) if counts.get(a) == best)])

    assert table[4]["majority"] == pytest.approx(np.mean([vote(p, cs) for p, cs in zip(bp, cands)]))
    assert bon["verifier_right"] >= 0 and bon["prm_steps"] >= bon["prm_solutions"] >= 0


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_oreo_smoke_on_countdown(countdown_sft, tmp_path):
    """The offline data OREO and rejection sampling share: every collected reward is countdown's check of the
    completion, and its steps are the completion cut after ";"; search and accuracies are counts."""
    from experiments import oreo_arithmetic
    from rljax.oreo_training import load_trajectories

    _, sft = countdown_sft
    run_dir = str(tmp_path / "oreo")
    res = oreo_arithmetic.main(oreo_arithmetic.Config(task="countdown", smoke=True, sft_run_dir=sft["run_dir"],
                                                      run_dir=run_dir, progress=False))
    cfg = res["config"]
    sft_cfg = read_sft_config(sft["run_dir"])
    train = sft_split(sft_cfg)[1][:cfg["problems"]]
    rows = load_trajectories(os.path.join(run_dir, "data"))
    assert rows and {r["prompt"] for r in rows} <= {p.prompt for p in train}
    for r in rows:
        assert r["reward"] == float(COUNTDOWN.check(train[r["problem"]], r["completion"]))
        assert train[r["problem"]].prompt == r["prompt"] and "".join(r["steps"]) == r["completion"]
        assert all(s.endswith(";") for s in r["steps"][:-1])
    right = (sum(r["reward"] for r in rows) + cfg["problems"]) / (len(rows) + cfg["problems"])
    assert res["compare"]["right_fraction"] == pytest.approx(right)
    n = cfg["eval_problems"]
    for b in res["search"]["beams"].values():
        assert round(b["search"]["accuracy"] * n) == pytest.approx(b["search"]["accuracy"] * n)
    assert res["iterate"]["OREO"][0] == res["sft"]["greedy"]
    # the search part's greedy baseline is OREO's policy decoded greedily and checked by countdown: the same number
    # part compare reports for it
    assert res["search"]["greedy"] == res["compare"]["methods"]["OREO"]["greedy"]


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_preference_smoke_on_countdown(countdown_sft, tmp_path):
    """DPO on countdown's synthetic pairs: the SFT row's gold is countdown's gold score of the same samples,
    recomputed here."""
    from experiments import preference_arithmetic as pa
    from rljax.eval import complete

    _, sft = countdown_sft
    res = pa.main(pa.Config(task="countdown", smoke=True, algo="dpo", sft_run_dir=sft["run_dir"],
                            run_dir=str(tmp_path / "pref"), progress=False))
    cfg = res["config"]
    _, _, test = _held_out(sft["run_dir"])
    held = test[:cfg["eval_problems"]]
    model, params, _ = load_sft(sft["run_dir"], TOK)
    texts = complete(params, model, TOK, [p.prompt for p in held], max_new_tokens=cfg["max_new_tokens"],
                     n=cfg["eval_samples"], temperature=1.0, key=jax.random.key(cfg["seed"] + 5))
    probs = [p for p in held for _ in range(cfg["eval_samples"])]
    assert res["sft"]["gold"] == pytest.approx(np.mean([COUNTDOWN.gold_score(p, t) for p, t in zip(probs, texts)]))
    assert res["sft"]["sampled"] == pytest.approx(np.mean([COUNTDOWN.check(p, t) for p, t in zip(probs, texts)]))
    assert [r["algo"] for r in res["runs"]] == ["dpo"] and res["runs"][0]["rows"] >= 1
