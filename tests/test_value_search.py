"""Value-guided step beam search: greedy steps with one beam equal greedy decoding, the
search keeps what it should (trace), an oracle value finds what greedy misses, and a
prompt's result does not depend on the other prompts of the batch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.sampling import SampleConfig, ValueSearchConfig, row_groups, sample, value_guided_beam_search

SEP = 7  # the step separator's token id in these tests


@pytest.fixture(scope="module")
def setup():
    model = Model(preset("tiny", n_layers=2, max_seq_len=256))
    return model, model.init(jax.random.key(0))


def _logprob_scorer(model, P):
    """Sum of the candidate's token log-probs under the policy (params = policy params)."""

    @jax.jit
    def scorer(params, tokens, mask):
        lp = token_logprobs(params, tokens, mask, model=model)
        return jnp.sum(lp[:, P - 1:], axis=1)

    return scorer


def test_one_greedy_beam_equals_greedy_decoding(setup):
    model, params = setup
    tokens, mask = left_padded([5, 9, 3], 12, model.config.vocab_size, seed=1)
    N = 24
    cfg = ValueSearchConfig(beams=1, expansions=1, step_end_ids=(SEP,), max_step_tokens=6, max_new_tokens=N,
                            max_rounds=N, temperature=0.0)
    out = value_guided_beam_search(params, tokens, mask, _logprob_scorer(model, 16), params, jax.random.key(0),
                                   model=model, cfg=cfg)
    greedy = sample(params, tokens, mask, jax.random.key(0), model=model,
                    cfg=SampleConfig(max_new_tokens=N, greedy=True))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    assert bool(np.all(out.finished))


def test_search_keeps_the_best_and_never_extends_finished(setup):
    """Best-of-K per step (beams 1, expansions 4) and the full search (beams 3): every
    round's kept beams are the best-scored unfinished candidates, the next round extends
    only them, and the answer is the best finished candidate."""
    model, params = setup
    tokens, mask = left_padded([4, 6], 16, model.config.vocab_size, seed=2)
    P, N = 16, 20
    scorer = _logprob_scorer(model, P)
    for W, E in ((1, 4), (3, None)):
        cfg = ValueSearchConfig(beams=W, expansions=E, step_end_ids=(SEP, 8, 9, 10), max_step_tokens=4,
                                max_new_tokens=N, max_rounds=8)
        out = value_guided_beam_search(params, tokens, mask, scorer, params, jax.random.key(3), model=model,
                                       cfg=cfg, trace=True)
        C = W * cfg.width
        pool = {b: [] for b in range(2)}
        for r, t in enumerate(out.trace):
            for b in range(2):
                s, fin, ok = t["scores"][b], t["finished"][b], t["valid"][b]
                live = np.where(ok & ~fin, s, -np.inf)
                kept = t["kept"][b]
                np.testing.assert_allclose(np.sort(live[kept])[::-1], np.sort(live)[::-1][:W])
                pool[b] += [(s[j], tuple(t["candidates"][b, j, :t["lengths"][b, j]])) for j in range(C) if fin[j]]
                if r + 1 < len(out.trace):  # the next round's candidates extend exactly the kept live beams
                    nxt = out.trace[r + 1]
                    for j in range(C):
                        if not nxt["valid"][b, j]:
                            continue
                        parent = kept[j // cfg.width]
                        assert np.isfinite(live[parent]) and not fin[parent]
                        n = t["lengths"][b, parent]
                        np.testing.assert_array_equal(nxt["candidates"][b, j, :n], t["candidates"][b, parent, :n])
                        assert nxt["lengths"][b, j] > n
            # a candidate's score is the scorer's value of it
            seq = np.concatenate([np.repeat(np.asarray(out.tokens[:, :P]), C, 0), t["candidates"].reshape(-1, N)], 1)
            m = np.concatenate([np.repeat(np.asarray(out.attention_mask[:, :P]), C, 0),
                                (np.arange(N)[None] < t["lengths"].reshape(-1, 1)).astype(np.int32)], 1)
            want = np.where(t["valid"].reshape(-1), np.asarray(scorer(params, seq, m)), -np.inf)
            np.testing.assert_allclose(t["scores"].reshape(-1), want, rtol=1e-5)
        for b in range(2):
            assert pool[b], "something finished within the round limit"
            best_score, best = max(pool[b], key=lambda x: x[0])
            assert bool(out.finished[b]) and float(out.scores[b]) == pytest.approx(float(best_score))
            got = np.asarray(out.tokens[b, P:P + int(out.lengths[b])])
            np.testing.assert_array_equal(got, best)
            assert got[-1] == 2 or len(got) == N  # finished: eos or the length limit


def test_oracle_value_finds_what_greedy_misses(setup):
    """Toy task: a solution is right iff it contains token `target`, which greedy decoding
    never emits here; a value that knows the task (1 once the target was emitted) leads
    the search to a right solution."""
    model, params = setup
    tokens, mask = left_padded([6, 6], 16, model.config.vocab_size, seed=4)
    P, N = 16, 16
    greedy = np.asarray(sample(params, tokens, mask, jax.random.key(0), model=model,
                               cfg=SampleConfig(max_new_tokens=N, greedy=True)).completions)
    target = next(t for t in range(11, model.config.vocab_size) if not (greedy == t).any())

    @jax.jit
    def oracle(_, seq, m):
        return jnp.any((seq[:, P:] == target) & (m[:, P:] > 0), axis=1).astype(jnp.float32)

    cfg = ValueSearchConfig(beams=3, step_end_ids=(SEP,), max_step_tokens=4, max_new_tokens=N, max_rounds=8)
    out = value_guided_beam_search(params, tokens, mask, oracle, None, jax.random.key(5), model=model, cfg=cfg)
    for b in range(2):
        sol = np.asarray(out.tokens[b, P:P + int(out.lengths[b])])
        assert target in sol and float(out.scores[b]) == 1.0
    assert out.generated > 0 and out.rounds >= 1


def test_result_does_not_depend_on_the_batch(setup):
    model, params = setup
    tokens, mask = left_padded([5, 7, 6], 16, model.config.vocab_size, seed=6)
    scorer = _logprob_scorer(model, 16)
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP, 8), max_step_tokens=4, max_new_tokens=16, max_rounds=6)
    key = jax.random.key(7)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(3))
    full = value_guided_beam_search(params, tokens, mask, scorer, params, key, model=model, cfg=cfg)
    for i in range(3):
        one = value_guided_beam_search(params, tokens[i:i + 1], mask[i:i + 1], scorer, params, key, model=model,
                                       cfg=cfg, keys=keys[i:i + 1])
        np.testing.assert_array_equal(one.tokens[0], full.tokens[i])
        assert float(one.scores[0]) == pytest.approx(float(full.scores[i]), rel=1e-5)


def test_prompt_groups_search_exactly_as_one_group(setup):
    """Four prompts searched as 1, 2 and 4 groups on host threads (`cpu_row_groups`): the same
    solutions, scores, lengths, pools bit for bit, prompts finishing in different rounds; rounds is
    the most any group ran, generated the groups' sum. trace=True searches as one group."""
    model, params = setup
    tokens, mask = left_padded([5, 7, 6, 3], 16, model.config.vocab_size, seed=8)
    scorer = _logprob_scorer(model, 16)
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP, 8), max_step_tokens=4, max_new_tokens=16, max_rounds=6,
                            eos_id=9)
    groups = [row_groups(4, params, model, dataclasses.replace(cfg, cpu_row_groups=g), per_row=4) for g in (1, 2, 4)]
    assert groups == [1, 2, 4]
    one, *grouped = (value_guided_beam_search(params, tokens, mask, scorer, params, jax.random.key(9), model=model,
                                              cfg=dataclasses.replace(cfg, cpu_row_groups=g)) for g in (1, 2, 4))
    for other in grouped:
        for field in ("tokens", "attention_mask", "scores", "lengths", "finished", "pool_tokens", "pool_scores"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field), err_msg=field)
        assert (other.rounds, other.generated, other.prompt_length) == (one.rounds, one.generated, one.prompt_length)
    traced = value_guided_beam_search(params, tokens, mask, scorer, params, jax.random.key(9), model=model,
                                      cfg=dataclasses.replace(cfg, cpu_row_groups=2), trace=True)  # one group
    assert len(traced.trace) == one.rounds
    np.testing.assert_array_equal(traced.tokens, one.tokens)
    last_round = [max(r for r, step in enumerate(traced.trace) if step["valid"][b].any()) for b in range(4)]
    assert len(set(last_round)) > 1, last_round  # the prompts finish in different rounds


def test_config_errors():
    assert ValueSearchConfig(max_rounds=3, max_step_tokens=5).cache_room == 15  # the cache's slots after the prompt
    with pytest.raises(ValueError, match="ValueSearchConfig.beams"):
        ValueSearchConfig(beams=0)
    with pytest.raises(ValueError, match="ValueSearchConfig.cpu_row_groups"):
        ValueSearchConfig(cpu_row_groups=-1)
    with pytest.raises(ValueError, match="SampleConfig.top_p"):
        ValueSearchConfig(top_p=0.0)
    assert ValueSearchConfig(step_end_ids=5).step_end_ids == (5,)  # one id, as stop_ids takes it
    with pytest.raises(ValueError, match=r"ValueSearchConfig.step_end_ids\[1\]: must be a token id \(an int >= 0\), "
                                         r"got -7"):
        ValueSearchConfig(step_end_ids=(3, -7))
    with pytest.raises(ValueError, match="ValueSearchConfig.max_rounds: must be an int, got 4.0"):
        ValueSearchConfig(max_rounds=4.0)


def test_search_checks_its_room_and_ids_and_takes_bfloat16_scores(setup):
    """The cache room a search keeps (max_rounds x max_step_tokens) is what an overflow names; a step end
    id outside the vocabulary is refused like a stop id; a scorer returning bfloat16 gives the search
    the float32 run of the same scores gives."""
    model, params = setup  # max_seq_len 256
    tokens, mask = left_padded([5, 7], 16, model.config.vocab_size, seed=3)
    scorer = _logprob_scorer(model, 16)
    key = jax.random.key(1)
    with pytest.raises(ValueError, match=r"^ValueSearchConfig.max_rounds x max_step_tokens \(16 x 16\)=256 leaves no "
                                         r"room for a prompt in the KV cache \(config.max_seq_len=256\)"):
        value_guided_beam_search(params, tokens, mask, scorer, params, key, model=model,
                                 cfg=ValueSearchConfig(step_end_ids=(SEP,), max_rounds=16, max_step_tokens=16))
    with pytest.raises(ValueError, match=r"ValueSearchConfig.step_end_ids\[0\] = 1007 is outside the model's "
                                         r"vocabulary \[0, 64\)"):
        value_guided_beam_search(params, tokens, mask, scorer, params, key, model=model,
                                 cfg=ValueSearchConfig(step_end_ids=(1007,), max_rounds=2, max_step_tokens=4))
    cfg = ValueSearchConfig(beams=2, step_end_ids=(SEP,), max_step_tokens=4, max_new_tokens=12, max_rounds=3)
    as_bf16 = jax.jit(lambda p, t, m: scorer(p, t, m).astype(jnp.bfloat16))
    rounded = jax.jit(lambda p, t, m: as_bf16(p, t, m).astype(jnp.float32))
    a, b = (value_guided_beam_search(params, tokens, mask, s, params, key, model=model, cfg=cfg)
            for s in (as_bf16, rounded))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(np.asarray(a.scores, np.float32), b.scores)
