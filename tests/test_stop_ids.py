"""Several stop ids (an HF generation_config's `eos_token_id` list): a row ends at the first
of eos_id and stop_ids, exactly where the free-running decode (no eos at all) first emits
one of them, in sampling, beam search and value-guided search; without stop_ids nothing
changes."""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.sampling import (BeamConfig, SampleConfig, ValueSearchConfig, beam_search, sample, tokenizer_ids,
                            value_guided_beam_search)

PROMPTS = left_padded([9, 4, 1, 6], 10, 64, seed=11)
# Jitted once per model: op by op, every primitive compiled on its own (the initialisers included).
init = jax.jit(lambda model, key: model.init(key), static_argnums=0)
logits = jax.jit(lambda params, tokens, mask, model: model(params, tokens, mask), static_argnames=("model",))
token_logprobs = jax.jit(token_logprobs, static_argnames=("model",))


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer tiny model: every sampler here is compiled once per config, and one layer
    compiles in about half the time of the session's 4-layer one."""
    model = Model(preset("tiny", n_layers=1))
    return model, init(model, jax.random.key(0))
N = 20
FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tokenizer")


def _first_stop(gen: np.ndarray, stops) -> int:
    """Length of a completion cut after its first stop token (all of it when there is none)."""
    hits = np.flatnonzero(np.isin(gen, list(stops)))
    return int(hits[0]) + 1 if len(hits) else len(gen)


def _pick_stops(free, P):
    """Two stop tokens from the free run: row 0's 4th token, and a token that some later row
    emits (from its 3rd token on) before its first eos, so the extra stop ends that row earlier."""
    gen = np.asarray(free.tokens[:, P:])
    eos = int(gen[0, 3])
    for row in gen[1:]:
        before = row[:_first_stop(row, {eos}) - 1]
        extra = [int(t) for t in before[2:] if t != eos]
        if extra:
            return eos, extra[0]
    raise AssertionError("the free run has no token to use as an extra stop id")


@pytest.mark.parametrize("greedy, n", [(True, 1), (False, 2)])
def test_sampling_stops_at_the_first_stop_id_exactly_where_the_free_run_emits_it(tiny, greedy, n):
    model, params = tiny
    base = SampleConfig(max_new_tokens=N, greedy=greedy, temperature=1.0, n=n, eos_id=-1)
    key = jax.random.key(3)
    free = sample(params, *PROMPTS, key, model=model, cfg=base)
    P = free.prompt_length
    eos, extra = _pick_stops(free, P)
    # eos as the extra stop (eos_id never emitted), and eos plus another stop id
    for cfg, stops in ((base.replace(stop_ids=(eos,)), {eos}), (base.replace(eos_id=eos, stop_ids=(extra,)),
                                                                 {eos, extra})):
        r = sample(params, *PROMPTS, key, model=model, cfg=cfg)
        toks, lm, lp = np.asarray(r.tokens), np.asarray(r.loss_mask), np.asarray(r.logprobs)
        free_toks, free_lp = np.asarray(free.tokens), np.asarray(free.logprobs)
        cut_any = False
        for i in range(toks.shape[0]):
            gen = free_toks[i, P:]
            L = _first_stop(gen, stops)
            hit = bool(np.isin(gen, list(stops)).any())
            cut_any |= hit
            assert int(r.lengths[i]) == L and bool(r.stopped_at_eos[i]) == hit
            np.testing.assert_array_equal(toks[i, :P + L], free_toks[i, :P + L])  # the stop token is kept
            assert (toks[i, P + L:] == cfg.pad_id).all()
            assert lm[i, P:].sum() == L and (lm[i, P:P + L] == 1).all()
            # log-probs of the kept tokens are the free run's, 0 after the stop
            np.testing.assert_array_equal(lp[i, P - 1:P - 1 + L], free_lp[i, P - 1:P - 1 + L])
            assert (lp[i, P - 1 + L:] == 0).all()
        assert cut_any and bool(r.stopped_at_eos[0])
    # the extra stop id ends some row earlier than eos alone would, and none later
    only_eos = np.asarray(sample(params, *PROMPTS, key, model=model, cfg=base.replace(eos_id=eos)).lengths)
    both = np.asarray(r.lengths)
    assert (both <= only_eos).all() and (both < only_eos).any()


def test_stop_ids_empty_or_repeating_eos_change_nothing(tiny):
    """stop_ids=() takes the single eos comparison; stop_ids=(eos_id,) goes through jnp.isin:
    both give the same rollout bit for bit."""
    model, params = tiny
    cfg = SampleConfig(max_new_tokens=N, temperature=1.0, n=2, eos_id=-1)
    free = sample(params, *PROMPTS, jax.random.key(1), model=model, cfg=cfg)
    eos = int(free.tokens[0, free.prompt_length + 2])
    plain = sample(params, *PROMPTS, jax.random.key(1), model=model, cfg=cfg.replace(eos_id=eos))
    same = sample(params, *PROMPTS, jax.random.key(1), model=model, cfg=cfg.replace(eos_id=eos, stop_ids=(eos,)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cfg.replace(eos_id=eos, stop_ids=(eos,)).stop_tokens == (eos,)


def _all_hypotheses(V, N, stops):
    """Every completion beam search can return: ones ending at a stop token shorter than N (no
    stop before the end), and every stop-free-prefix sequence of length N."""
    for L in range(1, N + 1):
        for seq in itertools.product(range(V), repeat=L):
            if any(t in stops for t in seq[:-1]) or (L < N and seq[-1] not in stops):
                continue
            yield seq


def test_wide_beam_search_with_two_stop_ids_is_exact_search():
    """With a beam that keeps every prefix, beam search equals brute force over the hypotheses
    that end at eos_id or the extra stop id."""
    V, N_, alpha = 5, 3, 0.8
    model = Model(preset("tiny", vocab_size=V, n_layers=1))
    params = init(model, jax.random.key(5))
    params["lm_head"] = params["lm_head"] * 60.0  # sharpen the random model so the ranking is not a near-tie
    prompt = np.array([[1, 3, 3, 1]], np.int32)
    # the extra stop: the likeliest first token other than eos, so that stopping at it matters
    first = np.asarray(logits(params, prompt, np.ones_like(prompt), model=model))[0, -1]
    stop = int(next(t for t in np.argsort(-first) if t != 2))
    cfg = BeamConfig(num_beams=20, max_new_tokens=N_, length_penalty=alpha, eos_id=2, stop_ids=(stop,),
                     min_prompt_bucket=4)
    res = beam_search(params, prompt, None, model=model, cfg=cfg)
    hyps = list(_all_hypotheses(V, N_, {2, stop}))
    seqs = np.array([np.r_[prompt[0], h, [0] * (N_ - len(h))] for h in hyps], np.int32)
    masks = np.array([np.r_[np.ones(4), np.ones(len(h)), np.zeros(N_ - len(h))] for h in hyps], np.int32)
    lp = np.asarray(token_logprobs(params, seqs, masks, model=model))[:, 3:].sum(1)
    scores = lp / np.array([len(h) for h in hyps]) ** alpha
    order = np.argsort(-scores)
    np.testing.assert_allclose(res.scores[0], scores[order[:20]], rtol=1e-4, atol=1e-5)
    for k in range(3):
        h = hyps[order[k]]
        np.testing.assert_array_equal(res.tokens[0, k, 4:4 + len(h)], h)
        assert int(res.lengths[0, k]) == len(h)
    # a hypothesis ending at the extra stop is among the best (the test is not vacuous)
    assert any(hyps[j][-1] == stop and len(hyps[j]) < N_ for j in order[:20])


def test_one_greedy_search_beam_stops_where_greedy_does(tiny):
    """Value-guided search with one greedy beam and one expansion is greedy decoding: with stop
    ids, it ends every row where the free greedy run first emits one. (Beam search with one
    beam is not greedy once stop tokens can end a hypothesis early: a likely stop among the
    step's candidates may score best; the brute-force test above covers beam search.)"""
    model, params = tiny
    free = sample(params, *PROMPTS, jax.random.key(0), model=model,
                  cfg=SampleConfig(max_new_tokens=N, greedy=True, eos_id=-1))
    P = free.prompt_length
    eos, extra = _pick_stops(free, P)
    gen = np.asarray(free.tokens[:, P:])
    lengths = np.array([_first_stop(g, {eos, extra}) for g in gen])
    assert (lengths < N).any()
    greedy = sample(params, *PROMPTS, jax.random.key(0), model=model,
                    cfg=SampleConfig(max_new_tokens=N, greedy=True, eos_id=eos, stop_ids=(extra,)))
    np.testing.assert_array_equal(greedy.lengths, lengths)

    @jax.jit
    def scorer(p, tokens, mask):  # any scorer: one beam and one expansion leave nothing to choose
        return jnp.sum(token_logprobs(p, tokens, mask, model=model), axis=1)

    vcfg = ValueSearchConfig(beams=1, expansions=1, step_end_ids=(9,), max_step_tokens=5, max_new_tokens=N,
                             max_rounds=N, temperature=0.0, eos_id=eos, stop_ids=(extra,))
    assert vcfg.sampling.stop_ids == (extra,)
    out = value_guided_beam_search(params, *PROMPTS, scorer, params, jax.random.key(0), model=model, cfg=vcfg)
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    assert bool(np.all(out.finished))  # a stop id finishes a solution like eos


def test_tokenizer_ids_of_an_hf_tokenizer_with_three_stop_ids():
    from rljax.tokenizer import CharTokenizer, HFTokenizer

    tok = HFTokenizer.from_pretrained(FIXTURE_TOKENIZER)  # generation_config: eos_token_id [4, 1, 7]
    ids = tokenizer_ids(tok)
    assert ids == dict(eos_id=4, stop_ids=(1, 7), pad_id=2)
    cfg = SampleConfig(max_new_tokens=8, **ids)
    assert cfg.stop_tokens == (4, 1, 7) == tuple(sorted(tok.eos_ids, key=tok.eos_ids.index))
    assert BeamConfig(**ids).stop_ids == ValueSearchConfig(**ids).stop_ids == (1, 7)
    assert tokenizer_ids(CharTokenizer()) == dict(eos_id=2, stop_ids=(), pad_id=0)


def test_bad_stop_ids_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"SampleConfig.stop_ids\[1\]"):
        SampleConfig(stop_ids=(3, "7"))
    with pytest.raises(ValueError, match=r"BeamConfig.stop_ids\[0\]"):
        BeamConfig(stop_ids=(-1,))
    with pytest.raises(ValueError, match="ValueSearchConfig.stop_ids"):
        ValueSearchConfig(stop_ids=None)
    cfg = SampleConfig(stop_ids=[5, np.int64(6)])  # lists and numpy ints become a hashable tuple of ints
    assert cfg.stop_ids == (5, 6) and hash(cfg) == hash(SampleConfig(stop_ids=(5, 6)))
