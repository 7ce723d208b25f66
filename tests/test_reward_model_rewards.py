"""A trained reward model as a GRPO reward function, as TRL takes one (a model id among reward_funcs): an HF
...ForSequenceClassification checkpoint, a (Model, params, tokenizer) or the `reward_model` task's result, scored
through `rewards.reward_model_reward` on the prompt and completion text; checked against that scorer called on
the sample records."""
import os
import shutil

import jax
import numpy as np
import pytest

from rljax.metrics import read_samples
from rljax.recipes import GRPOTaskConfig, RewardModelTaskConfig, grpo, reward_model
from rljax.recipes.tasks import reward_model_scorer
from rljax.rewards.learned import reward_model_reward
from test_recipes_tasks import PAIR_ROWS, TOK, small_model

ROWS = [{"prompt": f"{a}*{b}=", "answer": a * b} for a in range(3) for b in range(2)]


def length(prompts, completions, **_):
    return [len(c) / 4 for c in completions]


def _check_records(run, steps, scorer, name, weight=1.0, other=None):
    """Each written iteration's records: the reward model's term is the scorer's value on the record's text, and the
    reward is weight x it (+ the other term's); name None: the reward model alone (no terms recorded)."""
    for step in range(1, steps + 1):
        records = read_samples(run, step)
        expected = np.asarray(scorer([r["prompt"] for r in records], [r["completion"] for r in records]))
        assert np.ptp(expected) > 1e-4  # the reward model tells the samples apart
        if name is not None:
            np.testing.assert_allclose([r[f"reward_{name}"] for r in records], expected, rtol=1e-5, atol=1e-6)
        rest = np.array([r[f"reward_{other}"] for r in records]) if other else 0.0
        np.testing.assert_allclose([r["reward"] for r in records], weight * expected + rest, rtol=1e-5, atol=1e-6)


def test_a_reward_model_result_and_tuple_score_the_samples_as_the_reward_model_does(tmp_path):
    rm = reward_model(small_model(), PAIR_ROWS, RewardModelTaskConfig(steps=2, batch_size=4, lr=1e-2, progress=False))
    scorer = reward_model_reward(rm.model, rm.params, TOK)  # [bos] prompt completion eos: a CharTokenizer has no template
    cfg = GRPOTaskConfig(steps=2, batch_size=2, n=2, max_new_tokens=4, samples_every=1, progress=False)
    run = tmp_path / "result"
    result = grpo(small_model(), ROWS, [(2.0, rm), length], cfg, run_dir=str(run), eval_data=ROWS[:2])
    _check_records(run, 2, scorer, "reward_model", weight=2.0, other="length")
    assert "reward_reward_model_mean" in result.history[-1] and "reward_reward_model_mean" in result.eval_metrics

    run = tmp_path / "tuple"
    grpo(small_model(), ROWS, (rm.model, rm.params, rm.tokenizer), cfg, run_dir=str(run))
    _check_records(run, 2, scorer, None)  # one function alone: its values are the rewards
    # message prompts: the reward model still reads the prompt's text (the other functions get the messages)
    chats = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]

    def turns(completions, **kwargs):  # TRL's conversational form
        return [len(c[0]["content"]) / 4 for c in completions]

    run = tmp_path / "chat"
    grpo(small_model(), chats, [rm, turns], cfg, run_dir=str(run))
    _check_records(run, 2, scorer, "reward_model", other="turns")
    records = read_samples(run, 1)
    assert records[0]["prompt"].startswith("user: ")  # the rendered text the policy read

    lm = small_model()
    with pytest.raises(ValueError, match="reward function 'reward_model': the model has no reward head"):
        reward_model_scorer(lm)


def test_a_reward_model_checkpoint_path_is_loaded_and_named_by_its_directory(tmp_path):
    from rljax.models import Model, preset, save_pretrained
    from rljax.tokenizer import HFTokenizer

    tok_dir = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tokenizer")
    tok = HFTokenizer.from_pretrained(tok_dir)

    def checkpoint(path, heads, seed):
        cfg = preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64, vocab_size=tok.vocab_size,
                     max_seq_len=64, heads=heads)
        params = jax.jit(Model(cfg).init)(jax.random.key(seed))
        if "reward_head" in params:  # initialised at zero: a random head, so that the scores differ
            params["reward_head"] = jax.random.normal(jax.random.key(seed + 7), params["reward_head"].shape)
        save_pretrained(params, cfg, str(path))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, name), path)
        return Model(cfg), params

    rm_model, rm_params = checkpoint(tmp_path / "my-rm", ("reward",), 1)
    checkpoint(tmp_path / "policy", ("lm",), 0)
    chat = tok.chat_template is not None
    cfg = GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=4, samples_every=1, progress=False)
    run = tmp_path / "run"
    result = grpo(str(tmp_path / "policy"), ROWS, [str(tmp_path / "my-rm"), length], cfg, run_dir=str(run))
    _check_records(run, 1, reward_model_reward(rm_model, rm_params, tok, add_bos=not chat), "my_rm", other="length")
    records = read_samples(run, 1)  # the metric named after the directory, the mean of its logged values
    assert result.history[-1]["reward_my_rm_mean"] == pytest.approx(np.mean([r["reward_my_rm"] for r in records]))
