"""rljax.eval against numbers computed another way: exact match against a hand loop of greedy
decodes by full forwards (and against the formula the studies used before it moved here), the
sampled accuracy's layout, pass@k against enumerating every k-subset, finished-run loading and
its errors, and an exported policy that loads back with the same params digest."""
import hashlib
import itertools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.checkpoint import Checkpointer, digest_params
from rljax.data.arithmetic import check_answer, make_split
from rljax.eval import (UnfinishedRunError, complete, correctness, exact_match, export_policy, finished_run,
                        load_finished, pass_at_k)
from rljax.models import Model, preset
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer

MAX_NEW = 12
init = jax.jit(lambda model, key: model.init(key), static_argnums=0)  # one compile, not one per initialiser op


@pytest.fixture(scope="module")
def arithmetic():
    """A random tiny model on the arithmetic tokenizer and 6 held-out problems of mixed prompt lengths."""
    tok = CharTokenizer()
    # one layer: every decode here is a compile, and a layer less compiles faster; init jitted: one
    # compile, not one per initialiser op
    model = Model(preset("tiny", vocab_size=tok.vocab_size, n_layers=1))
    _, test = make_split(64, 6, levels=(1, 2), seed=0)
    return model, init(model, jax.random.key(3)), tok, test


def _hand_greedy(forward, params, tok, prompt: str, steps: int, width: int = 32) -> str:
    """One prompt, no padding on the left: append the argmax of a full forward at the last real
    position until eos or `steps` tokens (right pads are masked and causal attention ignores them)."""
    ids = tok.encode(prompt)
    assert len(ids) + steps <= width
    tokens, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
    tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    out, n = [], len(ids)
    for _ in range(steps):
        nxt = int(jnp.argmax(forward(params, tokens, mask)[0, n - 1]))
        if nxt == tok.eos_id:
            break
        out.append(nxt)
        tokens[0, n], mask[0, n] = nxt, 1
        n += 1
    return tok.decode(out)


def _odd(problem, text: str) -> bool:  # depends on both the problem and the text: not constant on a random model
    return (len(text) + problem.answer) % 2 == 1


def test_greedy_exact_match_equals_a_hand_loop_of_greedy_decodes(arithmetic):
    model, params, tok, test = arithmetic
    forward = jax.jit(lambda p, t, m: model(p, t, m))
    hand = [_hand_greedy(forward, params, tok, p.prompt, MAX_NEW) for p in test]
    acc, texts = exact_match(params, model, tok, test, MAX_NEW)
    assert texts == hand
    assert acc == np.mean([check_answer(p, t) for p, t in zip(test, hand)])
    odd, _ = exact_match(params, model, tok, test, MAX_NEW, check=_odd)
    assert odd == np.mean([_odd(p, t) for p, t in zip(test, hand)]) and 0 < odd < 1
    # batches of 4 (the second filled with copies), and truncation that cuts nothing, change nothing
    assert exact_match(params, model, tok, test, MAX_NEW, check=_odd, batch_size=4, truncate=True) == (odd, hand)
    # a prompt function: the problems are anything
    assert complete(params, model, tok, [p.prompt for p in test[:2]], max_new_tokens=MAX_NEW) == hand[:2]
    assert exact_match(params, model, tok, [p.expression for p in test], MAX_NEW, prompt=lambda e: e + "=",
                       check=lambda e, t: t == hand[[p.expression for p in test].index(e)])[0] == 1.0


def test_exact_match_gives_the_numbers_of_the_studies_formula(arithmetic):
    """The formula experiments/sft_arithmetic.py used (one `sample` call, check_answer per row):
    greedy and sampled accuracies and texts are the same."""
    model, params, tok, test = arithmetic
    for n, temperature, key in ((1, 0.0, None), (3, 1.0, jax.random.key(7))):
        prompts, mask = tok.encode_batch([p.prompt for p in test], padding_side="left")
        cfg = SampleConfig(max_new_tokens=MAX_NEW, n=n, temperature=temperature, eos_id=tok.eos_id, pad_id=tok.pad_id)
        r = sample(params, prompts, mask, jax.random.key(0) if key is None else key, model=model, cfg=cfg)
        old_texts = tok.decode_batch(np.asarray(r.completions))
        old = float(np.mean([check_answer(p, t) for p, t in zip((p for p in test for _ in range(n)), old_texts)]))
        old_odd = float(np.mean([_odd(p, t) for p, t in zip((p for p in test for _ in range(n)), old_texts)]))
        assert exact_match(params, model, tok, test, MAX_NEW, n=n, temperature=temperature, key=key) == (old, old_texts)
        assert exact_match(params, model, tok, test, MAX_NEW, n=n, temperature=temperature, key=key,
                           check=_odd)[0] == old_odd


def test_sampled_accuracy_is_the_mean_over_each_problems_samples(arithmetic):
    model, params, tok, test = arithmetic
    key = jax.random.key(11)
    texts = complete(params, model, tok, [p.prompt for p in test], max_new_tokens=MAX_NEW, n=4, temperature=1.0,
                     key=key)
    assert len(texts) == 4 * len(test)
    c = correctness(test, texts, n=4, check=_odd)
    assert c.shape == (len(test), 4)
    # row i holds problem i's samples i*4 .. i*4+3
    np.testing.assert_array_equal(c, [[_odd(p, t) for t in texts[i * 4:(i + 1) * 4]] for i, p in enumerate(test)])
    acc, same = exact_match(params, model, tok, test, MAX_NEW, n=4, temperature=1.0, key=key, check=_odd)
    assert same == texts and acc == pytest.approx(c.mean(), abs=1e-15)
    # a check that reads only the problem: every sample of problem i gets its value
    parity, _ = exact_match(params, model, tok, test, MAX_NEW, n=4, temperature=1.0, key=key,
                            check=lambda p, t: p.answer % 2 == 0)
    assert parity == pytest.approx(np.mean([p.answer % 2 == 0 for p in test]), abs=1e-15)
    with pytest.raises(ValueError, match="texts for"):
        correctness(test, texts, n=3)


def test_pass_at_k_equals_enumerating_every_k_subset():
    rng = np.random.default_rng(0)
    c = rng.random((7, 6)) < 0.3
    c[0], c[1] = False, True
    for k in range(1, 7):
        brute = np.mean([np.mean([row[list(s)].any() for s in itertools.combinations(range(6), k)]) for row in c])
        assert pass_at_k(c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(c, 1) == pytest.approx(c.mean(), abs=1e-12)
    assert pass_at_k([[0, 1, 0, 0]], 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(c, 7)
    # partial credit has a mean, not a pass@k: 0.2 would have counted as right, and so would -1 and NaN
    with pytest.raises(ValueError, match=r"problem 1, sample 0 is -1.0 \(a check with partial credit"):
        pass_at_k([[1.0, 0.0], [-1.0, 0.0]], 1)
    with pytest.raises(ValueError, match="problem 0, sample 1 is nan"):
        pass_at_k([[0.0, float("nan")]], 1)


def test_evaluate_policy_refuses_a_start_model_that_cannot_score_the_policys_tokens(arithmetic):
    from rljax.eval import PolicyEvalConfig, evaluate_policy

    model, params, tok, test = arithmetic
    small = Model(preset("tiny", vocab_size=8, n_layers=1))  # sampled ids >= 8 were read as NaN log-probs
    with pytest.raises(ValueError, match="evaluate_policy: start_model .the start policy.: its vocab_size 8 is "
                                         f"smaller than the policy's {tok.vocab_size}"):
        evaluate_policy(params, model, tok, test, PolicyEvalConfig(max_new_tokens=4, samples=1),
                        start_params=init(small, jax.random.key(0)), start_model=small)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, arithmetic):
    """A run directory whose checkpoints/ holds one state, saved at step 3."""
    model, params, _, _ = arithmetic
    run = str(tmp_path_factory.mktemp("eval") / "run")
    opt = OptimizerConfig(lr=1e-3)
    state = create_state(model, opt, jax.random.key(1), params=params)
    with Checkpointer(os.path.join(run, "checkpoints")) as ck:
        ck.save(state, step=3, force=True)
    return run, model, opt, state


def test_load_finished_returns_the_final_checkpoints_params(saved_run):
    run, model, opt, state = saved_run
    assert finished_run(run, 3) and not finished_run(run, 5)
    target = create_state(model, opt, jax.random.key(9),
                          params=init(model, jax.random.key(9)))  # other values, same structure
    loaded = load_finished(run, target, steps=3)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_or_unfinished_runs_are_errors_naming_the_directory(saved_run, tmp_path):
    run, model, opt, _ = saved_run
    target = create_state(model, opt, jax.random.key(0), params=init(model, jax.random.key(0)))
    with pytest.raises(UnfinishedRunError,
                       match=rf"{re.escape(run)}: the run is not finished: its latest checkpoint is step 3, its final "
                             r"step is 5"):
        load_finished(run, target, steps=5)
    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(missing)}: no finished run there"):
        load_finished(missing, target, steps=3)
    assert not finished_run(missing, 3) and not os.path.exists(missing)  # looking creates nothing
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(UnfinishedRunError, match=rf"{re.escape(str(empty))}: the run is not finished: no checkpoint"):
        load_finished(str(empty), target, steps=3)


def test_load_sft_of_an_unfinished_run_is_an_error_not_a_new_run(tmp_path):
    from rljax.recipes.arithmetic_runs import load_sft

    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "config.json").write_text(json.dumps(dict(preset="tiny", steps=12, warmup_steps=2, smoke=True)))
    with pytest.raises(UnfinishedRunError, match=rf"{re.escape(str(sft_dir))}: no finished run there"):
        load_sft(str(sft_dir), CharTokenizer())
    assert os.listdir(sft_dir) == ["config.json"]  # nothing was trained


def test_exported_policy_loads_back_with_the_same_digest(tmp_path):
    """export_policy on the grpo_math smoke model (the test fixtures' Qwen2 architecture and
    tokenizer): load_pretrained gives the same params, the tokenizer its three stop ids."""
    from experiments.fixtures import write_smoke_model
    from rljax.models.hf import load_pretrained
    from rljax.tokenizer import HFTokenizer

    model_dir = write_smoke_model(str(tmp_path / "model"), seed=1)
    arch, params = load_pretrained(model_dir)
    tok = HFTokenizer.from_pretrained(model_dir)
    out = export_policy(params, Model(arch), tok, model_dir, str(tmp_path / "policy"))
    digests = []
    for p in (params, load_pretrained(out)[1]):
        h = hashlib.sha256()
        digest_params(p, h)
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]
    back = HFTokenizer.from_pretrained(out)
    assert back.eos_ids == tok.eos_ids == (4, 1, 7) and back.pad_id == tok.pad_id
    # without a model directory: weights, config and a generation_config with all stop ids, no tokenizer files
    bare = export_policy(params, Model(arch), tok, None, str(tmp_path / "bare"))
    with open(os.path.join(bare, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [4, 1, 7]
    assert not os.path.exists(os.path.join(bare, "tokenizer.json"))
    # in place: the weights are replaced, the tokenizer files kept; a run directory is refused, untouched
    before = sorted(os.listdir(model_dir))
    export_policy(params, Model(arch), tok, model_dir, model_dir)
    assert sorted(os.listdir(model_dir)) == before and HFTokenizer.from_pretrained(model_dir).eos_ids == (4, 1, 7)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"holds files but no checkpoint \(checkpoints, metrics.jsonl\)"):
        export_policy(params, Model(arch), tok, model_dir, str(run))
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl"]
