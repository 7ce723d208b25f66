"""OREO data and phase: trajectory collation (step starts), bad rows named, collection to
Parquet that resumes and refuses other arguments, the phase resuming exactly, iterative
OREO resuming at the right round, and 8 simulated devices equal to one."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from conftest import run_with_devices
from rljax.data.arithmetic import make_split
from rljax.data.collate import BatchIterator
from rljax.losses.oreo import OREOConfig
from rljax.models import Model, preset
from rljax.oreo_training import (CollectConfig, OREOPhaseConfig, balanced, check_trajectories, collate_trajectories,
                        collect_trajectories, create_oreo_state, load_trajectories, oreo, prompts_with_steps,
                        split_keeping_separator)
from rljax.phases import LoopConfig
from rljax.pipelines import IterativeOREOConfig, iterative_oreo
from rljax.rewards.rules import arithmetic_answer_reward
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
OPT = OptimizerConfig(lr=1e-3, schedule="constant")
ROWS = [{"prompt": f"{a}+{b}=", "completion": f"{a}+{b}={a + b};answer:{a + b + (a % 2)}",
         "reward": float(a % 2 == 0)} for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def setup():
    # one layer: collection, resumption and the rounds do not depend on depth, which only adds compile time
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))
    return model, jax.jit(model.init)(jax.random.key(0))  # eager init compiles op by op


def test_split_keeping_separator():
    assert split_keeping_separator("1+2=3;3*4=12;answer:12", ";") == ["1+2=3;", "3*4=12;", "answer:12"]
    assert split_keeping_separator("a;", ";") == ["a;"] and split_keeping_separator("", ";") == []
    assert "".join(split_keeping_separator(";;x;", ";")) == ";;x;"


def test_collation_marks_step_starts_and_eos():
    rows = [{"prompt": "2+3=", "completion": "2+3=5;answer:5", "reward": 1},
            {"prompt": "1+1=", "completion": "1+1=3;answer:3", "reward": 0, "eos": False}]
    b = collate_trajectories(TOK, rows, separator=";")
    first = TOK.encode("2+3=")  # bos + prompt
    ids0 = first + TOK.encode("2+3=5;", add_bos=False) + TOK.encode("answer:5", add_bos=False) + [TOK.eos_id]
    np.testing.assert_array_equal(b.tokens[0, :len(ids0)], ids0)
    assert np.flatnonzero(b.step_starts[0]).tolist() == [len(first), len(first) + 6]
    assert b.loss_mask[0].sum() == len(ids0) - len(first)
    # the second row was cut at the length limit: no eos is appended
    assert int(b.attention_mask[1].sum()) == len(first) + len("1+1=3;answer:3")
    np.testing.assert_array_equal(b.rewards, [1.0, 0.0])
    assert collate_trajectories(TOK, rows).step_starts is None
    # recorded steps win over the separator and must rebuild the completion
    with_steps = [dict(rows[0], steps=["2+3=5;answer:5"])]
    assert np.flatnonzero(collate_trajectories(TOK, with_steps, separator=";").step_starts[0]).tolist() == [
        len(first)]
    with pytest.raises(ValueError, match="row 0: its steps do not concatenate"):
        collate_trajectories(TOK, [dict(rows[0], steps=["2+3=5;"])])


def test_bad_trajectories_are_named():
    with pytest.raises(ValueError, match="row 1: the trajectory has no reward"):
        collate_trajectories(TOK, [ROWS[0], {"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match=r"row 2: reward 0.5 is not 0 or 1.*allow_fractional_rewards"):
        check_trajectories(ROWS[:2] + [dict(ROWS[2], reward=0.5)])
    b = collate_trajectories(TOK, [dict(ROWS[0], reward=0.5)], allow_fractional_rewards=True)
    assert float(b.rewards[0]) == 0.5
    with pytest.raises(ValueError, match="row 0: reward 1.5 is outside"):
        check_trajectories([dict(ROWS[0], reward=1.5)], allow_fractional_rewards=True)
    with pytest.raises(ValueError, match="row 0: reward is nan"):
        check_trajectories([dict(ROWS[0], reward=float("nan"))])
    no_sep = [{"prompt": "q=", "completion": "answer:1", "reward": 1}, {"prompt": "q=", "completion": "x", "reward": 0}]
    with pytest.raises(ValueError, match=r"row 4: no sample of its prompt 'q=' contains the step separator"):
        check_trajectories(ROWS[:4] + no_sep, separator=";", need_steps=True)
    check_trajectories(ROWS[:4] + no_sep, separator=";")  # fine at the token level
    # what iterative OREO keeps of its own samples: the prompts with a multi-step sample
    kept, dropped = prompts_with_steps(ROWS[:4] + no_sep + [dict(no_sep[0], prompt="r=")] + ROWS[4:6], ";")
    assert kept == ROWS[:6] and dropped == ["q=", "r="]
    check_trajectories(kept, separator=";", need_steps=True)
    assert prompts_with_steps(no_sep, None) == ([], ["q="])  # no separator: no steps at all
    with pytest.raises(ValueError, match="row 0: missing field 'completion'"):
        check_trajectories([{"prompt": "p", "reward": 1}])


def test_balanced_keeps_the_first_k_of_each_kind():
    rows = [{"problem": p, "reward": r, "i": i} for i, (p, r) in enumerate([(0, 1), (0, 1), (0, 0), (0, 1), (1, 0),
                                                                            (1, 0), (1, 0)])]
    assert [r["i"] for r in balanced(rows, 2)] == [0, 1, 2, 4, 5]


def test_collect_writes_parquet_resumes_and_refuses_other_arguments(setup, tmp_path):
    model, params = setup
    train, _ = make_split(6, 1, levels=(1,), seed=0)
    prompts = [p.prompt for p in train]
    cfg = CollectConfig(samples=3, prompts_per_batch=2, separator=";",
                        sampling=SampleConfig(max_new_tokens=12, temperature=1.0))
    kw = dict(model=model, tokenizer=TOK, key=jax.random.key(1), problems=train)
    rows = collect_trajectories(params, prompts, arithmetic_answer_reward, cfg, **kw)
    assert len(rows) == 18 and [r["problem"] for r in rows] == [i // 3 for i in range(18)]
    assert all("".join(r["steps"]) == r["completion"] and r["reward"] in (0.0, 1.0) for r in rows)
    out = str(tmp_path / "data")
    disk = collect_trajectories(params, prompts, arithmetic_answer_reward, cfg, out_dir=out, **kw)
    assert disk == rows  # the same batches, keys and rows with or without a directory
    # a run killed after the first part: its files are reused and the rest is sampled again
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    del manifest["parts"]["1"], manifest["parts"]["2"]
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    os.remove(os.path.join(out, "part-00002.parquet"))
    with pytest.raises(ValueError, match="collection unfinished"):
        load_trajectories(out)
    assert collect_trajectories(params, prompts, arithmetic_answer_reward, cfg, out_dir=out, **kw) == rows
    assert load_trajectories(out) == rows
    with pytest.raises(ValueError, match="another 'samples'"):
        collect_trajectories(params, prompts, arithmetic_answer_reward, CollectConfig(samples=2, prompts_per_batch=2,
                             separator=";", sampling=cfg.sampling), out_dir=out, **kw)
    other = jax.tree.map(lambda x: x + 1e-3, params)
    with pytest.raises(ValueError, match="another 'params_sha256'"):
        collect_trajectories(other, prompts, arithmetic_answer_reward, cfg, out_dir=out, **kw)


def _phase(steps, level="token"):
    return OREOPhaseConfig(loss=OREOConfig(beta=0.1, level=level), optimizer=OPT,
                           loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=2, progress=False))


def test_phase_learns_and_resumes_exactly(setup, tmp_path):
    model, params = setup
    collate = functools.partial(collate_trajectories, TOK, separator=";")
    data = BatchIterator(ROWS, 4, collate, seed=0)
    run = lambda steps, d: oreo(create_oreo_state(model, params, OPT, jax.random.key(1))[1], data,  # noqa: E731
                                _phase(steps, "step"), model=model, run_dir=d)
    full = run(6, str(tmp_path / "a"))
    run(4, str(tmp_path / "b"))
    resumed = run(6, str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves((full.policy.params, full.value.params)),
                    jax.tree.leaves((resumed.policy.params, resumed.value.params))):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"oreo/policy_loss", "oreo/value_loss", "oreo/kl"} <= set(lines[0])
    # the value model moved off zero towards the rewards (mean 0.5)
    assert lines[-1]["oreo/value_loss"] < lines[0]["oreo/value_loss"]


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_iterative_oreo_resumes_at_the_right_round(setup, tmp_path):
    model, params = setup
    train, _ = make_split(8, 1, levels=(1,), seed=1)
    prompts = [p.prompt for p in train]
    cfg = IterativeOREOConfig(rounds=2, steps_per_round=2, batch_size=4, phase=_phase(0),
                              collect=CollectConfig(samples=2, prompts_per_batch=4, separator=";",
                                                    sampling=SampleConfig(max_new_tokens=10)))
    run = lambda c, d: iterative_oreo(create_oreo_state(model, params, OPT, jax.random.key(1))[1], prompts,  # noqa
                                      arithmetic_answer_reward, c, model=model, tokenizer=TOK, run_dir=d,
                                      key=jax.random.key(2), problems=train)
    full = run(cfg, str(tmp_path / "a"))
    assert int(full.step) == 4
    one = IterativeOREOConfig(**{**cfg.__dict__, "rounds": 1})
    half = run(one, str(tmp_path / "b"))
    assert int(half.step) == 2 and not os.path.exists(tmp_path / "b" / "round-1")
    resumed = run(cfg, str(tmp_path / "b"))
    assert load_trajectories(str(tmp_path / "a" / "round-1" / "data")) == \
        load_trajectories(str(tmp_path / "b" / "round-1" / "data"))
    for a, b in zip(jax.tree.leaves(full.policy.params), jax.tree.leaves(resumed.policy.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a sharded twin of 20-36 s (others stay in the default suite); .ci/run runs the slow tier
def test_oreo_step_and_search_sharded_equal_one_device():
    out = run_with_devices("""
        import functools, jax, numpy as np
        from rljax.data.collate import BatchIterator
        from rljax.losses.oreo import OREOConfig
        from rljax.models import Model, preset
        from rljax.oreo_training import OREOPhaseConfig, collate_trajectories, create_oreo_state, oreo, value_scorer
        from rljax.phases import LoopConfig
        from rljax.sampling import ValueSearchConfig, value_guided_beam_search
        from rljax.sharding import make_mesh, param_shardings, shard_params
        from rljax.state import OptimizerConfig
        from rljax.tokenizer import CharTokenizer
        from test_oreo_phase import ROWS

        # eps 1e-4: Adam's update of a near-zero gradient entry is then ~linear in it instead of
        # ~its sign, so reduction-order noise between the meshes is not amplified to a full step
        tok, opt = CharTokenizer(), OptimizerConfig(lr=1e-3, eps=1e-4, schedule="constant")
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        init = jax.jit(Model(preset("tiny", n_layers=1, vocab_size=tok.vocab_size)).init)(jax.random.key(0))
        prompts, pmask = tok.encode_batch([r["prompt"] for r in ROWS[:8]], padding_side="left")
        out = []
        for m in (None, mesh):
            model = Model(preset("tiny", n_layers=1, vocab_size=tok.vocab_size), mesh=m)
            value_model, state = create_oreo_state(model, init, opt, jax.random.key(1))
            data = BatchIterator(ROWS, 8, functools.partial(collate_trajectories, tok, separator=";"), seed=0)
            cfg = OREOPhaseConfig(loss=OREOConfig(beta=0.1, level="step"), optimizer=opt,
                                  loop=LoopConfig(steps=3, progress=False))
            state = oreo(state, data, cfg, model=model, mesh=m)
            search = ValueSearchConfig(beams=2, step_end_ids=(tok.encode(";", add_bos=False)[0],), max_step_tokens=4,
                                       max_new_tokens=12, max_rounds=4)
            res = value_guided_beam_search(state.policy.params, prompts, pmask, value_scorer(value_model),
                                           state.value.params, jax.random.key(2), model=model, cfg=search)
            out.append((jax.tree.map(np.asarray, jax.device_get((state.policy.params, state.value.params))),
                        np.asarray(res.tokens), np.asarray(res.scores)))
        for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
            np.testing.assert_allclose(a, b, atol=5e-5)
        np.testing.assert_array_equal(out[0][1], out[1][1])
        np.testing.assert_allclose(out[0][2], out[1][2], atol=1e-4)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[0][0][0]), jax.tree.leaves(init)))
        print("SAME", moved)
    """)
    assert "SAME" in out and float(out.split("SAME")[1]) > 2e-3
