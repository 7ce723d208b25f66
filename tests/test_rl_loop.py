"""The RL iteration's bookkeeping: metrics against direct computations, the moving-average
baseline's state, prompts longer than the context, and DAPO's dynamic sampling refill."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.estimators import BaselineConfig
from rljax.losses import GRPOConfig
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.phases import LoopConfig, PromptBatch, rl
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig, concat_rollouts, sample, truncate_prompts
from rljax.state import OptimizerConfig
from rljax.transforms import moving_average_baseline, normalise_rewards

V = 64
# Run op by op, the model compiles every primitive for every new shape: the reference
# log-probs are jitted instead (one compile per model and batch shape).
_token_logprobs = jax.jit(token_logprobs, static_argnames=("model",))


def decode(ids):
    """Token ids as text, padding (0) left out."""
    return [" ".join(str(int(t)) for t in row if t != 0) for row in np.asarray(ids)]


def arm(completion: str) -> int:
    """The sampled token of a single-token completion (0, the pad id, decodes to '')."""
    return int((completion.split() or ["0"])[0])


def arm_reward(prompts, completions, **_):
    """Single-token completions: token y pays y / 63."""
    return [arm(c) / (V - 1) for c in completions]


@pytest.fixture(scope="module")
def bandit():
    model = Model(preset("tiny", n_layers=1))
    return model, model.init(jax.random.key(0))


def one_token(n, **kw):
    return SampleConfig(max_new_tokens=1, n=n, eos_id=-1, min_prompt_bucket=1, **kw)


def test_kl_and_accuracy_metrics_match_a_direct_computation(bandit):
    model, params = bandit
    seen = []

    def accuracy(prompts, completions, **_):
        out = [float(arm(c) >= 32) for c in completions]
        seen.append(out)
        return out

    cfg = RLConfig(algorithm="rloo", sampling=one_token(4),
                   optimizer=OptimizerConfig(lr=3e-2, schedule="constant", clip_norm=None))
    it = make_rl_iteration(model, cfg, arm_reward, decode, accuracy_fn=accuracy)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    prompts = np.ones((4, 1), np.int32)
    state, m0 = it(state, prompts, None)
    # the sampler is the reference at iteration 0: both KL estimates vanish
    assert abs(m0["kl_k1"]) < 1e-5 and abs(m0["kl_k3"]) < 1e-5
    assert m0["accuracy"] == pytest.approx(np.mean(seen[-1]))
    for _ in range(2):
        state, _ = it(state, prompts, None)
    key = jax.random.key(7)
    start_params = jax.tree.map(jnp.copy, state.policy.params)  # the step donates the state
    _, m = it(state, prompts, None, key)
    # the same draw by hand: k1 = mean over completion tokens of log π_old − log π_ref, k3 = e^{-d} − 1 + d
    k_sample = jax.random.split(key, 3)[0]
    r = sample(start_params, prompts, None, k_sample, model=model, cfg=cfg.sampling)
    ref = np.asarray(_token_logprobs(params, r.tokens, r.attention_mask, model=model))
    mask = np.asarray(r.loss_mask[:, 1:])
    d = (np.asarray(r.logprobs) - ref)[mask == 1]
    assert m["kl_k1"] == pytest.approx(d.mean(), abs=1e-5)
    assert m["kl_k3"] == pytest.approx(np.mean(np.exp(-d) - 1 + d), abs=1e-5)
    assert m["kl_k3"] > 1e-4  # the policy has moved
    assert m["accuracy"] == pytest.approx(np.mean(seen[-1]))
    for stage in ("sample", "score", "ref", "update"):
        assert m[f"time_{stage}_s"] >= 0


def test_moving_average_baseline_state_follows_its_recursion(bandit):
    """ema_0 = mean r_0 (no past rewards), ema_{i+1} = d ema_i + (1 − d) mean r_{i+1};
    iteration i uses A = r − ema_{i−1}."""
    from rljax.algorithms import get_algorithm, prepare
    from rljax.estimators import PrepareInput

    model, params = bandit
    decay = 0.7
    cfg = RLConfig(algorithm="reinforce", advantage=BaselineConfig("moving_average"), sampling=one_token(2),
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"),
                   transforms=(moving_average_baseline(decay),))
    it = make_rl_iteration(model, cfg, arm_reward, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    prompts = np.ones((4, 1), np.int32)
    expected = None
    for i in range(4):
        state, m = it(state, prompts, None)
        mean = m["reward_mean"]
        expected = mean if expected is None else decay * expected + (1 - decay) * mean
        assert float(state.transforms[0].mean) == pytest.approx(expected, rel=1e-5)
    algo = get_algorithm("reinforce")
    r = sample(params, prompts, None, jax.random.key(0), model=model, cfg=cfg.sampling)
    rewards = np.array([0.1, 0.5, 0.2, 0.9, 0.0, 1.0, 0.3, 0.3], np.float32)
    batch, _ = prepare(algo, PrepareInput(rollout=r, rewards=rewards, baseline=jnp.float32(0.4)), cfg.advantage)
    np.testing.assert_allclose(np.asarray(batch.advantages), rewards - 0.4, rtol=1e-6)
    with pytest.raises(ValueError, match="PrepareInput.baseline is missing"):
        prepare(algo, PrepareInput(rollout=r, rewards=rewards), cfg.advantage)
    with pytest.raises(TypeError):  # a misspelt input is an error, not ignored
        PrepareInput(rollout=r, rewards=rewards, basline=jnp.float32(0.4))
    with pytest.raises(ValueError, match="moving_average_baseline"):  # the estimator's need is checked
        RLConfig(algorithm="reinforce", advantage=BaselineConfig("moving_average"))


def test_prompts_longer_than_the_context_raise_or_are_truncated_on_the_left():
    model = Model(preset("tiny", n_layers=1, max_seq_len=32))
    params = model.init(jax.random.key(0))
    tokens, mask = left_padded([5, 30, 12], 30, V, seed=3)
    cfg = RLConfig(algorithm="grpo", sampling=SampleConfig(max_new_tokens=8, n=2, min_prompt_bucket=1))
    seen = []

    def reward(prompts, completions, **_):
        seen.append(prompts)
        return [float(len(c)) for c in completions]

    state = create_rl_state(model, params, cfg, jax.random.key(1))
    with pytest.raises(ValueError, match="prompt row 1 has 30 tokens.*at most 24"):
        make_rl_iteration(model, cfg, reward, decode)(state, tokens, mask)
    it = make_rl_iteration(model, dataclasses.replace(cfg, truncate_prompts=True), reward, decode)
    _, m = it(state, tokens, mask)
    assert m["truncated_prompts"] == 1
    kept = seen[-1][2]  # row 1's first sample: its last 24 tokens
    assert kept == " ".join(str(t) for t in tokens[1, -24:])
    assert seen[-1][0] == " ".join(str(t) for t in tokens[0, -5:])
    t, k, cut = truncate_prompts(tokens, mask, 24)
    assert cut == 1 and t.shape == (3, 24) and k.sum() == 5 + 24 + 12


def test_concat_rollouts_left_pads_without_changing_log_probabilities(bandit):
    model, params = bandit
    cfg = SampleConfig(max_new_tokens=4, n=2, eos_id=-1, min_prompt_bucket=1)
    a = sample(params, *left_padded([3, 2], 3, V, seed=0), jax.random.key(0), model=model, cfg=cfg)
    b = sample(params, *left_padded([7, 5], 8, V, seed=1), jax.random.key(1), model=model, cfg=cfg)
    assert a.prompt_length != b.prompt_length
    c = concat_rollouts([a, b])
    assert c.tokens.shape == (8, b.tokens.shape[1]) and list(np.asarray(c.group_ids)) == [0, 0, 1, 1, 2, 2, 3, 3]
    lp = np.asarray(_token_logprobs(params, c.tokens, c.attention_mask, model=model))
    k = b.prompt_length - a.prompt_length
    np.testing.assert_allclose(lp[:4, k:] * np.asarray(a.loss_mask[:, 1:]), np.asarray(a.logprobs), atol=2e-5)
    np.testing.assert_allclose(np.asarray(c.logprobs[:4, k:]), np.asarray(a.logprobs))
    np.testing.assert_array_equal(np.asarray(c.completions), np.concatenate([a.completions, b.completions]))
    # another max_new_tokens: the shorter completions are right-padded as rows that stopped early
    d = sample(params, *left_padded([7, 5], 8, V, seed=1), jax.random.key(1), model=model,
               cfg=dataclasses.replace(cfg, max_new_tokens=7))
    e = concat_rollouts([b, d], pad_id=0)
    assert e.tokens.shape == (8, d.tokens.shape[1]) and e.prompt_length == d.prompt_length
    np.testing.assert_array_equal(np.asarray(e.completions[:4, :4]), np.asarray(b.completions))
    np.testing.assert_array_equal(np.asarray(e.completions[:4, 4:]), 0)
    for name in ("attention_mask", "loss_mask", "logprobs", "sampling_logprobs"):
        x = np.asarray(getattr(e, name))
        np.testing.assert_array_equal(x[:4, :getattr(b, name).shape[1]], np.asarray(getattr(b, name)), err_msg=name)
        np.testing.assert_array_equal(x[:4, getattr(b, name).shape[1]:], 0, err_msg=name)
        np.testing.assert_array_equal(x[4:], np.asarray(getattr(d, name)), err_msg=name)
    lp = np.asarray(_token_logprobs(params, e.tokens, e.attention_mask, model=model))
    np.testing.assert_allclose(lp[:4] * np.asarray(e.loss_mask[:4, 1:]), np.asarray(e.logprobs[:4]), atol=2e-5)


def _constant_unless_odd(prompts, completions, **_):
    """Prompts starting with an even token pay 1 whatever is sampled (an uninformative
    group); odd ones pay the sampled arm."""
    return [1.0 if int(p.split()[0]) % 2 == 0 else arm(c) / (V - 1) for p, c in zip(prompts, completions)]


def test_dynamic_sampling_refills_uninformative_groups(bandit):
    model, params = bandit
    dapo = GRPOConfig(eps_high=0.28, aggregation="token_mean", kl_coef=0.0)
    prompts = np.array([[2], [4], [6], [3]], np.int32)  # one informative group of four
    refills = {1: np.array([[8], [5], [10], [12]], np.int32), 2: np.array([[7], [9], [11], [13]], np.int32)}
    calls = []

    def refill(k):
        calls.append(k)
        return refills[k], None, {}

    def state():  # each iteration donates its input state
        return create_rl_state(model, params, RLConfig(algorithm="dapo"), jax.random.key(1))

    without = RLConfig(algorithm="dapo", loss=dapo, sampling=one_token(8))
    _, m = make_rl_iteration(model, without, _constant_unless_odd, decode)(state(), prompts, None, refill=refill)
    assert m["kept_fraction"] == 0.25 and m["refill_rounds"] == 0 and not calls
    cfg = RLConfig(algorithm="dapo", loss=dapo, sampling=one_token(8), max_refills=3)
    _, m = make_rl_iteration(model, cfg, _constant_unless_odd, decode)(state(), prompts, None, refill=refill)
    # round 1 adds one informative group (5), round 2 four more: 6 >= 4 stops it
    assert calls == [1, 2] and m["refill_rounds"] == 2 and m["kept_fraction"] == 1.0
    calls.clear()
    short = RLConfig(algorithm="dapo", loss=dapo, sampling=one_token(8), max_refills=1)
    _, m = make_rl_iteration(model, short, _constant_unless_odd, decode)(state(), prompts, None, refill=refill)
    assert calls == [1] and m["kept_fraction"] == 0.5  # 2 informative groups of 4, topped up with dropped ones
    with pytest.raises(ValueError, match="drop_equal_groups"):
        RLConfig(algorithm="grpo", max_refills=2)
    # the refill protocol's misuses, named
    with pytest.raises(ValueError, match=r"max_refills=3, but the iteration got no refill= function"):
        make_rl_iteration(model, cfg, _constant_unless_odd, decode)(state(), prompts, None)
    with pytest.raises(TypeError, match=r"refill\(1\) must return \(tokens, mask, metadata\), got tuple of 2"):
        make_rl_iteration(model, cfg, _constant_unless_odd, decode)(state(), prompts, None,
                                                                   refill=lambda k: refill(k)[:2])


def test_sample_records_are_the_rows_trained_on_after_refills(bandit):
    """make_rl_iteration(on_samples=): after one refill, the records are the 4 groups trained on, in order: the
    informative ones (prompts 3, then 5 from the refill), topped up with the first uninformative ones (2, 4);
    each record's reward is the reward function of its own text, its columns the prompt's metadata."""
    model, params = bandit
    got = []
    cfg = RLConfig(algorithm="dapo", loss=GRPOConfig(eps_high=0.28, aggregation="token_mean", kl_coef=0.0),
                   sampling=one_token(8), max_refills=1)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    refills = {1: (np.array([[8], [5], [10], [12]], np.int32), None, {"tag": ["r8", "r5", "r10", "r12"]})}
    iteration = make_rl_iteration(model, cfg, _constant_unless_odd, decode, on_samples=lambda i, r: got.append((i, r)))
    _, m = iteration(state, np.array([[2], [4], [6], [3]], np.int32), None, refill=refills.get, tag=["a", "b", "c", "d"])
    (step, records), = got
    assert step == 1 and len(records) == 32 and m["kept_fraction"] == 0.5
    assert [r["prompt"] for r in records[::8]] == ["3", "5", "2", "4"]
    assert [r["columns"] for r in records[::8]] == [{"tag": "d"}, {"tag": "r5"}, {"tag": "a"}, {"tag": "b"}]
    assert [r["group"] for r in records] == [j // 8 for j in range(32)]
    np.testing.assert_allclose([r["reward"] for r in records],
                               _constant_unless_odd([r["prompt"] for r in records], [r["completion"] for r in records]),
                               rtol=1e-6)
    assert all(r["completion_tokens"] == 1 and r["stopped"] is False for r in records)  # one token, no eos


def test_options_that_would_be_ignored_and_misshapen_metadata_are_refused(bandit):
    """A running baseline no estimator reads, greedy samples for a group method, metadata with a
    count other than one per prompt, and sampler ids that are not token ids: errors naming them."""
    model, params = bandit
    with pytest.raises(ValueError, match=r"a running baseline is given, but reinforce's estimator \(baseline\) "
                                         r"does not use one"):
        RLConfig(algorithm="reinforce", transforms=(moving_average_baseline(0.9),))
    # SCST subtracts the greedy decode's raw reward: normalised samples would be on another scale
    with pytest.raises(ValueError, match=r"scst's baseline is the greedy decode's reward.*normalise_rewards"):
        RLConfig(algorithm="scst", transforms=(normalise_rewards(),))
    RLConfig(algorithm="rloo", transforms=(normalise_rewards(),))  # a baseline from the samples: fine
    with pytest.raises(ValueError, match=r"greedy decoding .* makes them identical: every advantage would be 0"):
        RLConfig(algorithm="grpo", sampling=SampleConfig(n=4, temperature=0.0))
    with pytest.raises(ValueError, match=r"greedy decoding .*min_p=1\) makes them identical"):
        RLConfig(algorithm="grpo", sampling=SampleConfig(n=4, min_p=1.0))
    cfg = RLConfig(algorithm="grpo", sampling=one_token(2))
    it = make_rl_iteration(model, cfg, arm_reward, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    with pytest.raises(ValueError, match=r"metadata 'answer': 3 entries for 2 prompts \(one per prompt"):
        it(state, np.array([[3], [5]], np.int32), None, answer=[1, 2, 3])
    for field, value in (("pad_id", None), ("pad_id", -1), ("eos_id", None), ("eos_id", -2), ("eos_id", True)):
        with pytest.raises(ValueError, match=rf"SampleConfig.{field}: must be a token id"):
            SampleConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"SampleConfig.eos_id = {V} is outside the model's vocabulary"):
        sample(params, np.array([[3]], np.int32), None, jax.random.key(0), model=model,
               cfg=SampleConfig(max_new_tokens=2, eos_id=V))


class _Prompts:
    """batch_at(position) -> prompt [[position]]; records the positions drawn."""

    def __init__(self):
        self.positions = []

    def batch_at(self, position):
        self.positions.append(position)
        return PromptBatch(tokens=np.array([[2 + 2 * (position % 2)], [2 * position + 3]], np.int32), mask=None,
                           metadata={})


def test_rl_phase_refills_from_positions_past_the_phase(bandit):
    model, params = bandit
    dapo = GRPOConfig(eps_high=0.28, aggregation="token_mean", kl_coef=0.0)
    cfg = RLConfig(algorithm="dapo", loss=dapo, sampling=one_token(4), max_refills=2,
                   optimizer=OptimizerConfig(lr=1e-3, schedule="constant"))
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    source = _Prompts()
    rl(state, source, _constant_unless_odd, cfg, model=model, decode=decode,
       loop=LoopConfig(steps=2, log_every=1, progress=False))
    # iteration i draws position i, then refills from steps + i * max_refills + (k − 1)
    assert source.positions == [0, 2, 1, 4]


@pytest.mark.slow  # a sharded twin of 20-36 s (others stay in the default suite); .ci/run runs the slow tier
def test_sharded_rl_iterations_equal_single_device():
    """Two GRPO iterations on a (2, 2, 2) mesh of 8 simulated devices == one device:
    same samples, same metrics, same parameters; and one with the loss on the high-entropy tokens alone
    (top_entropy_quantile: a quantile over the global batch's tokens) and the reference moved toward the policy
    after it (ref_sync_every)."""
    from conftest import run_with_devices

    out = run_with_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from conftest import left_padded
        from rljax.models import Model, preset
        from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
        from rljax.sampling import SampleConfig
        from rljax.sharding import make_mesh
        from rljax.state import OptimizerConfig

        def decode(ids):
            return [" ".join(str(int(t)) for t in row if t != 0) for row in np.asarray(ids)]

        def reward(prompts, completions, **_):
            return [sum(int(t) % 7 == 0 for t in c.split()) / 6 for c in completions]

        cfg = RLConfig(algorithm="grpo", sampling=SampleConfig(max_new_tokens=6, n=4, eos_id=-1),
                       optimizer=OptimizerConfig(lr=1e-2, schedule="constant", eps=1e-3), minibatches=2)
        # (a large Adam eps: with 1e-8, coordinates whose gradient is ~0 would turn reduction-order
        # noise into full-size steps, and the comparison would test rounding, not sharding)
        prompts, mask = left_padded([5, 3, 7, 2], 8, 64, seed=4)
        results = []
        for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2)):
            model = Model(preset("tiny", n_layers=1), mesh=mesh)  # one layer: the sharding is what is tested
            params = Model(preset("tiny", n_layers=1)).init(jax.random.key(0))
            it = make_rl_iteration(model, cfg, reward, decode)
            state = create_rl_state(model, params, cfg, jax.random.key(1))
            ms = []
            for _ in range(2):
                state, m = it(state, prompts, mask)
                ms.append(m)
            if mesh is not None:
                w = state.policy.params["layers"]["mlp"]["gate"]
                assert len({s.device for s in w.addressable_shards}) == 8
            results.append((jax.device_get(state.policy.params), ms))
        (p1, m1), (p2, m2) = results
        for a, b in zip(m1, m2):
            for k in ("reward_mean", "kl_k1", "kl_k3", "loss", "completion_length"):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
        assert m1[1]["kl_k3"] > 0
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p1, p2)

        from rljax.algorithms import get_algorithm
        import dataclasses
        cfg = dataclasses.replace(cfg, algorithm=get_algorithm("grpo").with_config(top_entropy_quantile=0.3),
                                  minibatches=1, ref_sync_every=1, ref_sync_alpha=0.5)
        results = []
        for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2)):
            model = Model(preset("tiny", n_layers=1), mesh=mesh)
            params = Model(preset("tiny", n_layers=1)).init(jax.random.key(0))
            state, m = make_rl_iteration(model, cfg, reward, decode)(
                create_rl_state(model, params, cfg, jax.random.key(1)), prompts, mask)
            if mesh is not None:
                w = state.ref_params["layers"]["mlp"]["gate"]
                assert len({s.device for s in w.addressable_shards}) == 8
            results.append(((jax.device_get(state.policy.params), jax.device_get(state.ref_params)), m))
        (p1, m1), (p2, m2) = results
        for k in ("loss", "entropy_kept_fraction", "reward_mean"):
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-4, atol=1e-6, err_msg=k)
        assert 0.25 < m1["entropy_kept_fraction"] < 0.4
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p1, p2)
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.slow  # a sharded subprocess of ~30 s; .ci/run runs the slow tier
def test_sharded_rl_phase_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """On a (2, 2, 2) mesh: 2 iterations, then the same command for 3 resumes from the checkpoint and
    equals 3 straight iterations, and so does the state 2 iterations returned, continued to 3 in its own
    directory. (The state's step, key and transform state were single-device arrays, restored committed to
    device 0, and the resumed iteration failed to mix them with the sharded policy.)"""
    from conftest import run_with_devices

    out = run_with_devices(f"""
        import jax, numpy as np
        from conftest import left_padded
        from rljax.data.batch import PromptBatch
        from rljax.estimators import BaselineConfig
        from rljax.models import Model, preset
        from rljax.phases import LoopConfig, rl
        from rljax.rl import RLConfig, create_rl_state
        from rljax.sampling import SampleConfig
        from rljax.sharding import make_mesh
        from rljax.state import OptimizerConfig
        from rljax.transforms import moving_average_baseline

        def decode(ids):
            return [" ".join(str(int(t)) for t in row if t != 0) for row in np.asarray(ids)]

        def reward(prompts, completions, **_):
            return [sum(int(t) % 7 == 0 for t in c.split()) / 6 for c in completions]

        class Prompts:
            def batch_at(self, position):
                t, m = left_padded([5, 3, 7, 2], 8, 64, seed=position)
                return PromptBatch(tokens=t, mask=m, metadata={{}})

        cfg = RLConfig(algorithm="reinforce", advantage=BaselineConfig("moving_average"),
                       sampling=SampleConfig(max_new_tokens=4, n=2, eos_id=-1),
                       optimizer=OptimizerConfig(lr=1e-2, schedule="constant", eps=1e-3),
                       transforms=(moving_average_baseline(0.9),))
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        model = Model(preset("tiny", n_layers=1), mesh=mesh)
        params = Model(preset("tiny", n_layers=1)).init(jax.random.key(0))

        def run(steps, run_dir, state=None):
            state = create_rl_state(model, params, cfg, jax.random.key(1)) if state is None else state
            return rl(state, Prompts(), reward, cfg, model=model, decode=decode, run_dir=run_dir,
                      loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=1, progress=False))

        straight = run(3, {str(tmp_path / "a")!r})
        run(2, {str(tmp_path / "b")!r})
        resumed = run(3, {str(tmp_path / "b")!r})
        # a pipeline's next round: the state the last call returned, continued in the same directory (its
        # rng had been copied onto one device, and the first iteration's fold_in(rng, step) failed)
        continued = run(3, {str(tmp_path / "c")!r}, run(2, {str(tmp_path / "c")!r}))
        for done in (resumed, continued):
            assert int(done.step) == 3
            for a, b in ((done.policy.params, straight.policy.params), (done.transforms, straight.transforms),
                         (jax.random.key_data(done.rng), jax.random.key_data(straight.rng))):
                jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), jax.device_get(a),
                             jax.device_get(b))
        print("ok")
    """)
    assert "ok" in out


def test_reference_sync_moves_the_reference_toward_the_policy_by_hand(bandit):
    """ref_sync_every=2, α = 0.6: unchanged after iteration 1, θ_ref = 0.6 θ_2 + 0.4 θ_ref after iteration 2;
    α = 1 every iteration: the reference is the policy, so the next iteration's KL to it is that of the sampler
    to itself, 0."""
    model, params = bandit
    cfg = RLConfig(algorithm="grpo", sampling=one_token(4), optimizer=OptimizerConfig(lr=3e-2, schedule="constant"),
                   ref_sync_every=2, ref_sync_alpha=0.6)
    it = make_rl_iteration(model, cfg, arm_reward, decode)
    state = create_rl_state(model, params, cfg, jax.random.key(1))
    prompts = np.ones((4, 1), np.int32)
    ref0 = jax.device_get(state.ref_params)
    state, m1 = it(state, prompts, None)
    assert m1["ref_synced"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ref_params), ref0)
    state, m2 = it(state, prompts, None)
    theta2 = jax.device_get(state.policy.params)
    assert m2["ref_synced"] == 1.0 and m2["kl_k3"] > 0
    jax.tree.map(lambda r, t, r0: np.testing.assert_allclose(r, 0.6 * t + 0.4 * r0, rtol=1e-6, atol=1e-7),
                 jax.device_get(state.ref_params), theta2, ref0)
    assert not np.allclose(theta2["embedding"], ref0["embedding"])  # the policy had moved

    reset = dataclasses.replace(cfg, ref_sync_every=1, ref_sync_alpha=1.0)
    it = make_rl_iteration(model, reset, arm_reward, decode)
    state, _ = it(state, prompts, None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ref_params), jax.device_get(state.policy.params))
    _, m = it(state, prompts, None)
    assert abs(m["kl_k1"]) < 1e-5 and abs(m["kl_k3"]) < 1e-5
    with pytest.raises(ValueError, match="need ref_sync_every >= 0 .* and 0 < ref_sync_alpha <= 1, got 2, 0.0"):
        dataclasses.replace(cfg, ref_sync_alpha=0.0)
    with pytest.raises(ValueError, match="ref_sync_every: rloo has no KL term to the reference and track_kl is off"):
        RLConfig(algorithm="rloo", sampling=one_token(4), track_kl=False, ref_sync_every=3)


def test_rl_phase_resumed_from_its_checkpoint_equals_an_uninterrupted_run(bandit, tmp_path):
    """Stop after 2 of 4 iterations, run the same command again: the result equals 4 straight
    iterations (same prompts, same sampling keys, same optimizer and EMA state, the same reference moved
    toward the policy every iteration)."""
    model, params = bandit

    class Prompts:
        def batch_at(self, position):
            return PromptBatch(tokens=np.array([[3 + position], [9 + position]], np.int32), mask=None, metadata={})

    cfg = RLConfig(algorithm="reinforce", advantage=BaselineConfig("moving_average"), sampling=one_token(4),
                   optimizer=OptimizerConfig(lr=1e-2, schedule="constant"), transforms=(moving_average_baseline(0.9),),
                   ref_sync_every=1, ref_sync_alpha=0.5)

    def run(steps, run_dir):
        state = create_rl_state(model, params, cfg, jax.random.key(1))
        return rl(state, Prompts(), arm_reward, cfg, model=model, decode=decode, run_dir=str(run_dir),
                  loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=1, progress=False))

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b")
    assert int(resumed.step) == 4 and resumed.critic is None
    assert float(resumed.transforms[0].mean) == float(straight.transforms[0].mean)
    for a, b in ((resumed.policy.params, straight.policy.params), (resumed.policy.opt_state, straight.policy.opt_state),
                 (jax.random.key_data(resumed.rng), jax.random.key_data(straight.rng)),
                 (resumed.ref_params, straight.ref_params)):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    assert not np.array_equal(jax.device_get(straight.ref_params["embedding"]), params["embedding"])


def test_informative_groups_on_the_host_match_group_range():
    """The refill rule's test, a group whose rewards are not all equal, computed on the host equals
    `ops.advantages.group_range` > 0 (jnp's segment max and min) group by group, NaN groups included."""
    from rljax.ops.advantages import group_range
    from rljax.rl import _informative_groups

    rng = np.random.default_rng(0)
    n, groups = 4, 12
    rewards = rng.integers(0, 2, size=(groups, n)).astype(np.float64)  # many all-0 / all-1 groups
    rewards[3] = 0.25
    rewards[5, 2] = np.nan
    rewards = rewards.ravel()
    ids = jnp.arange(groups * n, dtype=jnp.int32) // n
    expected = np.asarray(group_range(jnp.asarray(rewards, jnp.float32), ids))[::n] > 0
    got = _informative_groups(rewards, n)
    assert got.dtype == bool and got.shape == (groups,)
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < groups and not got[3]


def test_mask_truncated_trains_on_the_stopped_rows_alone(bandit):
    """RLConfig.mask_truncated: the update equals the plain update on the same samples with the truncated rows'
    loss mask zeroed (their rewards still in the group statistics), and kept_fraction is the stopped share."""
    model, params = bandit
    sampling = SampleConfig(max_new_tokens=6, n=8, eos_id=7, min_prompt_bucket=1)
    prompts = np.array([[3], [5], [9], [11]], np.int32)
    masked, plain = (RLConfig(algorithm="grpo", sampling=sampling, mask_truncated=m,
                              optimizer=OptimizerConfig(lr=1e-2, schedule="constant")) for m in (True, False))

    def length_reward(prompts, completions, **_):
        return [float(len(c.split())) for c in completions]

    it_masked = make_rl_iteration(model, masked, length_reward, decode)
    key = jax.random.key(3)
    collected = it_masked.collect(params, prompts, None, key)
    stopped = np.asarray(collected.rollout.stopped_at_eos)
    assert 0 < stopped.sum() < len(stopped)  # the key draws both kinds of row
    a, m_a = it_masked.learn(create_rl_state(model, params, masked, jax.random.key(1)), collected, key)
    zeroed = dataclasses.replace(collected, rollout=collected.rollout.replace(
        loss_mask=collected.rollout.loss_mask * stopped[:, None].astype(collected.rollout.loss_mask.dtype)))
    b, m_b = make_rl_iteration(model, plain, length_reward, decode).learn(
        create_rl_state(model, params, plain, jax.random.key(1)), zeroed, key)
    for x, y in zip(jax.tree.leaves(a.policy.params), jax.tree.leaves(b.policy.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)
    assert m_a["kept_fraction"] == pytest.approx(stopped.mean()) and m_b["kept_fraction"] == 1.0
    with pytest.raises(ValueError, match="mask_truncated: the sampling has no stop id"):
        RLConfig(algorithm="grpo", sampling=one_token(4), mask_truncated=True)
