"""Reward-model kernels and losses against the known answers of docs/algorithms.md and naive references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rljax.data.batch import RankingBatch, ScoreBatch, TokenLabelBatch
from rljax.losses import reward_model as _reward_model
from rljax.losses.reward_model import RankingConfig, TokenLabelConfig
from rljax.models import Model, preset
from rljax.ops import ranking as _ranking

# The kernels jitted: one compile per shape, where op by op every primitive compiled on its own.
binary_cross_entropy, bradley_terry, pair_centring, pairwise_ranking, plackett_luce = (
    jax.jit(f) for f in (_ranking.binary_cross_entropy, _ranking.bradley_terry, _ranking.pair_centring,
                         _ranking.pairwise_ranking, _ranking.plackett_luce))


# Jitted once per batch shape and config: run op by op (eagerly), every primitive of the model
# compiled on its own for every new shape, which took minutes of the suite.
ranking_scores = jax.jit(_reward_model.ranking_scores, static_argnames=("model",))
ranking_loss = jax.jit(_reward_model.ranking_loss, static_argnames=("model", "cfg"))
pointwise_loss = jax.jit(_reward_model.pointwise_loss, static_argnames=("model", "cfg"))
token_label_loss = jax.jit(_reward_model.token_label_loss, static_argnames=("model", "cfg"))


def _heads(params, tokens, mask, model):
    hidden, _ = model.forward(params, tokens, mask)
    out = {"logits": model.logits(params, hidden)}
    if "reward" in model.config.heads:
        out["rewards"] = model.rewards(params, hidden, mask)
        out["token_rewards"] = model.token_rewards(params, hidden)
    return out


def heads(params, tokens, mask, *, model):
    """One jitted forward: the LM logits, and the reward head at the last real token and at
    every position (the references the losses are checked against)."""
    return {k: np.asarray(v) for k, v in _heads_jit(params, jnp.asarray(tokens), jnp.asarray(mask), model).items()}


_heads_jit = jax.jit(_heads, static_argnames=("model",))


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def naive_pairwise(scores, rank, margin=0.0):
    out = []
    for s, r in zip(scores, rank):
        terms = [softplus(-(s[i] - s[j] - margin)) for i in range(len(s)) for j in range(len(s))
                 if r[i] >= 0 and r[j] >= 0 and r[i] < r[j]]
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return np.array(out)


def naive_plackett_luce(scores, rank):
    out = []
    for s, r in zip(scores, rank):
        order = sorted((i for i in range(len(s)) if r[i] >= 0), key=lambda i: (r[i], i))
        out.append(sum(math.log(sum(math.exp(s[j]) for j in order[k:])) - s[order[k]] for k in range(len(order))))
    return np.array(out)


def test_known_answers_at_equal_scores():
    z = jnp.zeros(3)
    np.testing.assert_allclose(bradley_terry(z, z), np.log(2.0) * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(bradley_terry(z, z, 1.5), np.log1p(np.exp(1.5)) * np.ones(3), rtol=1e-6)
    for K in (2, 3, 5):
        rank = jnp.arange(K)[None, :]
        np.testing.assert_allclose(plackett_luce(jnp.zeros((1, K)), rank), [math.log(math.factorial(K))], rtol=1e-6)
        np.testing.assert_allclose(pairwise_ranking(jnp.zeros((1, K)), rank)[0], [math.log(2.0)], rtol=1e-6)


def test_k_equals_two_reduces_to_bradley_terry():
    s = jax.random.normal(jax.random.key(0), (6, 2))
    rank = jnp.tile(jnp.array([[0, 1]]), (6, 1))
    bt = bradley_terry(s[:, 0], s[:, 1], 0.3)
    np.testing.assert_allclose(pairwise_ranking(s, rank, 0.3)[0], bt, rtol=1e-6)
    np.testing.assert_allclose(plackett_luce(s, rank), bradley_terry(s[:, 0], s[:, 1]), rtol=1e-6, atol=1e-6)


def test_lists_match_naive_references_with_ties_and_absent_answers():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 5)).astype(np.float32)
    rank = rng.integers(-1, 4, size=(20, 5)).astype(np.int32)  # ties and absent (−1) answers
    rank[0] = [0, 0, 0, -1, -1]  # all tied: no pair, loss 0
    got, pairs = pairwise_ranking(jnp.asarray(scores), jnp.asarray(rank), 0.2)
    np.testing.assert_allclose(got, naive_pairwise(scores, rank, 0.2), rtol=1e-5, atol=1e-6)
    assert pairs[0] == 0 and got[0] == 0
    strict = np.argsort(rng.random((20, 5)), axis=1).astype(np.int32)
    strict[:5, 3:] = -1  # shorter lists
    np.testing.assert_allclose(plackett_luce(jnp.asarray(scores), jnp.asarray(strict)),
                               naive_plackett_luce(scores, strict), rtol=1e-5)


def test_adding_a_constant_per_prompt_changes_nothing():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    rank = jnp.asarray(np.argsort(rng.random((8, 4)), axis=1), jnp.int32)
    c = jnp.asarray(rng.normal(size=(8, 1)) * 5, jnp.float32)
    np.testing.assert_allclose(pairwise_ranking(s + c, rank)[0], pairwise_ranking(s, rank)[0], rtol=1e-5)
    np.testing.assert_allclose(plackett_luce(s + c, rank), plackett_luce(s, rank), rtol=1e-5)
    # centring is the one term that sees the constant: it pulls each prompt's rewards toward zero sum
    np.testing.assert_allclose(pair_centring(jnp.array([[1.0, -1.0]]), jnp.array([[0, 1]])), [0.0])
    np.testing.assert_allclose(pair_centring(jnp.array([[2.0, 1.0]]), jnp.array([[0, 1]])), [9.0])


def test_binary_cross_entropy_by_hand_and_soft_labels_stay_soft():
    z, y = jnp.array([0.0, 2.0, -1.0]), jnp.array([0.5, 1.0, 0.25])
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
    want = -(np.array([0.5, 1.0, 0.25]) * np.log(p) + (1 - np.array([0.5, 1.0, 0.25])) * np.log(1 - p))
    np.testing.assert_allclose(binary_cross_entropy(z, y), want, rtol=1e-6)


def test_tabular_bradley_terry_recovers_the_gold_reward():
    """Labels ~ Bernoulli(σ(r*_i − r*_j)) on random pairs of 20 items: the fitted scores
    equal r* up to a constant (correlation > 0.95)."""
    rng = np.random.default_rng(0)
    gold = rng.normal(size=20)
    i, j = rng.integers(0, 20, size=(2, 20_000))
    keep = i != j
    i, j = i[keep], j[keep]
    first_wins = rng.random(len(i)) < 1 / (1 + np.exp(-(gold[i] - gold[j])))
    w, lo = np.where(first_wins, i, j), np.where(first_wins, j, i)
    w, lo = jnp.asarray(w), jnp.asarray(lo)
    loss = lambda r: bradley_terry(r[w], r[lo]).mean()  # noqa: E731
    opt = optax.adam(0.1)
    r = jnp.zeros(20)
    state = opt.init(r)
    step = jax.jit(lambda r, s: (lambda g, s: (optax.apply_updates(r, opt.update(g, s)[0]), opt.update(g, s)[1]))(
        jax.grad(loss)(r), s))
    for _ in range(300):
        r, state = step(r, state)
    r = np.asarray(r)
    assert np.corrcoef(r, gold)[0, 1] > 0.95
    np.testing.assert_allclose(r - r.mean(), gold - gold.mean(), atol=0.15)


# ----- losses on a tiny model -----

@functools.partial(jax.jit, static_argnums=0)
def _rm_params(model):
    params = model.init(jax.random.key(0))
    # a non-zero head, so scores differ between answers
    return {**params, "reward_head": jax.random.normal(jax.random.key(1), params["reward_head"].shape)}


@functools.lru_cache
def _rm(**kw):
    """A 1-layer reward model and its params, built by one compiled program, once per kw."""
    model = Model(preset("tiny", n_layers=1, heads=("lm", "reward"), **kw))
    return model, _rm_params(model)


init = jax.jit(lambda model, key: model.init(key), static_argnums=0)  # one compile, not one per initialiser op


def _lists(B=3, K=3, T=7, seed=0, left_pad=False, extra=0):
    """Random answers of random lengths, padded right (or left), with `extra` more pad columns."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, size=(B, K))
    tokens = np.zeros((B, K, T + extra), np.int32)
    mask = np.zeros_like(tokens)
    ids = rng.integers(3, 60, size=(B, K, T))
    for b in range(B):
        for k in range(K):
            n = lengths[b, k]
            sl = slice(T + extra - n, T + extra) if left_pad else slice(0, n)
            tokens[b, k, sl], mask[b, k, sl] = ids[b, k, :n], 1
    rank = np.tile(np.arange(K, dtype=np.int32), (B, 1))
    return tokens, mask, rank


def test_ranking_scores_ignore_padding_side_and_extra_pads():
    model, params = _rm()
    base = None
    for left, extra in ((False, 0), (True, 0), (False, 3), (True, 4)):
        t, m, rank = _lists(left_pad=left, extra=extra)
        s = ranking_scores(params, RankingBatch(jnp.asarray(t), jnp.asarray(m), jnp.asarray(rank)), model=model)
        base = s if base is None else base
        np.testing.assert_allclose(s, base, rtol=1e-5, atol=1e-5)


def test_ranking_loss_is_the_kernel_on_the_model_scores():
    model, params = _rm()
    t, m, rank = _lists(B=4, K=3)
    rank[1] = [0, -1, 1]  # an absent answer
    rank[2] = [1, 1, 1]  # all tied: no pair, left out of the mean
    batch = RankingBatch(jnp.asarray(t), jnp.asarray(m), jnp.asarray(rank), margin=jnp.array([0.0, 0.5, 0.0, 1.0]))
    s = np.asarray(ranking_scores(params, batch, model=model))
    assert s[1, 1] == 0.0
    loss, metrics = ranking_loss(params, batch, model=model, cfg=RankingConfig(margin=0.1, centring=0.01))
    margins = 0.1 + np.array([0.0, 0.5, 0.0, 1.0])
    per_list = [naive_pairwise(s[b:b + 1], rank[b:b + 1], margins[b])[0] for b in range(4)]
    cent = [np.mean([(s[b, i] + s[b, j]) ** 2 for i in range(3) for j in range(3)
                     if rank[b, i] >= 0 and rank[b, j] >= 0 and rank[b, i] < rank[b, j]]) for b in (0, 1, 3)]
    want = np.mean([per_list[b] for b in (0, 1, 3)]) + 0.01 * np.mean(cent)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    pairs = [(b, i, j) for b in range(4) for i in range(3) for j in range(3)
             if rank[b, i] >= 0 and rank[b, j] >= 0 and rank[b, i] < rank[b, j]]
    np.testing.assert_allclose(metrics["accuracy"], np.mean([s[b, i] > s[b, j] for b, i, j in pairs]), rtol=1e-6)
    # (Plackett–Luce has no margin term: the batch's margins are dropped, a batch with them is refused)
    pl, _ = ranking_loss(params, batch.replace(margin=None), model=model, cfg=RankingConfig(objective="plackett_luce"))
    np.testing.assert_allclose(pl, np.mean(naive_plackett_luce(s[[0, 1, 3]], rank[[0, 1, 3]])), rtol=1e-5)
    # at the zero-initialised head every score is 0: log 2 per pair
    zero = {**params, "reward_head": jnp.zeros_like(params["reward_head"])}
    no_margin = batch.replace(margin=None)
    np.testing.assert_allclose(ranking_loss(zero, no_margin, model=model, cfg=RankingConfig())[0], np.log(2),
                               rtol=1e-6)


def test_pointwise_loss_one_and_several_attributes():
    t, m, _ = _lists(B=4, K=1)
    t, m = jnp.asarray(t[:, 0]), jnp.asarray(m[:, 0])
    model, params = _rm()
    r = heads(params, t, m, model=model)["rewards"]
    s = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    given = np.array([1, 1, 1, 0], np.float32)
    loss, met = pointwise_loss(params, ScoreBatch(t, m, jnp.asarray(s), jnp.asarray(given)), model=model)
    np.testing.assert_allclose(loss, 0.5 * np.mean((r[:3] - s[:3]) ** 2), rtol=1e-5)
    model3, params3 = _rm(reward_outputs=3)
    s3 = np.arange(12, dtype=np.float32).reshape(4, 3)
    r3 = heads(params3, t, m, model=model3)["rewards"]
    loss3, _ = pointwise_loss(params3, ScoreBatch(t, m, jnp.asarray(s3), jnp.ones((4, 3))), model=model3)
    np.testing.assert_allclose(loss3, 0.5 * np.mean((r3 - s3) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="reward_outputs"):
        pointwise_loss(params, ScoreBatch(t, m, jnp.asarray(s3), jnp.ones((4, 3))), model=model)


def test_token_label_loss_by_hand_with_soft_labels_and_the_joint_lm_term():
    model, params = _rm()
    rng = np.random.default_rng(3)
    t = jnp.asarray(rng.integers(3, 60, size=(2, 6)), jnp.int32)
    m = jnp.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], jnp.int32)
    lm = jnp.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], jnp.int32)
    labels = jnp.array([[0, 0, 0.25, 0, 0.75, 0], [0, 0, 0, 1.0, 0, 0.5]], jnp.float32)
    lmask = jnp.array([[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1]], jnp.int32)  # (0, 5) is padding: ignored
    batch = TokenLabelBatch(t, m, lm, labels, lmask)
    out = heads(params, t, m, model=model)
    z = out["token_rewards"]
    pos = [(0, 2), (0, 4), (1, 3), (1, 5)]
    want = np.mean([softplus(z[b, i]) - float(labels[b, i]) * z[b, i] for b, i in pos])
    loss, met = token_label_loss(params, batch, model=model, cfg=TokenLabelConfig())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    p = 1 / (1 + np.exp(-z))
    mse, _ = token_label_loss(params, batch, model=model, cfg=TokenLabelConfig(loss="mse"))
    np.testing.assert_allclose(mse, np.mean([(p[b, i] - float(labels[b, i])) ** 2 for b, i in pos]), rtol=1e-5)
    joint, met = token_label_loss(params, batch, model=model, cfg=TokenLabelConfig(lm_coef=0.5))
    logp = np.asarray(jax.nn.log_softmax(out["logits"], axis=-1))
    nll = np.mean([-logp[b, i - 1, int(t[b, i])] for b in range(2) for i in range(1, 6) if lm[b, i] and m[b, i]])
    np.testing.assert_allclose(joint, want + 0.5 * nll, rtol=1e-5)


def test_bad_configs_and_models_name_the_field():
    with pytest.raises(ValueError, match="objective"):
        RankingConfig(objective="listnet")
    with pytest.raises(ValueError, match="centring"):
        RankingConfig(objective="plackett_luce", centring=0.1)
    with pytest.raises(ValueError, match="TokenLabelConfig.loss"):
        TokenLabelConfig(loss="hinge")
    model = Model(preset("tiny", n_layers=1))
    t, m, rank = _lists()
    with pytest.raises(ValueError, match="reward head"):
        ranking_loss(init(model, jax.random.key(0)), RankingBatch(t, m, rank), model=model, cfg=RankingConfig())
    with pytest.raises(ValueError, match="reward_outputs"):
        preset("tiny", reward_outputs=0)


# ----- scoring: learned rewards for the RL loop, aggregation, best-of-N -----

def test_aggregate_steps_known_answers():
    from rljax.rewards.learned import aggregate_steps

    aggregate_steps = jax.jit(aggregate_steps, static_argnames=("mode",))
    p = jnp.array([[0.9, 0.5, 0.8, 0.0], [0.7, 0.0, 0.0, 0.0], [0.3, 0.6, 0.0, 0.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(aggregate_steps(p, m, "min"), [0.5, 0.7, 0.3], rtol=1e-6)
    np.testing.assert_allclose(aggregate_steps(p, m, "product"), [0.36, 0.7, 0.18], rtol=1e-5)
    np.testing.assert_allclose(aggregate_steps(p, m, "mean"), [2.2 / 3, 0.7, 0.45], rtol=1e-6)
    np.testing.assert_allclose(aggregate_steps(p, m, "last"), [0.8, 0.7, 0.6], rtol=1e-6)
    rng = np.random.default_rng(0)
    q, mask = jnp.asarray(rng.random((50, 6)), jnp.float32), jnp.asarray(rng.random((50, 6)) < 0.7)
    assert np.all(aggregate_steps(q, mask, "product") <= aggregate_steps(q, mask, "min") + 1e-7)
    np.testing.assert_allclose(aggregate_steps(q, jnp.zeros_like(mask), "min"), np.zeros(50))  # no steps: 0
    with pytest.raises(ValueError, match="mode"):
        aggregate_steps(q, mask, "max")


def test_running_normaliser_equals_the_statistics_of_everything_seen():
    from rljax.rewards.learned import running_normaliser

    norm = running_normaliser(eps=0.0)
    state = norm.init()
    rng = np.random.default_rng(0)
    seen = []
    for n in (5, 1, 17, 8):
        r = rng.normal(3.0, 2.0, size=n).astype(np.float32)
        seen.append(r)
        out, state = norm.update(state, r)
        allr = np.concatenate(seen)
        np.testing.assert_allclose(out, (r - allr.mean()) / allr.std(), rtol=1e-4, atol=1e-5)
    out, _ = running_normaliser(eps=0.0, shift_mean=False).update(state, np.array([1.0], np.float32))
    allr = np.concatenate(seen + [np.array([1.0])])
    np.testing.assert_allclose(out, [1.0 / allr.std()], rtol=1e-4)


def test_learned_scorers_match_the_training_collation():
    """The reward-model scorer gives the scores the ranking loss trained on; the PRM scorer
    the token scores at the step ends that collate_steps labels."""
    from rljax.data.reward_collate import collate_pairs, collate_steps
    from rljax.rewards.learned import prm_reward, reward_model_reward, step_scorer
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model, params = _rm()
    pairs = [("1+1=", "2;answer:2", "3"), ("2*3=", "6", "answer:5"), ("7-2=", "5", "4;answer:4")]
    s = np.asarray(ranking_scores(params, collate_pairs(tok, pairs), model=model))
    scorer = reward_model_reward(model, params, tok)
    np.testing.assert_allclose(scorer([p for p, _, _ in pairs], [c for _, c, _ in pairs]), s[:, 0], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(reward_model_reward(model, params, tok, probability=True)(["1+1="], ["3"]),
                               1 / (1 + np.exp(-s[0, 1:])), rtol=1e-5)
    steps = [("1+2*3=", ["2*3=6", "1+6=7", "answer:7"], [1, 1, 1]), ("5=", ["answer:5"], [1])]
    b = collate_steps(tok, steps, separator=";")
    probs = 1 / (1 + np.exp(-heads(params, b.tokens, b.attention_mask, model=model)["token_rewards"]))
    want = [probs[i][np.flatnonzero(b.label_mask[i])] for i in range(2)]
    got = step_scorer(model, params, tok, separator=";")(["1+2*3=", "5="], ["2*3=6;1+6=7;answer:7", "answer:5"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5)
    prm = prm_reward(model, params, tok, separator=";", aggregation="last")
    np.testing.assert_allclose(prm(["1+2*3=", "5="], ["2*3=6;1+6=7;answer:7", "answer:5"]),
                               [want[0][-1], want[1][-1]], rtol=1e-5)


def test_best_of_n_and_majority_vote_by_hand():
    from rljax.rewards.learned import best_of_n, majority_vote

    def length_scorer(prompts, completions, bonus):
        return [len(c) + b for c, b in zip(completions, bonus)]

    cands = [["a", "abc", "ab"], ["xy", "x"]]
    assert best_of_n(["p", "q"], cands, length_scorer, bonus=[0, 0]) == [1, 0]
    assert best_of_n(["p", "q"], [["a", "bb"], ["ccc", "dd"]], length_scorer, bonus=[5, 0]) == [1, 0]
    answers = [["answer:1", "answer:2", "answer:2", "junk"], ["junk", "junk"], ["answer:3", "answer:4"]]
    from rljax.data.arithmetic import parse_answer
    assert majority_vote(answers, parse_answer) == [1, 0, 0]


def test_best_of_n_checks_the_scores_and_names_the_prompt():
    """The scores go through `rules.score`: one finite number per candidate, else an error, never a
    silent pick. The picks are checked against argmax by hand, including unequal N per prompt."""
    from rljax.rewards.learned import best_of_n
    from rljax.rewards.rules import RewardError

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    # by hand: prompt p: lengths (1, 3, 2) -> 1; q: (2,) -> 0; r: (4, 4, 1) -> 0 (first on ties)
    assert best_of_n(["p", "q", "r"], [["a", "abc", "ab"], ["xy"], ["wxyz", "abcd", "e"]], length) == [1, 0, 0]

    def nan_for_b(prompts, completions, **_):  # np.argmax would pick the NaN: index 1
        return [float("nan") if c == "b" else float(len(c)) for c in completions]

    with pytest.raises(RewardError, match=r"nan_for_b returned non-finite rewards .* sample 1 = nan"):
        best_of_n(["q"], [["aaa", "b", "cc"]], nan_for_b)

    def two_attributes(prompts, completions, **_):  # reshape(-1) would pair prompt 1 with prompt 0's scores
        return np.stack([np.arange(len(completions)), -np.arange(len(completions))], axis=1).astype(np.float32)

    with pytest.raises(RewardError, match=r"two_attributes returned shape \(4, 2\); expected \(4,\)"):
        best_of_n(["q", "r"], [["a", "bb"], ["c", "dd"]], two_attributes)
    with pytest.raises(RewardError, match=r"shape \(3,\); expected \(2,\)"):
        best_of_n(["q"], [["a", "b"]], lambda ps, cs, **_: [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="best_of_n: prompt 1 has no candidates"):
        best_of_n(["q", "r"], [["aaa"], []], length)
    with pytest.raises(ValueError, match="best_of_n: 2 prompts but 1 candidate lists"):
        best_of_n(["q", "r"], [["aaa"]], length)
    with pytest.raises(ValueError, match="best_of_n: metadata 'bonus' has 1 entries for 2 prompts"):
        best_of_n(["q", "r"], [["a"], ["b"]], length, bonus=[0])


def test_learned_scorers_refuse_unequal_prompts_and_completions():
    """zip would score min(len) rows: 1 prompt with 3 completions gave 1 score."""
    from rljax.rewards.learned import likelihood_reward, prm_reward, reward_model_reward, step_scorer
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model, params = _rm()
    for name, scorer in (("reward_model_reward", reward_model_reward(model, params, tok)),
                         ("likelihood_reward", likelihood_reward(model, params, tok)),
                         ("step_scorer", step_scorer(model, params, tok, separator=";")),
                         ("prm_reward", prm_reward(model, params, tok, separator=";"))):
        with pytest.raises(ValueError, match=f"{name}: 1 prompts but 3 completions"):
            scorer(["q"], ["a", "b", "c"])


def test_add_head_keeps_the_backbone_and_starts_at_zero():
    from rljax.models import add_head

    lm = Model(preset("tiny", n_layers=1))
    params = init(lm, jax.random.key(0))
    rm, rp = add_head(lm, params, "reward")
    assert rm.config.heads == ("lm", "reward") and rp["layers"] is params["layers"]
    t = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 5)), jnp.int32)
    out = heads(rp, t, jnp.ones_like(t), model=rm)
    np.testing.assert_array_equal(out["rewards"], [0.0, 0.0])
    np.testing.assert_array_equal(out["logits"], heads(params, t, jnp.ones_like(t), model=lm)["logits"])  # untouched
    wide, wp = add_head(rm, rp, "reward", reward_outputs=3)
    assert wp["reward_head"].shape == (128, 3) and not np.any(wp["reward_head"])
    assert add_head(rm, rp, "reward")[0] is rm
    with pytest.raises(ValueError, match="not a head"):
        add_head(lm, params, "policy")


def test_ranking_loss_with_a_prior_ranks_the_sum():
    """r = r_θ + prior: with the head at zero the loss is the kernel on the priors alone
    (log 2 for equal priors, log(1 + e^{-m}) for a prior margin m in the preferred direction);
    with a non-zero head it is the kernel on r_θ + prior, and absent answers stay at 0."""
    model, params = _rm()
    t, m, rank = _lists(B=2, K=3)
    rank[1] = [0, -1, 1]
    prior = np.array([[0.3, -1.0, 2.0], [1.5, 9.0, -0.5]], np.float32)
    batch = RankingBatch(jnp.asarray(t), jnp.asarray(m), jnp.asarray(rank), prior=jnp.asarray(prior))
    s = np.asarray(ranking_scores(params, batch.replace(prior=None), model=model))
    total = np.where(rank >= 0, s + prior, 0.0)
    np.testing.assert_allclose(ranking_scores(params, batch, model=model), total, rtol=1e-6, atol=1e-6)
    loss, metrics = ranking_loss(params, batch, model=model, cfg=RankingConfig())
    np.testing.assert_allclose(loss, naive_pairwise(total, rank).mean(), rtol=1e-5)
    pairs = [(b, i, j) for b in range(2) for i in range(3) for j in range(3)
             if rank[b, i] >= 0 and rank[b, j] >= 0 and rank[b, i] < rank[b, j]]
    np.testing.assert_allclose(metrics["accuracy"], np.mean([total[b, i] > total[b, j] for b, i, j in pairs]))
    zero = {**params, "reward_head": jnp.zeros_like(params["reward_head"])}
    pair = RankingBatch(jnp.asarray(t[:, :2]), jnp.asarray(m[:, :2]), jnp.asarray(rank[:1, :2].repeat(2, 0)),
                        prior=jnp.array([[0.0, 0.0], [0.7, 0.0]]))
    loss, _ = ranking_loss(zero, pair, model=model, cfg=RankingConfig())
    np.testing.assert_allclose(loss, (math.log(2) + math.log1p(math.exp(-0.7))) / 2, rtol=1e-6)


def test_likelihood_reward_matches_a_naive_log_likelihood():
    """β A_θ (mean over the completion and [eos]), β S_θ, and β (S_θ − S_ref), against
    log-softmax of one full forward per row; batching and bucketing change nothing; an
    empty completion is scored by its [eos]."""
    from rljax.rewards.learned import likelihood_reward
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = Model(preset("tiny", n_layers=1))
    params, other = init(model, jax.random.key(0)), init(model, jax.random.key(1))
    prompts, completions = ["1+1=", "12*3-4=", "5="], ["2", "36-4=32;answer:32", "answer:5"]

    def naive(p, prompt, completion):
        ids = tok.encode(prompt, add_bos=True) + tok.encode(completion, add_bos=False, add_eos=True)
        # one row, right-padded to one width (causal attention: the pads change no real position), so
        # one compile serves every row
        tokens, mask = np.zeros((1, 32), np.int32), np.zeros((1, 32), np.int32)
        tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
        logits = heads(p, tokens, mask, model=model)["logits"][0, :len(ids)].astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        start = len(tok.encode(prompt, add_bos=True))
        return [float(lp[t - 1, ids[t]]) for t in range(start, len(ids))]

    own = [naive(params, p, c) for p, c in zip(prompts, completions)]
    ref = [naive(other, p, c) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(likelihood_reward(model, params, tok, beta=2.0)(prompts, completions),
                               [2.0 * np.mean(x) for x in own], rtol=1e-4)
    np.testing.assert_allclose(likelihood_reward(model, params, tok, reduction="sum")(prompts, completions),
                               [np.sum(x) for x in own], rtol=1e-4)
    dpo = likelihood_reward(model, lambda: params, tok, reference=other, beta=0.1, reduction="sum")
    np.testing.assert_allclose(dpo(prompts, completions), [0.1 * (np.sum(a) - np.sum(b)) for a, b in zip(own, ref)],
                               rtol=1e-4, atol=1e-5)
    one = likelihood_reward(model, params, tok)
    np.testing.assert_allclose([one([p], [c])[0] for p, c in zip(prompts, completions)], one(prompts, completions),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        likelihood_reward(model, params, tok, reduction="max")
    # an empty completion is scored by its [eos] alone (log π(eos | prompt)), as reward_model_reward reads it
    np.testing.assert_allclose(one(["1=", "2="], ["1", ""])[1], naive(params, "2=", "")[0], rtol=1e-4)


def test_shared_prompt_lists_score_as_separate_rows():
    """collate_ranked(share_prompt=True): [bos] prompt, then every answer in one row (layout by hand);
    the scores, the loss and its gradient equal the [B, K, T] layout's, absent answers included."""
    from rljax.data.reward_collate import collate_pairs, collate_ranked
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    model, params = _rm(vocab_size=tok.vocab_size)
    lists = [("12+7=", ["19", "18", "191"], [0, 1, 2]), ("3*4=", ["12", "7"], [0, 1]), ("9-5=", ["4", "14", "5"], [0, 2, 1])]
    one = collate_ranked(tok, lists, answers_per_list=3, share_prompt=True, min_bucket=8)
    ids = lambda s, eos=True: tok.encode(s, add_bos=False, add_eos=eos)  # noqa: E731
    row1 = [tok.bos_id] + ids("3*4=", eos=False) + ids("12") + ids("7")
    assert one.tokens[1, :len(row1)].tolist() == row1 and one.tokens.shape == (3, 16)  # row 0: 1 + 5 + 3 + 3 + 4
    assert one.segment_ids[1].tolist() == [1] * 5 + [2] * 3 + [3] * 2 + [0] * 6
    assert one.positions[1, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6]
    assert one.rank[1].tolist() == [0, 1, -1]
    two = collate_ranked(tok, lists, answers_per_list=3)
    s1, s2 = (np.asarray(ranking_scores(params, b, model=model)) for b in (one, two))
    assert s2[1, 2] == 0.0 and s1[1, 2] == 0.0 and len(set(np.round(s2[0], 4))) == 3
    np.testing.assert_allclose(s1, s2, atol=2e-5)
    grad = jax.jit(jax.value_and_grad(lambda p, b: _reward_model.ranking_loss(p, b, model=model,
                                                                                cfg=RankingConfig())[0]))
    (l1, g1), (l2, g2) = grad(params, one), grad(params, two)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(np.abs(b).max()) + 1e-8)
    # pairs pass the option through; a too-long answer is still named against max_length
    assert collate_pairs(tok, [("1+1=", "2", "3")], share_prompt=True).segment_ids.shape == (1, 16)
    with pytest.raises(ValueError, match="row 0 answer 2: 10 tokens exceed max_length=9"):
        collate_ranked(tok, lists[:1], share_prompt=True, max_length=9)
