"""Sharded (8 simulated CPU devices, mesh (2, 2, 2)) equals single-device; mesh and rule helpers."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_with_devices
from rljax.sharding import LOGICAL_RULES, _fit_spec, logical_to_spec, make_mesh


def test_sharded_forward_logprobs_and_sample_equal_single_device():
    out = run_with_devices("""
        import dataclasses
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        from rljax.models import Model, preset
        from rljax.models.logprobs import token_logprobs
        from rljax.sampling import SampleConfig, sample, beam_search, BeamConfig
        from rljax.sharding import make_mesh, param_shardings, shard_params, shard_batch
        from conftest import left_padded

        assert jax.device_count() == 8
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        for scan in (True, False):
            cfg = preset("tiny", scan_layers=scan)
            single, sharded = Model(cfg), Model(cfg, mesh=mesh)
            params = single.init(jax.random.key(0))
            sp = shard_params(params, param_shardings(sharded, mesh))
            gate = sp["layers"]["mlp"]["gate"]
            assert gate.sharding.spec == P(None, "fsdp", "tensor"), gate.sharding
            assert gate.addressable_shards[0].data.size * 4 == gate.size  # really split 4 ways
            tokens, mask = left_padded([9, 4, 1, 6, 9, 2, 7, 3], 10, 64, seed=1)
            st, sm = shard_batch(tokens, mesh), shard_batch(mask, mesh)

            f1 = jax.jit(lambda p, t, m: single(p, t, m))(params, tokens, mask)
            f2 = jax.jit(lambda p, t, m: sharded(p, t, m))(sp, st, sm)
            np.testing.assert_allclose(f1, f2, atol=1e-5)
            h1 = jax.jit(lambda p, t, m: single.last_hidden(p, t, m))(params, tokens, mask)
            h2 = jax.jit(lambda p, t, m: sharded.last_hidden(p, t, m))(sp, st, sm)
            np.testing.assert_allclose(h1, h2, atol=1e-5)
            if not scan:  # unrolled layers: their parameter layout, forward, and remat's gradient; the rest
                # is layer-agnostic. remat="full" recomputes through remat_after_cotangent (a custom VJP)
                remat = Model(dataclasses.replace(cfg, remat="full"), mesh=mesh)
                def grad(model, *args):
                    return jax.jit(jax.grad(lambda p, t, m: token_logprobs(p, t, m, model=model).sum()))(*args)

                g1, g2 = grad(single, params, tokens, mask), grad(remat, sp, st, sm)
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)
                continue

            l1 = jax.jit(lambda p, t, m: token_logprobs(p, t, m, model=single))(params, tokens, mask)
            l2 = jax.jit(lambda p, t, m: token_logprobs(p, t, m, model=sharded))(sp, st, sm)
            np.testing.assert_allclose(l1, l2, atol=1e-5)

            g1 = jax.grad(lambda p: token_logprobs(p, tokens, mask, model=single).sum())(params)
            g2 = jax.jit(jax.grad(lambda p, t, m: token_logprobs(p, t, m, model=sharded).sum()))(sp, st, sm)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)

            for scfg in (SampleConfig(max_new_tokens=12, greedy=True),
                         SampleConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, n=2),
                         SampleConfig(max_new_tokens=12, temperature=1.0, n=2, repetition_penalty=1.3)):
                r1 = sample(params, tokens, mask, jax.random.key(3), model=single, cfg=scfg)
                r2 = sample(sp, tokens, mask, jax.random.key(3), model=sharded, cfg=scfg)
                assert len(r2.tokens.sharding.device_set) == 8
                np.testing.assert_array_equal(r1.tokens, r2.tokens)
                np.testing.assert_allclose(r1.logprobs, r2.logprobs, atol=1e-5)
                np.testing.assert_allclose(r1.sampling_logprobs, r2.sampling_logprobs, atol=1e-5)
            b1 = beam_search(params, tokens, mask, model=single, cfg=BeamConfig(num_beams=2, max_new_tokens=6))
            b2 = beam_search(sp, tokens, mask, model=sharded, cfg=BeamConfig(num_beams=2, max_new_tokens=6))
            np.testing.assert_array_equal(b1.tokens, b2.tokens)
            np.testing.assert_allclose(b1.scores, b2.scores, atol=1e-5)

        # any number of prompts: complete fills a call up to prompt_multiple (data x fsdp = 4 rows) with
        # copies and drops them; sample itself names the multiple
        from rljax.eval import complete
        from rljax.sampling import prompt_multiple
        from rljax.tokenizer import CharTokenizer
        tok = CharTokenizer()
        cfg = preset("tiny", n_layers=1, vocab_size=tok.vocab_size)
        single, sharded = Model(cfg), Model(cfg, mesh=mesh)
        params = single.init(jax.random.key(0))
        sp = shard_params(params, param_shardings(sharded, mesh))
        assert [prompt_multiple(sharded, n) for n in (1, 2, 3, 4)] == [4, 2, 4, 1] and prompt_multiple(single) == 1
        prompts = ["1+2=", "13+4=", "7+70=", "2+2=", "45+6="]
        for n, t in ((1, 0.0), (2, 1.0)):
            kw = dict(max_new_tokens=5, n=n, temperature=t, key=jax.random.key(2))
            assert complete(sp, sharded, tok, prompts, **kw) == complete(params, single, tok, prompts, **kw)
        try:
            sample(sp, *tok.encode_batch(prompts, padding_side="left"), jax.random.key(3), model=sharded,
                   cfg=SampleConfig(max_new_tokens=2))
            raise AssertionError("5 prompts on data x fsdp = 4 were not refused")
        except ValueError as e:
            assert str(e).startswith("sample: 5 prompts do not split over the data x fsdp = 4 of the mesh: pass a "
                                     "multiple of 4 prompts"), e
        print("SHARDED_OK")
    """)
    assert "SHARDED_OK" in out


def test_make_mesh_sizes_and_errors():
    n = jax.device_count()
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(data=-1, fsdp=-1)


def test_rules_table():
    assert logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    # a mesh axis is used at most once per array: 'batch' already took fsdp
    assert logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("embedding_dim",), LOGICAL_RULES)


def test_indivisible_dimensions_fall_back_to_replication():
    mesh = make_mesh()

    class FakeMesh:  # sizes only; _fit_spec reads mesh.shape
        shape = {"data": 2, "fsdp": 4, "tensor": 4}

    assert _fit_spec(P("fsdp", "tensor"), (128, 2), FakeMesh) == P("fsdp", None)
    assert _fit_spec(P(("data", "fsdp"), None), (6, 3), FakeMesh) == P("data", None)
    assert _fit_spec(P("tensor"), (8,), mesh) == P("tensor")
