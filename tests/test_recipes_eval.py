"""eval_data in the one-call recipes: the held-out loss and metrics of sft, reward_model and dpo (`phases.loss_eval`,
batches of any size weighted to the whole set: checked against the loss on one batch of every held-out row), and
grpo's greedy-completion rewards (`reward_eval`: checked against the reward functions' own calls)."""
import functools

import jax
import numpy as np
import pytest

from rljax.losses.preference import preference_loss, with_live_reference
from rljax.losses.reward_model import RankingConfig, reward_model_loss
from rljax.losses.sft import SFTConfig, sft_loss
from rljax.recipes import DPOTaskConfig, GRPOTaskConfig, RewardModelTaskConfig, SFTTaskConfig, dpo, grpo, reward_model, sft
from rljax.recipes.tasks import held_out_batches, preference_batches, reward_batches, sft_batches
from test_recipes_tasks import PAIR_ROWS, SFT_ROWS, TOK, small_model

EVAL_SFT = [{"prompt": f"{a}*{b}=", "completion": str(a * b)} for a in range(1, 4) for b in range(2, 4)][:5]
EVAL_PAIRS = [{"prompt": f"{a}-{b}=", "chosen": str(a - b), "rejected": str(a - b + 2)} for a in range(5, 8)
              for b in range(2)][:5]


def _whole(batches_of, rows, cfg, model):
    """Every held-out row in one batch (the reference computation)."""
    return batches_of(TOK, rows, cfg.__class__(**{**cfg.__dict__, "batch_size": len(rows)}),
                      max_length=model.config.max_seq_len).batch_at(0)


def test_sft_eval_is_the_loss_over_every_held_out_token():
    """5 held-out rows in batches of 2 (2, 2, 1), evaluated at steps 2 and 4: the logged loss is the token mean
    over all 5 rows' completion tokens, the loss of one batch holding them all under the returned params."""
    cfg = SFTTaskConfig(steps=4, batch_size=2, lr=3e-3, eval_every=2, progress=False)
    result = sft(small_model(), SFT_ROWS, cfg, eval_data=EVAL_SFT)
    assert [h["step"] for h in result.eval_history] == [2, 4]
    whole = _whole(sft_batches, EVAL_SFT, cfg, result.model)
    loss, _ = sft_loss(result.params, whole, model=result.model, cfg=SFTConfig())
    assert result.eval_metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert result.eval_history[0]["loss"] != pytest.approx(result.eval_history[1]["loss"])  # it trained between
    # the training rows' own metrics are unchanged by the evaluation
    plain = sft(small_model(), SFT_ROWS, cfg)
    np.testing.assert_allclose([h["loss"] for h in plain.history], [h["loss"] for h in result.history], rtol=1e-6)
    assert plain.eval_metrics == {} and plain.eval_history == []


def test_dpo_eval_against_the_starting_model_as_reference():
    cfg = DPOTaskConfig(steps=2, batch_size=2, lr=1e-3, beta=0.1, progress=False)
    start = small_model()
    result = dpo(start, PAIR_ROWS, cfg, eval_data=EVAL_PAIRS)
    assert [h["step"] for h in result.eval_history] == [2]  # eval_every 0: at the end
    whole = _whole(preference_batches, EVAL_PAIRS, cfg, result.model)
    loss_cfg = cfg.loss()
    batch = with_live_reference(small_model()[1], whole, model=result.model, chunk_size=loss_cfg.chunk_size)
    loss, metrics = preference_loss(result.params, batch, model=result.model, cfg=loss_cfg)
    assert result.eval_metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    for k in ("accuracy", "margin"):  # per-pair means: weighted by the batches' pairs
        assert result.eval_metrics[k] == pytest.approx(float(metrics[k]), rel=1e-5, abs=1e-7), k


def test_reward_model_eval_accuracy_and_loss_over_every_pair():
    cfg = RewardModelTaskConfig(steps=2, batch_size=2, lr=1e-3, progress=False)
    result = reward_model(small_model(), PAIR_ROWS, cfg, eval_data=EVAL_PAIRS)
    whole, _ = reward_batches(TOK, EVAL_PAIRS, RewardModelTaskConfig(batch_size=len(EVAL_PAIRS)),
                              max_length=result.model.config.max_seq_len, share_prompt=True)
    loss, metrics = reward_model_loss(result.params, whole.batch_at(0), model=result.model, cfg=RankingConfig())
    assert result.eval_metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert result.eval_metrics["accuracy"] == pytest.approx(float(metrics["accuracy"]), abs=1e-7)
    with pytest.raises(Exception, match="eval_data holds scores rows, but data holds pairs rows"):
        reward_model(small_model(), PAIR_ROWS, cfg,
                     eval_data=[{"prompt": "1+1=", "response": "2", "score": 1.0}] * 2)


def test_grpo_eval_scores_greedy_completions_of_every_held_out_prompt():
    """Each held-out prompt once, greedy (the same completion at both evaluations of unchanged params would
    repeat; here the eval calls are told apart by their prompts), scored by each function: reward_mean and
    each function's mean are the means of what the functions returned on those calls."""
    calls = []

    def correct(prompts, completions, answer, **_):
        out = [float(str(a) in c) if a % 2 else None for c, a in zip(completions, answer)]
        calls.append((list(prompts), list(completions), out))
        return out

    def length(prompts, completions, **_):
        return [len(c) / 4 for c in completions]

    train = [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(4)]
    held = [{"prompt": f"{a}*2=", "answer": 2 * a + 1} for a in range(5)]  # odd answers: correct applies to all
    cfg = GRPOTaskConfig(steps=2, batch_size=2, n=2, max_new_tokens=3, eval_every=1, progress=False)
    result = grpo(small_model(), train, [correct, (0.5, length)], cfg, eval_data=held)
    assert [h["step"] for h in result.eval_history] == [1, 2]
    evals = [c for c in calls if c[0] and "*" in c[0][0]]  # the eval calls: batches of 2, 2, 1 prompts
    assert [len(c[0]) for c in evals] == [2, 2, 1, 2, 2, 1]
    last = evals[3:]
    prompts = [p for c in last for p in c[0]]
    assert sorted(prompts) == sorted(f"{a}*2=" for a in range(5))  # every held-out prompt once
    completions = [x for c in last for x in c[1]]
    right = [x for c in last for x in c[2]]
    lengths = [len(x) / 4 for x in completions]
    assert result.eval_metrics["reward_correct_mean"] == pytest.approx(np.mean(right))
    assert result.eval_metrics["reward_length_mean"] == pytest.approx(np.mean(lengths))
    assert result.eval_metrics["reward_mean"] == pytest.approx(np.mean(np.add(right, 0.5 * np.array(lengths))))
    assert 0 <= result.eval_metrics["completion_length"] <= 3


def test_grpo_eval_with_samples_scores_k_completions_of_each_prompt_and_the_best():
    """eval_samples=3: each held-out prompt's 3 sampled completions (prompt-major) scored by the function;
    reward_mean is the mean of what it returned, reward_best_mean the mean over prompts of each one's best;
    the draws are the same at every evaluation of the same params (a fixed key per batch)."""
    from rljax.recipes.tasks import prompt_batches, reward_eval

    calls = []

    def chars(prompts, completions, **_):  # a reward that tells the samples apart
        out = [float(sum(map(ord, c)) % 5) for c in completions]
        calls.append((list(prompts), out, [len(c) for c in completions]))
        return out

    train = [{"prompt": f"{a}+1="} for a in range(4)]
    held = [{"prompt": f"{a}*2="} for a in range(5)]
    cfg = GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=5, progress=False, eval_samples=3)
    result = grpo(small_model(), train, chars, cfg, eval_data=held)
    evals = [c for c in calls if "*" in c[0][0]]
    assert [len(c[0]) for c in evals] == [6, 6, 3]  # batches of 2, 2, 1 prompts x 3 samples
    prompts = [p for c in evals for p in c[0]]
    assert prompts == [f"{a}*2=" for a in range(5) for _ in range(3)]
    rewards = np.array([x for c in evals for x in c[1]])
    assert result.eval_metrics["reward_mean"] == pytest.approx(rewards.mean())
    assert result.eval_metrics["reward_best_mean"] == pytest.approx(rewards.reshape(5, 3).max(axis=1).mean())
    assert result.eval_metrics["reward_best_mean"] > result.eval_metrics["reward_mean"]  # the samples differ
    # the stop token counts in the tokens, not in the text
    assert result.eval_metrics["completion_length"] == pytest.approx(np.mean([min(n + 1, 5) for c in evals
                                                                             for n in c[2]]))
    model = result.model
    batches = held_out_batches(prompt_batches(TOK, held, cfg, max_length=64).batches, model, "eval", size=2,
                               split=False)
    again = reward_eval(model, TOK, batches, chars, max_new_tokens=5, samples=3)
    assert again(result.state) == again(result.state) == result.eval_metrics
    greedy = reward_eval(model, TOK, batches, chars, max_new_tokens=5)(result.state)
    assert "reward_best_mean" not in greedy
    # repetition_penalty reaches the held-out decoding: the completions scored are the penalized greedy
    # sampler's on the same prompts
    from rljax.sampling import SampleConfig, sample, tokenizer_ids

    seen = []

    def record(prompts, completions, **_):
        seen.extend(completions)
        return [0.0] * len(completions)

    def held_out_completions(cfg):
        return [c for b in batches for c in TOK.decode_batch(np.asarray(
            sample(result.state.policy.params, np.stack(b.tokens), np.stack(b.mask), jax.random.key(0), model=model,
                   cfg=cfg).completions))]

    reward_eval(model, TOK, batches, record, max_new_tokens=5, repetition_penalty=4.0)(result.state)
    greedy_cfg = SampleConfig(max_new_tokens=5, greedy=True, **tokenizer_ids(TOK))
    assert seen == held_out_completions(greedy_cfg.replace(repetition_penalty=4.0)) != held_out_completions(greedy_cfg)
    with pytest.raises(ValueError, match="eval_samples: must be >= 0"):
        GRPOTaskConfig(eval_samples=-1)


def test_held_out_batches_keep_every_row_once_and_drop_what_a_mesh_cannot_split(monkeypatch):
    it = sft_batches(TOK, EVAL_SFT, SFTTaskConfig(batch_size=1), max_length=64)
    model = small_model()[0]
    batches = held_out_batches(it, model, "sft: eval_data", size=2)
    assert [b.tokens.shape[0] for b in batches] == [2, 2, 1]
    monkeypatch.setattr("rljax.sampling.prompt_multiple", lambda model, n=1: 2)
    with pytest.warns(UserWarning, match="sft: eval_data: the last 1 of 5 rows are left out of the evaluation: the mesh "
                                         "splits a batch's rows 2 ways"):
        batches = held_out_batches(it, model, "sft: eval_data", size=2)
    assert [b.tokens.shape[0] for b in batches] == [2, 2]
    assert [b.tokens.shape[0] for b in held_out_batches(it, model, "sft: eval_data", size=8, split=False)] == [5]


def test_loss_eval_weighs_the_loss_by_its_tokens():
    """phases.loss_eval by hand: two batches of 1 row with 3 and 1 completion tokens give the token mean,
    (3 L_a + L_b) / 4, not (L_a + L_b) / 2; row-mean metrics weigh rows."""
    from rljax import phases
    from rljax.state import TrainState

    model, params, _ = small_model()
    rows = [{"prompt": "1+1=", "completion": "222"}, {"prompt": "1+2=", "completion": "3"}]
    it = sft_batches(TOK, rows, SFTTaskConfig(batch_size=1), max_length=64)
    batches = [it.collate([x]) for x in it.examples]
    loss = functools.partial(sft_loss, model=model, cfg=SFTConfig())
    each = [float(loss(params, b)[0]) for b in batches]
    tokens = [float(np.asarray(b.loss_mask)[:, 1:].sum()) for b in batches]
    assert tokens == [4.0, 2.0]  # the completion and eos
    got = phases.loss_eval(loss, batches, model=model)(TrainState(step=0, params=params, opt_state=None, rng=None,
                                                                  skipped_steps=0))
    assert got["loss"] == pytest.approx((4 * each[0] + 2 * each[1]) / 6, rel=1e-6)
