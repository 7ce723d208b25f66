"""experiments/oreo_arithmetic.py: its smoke runs every part and reports numbers that agree with
the data it wrote (slow: `make test-slow`); the pairing of right and wrong samples for DPO."""
import json
import os

import pytest

from experiments import oreo_arithmetic
from rljax.oreo_training import load_trajectories


def test_right_wrong_pairs_pair_in_order_per_problem():
    rows = [{"problem": p, "prompt": f"q{p}", "completion": c, "reward": r}  # "": a sample that stopped at once
            for p, c, r in [(0, "a", 1), (0, "", 0), (0, "b", 0), (0, "c", 1), (0, "d", 0), (0, "e", 0), (1, "x", 1),
                            (2, "y", 0)]]
    assert oreo_arithmetic.right_wrong_pairs(rows) == [{"prompt": "q0", "chosen": "a", "rejected": "b"},
                                                       {"prompt": "q0", "chosen": "c", "rejected": "d"}]


def _is_count(fraction: float, n: int) -> bool:
    """fraction is k/n for an integer 0 <= k <= n."""
    return 0 <= round(fraction * n) <= n and abs(fraction * n - round(fraction * n)) < 1e-6


@pytest.mark.slow  # every part of the experiment, ~2 min on 2 cores
def test_oreo_arithmetic_smoke(tmp_path):
    run_dir = str(tmp_path / "run")
    res = oreo_arithmetic.main(oreo_arithmetic.Config(smoke=True, run_dir=run_dir, sft_run_dir=str(tmp_path / "sft"),
                                                      progress=False))
    cfg = res["config"]
    rows = load_trajectories(os.path.join(run_dir, "data"))
    # the collected data plus one reference solution per problem (the smoke's with_references)
    assert res["compare"]["trajectories"] == len(rows) + cfg["problems"]
    right = (sum(r["reward"] for r in rows) + cfg["problems"]) / (len(rows) + cfg["problems"])
    assert abs(res["compare"]["right_fraction"] - right) < 1e-9
    assert set(res["compare"]["methods"]) == {"rejection sampling SFT", "DPO", "KTO", "OREO"}
    # accuracies are counts of right answers over the held-out problems (and samples), and the SFT
    # policy every method starts from is the same one the iterate part starts from
    n, k = cfg["eval_problems"], cfg["eval_samples"]
    for m in list(res["compare"]["methods"].values()) + [res["sft"]]:
        assert _is_count(m["greedy"], n) and _is_count(m["sampled"], n * k)
    assert res["iterate"]["OREO"][0] == res["iterate"]["rejection sampling"][0] == res["sft"]["greedy"]
    assert _is_count(res["search"]["greedy"], n)
    assert all(_is_count(b["search"]["accuracy"], n) for b in res["search"]["beams"].values())
    beams = res["search"]["beams"]
    assert set(map(int, beams)) == set(cfg["beams"])
    # one beam samples one step per round: at most max_new_tokens per problem; B beams sample more
    assert 0 < beams[1]["search"]["tokens_per_problem"] <= cfg["max_new_tokens"]
    assert beams[2]["search"]["tokens_per_problem"] > beams[1]["search"]["tokens_per_problem"]
    assert len(res["iterate"]["OREO"]) == len(res["iterate"]["rejection sampling"]) == cfg["iterate_rounds"] + 1
    assert json.load(open(os.path.join(run_dir, "results.json")))["sft"] == res["sft"]
