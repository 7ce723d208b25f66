"""Hugging Face checkpoints: rljax reproduces transformers' numbers; save/load round trips; errors name the culprit.

The fixtures under tests/fixtures/hf/ (tiny random Llama, Llama 3 with llama3 RoPE scaling, Qwen2, Qwen3 and a
Llama reward model) and their transformers float32 outputs come from tests/fixtures/make_hf_fixtures.py; the
tests themselves need neither torch nor transformers.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import run_with_devices
from rljax.data.batch import SequenceBatch
from rljax.losses import SFTConfig, sft_loss
from rljax.models import CheckpointFormatError, Model, load_pretrained, save_pretrained
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig, create_state, make_train_step

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
CAUSAL = ("llama", "llama3", "qwen2", "qwen3")


# Run op by op, the model compiles every primitive for every new shape: the forwards are jitted
# (one compile per config and batch shape, shared by the tests that load the same fixture).
@functools.partial(jax.jit, static_argnames=("model",))
def _logits(params, tokens, *, model):
    return model(params, tokens)


@functools.partial(jax.jit, static_argnames=("model",))
def _rewards(params, tokens, mask, *, model):
    hidden, _ = model.forward(params, tokens, mask)
    return model.rewards(params, hidden, mask)


def _fixture(name):
    return os.path.join(FIXTURES, name), dict(np.load(os.path.join(FIXTURES, f"{name}.npz")))


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("name", CAUSAL)
def test_logits_and_greedy_tokens_match_transformers(name):
    path, ref = _fixture(name)
    cfg, params = load_pretrained(path)
    expect = {"llama": dict(rope_scaling=None, tie_embeddings=False, qkv_bias=False, qk_norm=False),
              "llama3": dict(tie_embeddings=True, qkv_bias=False, qk_norm=False),
              "qwen2": dict(qkv_bias=True, qk_norm=False, tie_embeddings=False),
              "qwen3": dict(qk_norm=True, qkv_bias=False, tie_embeddings=True, head_dim=16)}[name]
    for field, value in expect.items():
        assert getattr(cfg, field) == value, field
    if name == "llama3":
        assert cfg.rope_scaling.factor == 8.0 and cfg.rope_scaling.original_max_position_embeddings == 32
    assert cfg.heads == ("lm",) and cfg.n_kv_heads < cfg.n_heads and cfg.param_dtype == "float32"
    model = Model(cfg)
    logits = np.asarray(_logits(params, ref["tokens"], model=model))
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    # Greedy decoding with rljax's KV-cache sampler; transformers' choices were >= min_greedy_gap from ties.
    assert float(ref["min_greedy_gap"]) > 1e-3
    scfg = SampleConfig(max_new_tokens=ref["greedy_tokens"].shape[1], greedy=True, eos_id=-1)
    out = sample(params, ref["greedy_prompt"], None, jax.random.key(0), model=model, cfg=scfg)
    np.testing.assert_array_equal(np.asarray(out.completions), ref["greedy_tokens"])


def test_sequence_classification_scores_match_transformers():
    path, ref = _fixture("llama_reward")
    cfg, params = load_pretrained(path)
    assert cfg.heads == ("reward",) and cfg.reward_outputs == 1
    np.testing.assert_array_equal(params["reward_bias"], 0.0)  # transformers' score layer has no bias
    model = Model(cfg)
    rewards = np.asarray(_rewards(params, ref["tokens"], ref["attention_mask"], model=model))
    np.testing.assert_allclose(rewards, ref["scores"][:, 0], atol=1e-4, rtol=0)


def test_legacy_rope_scaling_config_loads_the_same(tmp_path):
    """transformers < 5 writes rope_theta + rope_scaling instead of rope_parameters."""
    path, ref = _fixture("llama3")
    legacy = shutil.copytree(path, tmp_path / "legacy")
    hf = json.load(open(legacy / "config.json"))
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    json.dump(hf, open(legacy / "config.json", "w"))
    cfg, params = load_pretrained(str(legacy))
    _, params0 = load_pretrained(path)
    assert cfg == load_pretrained(path)[0]
    np.testing.assert_allclose(np.asarray(_logits(params, ref["tokens"], model=Model(cfg))), ref["logits"],
                               atol=1e-4, rtol=0)
    _assert_same_tree(params, params0)


@pytest.mark.parametrize("name", CAUSAL + ("llama_reward",))
def test_load_save_load_round_trip_is_exact(name, tmp_path):
    path, _ = _fixture(name)
    cfg, params = load_pretrained(path)
    out = save_pretrained(params, cfg, str(tmp_path / "out"), max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
    assert not any(f.startswith(".") for f in os.listdir(tmp_path))  # no temporary directory left
    src_hf = json.load(open(os.path.join(path, "config.json")))
    out_hf = json.load(open(os.path.join(out, "config.json")))
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_key_value_heads",
                "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_parameters"):
        if key in src_hf:
            assert out_hf[key] == src_hf[key], key
    # Every tensor the source holds is written with the same name, shape and values (read by the
    # safetensors library itself, independently of rljax's reader).
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    src = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            src.update(load_file(os.path.join(path, f)))
    for tensor, value in src.items():
        if tensor == "lm_head.weight" and src_hf["tie_word_embeddings"]:
            continue
        with safe_open(os.path.join(out, index[tensor]), framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(tensor), value, err_msg=tensor)
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    _assert_same_tree(params, params2)


def test_single_file_bfloat16_save_and_dtype_conversion(tmp_path):
    path, ref = _fixture("qwen2")
    cfg, params = load_pretrained(path)
    out = save_pretrained(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == jnp.bfloat16
    cfg_bf, params_bf = load_pretrained(out)  # the checkpoint's dtype by default
    assert cfg_bf.param_dtype == "bfloat16" and cfg_bf.dtype == "bfloat16"
    assert params_bf["embedding"].dtype == jnp.bfloat16
    _assert_same_tree(params_bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    cfg32, params32 = load_pretrained(out, dtype=jnp.float32)
    assert cfg32.param_dtype == "float32" and params32["embedding"].dtype == jnp.float32
    _assert_same_tree(params32, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
    # bf16 weights computed in float32 stay close to the float32 reference.
    np.testing.assert_allclose(np.asarray(_logits(params32, ref["tokens"], model=Model(cfg32))), ref["logits"],
                               atol=0.1)


def test_sft_step_then_save_and_load_gives_the_in_memory_logits(tmp_path):
    path, ref = _fixture("llama")
    cfg, params = load_pretrained(path)
    model = Model(cfg)
    opt = OptimizerConfig(lr=1e-2, schedule="constant", total_steps=10)
    state = create_state(model, opt, jax.random.key(0), params=params)
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), opt, donate=False)
    tokens = jnp.asarray(ref["tokens"])
    batch = SequenceBatch(tokens, jnp.ones_like(tokens), jnp.ones_like(tokens).at[:, :4].set(0))
    state, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 0
    trained = np.asarray(_logits(state.params, tokens, model=model))
    assert np.abs(trained - ref["logits"]).max() > 1e-2  # the step really changed the model
    out = save_pretrained(state.params, cfg, str(tmp_path / "sft"))
    cfg2, params2 = load_pretrained(out)
    _assert_same_tree(state.params, params2)
    np.testing.assert_allclose(np.asarray(_logits(params2, tokens, model=Model(cfg2))), trained, atol=1e-6, rtol=0)


def test_extra_heads_round_trip_under_documented_names(tmp_path):
    path, ref = _fixture("qwen3")
    cfg, params = load_pretrained(path, heads=("lm", "value", "reward"), config_overrides={"reward_outputs": 2})
    for k in ("value_head", "value_bias", "reward_head", "reward_bias"):  # new heads start at zero
        np.testing.assert_array_equal(params[k], 0.0)
    rng = np.random.default_rng(0)
    params = {**params, **{k: jnp.asarray(rng.normal(size=params[k].shape), jnp.float32)
                           for k in ("value_head", "value_bias", "reward_head", "reward_bias")}}
    out = save_pretrained(params, cfg, str(tmp_path / "heads"))
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("v_head.summary.weight").shape == (1, cfg.d_model)
        np.testing.assert_array_equal(f.get_tensor("score.weight"), np.asarray(params["reward_head"]).T)
        np.testing.assert_array_equal(f.get_tensor("score.bias"), params["reward_bias"])
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["Qwen3ForCausalLM"]
    cfg2, params2 = load_pretrained(out, heads=("lm", "value", "reward"))
    assert cfg2 == cfg
    _assert_same_tree(params, params2)
    # A reward model alone exports as sequence classification; a value model alone as the bare backbone.
    for heads, arch in ((("reward",), "Qwen3ForSequenceClassification"), (("value",), "Qwen3Model")):
        sub = cfg.replace(heads=heads)
        sub_shapes = Model(sub).param_shapes()  # traced once, not once per parameter
        sub_params = {k: v for k, v in params.items() if k in sub_shapes}
        d = save_pretrained(sub_params, sub, str(tmp_path / arch))
        hf = json.load(open(os.path.join(d, "config.json")))
        assert hf["architectures"] == [arch] and hf["tie_word_embeddings"] is False
        cfg3, params3 = load_pretrained(d)
        assert cfg3.heads == heads
        _assert_same_tree(sub_params, params3)


def test_loading_onto_a_2x2x2_mesh_equals_one_device():
    out = run_with_devices("""
        import os, tempfile
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from rljax.models import Model, load_pretrained, save_pretrained
        from rljax.sharding import make_mesh

        assert jax.device_count() == 8
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        for name in ("llama", "qwen2", "qwen3"):
            path = os.path.join("tests", "fixtures", "hf", name)
            ref = np.load(path + ".npz")
            cfg, params = load_pretrained(path)
            cfg_m, sp = load_pretrained(path, mesh=mesh)
            assert cfg_m == cfg
            gate = sp["layers"]["mlp"]["gate"]
            assert gate.sharding.spec == P(None, "fsdp", "tensor"), gate.sharding
            assert gate.addressable_shards[0].data.size * 4 == gate.size  # really split 4 ways
            q = sp["layers"]["attn"]["q_proj"]
            assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, sp)
            f1 = jax.jit(lambda p, t: Model(cfg)(p, t))(params, ref["tokens"])
            f8 = jax.jit(lambda p, t: Model(cfg, mesh)(p, t))(sp, ref["tokens"])
            np.testing.assert_allclose(f1, f8, atol=1e-5)
            np.testing.assert_allclose(f8, ref["logits"], atol=1e-4)
            with tempfile.TemporaryDirectory() as d:  # saving gathers from the mesh
                save_pretrained(sp, cfg, d + "/out", max_shard_bytes=50_000)
                _, back = load_pretrained(d + "/out")
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)
        print("HF_MESH_OK")
    """)
    assert "HF_MESH_OK" in out


# ----------------------------------------------------------------------------- bad input


def _copy(name, tmp_path):
    return str(shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name))


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    hf = json.load(open(file))
    hf.update(changes)
    json.dump(hf, open(file, "w"))


def test_missing_shard_file_is_named(tmp_path):
    path = _copy("llama", tmp_path)
    os.remove(os.path.join(path, "model-00003-of-00007.safetensors"))
    with pytest.raises(CheckpointFormatError, match="model-00003-of-00007.safetensors.*missing"):
        load_pretrained(path)


def test_no_safetensors_at_all(tmp_path):
    path = _copy("qwen2", tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="model.safetensors"):
        load_pretrained(path)


def test_missing_tensor_is_named(tmp_path):
    path = _copy("qwen2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias is missing"):
        load_pretrained(path)
    # Untied config without lm_head.weight: the LM head is missing, not silently tied.
    path = _copy("qwen3", tmp_path)
    _edit_config(path, tie_word_embeddings=False)
    with pytest.raises(CheckpointFormatError, match="lm_head.weight is missing"):
        load_pretrained(path)


def test_tensor_the_config_does_not_describe_is_named(tmp_path):
    path = _copy("qwen2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)  # an o_proj bias rljax lacks
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: tensor model.layers.0.self_attn.o_proj.bias "
                                                    r"has no place"):
        load_pretrained(path)
    path = _copy("llama", tmp_path)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(CheckpointFormatError, match=r"tensor model.layers.1.input_layernorm.weight has no place"):
        load_pretrained(path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    path = _copy("llama", tmp_path)
    _edit_config(path, intermediate_size=128)
    with pytest.raises(CheckpointFormatError,
                       match=r"llama/model-00004-of-00007.safetensors: tensor model.layers.0.mlp.down_proj.weight "
                             r"has shape \[64, 96\], expected \[64, 128\]"):
        load_pretrained(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = _copy("llama", tmp_path)
    _edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(CheckpointFormatError, match="model_type='mistral'"):
        load_pretrained(path)
    _edit_config(path, model_type="llama", architectures=["LlamaForTokenClassification"])
    with pytest.raises(CheckpointFormatError, match="LlamaForTokenClassification"):
        load_pretrained(path)


@pytest.mark.parametrize("name, changes, field", [
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen2", {"num_experts": 8}, "num_experts"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_field_is_named(name, changes, field, tmp_path):
    path = _copy(name, tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(CheckpointFormatError, match=field):
        load_pretrained(path)


def test_a_tied_config_over_a_separate_head_loads_only_when_the_head_is_the_embedding(tmp_path):
    """tie_word_embeddings true and an lm_head.weight in the file: equal to the embedding, the same
    model (loads tied); different, transformers' versions disagree on which they use: refused."""
    path = _copy("qwen3", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    embedding = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    save_file({**tensors, "lm_head.weight": tensors[embedding].copy()}, file)
    _assert_same_tree(load_pretrained(os.path.join(FIXTURES, "qwen3"))[1], load_pretrained(path)[1])
    save_file({**tensors, "lm_head.weight": tensors[embedding] + 1}, file)
    with pytest.raises(CheckpointFormatError, match=r"tie_word_embeddings is true, but .*model.safetensors also "
                                                    r"holds an lm_head.weight that differs"):
        load_pretrained(path)


def test_rope_scaling_beside_rope_parameters_must_agree(tmp_path):
    path = _copy("qwen3", tmp_path)
    _edit_config(path, rope_scaling={"rope_type": "default"})  # the same: loads
    load_pretrained(path)
    _edit_config(path, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointFormatError, match=r"rope_scaling \{'type': 'linear', 'factor': 2.0\} disagrees "
                                                    r"with rope_parameters"):
        load_pretrained(path)


def test_damaged_files_are_named(tmp_path):
    """A truncated safetensors file (a broken download) and JSON that does not parse name their file."""
    path = _copy("qwen3", tmp_path)
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: not a readable safetensors file"):
        load_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "qwen3",')
    with pytest.raises(CheckpointFormatError, match=r"config.json: not valid JSON"):
        load_pretrained(path)


def test_save_refuses_to_clobber_and_checks_shapes(tmp_path):
    cfg, params = load_pretrained(os.path.join(FIXTURES, "qwen3"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(params, cfg, str(tmp_path / "full"))
    with pytest.raises(FileExistsError, match=r"holds files but no checkpoint \(keep.txt\)"):  # e.g. a run dir
        save_pretrained(params, cfg, str(tmp_path / "full"), overwrite=True)
    # overwrite=True over a checkpoint replaces its own files (a stale shard of an older save too) and
    # keeps the rest: tokenizer files, a README
    (tmp_path / "full" / "keep.txt").unlink()
    save_pretrained(params, cfg, str(tmp_path / "full"), max_shard_bytes=2**14)  # sharded
    shards = [n for n in os.listdir(tmp_path / "full") if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(tmp_path / "full")
    (tmp_path / "full" / "README.md").write_text("mine")
    shutil.copy(os.path.join(FIXTURES, "qwen3", "generation_config.json"), tmp_path / "full")
    save_pretrained(params, cfg, str(tmp_path / "full"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "full")) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert (tmp_path / "full" / "README.md").read_text() == "mine"
    _assert_same_tree(params, load_pretrained(str(tmp_path / "full"))[1])
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_pretrained(params, cfg, str(tmp_path / "file"), overwrite=True)
    with pytest.raises(ValueError, match=r"params\['embedding'\] has shape"):
        save_pretrained({**params, "embedding": params["embedding"][:3]}, cfg, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_reads_in_small_chunks_give_the_same_params(monkeypatch):
    """Big tensors are read a few rows at a time; force that path on the tiny fixtures."""
    import rljax.models.hf as hf

    for name in ("llama", "qwen3"):
        _, whole = load_pretrained(os.path.join(FIXTURES, name))
        monkeypatch.setattr(hf, "_CHUNK_BYTES", 100)
        _, chunked = load_pretrained(os.path.join(FIXTURES, name))
        monkeypatch.undo()
        _assert_same_tree(whole, chunked)


HF_WORKER = """
import json, sys
import jax, numpy as np
from jax.experimental.multihost_utils import process_allgather
from rljax.models import Model, load_pretrained, save_pretrained
from rljax.sharding import make_mesh, replicated

pid, port, fixture, out_dir, result = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
mesh = make_mesh(data=1, fsdp=2, tensor=2)  # 4 devices, 2 per process: every parameter spans both processes
cfg, params = load_pretrained(fixture, mesh=mesh)
gate = params["layers"]["mlp"]["gate"]
assert not gate.is_fully_addressable and len(gate.addressable_shards) == 2
ref = np.load(fixture + ".npz")
tokens = jax.make_array_from_callback(ref["tokens"].shape, replicated(mesh), lambda i: ref["tokens"][i])
logits = jax.jit(lambda p, t: Model(cfg, mesh)(p, t), out_shardings=replicated(mesh))(params, tokens)
err = float(np.abs(np.asarray(process_allgather(logits, tiled=True)) - ref["logits"]).max())
save_pretrained(params, cfg, out_dir, max_shard_bytes=50_000)
json.dump({"err": err, "processes": jax.process_count()}, open(result, "w"))
"""


@pytest.mark.slow
def test_two_processes_load_and_save(tmp_path):
    """Two processes (2 CPU devices each) load the sharded fixture onto one 4-device mesh, each reading its
    own slices; saving gathers across them and process 0 writes a checkpoint equal to the source."""
    import subprocess
    import sys

    from test_multihost import _env, _free_port

    script, port, fixture = tmp_path / "worker.py", _free_port(), os.path.join(FIXTURES, "llama")
    script.write_text(HF_WORKER)
    procs = []
    for pid in (0, 1):
        log = open(tmp_path / f"proc{pid}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), str(pid), str(port), fixture,
                                       str(tmp_path / "out"), str(tmp_path / f"proc{pid}.json")],
                                      env=_env(2), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        pytest.fail("\n".join((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in (0, 1)))
    for pid in (0, 1):
        res = json.load(open(tmp_path / f"proc{pid}.json"))
        assert res["processes"] == 2 and res["err"] < 1e-4, res
    _, params = load_pretrained(fixture)
    _, back = load_pretrained(str(tmp_path / "out"))
    _assert_same_tree(params, back)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["out"]  # no temporary directory left


def test_hub_names_go_through_snapshot_download_only_when_not_a_directory(monkeypatch, tmp_path):
    """A stand-in huggingface_hub module (the real one is never called in tests)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = lambda repo_id, **kw: calls.append((repo_id, kw)) or os.path.join(FIXTURES, "qwen3")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    cfg, _ = load_pretrained("Qwen/Qwen3-tiny-fixture")
    assert cfg.qk_norm and [c[0] for c in calls] == ["Qwen/Qwen3-tiny-fixture"]
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    load_pretrained(os.path.join(FIXTURES, "qwen3"))  # a local directory is never looked up
    assert len(calls) == 1
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: a clear error
    with pytest.raises(FileNotFoundError, match="not a local directory and huggingface_hub is not installed"):
        load_pretrained("Qwen/Qwen3-tiny-fixture")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):  # a path: never a hub lookup
        load_pretrained(str(tmp_path / "nowhere"))
