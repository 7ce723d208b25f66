"""Pipelines and learned scorers on two processes (2 CPU devices each, one 4-device mesh) against one process
with the same 4 devices: the scorers score each process's own rows, and online DPO, iterative OREO and RLHF,
the RLAIF, adversarial, RLHF and R1 recipes and the one-call task recipes give one process's results rows and
parameters. The worker script and its modes live in test_multiprocess_phases (one script for every run); these
tests are a file of their own so the slow tier's workers share them out."""
import json
import os

import numpy as np
import pytest

from rljax.metrics import read_metrics, read_samples
from test_multiprocess_phases import _close_rows, _run


@pytest.mark.slow  # 14-30 s: five scorers, an evaluation and a reference pass compiled in three processes
def test_two_process_learned_scorers_score_own_rows_like_one_process(tmp_path):
    """A reward model, a likelihood reward with a reference, a PRM, the discriminator reward and a judge,
    all with params on the two processes' 4-device mesh, each called by a process with rows of its own
    (process 0 two rows, process 1 five, as the RL iteration's reward calls): together the scores of one
    process scoring all seven (each scorer runs on its process's own devices, `process_local`); a
    callable returning params that span the processes is refused naming `process_local`. The reward
    model's evaluation and the cached reference log-probs (global rows on every process) equal one
    process's, and both processes name the reference cache by the same digest."""
    res = _run(tmp_path, "scorers")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert single["scores"].keys() == {"rm", "likelihood", "prm", "adversarial", "judge", "callable"}
    for key, want in single["scores"].items():
        assert len(p0["scores"][key]) == 2 and len(p1["scores"][key]) == 5, key
        # the likelihood reward is a difference of two sequence log-prob sums (magnitude ~20 here), each summed in
        # another order on 2 devices than on 4: its rounding is that of the sums (1.9e-6 on an AMD EPYC Zen 5)
        atol = 1e-5 if key == "likelihood" else 1e-6
        np.testing.assert_allclose(p0["scores"][key] + p1["scores"][key], want, rtol=2e-5, atol=atol, err_msg=key)
        assert len(set(np.round(want, 4))) > 2, key  # scores that tell the rows apart
    np.testing.assert_allclose(single["scores"]["callable"], single["scores"]["rm"], rtol=1e-6)
    # each process's scorer on its own 2 devices: fsdp over them, its own process only
    assert p0["local"] == [{"data": 1, "fsdp": 2, "tensor": 1}, 2, [0], [0]]
    assert p1["local"] == [{"data": 1, "fsdp": 2, "tensor": 1}, 2, [1], [1]]
    assert single["local"] == [{"data": 2, "fsdp": 2, "tensor": 1}, 4, [0], [0]]  # one process: as it was
    # the global values, gathered one array at a time: no program made more than the largest array whole
    for p in (p0, p1):
        largest_call, largest_leaf, total, equal = p["process_local"]
        assert equal and 0 < largest_call <= largest_leaf < total / 4, p["process_local"]
    assert single["process_local"][0] == 0 and single["process_local"][3]  # one process: nothing to gather
    assert p0["local_meshes"]["(4, 1, 1)"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert p0["local_meshes"]["(1, 4, 1)"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert "holds 2 of the mesh's devices" in p0["local_meshes"]["(1, 1, 4)"]
    assert single["spanning_callable"] is None
    assert p0["spanning_callable"] == p1["spanning_callable"] and "the params span several processes" in \
        p0["spanning_callable"] and "rljax.distributed.process_local(model, params)" in p0["spanning_callable"]
    assert p0["rm_eval"] == p1["rm_eval"]
    np.testing.assert_allclose(p0["rm_eval"]["pairwise_accuracy"], single["rm_eval"]["pairwise_accuracy"])
    assert p0["reference"] == p1["reference"]
    np.testing.assert_allclose(p0["reference"], single["reference"], rtol=1e-5)
    assert p0["reference_files"] == single["reference_files"] and len(p0["reference_files"]) == 1


@pytest.mark.slow  # 50-90 s: three pipelines' sampling and training compiled in three processes
def test_two_process_online_dpo_iterative_oreo_and_rlhf_equal_one_process(tmp_path):
    """Online DPO scored by a reward model on the mesh, iterative OREO collecting into its run directory,
    and iterative RLHF whose reward model is refreshed and scores each process's own samples, two rounds
    each on two processes: the per-round stats and the parameters of one process with the same mesh."""
    res = _run(tmp_path, "rounds", timeout=400)
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert {**p0, "main": None} == {**p1, "main": None}
    for name in ("dpo", "oreo", "rlhf"):
        multi, one = p0[name], single[name]
        assert multi.keys() == one.keys()
        for k in one:
            if k in ("stats",):
                assert [r.keys() for r in multi[k]] == [r.keys() for r in one[k]], name
                for a, b in zip(multi[k], one[k]):
                    for field in b:
                        np.testing.assert_allclose(a[field], b[field], rtol=1e-5, atol=1e-6, err_msg=f"{name} {field}")
            else:
                np.testing.assert_allclose(multi[k], one[k], rtol=1e-5, err_msg=f"{name} {k}")
    assert p0["dpo"]["step"] == 4 and len(p0["dpo"]["stats"]) == 2
    assert p0["oreo"]["step"] == 4 and p0["rlhf"]["steps"][0] == 2
    run = res["proc0"]["run_dir"]
    assert (run / "oreo" / "round-1" / "data" / "manifest.json").exists()
    assert (run / "dpo" / "round-1" / "pairs.json").exists() and (run / "rlhf" / "round-1" / "lists.json").exists()


@pytest.mark.slow  # 60-110 s: two recipes' stages compiled in three processes
def test_two_process_rlaif_and_adversarial_recipes_equal_one_process(tmp_path):
    """RLAIF (SFT, a judge trained and labelling pairs, a reward model on its labels, RL against it) and
    adversarial RLAIF (SFT, a discriminator and REINFORCE on its reward, two rounds) with every model on
    the two processes' mesh: every stage's results row (evaluations, label statistics, discriminator
    metrics) and the final parameters are one process's."""
    res = _run(tmp_path, "recipes", timeout=500)
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert {**p0, "main": None} == {**p1, "main": None}
    _close_rows(p0["rlaif"], single["rlaif"], "rlaif")
    _close_rows(p0["adversarial"]["rows"], single["adversarial"]["rows"], "adversarial")
    for k in ("policy", "discriminator"):
        np.testing.assert_allclose(p0["adversarial"][k], single["adversarial"][k], rtol=1e-5, err_msg=k)
    assert len(p0["rlaif"]) >= 4 and [r["stage"] for r in p0["adversarial"]["rows"]] == ["sft", "round-0", "round-1"]


@pytest.mark.slow  # 75-140 s: two recipes' stages compiled in three processes
def test_two_process_rlhf_and_r1_recipes_equal_one_process(tmp_path):
    """The RLHF recipe (SFT, a Bradley–Terry reward model, PPO with a value head against it) and R1 (cold-start
    SFT, GRPO, rejection sampling + SFT, a reward model and RL on the mixed reward, then a student: SFT on the
    teacher's samples and on-policy distillation) with every model on the two processes' mesh: every stage's
    results row and the final parameters are one process's."""
    res = _run(tmp_path, "recipes2", timeout=560)
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert {**p0, "main": None} == {**p1, "main": None}
    for name, final in (("rlhf", "policy"), ("r1", "student")):
        _close_rows(p0[name]["rows"], single[name]["rows"], name)
        np.testing.assert_allclose(p0[name][final], single[name][final], rtol=1e-5, err_msg=name)
    assert [r["stage"] for r in p0["rlhf"]["rows"]] == ["sft", "reward-model", "ppo"]
    assert len(p0["r1"]["rows"]) == 8 and "kl_to_teacher" in p0["r1"]["rows"][-1]
    assert [r["kept"] for r in p0["r1"]["rows"] if "kept" in r] == [8, 8]  # every problem gives its one row


@pytest.mark.slow  # 17-35 s: three recipes' steps compiled in three processes
def test_two_process_task_recipes_equal_one_process(tmp_path):
    """`sft`, `dpo`, `reward_model` and `grpo` (a reward function of which is that reward model) of
    `rljax.recipes` with mesh= on two processes: the per-step metrics, the
    evaluations on eval_data (GRPO's 3 held-out prompts in batches of 2, 2 samples each, each filled to the mesh's rows) and
    the parameters of one process with the same mesh; GRPO's reward function sees each process's own samples
    (and every held-out prompt's greedy completion), a term taking completion_ids each of its own samples' token ids
    (-len(ids) averaging to -completion_length) and logging each one's length through log_metric and log_extra
    (gathered from both processes: their mean the completion length, each sample record's its own); config.json
    is written once (process 0), metrics.jsonl holds every step once, the samples of each iteration one file. Without run_dir (a temporary directory
    would differ per process) or without a mesh, a call is refused before training."""
    res = _run(tmp_path, "tasks")
    p0, p1, single = (res[n]["out"] for n in ("proc0", "proc1", "single"))
    assert p0["tasks"] == p1["tasks"]
    for name, one in single["tasks"].items():
        multi = p0["tasks"][name]
        _close_rows(multi["history"], one["history"], name)
        _close_rows(multi["eval"], one["eval"], name + " eval")
        assert [h["step"] for h in multi["history"]] == [1, 2] and [h["step"] for h in multi["eval"]] == [2]
        np.testing.assert_allclose(multi["params"], one["params"], rtol=1e-5, err_msg=name)
        if name == "grpo":
            for row in multi["history"] + multi["eval"] + one["history"] + one["eval"]:
                assert row["reward_tokens_mean"] == pytest.approx(-row["completion_length"])
                assert row["ids_logged"] == pytest.approx(row["completion_length"])  # what the term logged
                assert "reward_reward_model_mean" in row
        run = res["proc0"]["run_dir"] / name
        assert json.loads((run / "config.json").read_text())["task"] == name
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 2]  # the steps, then the final evaluation
    assert sorted(os.listdir(res["proc0"]["run_dir"] / "grpo" / "samples")) == ["iteration-000001.jsonl",
                                                                               "iteration-000002.jsonl"]
    assert read_samples(res["proc0"]["run_dir"] / "grpo", 2) == read_samples(res["single"]["run_dir"] / "grpo", 2)
    assert all(r["extra"] == {"ids": r["completion_tokens"]} for r in read_samples(res["proc0"]["run_dir"] / "grpo", 2))
    # 2 prompts x 2 samples a step (each process its half), then the held-out 2 + 1 prompts' 2 samples each
    # (eval_samples=2) on every process
    assert p0["scored"] == p1["scored"] == [2, 2, 4, 2] and single["scored"] == [4, 4, 4, 2]
    assert "reward_best_mean" in p0["tasks"]["grpo"]["eval"][0]
    assert single["refused"] == {"run_dir": None, "mesh": None}
    assert "2 processes are running: pass run_dir= on a file system they all share" in p0["refused"]["run_dir"]
    assert "2 processes are running: pass mesh=make_mesh(...)" in p0["refused"]["mesh"]
