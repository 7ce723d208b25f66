"""experiments/grpo_math.py: SFT -> GRPO on a Hugging Face checkpoint and GSM8K-style data.
The smoke runs on the fixtures (a random Qwen2-architecture model with the tokenizer
fixture's vocabulary); its reported rewards are recomputed from the logged samples, the
exported policy loads back bit for bit with the tokenizer's three stop ids, and SFT and RL
see the same chat-templated prompt tokens."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from experiments import fixtures, grpo_math
from rljax.checkpoint import digest_params
from rljax.data.adapters import DataError
from rljax.data.collate import collate_prompt_completion
from rljax.metrics import read_metrics, read_samples
from test_multihost import _free_port, launch_module, run_study_on_two_processes_and_one
from rljax.models.hf import load_pretrained, read_hf_config
from rljax.rewards.math_answers import math_answer_reward, think_answer_format_reward
from rljax.tokenizer import HFTokenizer


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("grpo_math") / "run")
    return grpo_math.main(grpo_math.Config(smoke=True, run_dir=run_dir, progress=False))


@pytest.mark.slow  # the experiment's whole --smoke run; .ci/run runs the slow tier
def test_smoke_rewards_equal_the_math_reward_recomputed_on_the_logged_samples(smoke):
    rows = [r for r in read_metrics(smoke["run_dir"]) if "rl/reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    problems = {p.answer for p in grpo_math.read_problems(fixtures.SMOKE_DATA, "gsm8k")}
    for r in rows:
        logged = read_samples(smoke["run_dir"], r["step"])
        assert len(logged) == 4 * 4  # prompts_per_iteration x n
        prompts = [s["prompt"] for s in logged]
        completions = [s["completion"] for s in logged]
        answers = [s["columns"]["answers"] for s in logged]
        assert set(answers) <= problems
        correct = math_answer_reward(prompts, completions, answers=answers)
        fmt = think_answer_format_reward(prompts, completions)
        expected = correct + 0.1 * fmt  # the smoke's reward
        np.testing.assert_allclose([s["reward"] for s in logged], expected, atol=1e-6)
        np.testing.assert_allclose([s["reward_math_answer_reward"] for s in logged], correct)
        np.testing.assert_allclose([s["reward_think_answer_format_reward"] for s in logged], fmt)
        assert r["rl/reward_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
        assert r["rl/accuracy"] == pytest.approx(float(np.mean(correct)), abs=1e-6)
        assert r["rl/reward_math_answer_reward_mean"] == pytest.approx(float(np.mean(correct)), abs=1e-6)
        assert r["rl/reward_think_answer_format_reward_mean"] == pytest.approx(float(np.mean(fmt)), abs=1e-6)
        # the reward saw each prompt whole: the chat template's turns end in a stop id (<|im_end|>),
        # which a decode stopping at eos would have cut after the system turn
        assert all(p.rstrip().endswith("assistant") and "\nuser\n" in p for p in prompts)
    assert 0.0 <= smoke["accuracy_rl"] <= 1.0 and smoke["sft_rows"] == 8


def test_sft_targets_earn_the_full_reward():
    """The SFT target's answer style is the one the reward reads: answer 1 + format 0.1 for every row."""
    cfg = grpo_math.Config(smoke=True)
    grpo_math.apply_smoke(cfg)
    problems = grpo_math.read_problems(fixtures.SMOKE_DATA, "gsm8k")
    targets = [grpo_math.sft_target(p, cfg.style) for p in problems]
    r = grpo_math.make_reward(cfg)([""] * len(targets), targets, answers=[p.answer for p in problems])
    np.testing.assert_allclose(r, 1.1, atol=1e-6)
    boxed = [grpo_math.sft_target(p, "boxed") for p in problems]
    np.testing.assert_array_equal(math_answer_reward(None, boxed, answers=[p.answer for p in problems]), 1.0)
    assert problems[6].answer == "2000"  # "#### 2,000": thousands separators dropped


@pytest.mark.slow  # the experiment's whole --smoke run; .ci/run runs the slow tier
def test_exported_policy_loads_back_identical_with_every_stop_id(smoke):
    policy = smoke["policy_dir"]
    _, params = load_pretrained(policy)
    h = hashlib.sha256()
    digest_params(params, h)
    assert h.hexdigest() == smoke["policy_sha256"]
    tok = HFTokenizer.from_pretrained(policy)
    assert tok.eos_ids == (4, 1, 7) and tok.eos_id == 4 and tok.pad_id == 2  # the fixture's generation_config
    with open(os.path.join(policy, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [4, 1, 7]
    assert tok.chat_template is not None
    # the exported config keeps the checkpoint's context length and names the special ids
    exported, source = read_hf_config(policy), read_hf_config(smoke["model_dir"])
    assert exported["max_position_embeddings"] == source["max_position_embeddings"] == 512
    assert (exported["eos_token_id"], exported["pad_token_id"], exported["bos_token_id"]) == (4, 2, 0)


def _params(policy_dir) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_flatten_with_path(load_pretrained(str(policy_dir))[1])[0]}


@pytest.mark.slow  # 40-90 s: the whole --smoke run in three processes at once, then two refused launches
def test_smoke_on_two_processes_equals_one_process_on_the_same_mesh(tmp_path):
    """`python -m experiments.grpo_math --smoke --mesh-data 2 --mesh-fsdp 2` as two processes (2 simulated
    CPU devices each, connected through the RLJAX_* variables) and as one process with 4 devices: the
    two processes make one run directory (process 0's name), sample the same completions (process 0 writes
    every row's), report the same rewards and
    accuracies, train the same weights up to float rounding, and export a policy that loads back with the
    digest of the trained (sharded) params; only process 0 prints the table. An experiment written for one
    process (two processes named by the RLJAX_* variables, or found by JAX in a SLURM job step with
    RLJAX_DISTRIBUTED=auto), and grpo_math without a mesh, are refused on two."""
    smoke = ["experiments.grpo_math", "--smoke", "--mesh-data", "2", "--mesh-fsdp", "2", "--no-progress",
             "--no-tensorboard"]
    multi, single = run_study_on_two_processes_and_one(tmp_path, smoke, timeout=400)
    results = {name: json.loads((d / "results.json").read_text()) for name, d in (("multi", multi), ("single", single))}
    for key in ("accuracy_start", "accuracy_sft", "accuracy_rl", "reward_first", "reward_last",
                "train_accuracy_first", "train_accuracy_last", "sft_rows"):
        assert results["multi"][key] == results["single"][key], key
    samples = {name: [read_samples(d, i) for i in (1, 2)] for name, d in (("multi", multi), ("single", single))}
    assert sorted(os.listdir(multi / "samples")) == ["iteration-000001.jsonl", "iteration-000002.jsonl"]
    assert samples["multi"] == samples["single"] and [len(v) for v in samples["single"]] == [16, 16]
    losses = {name: [r["rl/loss"] for r in read_metrics(str(d)) if "rl/loss" in r] for name, d in
              (("multi", multi), ("single", single))}
    assert len(losses["single"]) == 2
    np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-5, atol=1e-7)
    # the weights up to float rounding, leaf by leaf in norm: Adam moves a weight whose gradient is ~0 (rounding
    # noise that the two layouts sum in different orders) by up to lr either way, so single elements may differ
    # by ~lr while the leaf's difference stays ~1e-5 of its norm (a wrong row or step would be O(1))
    trained = {name: _params(d / "policy") for name, d in (("multi", multi), ("single", single))}
    for key, want in trained["single"].items():
        assert np.linalg.norm(trained["multi"][key] - want) <= 1e-4 * np.linalg.norm(want), key
    for name, d in (("multi", multi), ("single", single)):
        h = hashlib.sha256()
        digest_params(load_pretrained(str(d / "policy"))[1], h)
        assert h.hexdigest() == results[name]["policy_sha256"], name
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("proc0", "proc1", "single")}
    assert "| grpo_math | value |" in logs["proc0"] and "| grpo_math | value |" not in logs["proc1"]

    # refused on two processes, before anything runs: each process exits naming why
    for case, args, said in (
            ("one_process", ["experiments.rl_arithmetic", "--smoke", "--run-dir", str(tmp_path / "refused")],
             "experiments.rl_arithmetic: runs on one process, but 2 were started"),
            ("no_mesh", ["experiments.grpo_math", "--smoke", "--run-dir", str(tmp_path / "refused")],
             "--mesh-data / --mesh-fsdp / --mesh-tensor: 2 processes are running: pass a mesh over all their 4")):
        port = _free_port()
        procs = [launch_module(tmp_path, f"{case}{k}", args, 2, k, port) for k in (0, 1)]
        if case == "one_process":  # the same, the processes found by JAX in a (simulated) SLURM job step
            slurm = dict(RLJAX_DISTRIBUTED="auto", SLURM_JOB_ID="7", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                         JAX_COORDINATOR_PORT=str(_free_port()))
            procs += [launch_module(tmp_path, f"slurm{k}", args, 2, env=dict(slurm, SLURM_PROCID=str(k),
                                                                                SLURM_LOCALID=str(k))) for k in (0, 1)]
        for proc, log in procs:
            try:
                assert proc.wait(timeout=120) != 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert said in log.read_text(), log.read_text()[-3000:]
    assert not (tmp_path / "refused").exists()


def test_sft_and_rl_prompts_are_the_same_tokens():
    tok = HFTokenizer.from_pretrained(fixtures.SMOKE_TOKENIZER)
    cfg = grpo_math.Config(smoke=True)
    grpo_math.apply_smoke(cfg)
    problems = grpo_math.read_problems(fixtures.SMOKE_DATA, "gsm8k")[:3]
    system = grpo_math.SYSTEM_PROMPTS[cfg.style]
    pairs, dropped = grpo_math.sft_pairs(tok, problems, cfg, system)
    assert dropped == 0
    sft = collate_prompt_completion(tok, pairs, add_bos=False, add_eos=True)
    rl = grpo_math.rl_prompt_batch(tok, problems, system)
    for i in range(3):
        sft_prompt = np.asarray(sft.tokens[i])[(np.asarray(sft.attention_mask[i]) == 1)
                                               & (np.asarray(sft.loss_mask[i]) == 0)]
        rl_prompt = np.asarray(rl.tokens[i])[np.asarray(rl.mask[i]) == 1]
        np.testing.assert_array_equal(sft_prompt, rl_prompt)
        # exactly the template's tokens, as transformers' apply_chat_template(tokenize=True) gives them
        # (the template writes any bos itself; this Qwen-style one writes none)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": problems[i].question}]
        assert list(rl_prompt) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        completion = np.asarray(sft.tokens[i])[np.asarray(sft.loss_mask[i]) == 1]
        assert completion[-1] == tok.eos_id  # SFT teaches the model to stop with eos


def test_bad_remat_is_named_before_the_run_directory_exists(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"Config.remat: 'ful' is not one of \('none', 'full', 'dots'\)"):
        grpo_math.main(grpo_math.Config(smoke=True, run_dir=str(run_dir), remat="ful", progress=False))
    assert not run_dir.exists()


@pytest.mark.slow  # a second whole --smoke run
def test_smoke_with_remat_trains_the_same_policy(smoke, tmp_path):
    """--remat full changes where the backward pass gets its activations, not what it computes:
    the same rewards (the same samples) and the trained parameters equal up to float rounding."""
    res = grpo_math.main(grpo_math.Config(smoke=True, run_dir=str(tmp_path / "run"), remat="full", progress=False))
    rewards = [[r["rl/reward_mean"] for r in read_metrics(d) if "rl/reward_mean" in r]
               for d in (smoke["run_dir"], res["run_dir"])]
    assert rewards[0] == rewards[1]
    a = load_pretrained(smoke["policy_dir"])[1]
    b = load_pretrained(res["policy_dir"])[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-4, atol=1e-5)


def test_bad_data_rows_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1 #### 1"}\n{"question": "q2"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        grpo_math.read_problems(str(bad), "gsm8k")
    bad.write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 0.*answer"):
        grpo_math.read_problems(str(bad), "gsm8k")
    with pytest.raises(ValueError, match="data_format"):
        grpo_math.read_problems(str(bad), "aime")
