"""Where the OREO value (and a PRM) is read at test time, the search's checks on its scorer, and the
optimizers an OREO state was made for. Each value is checked against a naive full forward read at a
hand-picked position: OREO fits V_t only where a completion token follows, so a finished solution
"… 3 <eos>" must be scored at "3", never at its eos."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.data.collate import BatchIterator
from rljax.losses.actor_critic import token_values
from rljax.losses.oreo import OREOConfig
from rljax.models import Model, preset
from rljax.oreo_training import (OREOPhaseConfig, collate_trajectories, create_oreo_state, make_oreo_step, oreo,
                                 value_model_of, value_params_from, value_scorer)
from rljax.phases import LoopConfig
from rljax.rewards.learned import prm_search_scorer
from rljax.sampling import ValueSearchConfig, value_guided_beam_search
from rljax.state import OptimizerConfig
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
SEP = TOK.encode(";", add_bos=False)[0]


@pytest.fixture(scope="module")
def setup():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=128))
    params = model.init(jax.random.key(0))
    vm = value_model_of(model)
    vp = value_params_from(model, params)
    # a non-zero head, so V differs from position to position and a wrong read shows
    vp = {**vp, "value_head": 0.5 * jax.random.normal(jax.random.key(4), vp["value_head"].shape)}
    return model, params, vm, vp


def _all_values(vm, vp, tokens, mask):
    """V at every position from one full forward: the naive reference."""
    hidden, _ = vm.forward(vp, jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(vm.values(vp, hidden))


def test_value_scorer_reads_v_before_a_trailing_eos(setup):
    model, params, vm, vp = setup
    rows = [{"prompt": "1+2=", "completion": "3", "reward": 1}, {"prompt": "1+2=", "completion": "4", "reward": 0},
            {"prompt": "12+2=", "completion": "1;4", "reward": 1, "eos": False}]
    b = collate_trajectories(TOK, rows)
    V = _all_values(vm, vp, b.tokens, b.attention_mask)
    # by hand: [bos] 1 + 2 = 3 [eos] -> "3" at 5, eos at 6; row 2 has no eos, its last token "4" is at 8
    assert b.tokens[0, 6] == TOK.eos_id and b.tokens[2, 8] == TOK.encode("4", add_bos=False)[0]
    got = np.asarray(value_scorer(vm, stop_ids=(TOK.eos_id,))(vp, b.tokens, b.attention_mask))
    np.testing.assert_allclose(got, [V[0, 5], V[1, 5], V[2, 8]], rtol=1e-5, atol=1e-6)
    assert abs(V[0, 6] - V[0, 5]) > 1e-3  # reading at eos (the old behaviour) would give another number
    # the position read is one OREO trains: token_values has V_t for t < T-1, masked to where a completion
    # token follows; t = 5 of row 0 is such a position (its next token, eos, is a completion token)
    tv = np.asarray(token_values(vp, b.tokens, b.attention_mask, model=vm))
    assert b.loss_mask[0, 6] == 1 and tv[0, 5] == pytest.approx(got[0], rel=1e-5)
    # left padding, as the sampler lays rows out: the same values
    width = b.tokens.shape[1]
    lens = b.attention_mask.sum(1)
    left = np.zeros_like(b.tokens)
    lmask = np.zeros_like(b.attention_mask)
    for i, n in enumerate(lens):
        left[i, width - n:], lmask[i, width - n:] = b.tokens[i, :n], 1
    np.testing.assert_allclose(value_scorer(vm)(vp, left, lmask), got, rtol=1e-5, atol=1e-6)


def test_trained_value_scores_finished_solutions_by_their_reward(setup):
    """The audit's case: two one-token answers, rewards 1 and 0, the policy frozen (lr ~ 0), so
    V at the last answer token is fitted towards R − β·Σℓ = R. The scorer must return ≈ (1, 0)."""
    model, params, vm, _ = setup
    rows = [{"prompt": "1+2=", "completion": "3", "reward": 1}, {"prompt": "1+2=", "completion": "4", "reward": 0}]
    b = collate_trajectories(TOK, rows)
    frozen, vopt = OptimizerConfig(lr=1e-12, schedule="constant"), OptimizerConfig(lr=3e-3, schedule="constant")
    _, state = create_oreo_state(model, params, frozen, jax.random.key(1), value_optimizer=vopt)
    step = make_oreo_step(model, OREOConfig(), frozen, vopt)
    for _ in range(100):
        state, _ = step(state, b)
    got = np.asarray(value_scorer(vm)(state.value.params, b.tokens, b.attention_mask))
    np.testing.assert_allclose(got, [1.0, 0.0], atol=0.1)


def test_search_scores_finished_candidates_before_their_stop_token(setup):
    """Every candidate of every round is scored at its last non-stop token: the trace's scores equal
    V at that position, recomputed by a full forward of prompt + candidate."""
    model, params, vm, vp = setup
    stops = tuple(TOK.encode("0123", add_bos=False))  # frequent under a random policy: many candidates finish
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP,), max_step_tokens=3, max_new_tokens=8, max_rounds=4,
                            eos_id=TOK.eos_id, pad_id=TOK.pad_id, stop_ids=stops, min_prompt_bucket=8)
    tokens, mask = TOK.encode_batch(["1+2=", "13+4="], padding_side="left")
    res = value_guided_beam_search(params, tokens, mask, value_scorer(vm, stop_ids=(cfg.eos_id, *stops)), vp,
                                   jax.random.key(3), model=model, cfg=cfg, trace=True)
    P, N = res.prompt_length, cfg.max_new_tokens
    ptok, pmask = np.asarray(res.tokens[:, :P]), np.asarray(res.attention_mask[:, :P])
    rows, masks, at, want = [], [], [], []
    for t in res.trace:
        for b in range(2):
            for j in np.flatnonzero(t["valid"][b]):
                n = t["lengths"][b, j]
                gen = t["candidates"][b, j, :n]
                rows.append(np.concatenate([ptok[b], gen, np.zeros(N - n, np.int32)]))
                masks.append(np.concatenate([pmask[b], np.ones(n, np.int32), np.zeros(N - n, np.int32)]))
                at.append(P + n - 2 if gen[-1] in (cfg.eos_id, *stops) else P + n - 1)  # by hand
                want.append(t["scores"][b, j])
    V = _all_values(vm, vp, np.stack(rows), np.stack(masks))  # one right-padded batch: one compile
    np.testing.assert_allclose(want, V[np.arange(len(at)), at], rtol=1e-4, atol=1e-5)
    seen_stop = sum(r[a + 1] in stops for r, a in zip(rows, at) if a + 1 < P + N)
    assert seen_stop > 0  # the case under test happened


def test_prm_search_scorer_reads_the_last_step_text_token():
    """A PRM's labels sit on a step's last text token: "q:1+2;3<eos>" is read at "3", "q:1+2;" at "2"."""
    prm = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, heads=("reward",)))
    p = prm.init(jax.random.key(0))
    p = {**p, "reward_head": jax.random.normal(jax.random.key(5), p["reward_head"].shape)}
    rows = [TOK.encode("q:1+2;3", add_eos=True), TOK.encode("q:1+2;", add_eos=False) + [TOK.pad_id] * 2]
    tokens = np.asarray(rows, np.int32)
    mask = np.asarray([[1] * 9, [1] * 7 + [0] * 2], np.int32)
    hidden, _ = prm.forward(p, jnp.asarray(tokens), jnp.asarray(mask))
    z = np.asarray(prm.token_rewards(p, hidden))
    # [bos] q : 1 + 2 ; 3 [eos]: "3" at 7; [bos] q : 1 + 2 ; : "2" at 5
    got = np.asarray(prm_search_scorer(prm, (SEP, TOK.eos_id))(p, tokens, mask))
    np.testing.assert_allclose(got, [z[0, 7], z[1, 5]], rtol=1e-5, atol=1e-6)


def test_search_refuses_a_scorer_with_other_stop_ids_and_bad_scores(setup):
    model, params, vm, vp = setup
    tokens, mask = TOK.encode_batch(["1+2=", "13+4="], padding_side="left")
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP,), max_step_tokens=3, max_new_tokens=6, max_rounds=2,
                            eos_id=5, pad_id=TOK.pad_id, min_prompt_bucket=8)
    with pytest.raises(ValueError, match=r"scorer value_scorer reads before the trailing ids \(2,\), but this "
                                         r"search also ends solutions at \(5,\)"):
        value_guided_beam_search(params, tokens, mask, value_scorer(vm), vp, jax.random.key(0), model=model, cfg=cfg)
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP,), max_step_tokens=3, max_new_tokens=6, max_rounds=2,
                            eos_id=TOK.eos_id, pad_id=TOK.pad_id, min_prompt_bucket=8)
    inner = value_scorer(vm)

    def nan_for_prompt_1(p, t, m):  # round 0: prompt b's candidates are rows b·C .. b·C + C − 1, C = W·E = 4
        s = inner(p, t, m)
        return jnp.where(jnp.arange(s.shape[0]) // 4 == 1, jnp.nan, s)

    with pytest.raises(ValueError, match=r"scorer nan_for_prompt_1 returned nan for candidate 0 of prompt 1 "
                                         r"in round 0 \(2 non-finite"):  # round 0: only beam 0's E = 2 are valid
        value_guided_beam_search(params, tokens, mask, nan_for_prompt_1, vp, jax.random.key(0), model=model, cfg=cfg)

    def two_columns(p, t, m):
        return jnp.stack([inner(p, t, m)] * 2, axis=1)

    with pytest.raises(ValueError, match=r"two_columns returned shape \(8, 2\); expected \(8,\)"):
        value_guided_beam_search(params, tokens, mask, two_columns, vp, jax.random.key(0), model=model, cfg=cfg)


def test_oreo_refuses_optimizers_other_than_the_states(setup):
    model, params, _, _ = setup
    opt, vopt = OptimizerConfig(lr=1e-6, schedule="constant"), OptimizerConfig(lr=3e-3, schedule="constant")
    _, state = create_oreo_state(model, params, opt, jax.random.key(1), value_optimizer=vopt)
    assert state.optimizer == opt and state.value_optimizer == vopt
    rows = [{"prompt": "1+2=", "completion": "3", "reward": 1}] * 2
    data = BatchIterator(rows, 2, lambda rows: collate_trajectories(TOK, rows))
    loop = LoopConfig(steps=1, log_every=0, progress=False)
    # the audit's case: value_optimizer given to create_oreo_state only; the phase would update with the policy's
    with pytest.raises(ValueError, match=r"oreo: the value model's optimizer differs .*lr 1e-06 vs 0.003"):
        oreo(state, data, OREOPhaseConfig(optimizer=opt, loop=loop), model=model)
    with pytest.raises(ValueError, match=r"OREO step: the policy model's optimizer differs .*lr 0.001 vs 1e-06"):
        step = make_oreo_step(model, OREOConfig(), OptimizerConfig(lr=1e-3, schedule="constant"), vopt)
        step(state, collate_trajectories(TOK, rows))
    # a state without recorded configs: the optimizer state's structure is still checked (grad_accum wraps it)
    bare = state.replace(optimizer=None, value_optimizer=None)
    with pytest.raises(ValueError, match="value model's optimizer state does not match value_optimizer"):
        accum = dataclasses.replace(vopt, grad_accum=2)
        oreo(bare, data, OREOPhaseConfig(optimizer=opt, value_optimizer=accum, loop=loop), model=model)
    out = oreo(state, data, OREOPhaseConfig(optimizer=opt, value_optimizer=vopt, loop=loop), model=model)
    assert int(out.step) == 1 and out.value_optimizer == vopt  # the matching configs run, and stay recorded
