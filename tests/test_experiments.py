"""Every experiment's --smoke setting runs and reports consistent numbers."""
import json
import os

import pytest

from experiments import sampling_tour


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_sampling_tour_smoke(tmp_path):
    cfg = sampling_tour.Config(smoke=True, run_root=str(tmp_path))
    res = sampling_tour.main(cfg)
    assert res["logprob_max_abs_diff"] < 1e-4
    assert res["greedy_tok_per_s"] > 0 and len(res["samples"]) == len(sampling_tour.PROMPTS)
    (run,) = os.listdir(tmp_path)
    saved = json.load(open(tmp_path / run / "results.json"))
    assert saved["params"] == res["params"]


@pytest.fixture(scope="module")
def rl_smoke(tmp_path_factory):
    """One rl_arithmetic --smoke run whose SFT run directory does not exist yet, so it trains the SFT
    smoke run there first (`load_sft(run_if_missing=True)`, the same `train_sft` as
    experiments.sft_arithmetic --smoke), then RL. Both tests below check it: SFT is trained once per
    module, not once per test (each run compiles its own train step and init)."""
    from experiments import rl_arithmetic

    tmp = tmp_path_factory.mktemp("rl_arithmetic")
    cfg = rl_arithmetic.Config(smoke=True, sft_run_dir=str(tmp / "sft"), run_root=str(tmp), progress=False,
                               algo="rloo")
    return tmp, rl_arithmetic.main(cfg)


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_sft_arithmetic_smoke(rl_smoke):
    from experiments import sft_arithmetic
    from rljax.metrics import read_metrics

    tmp, _ = rl_smoke
    sft_dir = str(tmp / "sft")
    with open(os.path.join(sft_dir, "results.json")) as f:
        trained = json.load(f)  # the SFT smoke run as the RL smoke trained it
    assert 0.0 <= trained["accuracy_before"] <= 1.0 and 0.0 <= trained["accuracy_after"] <= 1.0
    losses = [r["sft/loss"] for r in read_metrics(sft_dir) if "sft/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]  # logged at steps 4, 8, 12; training reduces the loss
    assert os.path.exists(trained["plot"])
    # the experiment's entry point in the finished run's directory: resumed at its last step, nothing
    # trained, and the same held-out accuracies (the same initial and final params, the same test set)
    res = sft_arithmetic.main(sft_arithmetic.Config(smoke=True, run_dir=sft_dir, progress=False))
    assert (res["accuracy_before"], res["accuracy_after"]) == (trained["accuracy_before"], trained["accuracy_after"])
    assert [r["sft/loss"] for r in read_metrics(sft_dir) if "sft/loss" in r] == losses
    assert os.path.exists(res["plot"]) and json.load(open(os.path.join(res["run_dir"], "results.json")))


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_rl_arithmetic_smoke_runs_sft_first_then_rl(rl_smoke):
    from rljax.metrics import read_metrics

    tmp, res = rl_smoke
    assert os.path.exists(tmp / "sft" / "results.json")  # SFT ran because its checkpoint was missing
    rows = [r for r in read_metrics(res["run_dir"]) if "rl/reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["rl/reward_mean"] <= 1.1 for r in rows)
    assert 0.0 <= res["accuracy_rl"] <= 1.0
    # accuracy is the answer term of the reward (reward = accuracy + 0.1 * format)
    assert all(0.0 <= r["rl/reward_mean"] - r["rl/accuracy"] <= 0.1 + 1e-6 for r in rows)


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_grpo_gain_smoke_reuses_one_sft_run_across_settings(tmp_path, capsys):
    from experiments import grpo_gain

    run_dir = str(tmp_path / "study")
    # one RL iteration and 2 evaluation samples per problem (the smoke's 2 and 8): the test checks how the
    # study combines its runs and reuses the SFT run, which does not depend on those sizes
    small = dict(smoke=True, run_dir=run_dir, progress=False, iterations=1, eval_samples=2)
    res = grpo_gain.main(grpo_gain.Config(**small))
    out = capsys.readouterr().out
    # what the command tells its user: the plan first, each evaluation announced (the SFT policy once for
    # both seeds), one table at the end (train_rl's own table left out) with the gains and what they mean
    assert out.startswith("grpo_gain --smoke: SFT of the tiny model on arithmetic (12 steps), then GRPO from it "
                          "(1 iteration, seeds 0, 1)")
    assert out.count("evaluating the SFT policy on 16 held-out problems: greedy, then 2 samples each") == 1
    assert out.count("evaluating the GRPO policy on 16 held-out problems") == 2
    assert out.count("| held-out accuracy (16 problems) | greedy |") == 1 and "| value |" not in out
    assert "| gain, points, mean ± std over 2 seeds |" in out and "these accuracies mean nothing" in out
    for kind in ("greedy", "sampled"):
        after, before = res[kind]["accuracy_rl"], res[kind]["accuracy_sft"]
        assert len(after) == 2 and abs(res[kind]["gain_mean"] - (sum(after) / 2 - before)) < 1e-9
        assert abs(res[kind]["gain_std"] - abs(after[0] - after[1]) / 2 ** 0.5) < 1e-9
    ckpt = os.path.join(run_dir, "sft", "checkpoints")
    mtime = os.path.getmtime(ckpt)
    capsys.readouterr()
    again = grpo_gain.main(grpo_gain.Config(**small, lr=3e-5))
    assert "using the finished SFT run" in capsys.readouterr().out and os.path.getmtime(ckpt) == mtime
    assert again["greedy"]["accuracy_sft"] == res["greedy"]["accuracy_sft"]  # the same SFT model and test set
    assert sorted(f for f in os.listdir(run_dir) if f.startswith("results")) == [
        "results-grpo-lr2e-05.json", "results-grpo-lr3e-05.json"]


def test_sampled_exact_match_at_low_temperature_equals_greedy(tmp_path):
    """Sampled accuracy is the mean over n samples per problem; at a temperature near 0
    every sample is the greedy decode, so it equals greedy exact match."""
    import jax

    from rljax.data.arithmetic import make_split
    from rljax.eval import exact_match
    from rljax.models import Model, preset
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = Model(preset("tiny", vocab_size=tok.vocab_size))
    params = jax.jit(model.init)(jax.random.key(3))  # one compile, not op by op
    # the SFT smoke's evaluation shapes (16 problems, 24 new tokens, the same model config): in the slow
    # tier, where that smoke runs first in this module, the greedy decode reuses its compile
    _, test = make_split(64, 16, levels=(1,), seed=0)
    greedy, texts = exact_match(params, model, tok, test, 24)
    cold, cold_texts = exact_match(params, model, tok, test, 24, n=3, temperature=1e-6)
    assert cold == greedy and cold_texts == [t for t in texts for _ in range(3)]
