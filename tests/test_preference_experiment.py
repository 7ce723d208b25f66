"""The preference experiment's --smoke setting runs and reports consistent numbers (slow: `make
test-slow`); its label flips."""
import numpy as np
import pytest


def test_noisy_pairs_flip_exactly_the_requested_fraction():
    from experiments.preference_arithmetic import noisy_pairs
    from rljax.data.arithmetic import make_split

    problems = make_split(400, 0, levels=(1, 2), seed=0)[0]
    clean, noisy = noisy_pairs(problems, 0.0, seed=3), noisy_pairs(problems, 0.2, seed=3)
    assert len(clean) == len(noisy) and all(r["gold_margin"] > 0 for r in clean)
    swapped = [c["chosen"] != n["chosen"] for c, n in zip(clean, noisy)]
    assert sum(swapped) == round(0.2 * len(clean))


@pytest.mark.slow  # SFT, offline and online DPO runs, ~80 s on 2 cores
def test_preference_smoke(tmp_path):
    from experiments import preference_arithmetic as pa

    res = pa.main(pa.Config(smoke=True, algo="robust_dpo,online_dpo", flips=(0.0, 0.25),
                            sft_run_dir=str(tmp_path / "sft"), run_dir=str(tmp_path / "pref"), progress=False))
    runs = res["runs"]
    assert [(r["algo"], r["flip"]) for r in runs] == [("robust_dpo", 0.0), ("robust_dpo", 0.25), ("online_dpo", 0.0)]
    n, k = res["config"]["eval_problems"], res["config"]["eval_samples"]
    for r in runs + [res["sft"]]:
        # counts of right answers over the held-out problems (greedy) and their samples
        for value, total in ((r["greedy"], n), (r["sampled"], n * k)):
            assert 0 <= round(value * total) <= total and abs(value * total - round(value * total)) < 1e-6
        # gold = right answer + 0.5 * step fraction - length penalty on the same samples: at most sampled + 0.5
        assert np.isfinite(r["gold"]) and r["gold"] <= r["sampled"] + 0.5 + 1e-6
    # the flip rate of robust DPO follows the label noise it is told about
    assert pa.method_config("robust_dpo", 0.25, None).flip_rate == 0.25
    assert runs[0]["steps"] == max(res["config"]["epochs"] * runs[0]["rows"] // res["config"]["batch"], 1)
    assert len(runs[2]["rounds"]) == 2 and all(s["pairs"] >= 1 for s in runs[2]["rounds"])
