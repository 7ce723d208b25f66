"""The reward-model experiment's --smoke setting runs and reports consistent numbers (its own file, so
`pytest -n 2 --dist loadfile` can run it beside the other experiments)."""
import numpy as np
import pytest


def test_reward_models_smoke_reports_consistent_best_of_n(tmp_path):
    from experiments import reward_models

    res = reward_models.main(reward_models.Config(smoke=True, sft_run_dir=str(tmp_path / "sft"),
                                                  run_dir=str(tmp_path / "rm"), progress=False, feedback_rl=False))
    table = res["bon"]["table"]
    # one candidate: every selection method picks it, so all equal the sample accuracy
    assert len(set(table[1].values())) == 1
    # pass@N is the ceiling of every selection method
    assert all(v <= table[4]["pass@n"] for v in table[4].values())
    assert 0.0 <= res["bt"]["rows"][0]["pairwise_accuracy"] <= 1.0 and res["bt"]["rows"][0]["pairs"] == 16
    # GRPO against the learned reward model: gold gain = mean of the per-seed gold changes
    rl = res["rl"]
    assert rl["gold_gain_mean"] == pytest.approx(np.mean([a["gold"] - rl["before"]["gold"] for a in rl["after"]]))
    # feedback models: the true mean relevance is the same held-out candidates' for all three
    fb = res["feedback"]
    assert set(fb) == {"clicks_naive", "clicks_ipw", "likes"}
    assert len({round(v["relevance_mean"], 9) for v in fb.values()}) == 1
    # over-optimisation: best-of-1 is the policy itself (d = 0), best-of-n picks the highest proxy score
    bon = res["overopt"]["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 4] and bon[0]["d"] == 0.0
    assert bon[0]["proxy"] <= bon[1]["proxy"] <= bon[2]["proxy"]
    assert [c["iteration"] for c in res["overopt"]["rl"]] == [0, 1, 2]
