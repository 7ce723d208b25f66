"""On-policy distillation (`on_policy_distill`): advantages and loss against naive per-row references,
the estimator's expected gradient against the analytic gradient of the reverse KL on tabular
problems (one token: ∇_z KL(π‖q); two tokens: γ = 1 gives the sequence-level KL's gradient, γ = 0 the
per-state KLs' with the state distribution held fixed), a student distilled through the real RL loop
from a teacher of another size converging to the teacher's distribution, and a missing or mismatched
teacher failing with an error naming the field."""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.algorithms import get_algorithm, prepare
from rljax.data.batch import PolicyBatch
from rljax.estimators import DistillConfig, PrepareInput, distill_advantages
from rljax.losses import GRPOConfig
from rljax.models import Model, preset
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig


def _naive_advantages(student, teacher, mask, coef, gamma):
    """Row by row, token by token: r_t = coef (ℓ^T_t − ℓ^S_t) on masked tokens, A_t = Σ_{k≥t} γ^{k−t} r_k."""
    R, T = student.shape
    r = np.zeros((R, T))
    adv = np.zeros((R, T))
    for i in range(R):
        for t in range(T):
            if mask[i, t]:
                r[i, t] = coef * (teacher[i, t] - student[i, t])
        for t in range(T):
            if mask[i, t]:
                adv[i, t] = sum(gamma ** (k - t) * r[i, k] for k in range(t, T) if mask[i, k]) if gamma else r[i, t]
    return adv, r


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_advantages_match_a_naive_per_row_reference(gamma):
    rng = np.random.default_rng(0)
    R, T = 5, 7
    student = -rng.uniform(0.1, 3.0, (R, T)).astype(np.float32)
    teacher = -rng.uniform(0.1, 3.0, (R, T)).astype(np.float32)
    mask = np.zeros((R, T), np.float32)
    for i, (start, end) in enumerate([(2, 7), (3, 5), (0, 7), (4, 4), (6, 7)]):  # row 3 has no completion token
        mask[i, start:end] = 1
    adv, r = distill_advantages(student, teacher, mask, teacher_coef=0.5, gamma=gamma)
    want_adv, want_r = _naive_advantages(student, teacher, mask, 0.5, gamma)
    np.testing.assert_allclose(r, want_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)


def test_loss_on_a_real_rollout_matches_a_naive_reference(tiny):
    """prepare → the registered loss on a rollout of the tiny model, against numpy: the clipped surrogate
    −min(ρA, clip(ρ, 0.8, 1.2)A) averaged over completion tokens, with a perturbed π_old so some ratios clip."""
    from conftest import left_padded
    from rljax.models.logprobs import target_mask, token_logprobs
    from rljax.sampling import sample

    model, params = tiny
    prompts, pmask = left_padded([4, 2, 5], 5, 64, seed=3)
    roll = sample(params, prompts, pmask, jax.random.key(2), model=model,
                  cfg=SampleConfig(max_new_tokens=6, n=2, eos_id=5, min_prompt_bucket=1))
    teacher_params = jax.tree.map(lambda x: x * 1.5, params)
    teacher = token_logprobs(teacher_params, roll.tokens, roll.attention_mask, model=model)
    algo = get_algorithm("on_policy_distill")
    assert algo.needs().teacher and not algo.needs().reference and algo.estimator.output == "token"
    batch, keep = prepare(algo, PrepareInput(rollout=roll, rewards=np.zeros(6, np.float32), teacher_logprobs=teacher))
    assert bool(np.all(keep)) and batch.advantages.shape == teacher.shape
    mask = np.asarray(target_mask(roll.loss_mask, roll.attention_mask))
    np.testing.assert_allclose(batch.rewards, ((np.asarray(teacher) - np.asarray(roll.logprobs)) * mask).sum(1),
                               rtol=1e-5, atol=1e-5)
    noise = np.random.default_rng(1).normal(0, 0.3, mask.shape).astype(np.float32) * mask
    batch = batch.replace(old_logprobs=batch.old_logprobs + noise)
    loss, metrics = algo.loss.loss(params, batch, model=model, cfg=algo.loss.config)

    lp = np.asarray(token_logprobs(params, roll.tokens, roll.attention_mask, model=model), np.float64)
    old = np.asarray(batch.old_logprobs, np.float64)
    adv = np.asarray(batch.advantages, np.float64)
    terms = []
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                rho = np.exp(lp[i, t] - old[i, t])
                terms.append(-min(rho * adv[i, t], np.clip(rho, 0.8, 1.2) * adv[i, t]))
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-4, abs=1e-6)
    assert 0 < float(metrics["clip_fraction"]) < 1


# ----------------------------------------------------------------------------- tabular closed forms


@dataclass(frozen=True)
class _TabularConfig:
    vocab_size: int


@dataclass(frozen=True)
class Tabular:
    """A tabular policy with the model interface the losses use: the logits at a position are
    params["W"][current token], so π(y_{t+1} | y_≤t) = softmax(W[y_t]) (a first-order table)."""

    config: _TabularConfig

    def forward(self, params, tokens, attention_mask=None, *, positions=None, cache=None, segment_ids=None):
        return jax.nn.one_hot(tokens, self.config.vocab_size, dtype=jnp.float32), None

    def logits(self, params, hidden):
        return hidden @ params["W"]


def _expected_gradient(algo, W, Q, sequences, n_completion):
    """Σ_y π(y) ∇_W loss(the one-row batch of y) over every completion y (prompt token 0): the
    estimator's expected gradient, exactly. π_old = π (first minibatch), teacher log-probs from Q."""
    V = W.shape[0]
    model = Tabular(_TabularConfig(V))
    tokens = np.array([[0, *y] for y in sequences], np.int32)
    ones = np.ones_like(tokens)
    loss_mask = ones.copy()
    loss_mask[:, 0] = 0
    logp_s = jax.nn.log_softmax(W, axis=-1)
    logp_t = jax.nn.log_softmax(Q, axis=-1)
    old = logp_s[tokens[:, :-1], tokens[:, 1:]]
    teach = logp_t[tokens[:, :-1], tokens[:, 1:]]
    mask = np.ones(old.shape, np.float32)
    adv, r = distill_advantages(old, teach, mask, teacher_coef=1.0, gamma=algo.estimator.config.gamma)

    rows = PolicyBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(ones), loss_mask=jnp.asarray(loss_mask),
                       old_logprobs=old, advantages=adv, rewards=r.sum(1), group_ids=jnp.zeros(len(tokens), jnp.int32))

    def row_loss(W_, i):  # the loss of the one-row batch holding sequence i
        b = jax.tree.map(lambda x: x[i][None], rows)
        return algo.loss.loss({"W": W_}, b, model=model, cfg=algo.loss.config)[0]

    grads = jax.jit(jax.vmap(jax.grad(row_loss), in_axes=(None, 0)))(W, jnp.arange(len(sequences)))
    prob = jnp.exp(old.sum(axis=1))
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-5) and n_completion == tokens.shape[1] - 1
    return jnp.einsum("n,nij->ij", prob, grads)


def test_one_token_gradient_is_the_analytic_gradient_of_the_reverse_kl():
    """One token, logits z = W[0]: E_{y~π}[∇ loss] = ∇_z KL(π ‖ q) = π ⊙ (log π − log q − KL(π‖q))."""
    V = 6
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(0, 1.0, (V, V)), jnp.float32)
    Q = jnp.asarray(rng.normal(0, 2.0, (V, V)), jnp.float32)
    algo = get_algorithm("on_policy_distill")
    g = _expected_gradient(algo, W, Q, [(y,) for y in range(V)], 1)
    pi, logq = jax.nn.softmax(W[0]), jax.nn.log_softmax(Q[0])
    kl = jnp.sum(pi * (jnp.log(pi) - logq))
    analytic = pi * (jnp.log(pi) - logq - kl)
    np.testing.assert_allclose(g[0], analytic, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g[0], jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * (jax.nn.log_softmax(z) - logq)))(
        W[0]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g[1:], 0.0, atol=1e-7)  # rows of states never visited get nothing


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_two_token_gradient_is_the_sequence_or_per_state_reverse_kl_gradient(gamma):
    """Two tokens y1 ~ π(·|0), y2 ~ π(·|y1). γ = 1: the expected gradient is ∇_W KL(π(y1,y2) ‖ q(y1,y2)),
    the sequence-level reverse KL. γ = 0: it is ∇_W of KL(π(·|0)‖q(·|0)) + Σ_{y1} sg[π(y1|0)]
    KL(π(·|y1)‖q(·|y1)), the per-state KLs with the visit distribution held fixed."""
    V = 4
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(0, 1.0, (V, V)), jnp.float32)
    Q = jnp.asarray(rng.normal(0, 2.0, (V, V)), jnp.float32)
    algo = get_algorithm("on_policy_distill").with_config(advantage=DistillConfig(gamma=gamma),
                                                          loss=GRPOConfig(kl_coef=0.0,
                                                                          aggregation="seq_mean_token_sum"))
    g = _expected_gradient(algo, W, Q, [(a, b) for a in range(V) for b in range(V)], 2)
    logq = jax.nn.log_softmax(Q, axis=-1)

    def state_kl(W_):  # [V]: KL(π(·|s) ‖ q(·|s)) for every state s
        lp = jax.nn.log_softmax(W_, axis=-1)
        return jnp.sum(jnp.exp(lp) * (lp - logq), axis=-1)

    if gamma == 1.0:
        def objective(W_):
            lp = jax.nn.log_softmax(W_, axis=-1)
            joint = lp[0][:, None] + lp  # log π(y1, y2) [V, V]
            return jnp.sum(jnp.exp(joint) * (joint - (logq[0][:, None] + logq)))
    else:
        def objective(W_):
            visit = jax.lax.stop_gradient(jax.nn.softmax(W_[0]))
            kl = state_kl(W_)
            return kl[0] + jnp.sum(visit * kl)
    np.testing.assert_allclose(g, jax.grad(objective)(W), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the RL loop


def _probs(model, params):
    return jax.nn.softmax(model(params, jnp.ones((1, 1), jnp.int32))[0, -1].astype(jnp.float32))


def _reverse_kl(p, q):
    return float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_a_student_distilled_through_the_rl_loop_reaches_a_teacher_of_another_size():
    """One-step categorical (64 tokens, one prompt token): the 1-layer student samples, a 2-layer narrower
    teacher (its LM head scaled so its distribution is far from uniform) scores the samples; 150 on-policy
    distillation iterations take the exact KL(π_S ‖ π_T) at the prompt from its start to below 2% of it."""
    student = Model(preset("tiny", n_layers=1))
    teacher = Model(preset("tiny", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, mlp_dim=128))
    s_params = jax.jit(student.init)(jax.random.key(0))
    t_params = jax.jit(teacher.init)(jax.random.key(7))
    t_params = dict(t_params, lm_head=t_params["lm_head"] * 40.0)
    target = _probs(teacher, t_params)
    cfg = RLConfig(algorithm="on_policy_distill",
                   sampling=SampleConfig(max_new_tokens=1, n=16, eos_id=-1, min_prompt_bucket=1),
                   optimizer=OptimizerConfig(lr=2e-2, schedule="constant", clip_norm=None), track_kl=False)
    it = make_rl_iteration(student, cfg, lambda p, c, **_: np.zeros(len(c), np.float32),
                           lambda ids: [str(list(r)) for r in np.asarray(ids)], teacher_model=teacher)
    state = create_rl_state(student, s_params, cfg, jax.random.key(1), teacher_params=t_params, teacher_model=teacher)
    kl_start = _reverse_kl(_probs(student, s_params), target)
    first = None
    for _ in range(150):
        state, m = it(state, np.ones((4, 1), np.int32), None)
        first = m if first is None else first
    kl_end = _reverse_kl(_probs(student, state.policy.params), target)
    print(f"KL(π_S ‖ π_T): start {kl_start:.4f}, after 150 iterations {kl_end:.5f}; teacher entropy "
          f"{-float(jnp.sum(target * jnp.log(target))):.3f} nats")
    assert kl_start > 1.0 and kl_end < 0.02 * kl_start, (kl_start, kl_end)
    # the iteration's own estimate (k1 over the sampled tokens) tracks the exact KL
    assert first["teacher_kl_k1"] == pytest.approx(kl_start, rel=0.5)
    assert m["teacher_kl_k1"] < 0.1 and "time_teacher_s" in m


def test_a_missing_or_mismatched_teacher_is_an_error_naming_the_field(tiny):
    model, params = tiny
    cfg = RLConfig(algorithm="on_policy_distill", sampling=SampleConfig(max_new_tokens=1, n=2, eos_id=-1,
                                                                        min_prompt_bucket=1))
    reward = lambda p, c, **_: np.zeros(len(c), np.float32)  # noqa: E731
    decode = lambda ids: [str(list(r)) for r in np.asarray(ids)]  # noqa: E731
    it = make_rl_iteration(model, cfg, reward, decode)
    with pytest.raises(ValueError, match="RLState.teacher_params is None"):
        it(create_rl_state(model, params, cfg, jax.random.key(0)), np.ones((2, 1), np.int32), None)
    small = Model(preset("tiny", n_layers=1, vocab_size=model.config.vocab_size - 8))
    with pytest.raises(ValueError, match=rf"teacher_model \(the teacher\): its vocab_size {model.config.vocab_size - 8} "
                                         rf"is smaller than the policy's {model.config.vocab_size}"):
        make_rl_iteration(model, cfg, reward, decode, teacher_model=small)
    # the same tokenizer's embedding table padded further (Qwen2.5 0.5B-3B vs 7B) scores every student token
    make_rl_iteration(model, cfg, reward, decode, teacher_model=Model(preset("tiny", n_layers=1, vocab_size=80)))
    # a teacher of another architecture without its teacher_model: named, not a Flax scope error deep in the scoring
    wide = Model(preset("tiny", n_layers=1, d_model=64, vocab_size=model.config.vocab_size))
    state = create_rl_state(model, params, cfg, jax.random.key(0), teacher_params=wide.init(jax.random.key(1)))
    with pytest.raises(ValueError, match=r"RLState.teacher_params: parameter .* is of shape .*, the model expects "
                                         r"shape .*; pass the teacher's model as make_rl_iteration\(\.\.\., "
                                         r"teacher_model=\)"):
        it(state, np.ones((2, 1), np.int32), None)
    # the reverse KL is estimated from the student's own samples at temperature 1
    for sampling in (cfg.sampling.replace(temperature=0.7), cfg.sampling.replace(top_k=5),
                     cfg.sampling.replace(top_p=0.9), cfg.sampling.replace(min_p=0.05),
                     cfg.sampling.replace(repetition_penalty=1.2)):
        with pytest.raises(ValueError, match="RLConfig.sampling: on_policy_distill estimates KL.* at temperature 1 "
                                             "without truncation or penalty"):
            RLConfig(algorithm="on_policy_distill", sampling=sampling)
    with pytest.raises(ValueError, match="teacher_model: grpo uses no teacher"):
        make_rl_iteration(model, RLConfig(algorithm="grpo", sampling=cfg.sampling.replace(n=2)), reward, decode,
                          teacher_model=model)
    with pytest.raises(ValueError, match="PrepareInput.teacher_logprobs is missing"):
        from rljax.sampling import sample

        roll = sample(params, np.ones((1, 1), np.int32), None, jax.random.key(0), model=model, cfg=cfg.sampling)
        prepare(get_algorithm("on_policy_distill"), PrepareInput(rollout=roll, rewards=np.zeros(2, np.float32)))
    for bad, match in [(dict(teacher_coef=0.0), "DistillConfig.teacher_coef"),
                       (dict(gamma=1.5), "DistillConfig.gamma")]:
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)
