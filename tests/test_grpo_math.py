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
from rljax.metrics import read_metrics
from conftest import run_with_devices
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
        with open(os.path.join(smoke["run_dir"], "samples", f"iteration-{r['step']:06d}.jsonl")) as f:
            logged = [json.loads(line) for line in f]
        assert len(logged) == 4 * 4  # prompts_per_iteration x n
        prompts = [s["prompt"] for s in logged]
        completions = [s["completion"] for s in logged]
        answers = [s["answer"] for s in logged]
        assert set(answers) <= problems
        correct = math_answer_reward(prompts, completions, answers=answers)
        expected = correct + 0.1 * think_answer_format_reward(prompts, completions)  # the smoke's reward
        np.testing.assert_allclose([s["reward"] for s in logged], expected, atol=1e-6)
        assert r["rl/reward_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
        assert r["rl/accuracy"] == pytest.approx(float(np.mean(correct)), abs=1e-6)
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


@pytest.mark.slow
def test_smoke_on_a_four_device_mesh(tmp_path):
    """--mesh-data 2 --mesh-fsdp 2 on 4 simulated CPU devices: SFT, RL and the export run sharded,
    and the exported policy loads back with the digest of the trained (sharded) params."""
    code = "\n".join([
        "import hashlib, json",
        "from experiments import grpo_math",
        "from rljax.checkpoint import digest_params",
        "from rljax.models.hf import load_pretrained",
        f"res = grpo_math.main(grpo_math.Config(smoke=True, run_dir={str(tmp_path / 'run')!r}, progress=False,"
        " mesh_data=2, mesh_fsdp=2))",
        "h = hashlib.sha256()",
        "digest_params(load_pretrained(res['policy_dir'])[1], h)",
        "print(json.dumps(dict(same=h.hexdigest() == res['policy_sha256'], reward=res['reward_last'])))",
    ])
    out = run_with_devices(code, n_devices=4)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same"] and 0.0 <= result["reward"] <= 1.1


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
