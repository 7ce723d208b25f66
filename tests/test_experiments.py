"""Every experiment's --smoke setting runs and reports consistent numbers."""
import json
import os

from experiments import quickstart


def test_quickstart_smoke(tmp_path):
    cfg = quickstart.Config(smoke=True, run_root=str(tmp_path))
    res = quickstart.main(cfg)
    assert res["logprob_max_abs_diff"] < 1e-4
    assert res["greedy_tok_per_s"] > 0 and len(res["samples"]) == len(quickstart.PROMPTS)
    (run,) = os.listdir(tmp_path)
    saved = json.load(open(tmp_path / run / "results.json"))
    assert saved["params"] == res["params"]
