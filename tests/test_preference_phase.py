"""The preference phase: precomputed reference log-probs (cached on disk) train exactly as a live
reference, resume, 8 simulated devices equal one, and online DPO's rounds resume where they stopped."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_with_devices
from rljax.data.collate import BatchIterator
from rljax.data.preference_collate import collate_kto, collate_preferences, fixed_mismatch
from rljax.losses.preference import DPOConfig, KTOConfig, preference_loss, reference_logps, with_live_reference
from rljax.models import Model, preset
from rljax.phases import LoopConfig, PreferencePhaseConfig, preference
from rljax.pipelines import OnlineDPOConfig, StageArgumentsError, online_dpo
from rljax.reference import best_worst_pairs, cached_reference_logps, with_reference
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig, create_state, make_train_step
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
PAIRS = [(f"{a}+{b}=", str(a + b), str(a + b + 1 + (a % 3))) for a in range(4) for b in range(4)]
OPT = OptimizerConfig(lr=1e-3, schedule="constant")


@pytest.fixture(scope="module")
def setup():
    model = Model(preset("tiny", n_layers=2, vocab_size=TOK.vocab_size))  # the sampler must emit real characters
    params = model.init(jax.random.key(0))
    return model, params


def _train(model, params, rows, loss, steps, *, reference=None, run_dir=None, collate=None):
    collate = collate or functools.partial(collate_preferences, TOK)
    data = BatchIterator(rows, 4, collate, seed=0)
    state = create_state(model, OPT, jax.random.key(1), params=params)
    cfg = PreferencePhaseConfig(loss=loss, optimizer=OPT, loop=LoopConfig(steps=steps, log_every=1,
                                                                         checkpoint_every=2, progress=False))
    return preference(state, data, cfg, model=model, reference=reference, run_dir=run_dir)


def test_precomputed_reference_equals_live_and_is_cached(setup, tmp_path):
    model, params = setup
    collate = functools.partial(collate_preferences, TOK)
    ref = cached_reference_logps(params, PAIRS, collate, model=model, cache_dir=str(tmp_path), batch_size=5)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("ref_logps-") and ref.shape == (len(PAIRS), 2)
    # the cached values are the reference's summed log-probs of each row, whatever the batching
    direct = np.asarray(reference_logps(params, collate(PAIRS), model=model))
    np.testing.assert_allclose(ref, direct, atol=1e-4)
    # a second call loads the file; other params make another key
    np.testing.assert_array_equal(cached_reference_logps(params, PAIRS, collate, model=model,
                                                         cache_dir=str(tmp_path), batch_size=5), ref)
    other = jax.tree.map(lambda x: x * 1.01, params)
    cached_reference_logps(other, PAIRS, collate, model=model, cache_dir=str(tmp_path), batch_size=5)
    assert len(os.listdir(tmp_path)) == 2
    live = _train(model, params, PAIRS, DPOConfig(), 4, reference=params)
    pre = _train(model, params, with_reference(PAIRS, ref), DPOConfig(), 4)
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(pre.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # each pair's prompt once (collate_preferences(share_prompt=True)): the same reference log-probs and run
    shared = functools.partial(collate_preferences, TOK, share_prompt=True)
    np.testing.assert_allclose(cached_reference_logps(params, PAIRS, shared, model=model, batch_size=5), ref, atol=1e-4)
    one = _train(model, params, PAIRS, DPOConfig(), 4, reference=params, collate=shared)
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(one.params)):
        # other float rounding in the forward pass; Adam's m / √v turns it into up to ~5e-5 of an update
        # where a weight's gradient is near 0 (1 of 32,768 elements here)
        np.testing.assert_allclose(a, b, atol=1e-4)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(params)))
    assert moved > 1e-4


def test_reference_cache_keys_the_model_config_and_tuple_rows_keep_their_fields(setup, tmp_path):
    """The same params under another RoPE base are another function: a second cache file, whose values are
    that model's log-probs (the key once held params and tokens only, so it returned the first model's);
    with_reference keeps a tuple pair's weight and soft label and reads KTO tuples as KTO rows; cached KTO
    values without a fixed mismatched completion are refused (their z0 would read other pairings)."""
    model, params = setup
    collate = functools.partial(collate_preferences, TOK)
    first = cached_reference_logps(params, PAIRS, collate, model=model, cache_dir=str(tmp_path), batch_size=8)
    other = Model(dataclasses.replace(model.config, rope_theta=10.0))
    second = cached_reference_logps(params, PAIRS, collate, model=other, cache_dir=str(tmp_path), batch_size=8)
    assert len(os.listdir(tmp_path)) == 2
    np.testing.assert_allclose(second, np.asarray(reference_logps(params, collate(PAIRS), model=other)), atol=1e-4)
    assert np.abs(second - first).max() > 1e-3

    rows = [(p, c, r, None, 2.0, 0.9) for p, c, r in PAIRS[:2]]
    batch = collate(with_reference(rows, first[:2]))
    np.testing.assert_array_equal(batch.weight, [2.0, 2.0])
    np.testing.assert_allclose(batch.label, [0.9, 0.9])
    np.testing.assert_allclose(batch.ref_logps, first[:2])
    kto = [(p, c, i % 2 == 0, r) for i, (p, c, r) in enumerate(PAIRS[:2])]  # (prompt, completion, desirable, mismatched)
    kb = collate_kto(TOK, with_reference(kto, first[:2]))
    np.testing.assert_array_equal(kb.desirable, [1.0, 0.0])
    np.testing.assert_allclose(kb.ref_logps, first[:2])
    with pytest.raises(ValueError, match=r"row 0: has ref_logps but no fixed 'mismatched' completion.*fixed_mismatch"):
        collate_kto(TOK, with_reference([row[:3] for row in kto], first[:2]))


def test_shared_prompt_rows_past_the_context_are_refused_before_training():
    """The shared-prompt layout is exempt from the model's width check (a row holds P + C + R tokens), so
    a pair whose prompt + longer completion passes max_seq_len trained silently on positions past the
    context; the phase and the reference cache now refuse the batch, naming the row and the position
    (1 bos + 20 prompt + 15 completion tokens: the last real token sits at position 35 of a 32-token
    model), and a pair that fits still collates and passes."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=32))
    params = model.init(jax.random.key(0))
    long_pair = [("1+2+3+4+5+6+7+8+9+0=", "a" * 14, "b" * 12)] * 4  # completions + eos: 15 and 13 tokens
    shared = functools.partial(collate_preferences, TOK, share_prompt=True)
    batch = shared(long_pair)
    assert int(batch.positions[batch.attention_mask > 0].max()) == 35  # by hand: positions 0..35
    data = BatchIterator(long_pair, 4, shared, seed=0)
    state = create_state(model, OPT, jax.random.key(1), params=params)
    cfg = PreferencePhaseConfig(loss=DPOConfig(), optimizer=OPT, loop=LoopConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match=r"preference: row 0 of the batch reaches position 35, past the model's "
                                         r"max_seq_len=32"):
        preference(state, data, cfg, model=model, reference=params)
    with pytest.raises(ValueError, match=r"cached_reference_logps: row 0 .* position 35"):
        cached_reference_logps(params, long_pair, shared, model=model)
    fits = [("1+2=", "3", "4")] * 4
    ref = cached_reference_logps(params, fits, shared, model=model)
    np.testing.assert_allclose(ref, cached_reference_logps(params, fits, functools.partial(
        collate_preferences, TOK), model=model), atol=1e-4)


def test_truncation_that_makes_chosen_equal_rejected_is_refused():
    rows = [("1+1=", "2 and more", "2 and less"), ("1+2=", "3", "4")]
    assert collate_preferences(TOK, rows).tokens.shape[0] == 2  # different texts, in full
    with pytest.raises(ValueError, match=r"row 0: chosen and rejected are the same tokens after truncation to "
                                         r"max_length=8"):
        collate_preferences(TOK, rows, max_length=8)


def test_kto_precomputed_with_fixed_mismatch_equals_live(setup):
    model, params = setup
    rows = fixed_mismatch([(p, c if i % 3 else r, bool(i % 3)) for i, (p, c, r) in enumerate(PAIRS)], seed=0)
    collate = functools.partial(collate_kto, TOK)
    ref = cached_reference_logps(params, rows, collate, model=model, batch_size=8)
    live = _train(model, params, rows, KTOConfig(), 3, reference=params, collate=collate)
    pre = _train(model, params, with_reference(rows, ref), KTOConfig(), 3, collate=collate)
    for a, b in zip(jax.tree.leaves(live.params), jax.tree.leaves(pre.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)



def test_live_reference_runs_inside_the_train_step(setup):
    """`make_train_step(prepare=with_live_reference)`: one program scores the batch under the frozen
    reference and trains on it, as the plain step does on a batch whose S_ref was computed apart;
    a batch that already has ref_logps keeps them; the reference's pass reuses the step's buffer."""
    model, params = setup
    reference = model.init(jax.random.key(7))  # not the trained params: S_ref must come from these
    batch = collate_preferences(TOK, PAIRS[:8])
    loss = functools.partial(preference_loss, model=model, cfg=DPOConfig())
    live = make_train_step(loss, OPT, model=model, prepare=functools.partial(with_live_reference, model=model),
                           donate=False)
    plain = make_train_step(loss, OPT, model=model, donate=False)
    state = create_state(model, OPT, jax.random.key(1), params=params)
    s_ref = reference_logps(reference, batch, model=model)
    one, m_one = live(state, batch, reference)
    two, m_two = plain(state, batch.replace(ref_logps=s_ref))
    assert float(m_one["loss"]) == pytest.approx(float(m_two["loss"]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        # one program fuses the forward pass otherwise: Adam's first m / √v turns a rounding difference of a
        # near-zero gradient into up to ~lr of an update (1 of 32,768 elements here moves by 1.4e-6)
        np.testing.assert_allclose(a, b, atol=2e-5)
    # the policy as its own reference: every margin is 0, so the DPO loss is -log σ(0) = log 2
    _, m_self = live(state, batch, params)
    assert float(m_self["loss"]) == pytest.approx(np.log(2.0), abs=1e-6)
    assert abs(float(m_one["loss"]) - np.log(2.0)) > 1e-3
    # ref_logps already in the batch: the reference passed is not evaluated
    kept, _ = live(state, batch.replace(ref_logps=s_ref), params)
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    def temp(fn, *args):
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    ref_pass = jax.jit(functools.partial(reference_logps, model=model))
    t_live, t_plain, t_ref = temp(live, state, batch, reference), temp(plain, state, batch.replace(ref_logps=s_ref)), \
        temp(ref_pass, reference, batch)
    assert t_live < t_plain + 0.5 * t_ref, (t_live, t_plain, t_ref)

def test_phase_resumes_exactly(setup, tmp_path):
    model, params = setup
    full = _train(model, params, PAIRS, DPOConfig(), 4, reference=params, run_dir=str(tmp_path / "a"))
    _train(model, params, PAIRS, DPOConfig(), 2, reference=params, run_dir=str(tmp_path / "b"))
    resumed = _train(model, params, PAIRS, DPOConfig(), 4, reference=params, run_dir=str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a sharded twin of 20-36 s (others stay in the default suite); .ci/run runs the slow tier
def test_preference_sharded_equals_one_device():
    out = run_with_devices("""
        import functools, jax, numpy as np
        from rljax.data.collate import BatchIterator
        from rljax.data.preference_collate import collate_preferences
        from rljax.losses.preference import DPOConfig
        from rljax.models import Model, preset
        from rljax.phases import LoopConfig, PreferencePhaseConfig, preference
        from rljax.sharding import make_mesh
        from rljax.state import OptimizerConfig, create_state, make_train_step
        from rljax.tokenizer import CharTokenizer
        from test_preference_phase import PAIRS

        tok, opt = CharTokenizer(), OptimizerConfig(lr=1e-3, schedule="constant")
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        ref = Model(preset("tiny", n_layers=2)).init(jax.random.key(0))
        out = []
        for m, share in ((None, False), (mesh, False), (mesh, True)):  # and each prompt once, sharded
            model = Model(preset("tiny", n_layers=2), mesh=m)
            state = create_state(model, opt, jax.random.key(1), mesh=m, params=ref)
            data = BatchIterator(PAIRS, 8, functools.partial(collate_preferences, tok, share_prompt=share), seed=0)
            cfg = PreferencePhaseConfig(loss=DPOConfig(), optimizer=opt, loop=LoopConfig(steps=3, progress=False))
            state = preference(state, data, cfg, model=model, reference=ref, mesh=m)
            out.append(jax.tree.map(np.asarray, jax.device_get(state.params)))
        for other, atol in zip(out[1:], (5e-5, 1e-4)):  # the shared prompt rounds otherwise (Adam: ~5e-5)
            for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(other)):
                np.testing.assert_allclose(a, b, atol=atol)
        print("SAME", max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref))))
    """)
    assert "SAME" in out and float(out.split("SAME")[1]) > 1e-4


def test_best_worst_pairs():
    pairs = best_worst_pairs(["p", "q", "r"], [["a", "b", "c"], ["x", "y", "z"], ["s", "s", "t"]],
                             np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p", "b", "a"), ("r", "s", "t")]
    assert pairs[0]["margin"] == pytest.approx(0.8)
    for field in ("prompts_per_round", "batch_size"):  # refused with the config, not in a round's sampling
        with pytest.raises(ValueError, match=rf"OnlineDPOConfig.{field}: must be >= 1, got 0"):
            OnlineDPOConfig(**{field: 0})


def _online(model, params, rounds, run_dir, steps_per_round=2):
    # reward: answers that start with a digit equal to the prompt's last digit score 1
    def scorer(prompts, completions):
        return np.array([float(bool(c) and c[0] == p[-2]) + 0.01 * len(c) for p, c in zip(prompts, completions)])

    cfg = OnlineDPOConfig(rounds=rounds, samples=4, prompts_per_round=8, steps_per_round=steps_per_round, batch_size=4,
                          optimizer=OPT, progress=False,
                          sampling=SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=TOK.eos_id,
                                                pad_id=TOK.pad_id))
    state = create_state(model, OPT, jax.random.key(2), params=params)
    prompts = [p for p, _, _ in PAIRS]
    return online_dpo(state, prompts, scorer, cfg, model=model, tokenizer=TOK,
                      collate=functools.partial(collate_preferences, TOK), run_dir=run_dir)


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_online_dpo_rounds_resume(setup, tmp_path):
    model, params = setup
    full, stats = _online(model, params, 2, str(tmp_path / "a"))
    assert int(full.step) == 4 and [s["round"] for s in stats] == [0, 1]
    assert all(s["pairs"] >= 4 for s in stats)
    _online(model, params, 1, str(tmp_path / "b"))  # killed after round 0
    resumed, stats_b = _online(model, params, 2, str(tmp_path / "b"))  # more rounds extend the run
    assert stats_b == stats
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StageArgumentsError, match=r"stage 'round-0': .*stage.json was written by other arguments "
                                                  r"\(config.steps_per_round: 2 -> 3\)"):
        _online(model, params, 2, str(tmp_path / "b"), steps_per_round=3)  # other settings are refused
