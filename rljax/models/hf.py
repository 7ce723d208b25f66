"""Hugging Face interop: load and save Llama / Qwen2 / Qwen3 checkpoints (config.json + safetensors).

    cfg, params = load_pretrained("path/to/Qwen2.5-0.5B", mesh=mesh)     # or a hub name
    model = Model(cfg, mesh)
    save_pretrained(params, cfg, "out/dir")        # transformers loads it as the same architecture

Supported architectures: {Llama, Qwen2, Qwen3} x {ForCausalLM, ForSequenceClassification, Model}:
Llama 2 and 3.x (including `rope_scaling` with `rope_type: "llama3"`), Qwen2 (q/k/v biases), Qwen3
(per-head q/k RMSNorm, explicit head_dim). A config.json field that changes the computation in a way
rljax does not implement (another RoPE scaling, a sliding window, MoE experts, Llama's attention or
MLP biases, quantisation, a non-SiLU activation, ...) raises `CheckpointFormatError` naming the field:
a checkpoint loads exactly or not at all.

Name and layout map (HF Linear weights are [out, in]; rljax stacks layers on a leading L axis):

    model.embed_tokens.weight                 [V, D]      embedding               [V, D]
    model.layers.{i}.input_layernorm.weight   [D]         layers.attn_norm.scale  [L, D]
    model.layers.{i}.self_attn.q_proj.weight  [N*H, D]    layers.attn.q_proj      [L, D, N, H]
    model.layers.{i}.self_attn.k_proj.weight  [K*H, D]    layers.attn.k_proj      [L, D, K, H]   (v_proj alike)
    model.layers.{i}.self_attn.q_proj.bias    [N*H]       layers.attn.q_proj_bias [L, N, H]      (k, v alike)
    model.layers.{i}.self_attn.q_norm.weight  [H]         layers.attn.q_norm.scale [L, H]        (k_norm alike)
    model.layers.{i}.self_attn.o_proj.weight  [D, N*H]    layers.attn.o_proj      [L, N, H, D]
    model.layers.{i}.post_attention_layernorm.weight      layers.mlp_norm.scale   [L, D]
    model.layers.{i}.mlp.gate_proj.weight     [F, D]      layers.mlp.gate         [L, D, F]      (up alike)
    model.layers.{i}.mlp.down_proj.weight     [D, F]      layers.mlp.down         [L, F, D]
    model.norm.weight                         [D]         final_norm.scale        [D]
    lm_head.weight                            [V, D]      lm_head                 [D, V]  (absent when tied)

Heads beyond the LM head:
  reward  `score.weight` [A, D] -> reward_head [D] (A = 1) or [D, A]; `score.bias` [A] -> reward_bias.
          Exported as `{Arch}ForSequenceClassification` when the model has no LM head (transformers'
          score layer is bias-free, so it drops `score.bias`: its scores are rljax's minus reward_bias).
          transformers reads the score at the last token that is not `pad_token_id`; pass the pad id
          in `extra_config` when saving.
  value   `v_head.summary.weight` [1, D] -> value_head [D], `v_head.summary.bias` [1] -> value_bias
          (TRL's AutoModelForCausalLMWithValueHead names); transformers ignores these tensors.
          A model with only a value head is exported as `{Arch}Model` (the bare backbone).
A head asked for at load time whose tensors the checkpoint lacks starts at zero (as `add_head`).

Memory: every parameter is created directly in its target sharding with
`jax.make_array_from_callback`; each device's shard is read from the memory-mapped safetensors
file(s), only the rows it needs, one HF tensor at a time, so loading never holds a second full
copy of the weights on the host. Saving gathers one HF tensor at a time and streams it to disk.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from rljax.models.config import DTYPES, ConfigFieldError, RopeScaling, TransformerConfig
from rljax.models.transformer import Model
from rljax.sharding import LOGICAL_RULES, param_shardings

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The files save_pretrained writes, and so replaces: every other file of a checkpoint directory (tokenizer
# files, generation_config.json, a README) is kept.
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _checkpoint_owned(name: str) -> bool:
    return name in (CONFIG_NAME, SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name) is not None

# model_type -> architecture name prefix; the suffix says which heads the checkpoint holds.
MODEL_TYPES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ARCH_SUFFIXES = ("ForCausalLM", "ForSequenceClassification", "Model")
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}
_ALIGN = 64  # XLA:CPU aliases (does not copy) host buffers aligned to 64 bytes
_CHUNK_BYTES = 32 * 2**20  # largest block read from a file at once


class CheckpointFormatError(ValueError):
    """A checkpoint rljax cannot load exactly: the message names the file, tensor or config field."""


# ----------------------------------------------------------------------------- config.json <-> config


def resolve_path(path_or_name: str) -> str:
    """A local directory as is (`~` expanded); otherwise a hub repo id ("name" or "owner/name") fetched with
    `huggingface_hub.snapshot_download` (imported only here: it is not an rljax dependency). A string that
    can only be a local path (absolute, "./", "~", more than one "/") and names no directory is a
    FileNotFoundError naming it, not a hub lookup."""
    from rljax.data.adapters import _looks_like_path

    given = os.fspath(path_or_name)
    path = os.path.expanduser(given)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{given!r} is a file; a checkpoint is a directory holding config.json and the "
                                 f"*.safetensors weights")
    if isinstance(path_or_name, os.PathLike) or _looks_like_path(given):
        raise FileNotFoundError(f"no such checkpoint directory: {given!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local directory and huggingface_hub is not installed "
                                f"to fetch it from the hub") from None
    return snapshot_download(path, allow_patterns=[CONFIG_NAME, "*.safetensors", INDEX_FILE])


def read_hf_config(path: str) -> dict:
    """The raw config.json of a checkpoint directory as a dict."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise CheckpointFormatError(f"{file}: missing (a Hugging Face checkpoint needs config.json)")
    return _read_json(file)


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{file}: not valid JSON ({e})") from None


def _architecture(hf: dict, file: str) -> tuple[str, str]:
    """(model_type, suffix) from `architectures` / `model_type`, or an error naming the field."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointFormatError(f"{file}: model_type={model_type!r} is not supported; rljax loads "
                                    f"{sorted(MODEL_TYPES)}")
    archs = hf.get("architectures") or [MODEL_TYPES[model_type] + "ForCausalLM"]
    if len(archs) != 1:
        raise CheckpointFormatError(f"{file}: architectures={archs} must name exactly one architecture")
    prefix = MODEL_TYPES[model_type]
    suffix = archs[0][len(prefix):] if archs[0].startswith(prefix) else None
    if suffix not in ARCH_SUFFIXES:
        supported = [prefix + s for s in ARCH_SUFFIXES]
        raise CheckpointFormatError(f"{file}: architectures={archs} is not supported for model_type="
                                    f"{model_type!r}; supported: {supported}")
    return model_type, suffix


def _rope(hf: dict, file: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    legacy = hf.get("rope_scaling")
    if isinstance(params, dict) and isinstance(legacy, dict) and legacy:
        # both spellings: transformers 5 lets the legacy rope_scaling win, older versions read only it, so
        # they must agree ("type" is rope_type's old name)
        differ = {k: v for k, v in legacy.items() if params.get("rope_type" if k == "type" else k) != v}
        if differ:
            raise CheckpointFormatError(f"{file}: rope_scaling {differ} disagrees with rope_parameters "
                                        f"{params}; keep one of the two fields")
    if params is None:
        params, field = dict(hf.get("rope_scaling") or {}), "rope_scaling"
        params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointFormatError(f"{file}: {field} holds per-layer-type RoPE parameters; rljax has one RoPE")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointFormatError(f"{file}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointFormatError(f"{file}: {field}.rope_type={rope_type!r} is not supported; rljax implements "
                                    f"'default' and 'llama3'")
    try:
        scaling = RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params.get(
                                  "original_max_position_embeddings", hf["max_position_embeddings"])))
    except KeyError as e:
        raise CheckpointFormatError(f"{file}: {field} of rope_type 'llama3' lacks {e.args[0]!r}") from None
    return theta, scaling


def _check_unsupported(hf: dict, model_type: str, file: str) -> None:
    """Raise on any config field whose value changes the computation in a way rljax does not implement."""
    def bad(field, why):
        raise CheckpointFormatError(f"{file}: {field}={hf.get(field)!r} is not supported: {why}")

    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        bad("hidden_act", "rljax's MLP is SwiGLU (SiLU)")
    if hf.get("attention_bias") and model_type != "qwen2":
        bad("attention_bias", "rljax has q/k/v biases (Qwen2) but no o_proj bias")
    if hf.get("mlp_bias"):
        bad("mlp_bias", "rljax's MLP has no biases")
    if hf.get("use_sliding_window"):
        bad("use_sliding_window", "rljax attends over the full context")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        bad("layer_types", "only 'full_attention' layers are implemented")
    for field in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
                  "num_experts_per_tok"):
        if hf.get(field):
            bad(field, "mixture-of-experts layers are not implemented")
    if hf.get("quantization_config"):
        bad("quantization_config", "quantised weights are not implemented")


# TransformerConfig field -> the config.json field it is read from (for errors that name the file's field)
_HF_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "mlp_dim": "intermediate_size",
              "head_dim": "head_dim", "max_seq_len": "max_position_embeddings",
              "max_position_embeddings": "max_position_embeddings"}


def config_from_hf(hf: dict, *, heads: Sequence[str] = ("lm",), param_dtype: str | None = None,
                   source: str = CONFIG_NAME, **overrides) -> TransformerConfig:
    """TransformerConfig of an HF config.json dict; `overrides` replace fields (e.g. max_seq_len, dtype,
    scan_layers). param_dtype None: the checkpoint's dtype (`dtype` / `torch_dtype`), float32 if unknown.

    max_seq_len is the file's max_position_embeddings unless overridden; an override that changes it
    keeps the file's value as `TransformerConfig.max_position_embeddings`, which `save_pretrained`
    writes back. A value of the file that makes no valid config (num_key_value_heads not dividing
    num_attention_heads, say) raises CheckpointFormatError naming `source` and the config.json field."""
    model_type, _ = _architecture(hf, source)
    _check_unsupported(hf, model_type, source)
    theta, scaling = _rope(hf, source)
    try:
        D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = dict(vocab_size=int(hf["vocab_size"]), d_model=D, n_layers=int(hf["num_hidden_layers"]), n_heads=N,
                      n_kv_heads=int(hf.get("num_key_value_heads") or N), mlp_dim=int(hf["intermediate_size"]))
    except KeyError as e:
        raise CheckpointFormatError(f"{source}: missing field {e.args[0]!r}") from None
    head_dim = hf.get("head_dim")
    stored = hf.get("dtype") or hf.get("torch_dtype")
    param_dtype = param_dtype or (stored if stored in DTYPES else "float32")
    fields.update(
        head_dim=int(head_dim) if head_dim and int(head_dim) != D // N else None,
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), heads=tuple(heads),
        param_dtype=param_dtype, dtype=param_dtype)
    fields.update(overrides)
    if ("max_position_embeddings" in hf and "max_position_embeddings" not in overrides
            and fields["max_seq_len"] != int(hf["max_position_embeddings"])):
        fields["max_position_embeddings"] = int(hf["max_position_embeddings"])
    try:
        return TransformerConfig(**fields)
    except ConfigFieldError as e:
        if e.field in overrides or e.field not in _HF_FIELDS:
            raise
        name = _HF_FIELDS[e.field]
        raise CheckpointFormatError(f"{source}: {name}={hf.get(name)!r} does not make a valid model ({e})") from None


def _model_type_of(cfg: TransformerConfig) -> str:
    """The HF model_type that computes exactly what `cfg` computes."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("save_pretrained: qk_norm with qkv_bias has no transformers architecture (Qwen3's "
                         "attention_bias also adds an o_proj bias, which rljax lacks)")
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "llama"


def _architecture_suffix(cfg: TransformerConfig) -> str:
    if "lm" in cfg.heads:
        return "ForCausalLM"
    return "ForSequenceClassification" if "reward" in cfg.heads else "Model"


def hf_config_from(cfg: TransformerConfig, *, dtype: str, extra_config: dict | None = None) -> dict:
    """config.json dict for `cfg`. RoPE is written both as `rope_parameters` (transformers >= 5) and as
    `rope_theta` / `rope_scaling` (older versions). `extra_config` (e.g. token ids) goes under the derived keys.
    max_position_embeddings: the larger of cfg.max_seq_len and cfg.max_position_embeddings (the source
    checkpoint's context, kept by `load_pretrained` when max_seq_len was overridden), so a model loaded
    with a shorter max_seq_len to bound its KV cache still advertises its source's context."""
    model_type = _model_type_of(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**scaling, "rope_theta": cfg.rope_theta}
    hf = dict(extra_config or {})
    hf.update(
        architectures=[MODEL_TYPES[model_type] + _architecture_suffix(cfg)], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim_per_head, hidden_act="silu",
        max_position_embeddings=max(cfg.max_seq_len, cfg.max_position_embeddings or 0),
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=rope,
        tie_word_embeddings=bool(cfg.tie_embeddings and "lm" in cfg.heads), dtype=dtype, torch_dtype=dtype,
        use_cache=True)
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None,
                  layer_types=["full_attention"] * cfg.n_layers)
        if model_type == "qwen3":
            hf.update(attention_bias=False)
    if "reward" in cfg.heads and "lm" not in cfg.heads:
        A = cfg.reward_outputs
        hf.update(num_labels=A, id2label={str(i): f"LABEL_{i}" for i in range(A)},
                  label2id={f"LABEL_{i}": i for i in range(A)})
        if A == 1:
            hf.setdefault("problem_type", "regression")
    return hf


# ----------------------------------------------------------------------------- the name / layout map


@dataclass(frozen=True)
class _Source:
    """Where one rljax parameter lives in an HF checkpoint and how its layout differs.

    name: HF tensor name ({i} = layer index when `layered`: the rljax array stacks all L layers).
    hf_shape: the HF tensor's shape (one layer). The HF tensor read in row-major order, reshaped to
    `view` (each HF axis split into `groups[d]` consecutive view axes), then transposed by `perm`
    gives the rljax layout: rljax axis j is view axis perm[j].
    whole: small tensors read entirely and reshaped to the rljax shape (heads).
    optional: absent in the checkpoint -> zeros (a new head), instead of an error.
    """

    name: str
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    groups: tuple[int, ...]
    perm: tuple[int, ...]
    layered: bool = False
    whole: bool = False
    optional: bool = False


def _linear(name, out_split, in_split, layered=True) -> _Source:
    """An HF Linear weight [out, in] with out = prod(out_split), in = prod(in_split); rljax keeps every
    matrix as [in..., out...] (q_proj [D, N, H], o_proj [N, H, D], gate [D, F])."""
    view = tuple(out_split) + tuple(in_split)
    n_out = len(out_split)
    perm = tuple(range(n_out, len(view))) + tuple(range(n_out))
    return _Source(name, (math.prod(out_split), math.prod(in_split)), view, (n_out, len(in_split)), perm, layered)


def _vector(name, size, layered=True, split=None) -> _Source:
    view = tuple(split or (size,))
    return _Source(name, (size,), view, (len(view),), tuple(range(len(view))), layered)


def _sources(cfg: TransformerConfig, prefix: str) -> dict:
    """rljax params tree (nested dict) -> _Source for every parameter of `cfg`."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    lp = prefix + "layers.{i}."
    attn = {
        "q_proj": _linear(lp + "self_attn.q_proj.weight", (N, H), (D,)),
        "k_proj": _linear(lp + "self_attn.k_proj.weight", (K, H), (D,)),
        "v_proj": _linear(lp + "self_attn.v_proj.weight", (K, H), (D,)),
        "o_proj": _linear(lp + "self_attn.o_proj.weight", (D,), (N, H)),
    }
    if cfg.qkv_bias:
        for p, h in (("q", N), ("k", K), ("v", K)):
            attn[f"{p}_proj_bias"] = _vector(lp + f"self_attn.{p}_proj.bias", h * H, split=(h, H))
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": _vector(lp + "self_attn.q_norm.weight", H)}
        attn["k_norm"] = {"scale": _vector(lp + "self_attn.k_norm.weight", H)}
    tree = {
        "embedding": _Source(prefix + "embed_tokens.weight", (V, D), (V, D), (1, 1), (0, 1)),
        "final_norm": {"scale": _vector(prefix + "norm.weight", D, layered=False)},
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": _vector(lp + "input_layernorm.weight", D)},
            "mlp_norm": {"scale": _vector(lp + "post_attention_layernorm.weight", D)},
            "mlp": {"gate": _linear(lp + "mlp.gate_proj.weight", (F,), (D,)),
                    "up": _linear(lp + "mlp.up_proj.weight", (F,), (D,)),
                    "down": _linear(lp + "mlp.down_proj.weight", (D,), (F,))},
        },
    }
    if cfg.has_lm_head_matrix:
        tree["lm_head"] = _linear("lm_head.weight", (V,), (D,), layered=False)
    if "value" in cfg.heads:
        tree["value_head"] = _Source("v_head.summary.weight", (1, D), (1, D), (1, 1), (1, 0), whole=True, optional=True)
        tree["value_bias"] = _Source("v_head.summary.bias", (1,), (1,), (1,), (0,), whole=True, optional=True)
    if "reward" in cfg.heads:
        A = cfg.reward_outputs
        tree["reward_head"] = _Source("score.weight", (A, D), (A, D), (1, 1), (1, 0), whole=True, optional=True)
        tree["reward_bias"] = _Source("score.bias", (A,), (A,), (1,), (0,), whole=True, optional=True)
    return tree


# ----------------------------------------------------------------------------- reading


class _Checkpoint:
    """The tensors of a safetensors checkpoint directory: name -> file, shape, dtype (headers only).

    Reads open the file per HF tensor and close it after copying the slice: the memory map's resident
    pages are released with it, so the process never holds the mapped file beside the arrays it built.
    """

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointFormatError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                                        f"checkpoints are supported)")
        self.meta: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for file in files:
            full = os.path.join(path, file)
            if not os.path.isfile(full):
                raise CheckpointFormatError(f"{full}: shard file listed in {INDEX_FILE} is missing")
            try:
                with safe_open(full, framework="numpy") as f:
                    for name in f.keys():
                        if weight_map is not None and weight_map.get(name) != file:
                            continue
                        sl = f.get_slice(name)
                        self.meta[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # noqa: BLE001 - safetensors' errors name no file: truncated, damaged
                if isinstance(e, CheckpointFormatError):
                    raise
                raise CheckpointFormatError(f"{full}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                            "a truncated download or a damaged copy") from e
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.meta:
                    raise CheckpointFormatError(f"{os.path.join(path, file)}: tensor {name} listed in {INDEX_FILE} "
                                                f"is not in the file")

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.meta:
            raise CheckpointFormatError(f"{self.path}: tensor {name} is missing from the checkpoint")
        file, got, dtype = self.meta[name]
        if got != tuple(shape):
            raise CheckpointFormatError(f"{os.path.join(self.path, file)}: tensor {name} has shape {list(got)}, "
                                        f"expected {list(shape)} from config.json")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"{os.path.join(self.path, file)}: tensor {name} has dtype {dtype}; "
                                        f"rljax loads {sorted(SAFETENSORS_DTYPES)}")

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """tensor[index] (all of it when None), read from the memory-mapped file."""
        with safe_open(os.path.join(self.path, self.meta[name][0]), framework="numpy") as f:
            sl = f.get_slice(name)
            return sl[index] if index is not None else sl[:]


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty aligned to _ALIGN bytes, so jax on CPU adopts the buffer instead of copying it."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def _read_block(ckpt: _Checkpoint, src: _Source, name: str, view_index: tuple[slice, ...]) -> np.ndarray:
    """The block view[view_index] of HF tensor `name`, as a (view-layout) numpy array.

    Each HF axis is split into a group of view axes. The HF rows read cover the slice of the group's
    first view axis with its inner axes whole (one contiguous range on disk); the inner slices are
    applied after the reshape. Only heads (first axis) or whole rows are ever sharded, so the
    covering read is the block itself in practice.
    """
    hf_index, covered, post, k = [], [], [], 0
    for g in src.groups:
        first, inner = view_index[k], src.view[k + 1:k + g]
        step = math.prod(inner)
        hf_index.append(slice(first.start * step, first.stop * step))
        covered.extend((first.stop - first.start, *inner))
        post.extend((slice(None), *view_index[k + 1:k + g]))
        k += g
    return ckpt.read(name, tuple(hf_index)).reshape(covered)[tuple(post)]


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _shard_reader(ckpt: _Checkpoint, src: _Source, shape: tuple[int, ...], dtype) -> Callable:
    """callback(index) -> the rljax-layout block parameter[index], for `jax.make_array_from_callback`."""
    per_layer = shape[1:] if src.layered else shape

    def one(name: str, idx: tuple[slice, ...], out: np.ndarray) -> None:
        if src.whole:
            full = ckpt.read(name).reshape(src.view).transpose(src.perm).reshape(per_layer)
            out[...] = full[idx]
            return
        # Read in chunks of HF rows (view axis 0) so the transient copies stay near _CHUNK_BYTES
        # even for a whole embedding on one device.
        j0 = src.perm.index(0)
        rows = idx[j0]
        row_bytes = max(out.nbytes // max(rows.stop - rows.start, 1), 1)
        step = max(_CHUNK_BYTES // row_bytes, 1)
        for r in range(rows.start, rows.stop, step):
            sub = list(idx)
            sub[j0] = slice(r, min(r + step, rows.stop))
            view_index = [None] * len(src.view)
            for j, p in enumerate(src.perm):
                view_index[p] = sub[j]
            dest = [slice(None)] * out.ndim
            dest[j0] = slice(r - rows.start, sub[j0].stop - rows.start)
            out[tuple(dest)] = _read_block(ckpt, src, name, tuple(view_index)).transpose(src.perm)

    def callback(index):
        index = _normalise(index, shape)
        out = _aligned_empty(tuple(s.stop - s.start for s in index), dtype)
        if src.layered:
            for j, i in enumerate(range(index[0].start, index[0].stop)):
                one(src.name.format(i=i), index[1:], out[j])
        else:
            one(src.name, index, out)
        return out

    return callback


def _zeros_reader(shape, dtype) -> Callable:
    def callback(index):
        index = _normalise(index, shape)
        out = _aligned_empty(tuple(s.stop - s.start for s in index), dtype)
        out[...] = 0
        return out

    return callback


# Tensors a checkpoint may hold that the config does not use without changing the computation:
# RoPE tables of old checkpoints (recomputed), and heads that were not asked for.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias", "v_head.summary.weight", "v_head.summary.bias")


def _check_unused(ckpt: _Checkpoint, sources: dict, cfg: TransformerConfig, prefix: str) -> None:
    """A tensor the config has no place for (an extra layer, a bias the config does not declare) means
    the config does not describe the weights: refuse rather than load a different model."""
    used = set()
    for src in jax.tree.leaves(sources, is_leaf=lambda x: isinstance(x, _Source)):
        if src.layered:
            used.update(src.name.format(i=i) for i in range(cfg.n_layers))
        else:
            used.add(src.name)
    for name in sorted(ckpt.meta):
        if name in used or name in _HEAD_TENSORS or name.endswith(_IGNORABLE_SUFFIXES):
            continue
        file = os.path.join(ckpt.path, ckpt.meta[name][0])
        raise CheckpointFormatError(f"{file}: tensor {name} has no place in the model config.json describes "
                                    f"(num_hidden_layers={cfg.n_layers}, qkv_bias={cfg.qkv_bias}, "
                                    f"qk_norm={cfg.qk_norm}); refusing a partial load")


def _check_tied_head(ckpt: _Checkpoint, embedding: str, source: str) -> None:
    """A config that ties the LM head to the embedding, over a file that also holds lm_head.weight: the
    same model only when the two tensors are equal (some exporters write both). A different head is
    refused: transformers' versions disagree on which of the two they use."""
    if "lm_head.weight" not in ckpt or embedding not in ckpt:
        return
    rows = ckpt.meta[embedding][1][0]
    if ckpt.meta["lm_head.weight"][1] != ckpt.meta[embedding][1]:
        same = False
    else:
        step = max(1, 2**24 // max(1, math.prod(ckpt.meta[embedding][1][1:])))  # ~16M values at a time
        chunks = [(slice(i, min(i + step, rows)),) for i in range(0, rows, step)]
        same = all(np.array_equal(ckpt.read("lm_head.weight", c), ckpt.read(embedding, c)) for c in chunks)
    if not same:
        raise CheckpointFormatError(
            f"{source}: tie_word_embeddings is true, but {os.path.join(ckpt.path, ckpt.meta['lm_head.weight'][0])} "
            f"also holds an lm_head.weight that differs from {embedding}; set tie_word_embeddings to false to load "
            f"that separate head, or remove it to tie")


def load_pretrained(path_or_name: str, *, mesh=None, dtype=None, heads: Sequence[str] | None = None,
                    rules=LOGICAL_RULES, config_overrides: dict | None = None) -> tuple[TransformerConfig, dict]:
    """Load an HF Llama / Qwen2 / Qwen3 checkpoint as (TransformerConfig, params).

    path_or_name: a local directory with config.json and model.safetensors (or sharded files with
      model.safetensors.index.json); a hub id when it is not a local directory (needs huggingface_hub).
    mesh: place every parameter on its sharding from the logical-axis `rules` (one device when None);
      each device reads only its own slice.
    dtype: parameter storage dtype ("float32", "bfloat16", "float16" or a jnp dtype); None keeps the
      checkpoint's. The compute dtype follows it unless config_overrides sets "dtype".
    heads: rljax heads to build; None takes them from the architecture (ForCausalLM: lm;
      ForSequenceClassification: reward; Model: value). Head tensors the checkpoint lacks start at zero.
    config_overrides: other TransformerConfig fields (max_seq_len, scan_layers, remat, attention_impl, ...). A
      max_seq_len other than the file's max_position_embeddings (a shorter one bounds the KV cache) keeps the
      file's value in `TransformerConfig.max_position_embeddings`, which `save_pretrained` writes back.
    Raises CheckpointFormatError naming the file, tensor or config field that cannot be loaded exactly.
    """
    path = resolve_path(path_or_name)
    hf = read_hf_config(path)
    source = os.path.join(path, CONFIG_NAME)
    _, suffix = _architecture(hf, source)
    ckpt = _Checkpoint(path)
    if heads is None:
        heads = {"ForCausalLM": ("lm",), "ForSequenceClassification": ("reward",), "Model": ("value",)}[suffix]
    overrides = dict(config_overrides or {})
    if "reward" in heads and "score.weight" in ckpt and "reward_outputs" not in overrides:
        overrides["reward_outputs"] = ckpt.meta["score.weight"][1][0]
    param_dtype = None if dtype is None else jnp.dtype(dtype).name
    if param_dtype is not None and param_dtype not in DTYPES:
        raise ValueError(f"load_pretrained: dtype {param_dtype!r} not in {tuple(DTYPES)}")
    cfg = config_from_hf(hf, heads=heads, param_dtype=param_dtype, source=source, **overrides)
    prefix = "model." if any(n.startswith("model.") for n in ckpt.meta) else ""
    model = Model(cfg, mesh)
    shapes = model.param_shapes()
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
    else:
        shardings = param_shardings(model, mesh, rules)
    sources = _sources(cfg, prefix)
    if jax.tree.structure(sources, is_leaf=lambda x: isinstance(x, _Source)) != jax.tree.structure(shapes):
        raise AssertionError("rljax.models.hf: the name map does not cover the model's parameters")  # a bug here

    def present(src: _Source) -> bool:
        """Whether to read `src` (an optional head the checkpoint lacks starts at zero); checks every
        tensor's presence, shape and dtype before anything is read."""
        names = [src.name.format(i=i) for i in range(cfg.n_layers)] if src.layered else [src.name]
        if src.optional and names[0] not in ckpt:
            return False
        for name in names:
            ckpt.check(name, src.hf_shape)
        return True

    is_source = lambda x: isinstance(x, _Source)  # noqa: E731
    read = jax.tree.map(present, sources, is_leaf=is_source)
    _check_unused(ckpt, sources, cfg, prefix)
    if cfg.tie_embeddings and "lm" in cfg.heads:
        _check_tied_head(ckpt, prefix + "embed_tokens.weight", source)

    def make(src: _Source, shape, sharding, read):
        reader = _shard_reader(ckpt, src, shape.shape, shape.dtype) if read else _zeros_reader(shape.shape, shape.dtype)
        return jax.make_array_from_callback(shape.shape, sharding, reader)

    params = jax.tree.map(make, sources, shapes, shardings, read, is_leaf=is_source)
    return cfg, params


# ----------------------------------------------------------------------------- writing


def _to_hf(src: _Source, x: np.ndarray) -> np.ndarray:
    """Inverse of the load map for one layer: rljax-layout block -> HF tensor."""
    view_shape = tuple(src.view[p] for p in src.perm)
    return np.ascontiguousarray(x.reshape(view_shape).transpose(np.argsort(src.perm)).reshape(src.hf_shape))


def _gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-process) array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(params: dict, cfg: TransformerConfig) -> list[tuple[str, _Source, Any, int | None]]:
    """[(HF name, source, rljax array, layer or None)] in the order transformers writes them."""
    prefix = "model." if ("lm" in cfg.heads or "reward" in cfg.heads) else ""
    sources = _sources(cfg, prefix)
    leaves = jax.tree.leaves(sources, is_leaf=lambda x: isinstance(x, _Source))
    arrays = jax.tree.leaves(params)
    if len(leaves) != len(arrays) or jax.tree.structure(params) != jax.tree.structure(
            sources, is_leaf=lambda x: isinstance(x, _Source)):
        raise ValueError(f"save_pretrained: params do not match the config's parameter tree "
                         f"(heads={cfg.heads}, qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm})")
    expected = jax.tree.leaves(Model(cfg).param_shapes())
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for p, x, e in zip(paths, arrays, expected):
        if tuple(x.shape) != tuple(e.shape):
            raise ValueError(f"save_pretrained: params{p} has shape {tuple(x.shape)}, the config implies "
                             f"{tuple(e.shape)}")
    out = []
    for src, x in zip(leaves, arrays):
        if src.layered:
            out.extend((src.name.format(i=i), src, x, i) for i in range(cfg.n_layers))
        else:
            out.append((src.name, src, x, None))
    return sorted(out, key=lambda t: (t[3] is not None, t[3] or 0, t[0]))


def _write_safetensors(file: str, entries: list, dtype) -> None:
    """Stream tensors into one safetensors file: the header first (shapes are known without gathering),
    then each tensor's bytes as soon as it is gathered, so one tensor at a time is on the host. On several
    processes a failed write (a full disk) still takes part in every remaining gather, where the other
    processes wait, and is raised after them."""
    header, offset = {}, 0
    for name, src, x, _ in entries:
        dt = np.dtype(dtype or x.dtype)
        nbytes = math.prod(src.hf_shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(src.hf_shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses safetensors without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    f, failure = None, None

    def attempt(write, *args):
        nonlocal failure
        if failure is None:
            try:
                write(*args)
            except OSError as e:
                if jax.process_count() == 1:
                    raise
                failure = e

    def start():
        nonlocal f
        f = open(file, "wb")
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)

    try:
        attempt(start)
        for name, src, x, layer in entries:
            arr = _to_hf(src, _gather(x if layer is None else x[layer]))
            # raw bytes: memoryview cannot describe bfloat16 items, uint8 it can
            attempt(lambda b: f.write(b), memoryview(arr.astype(dtype or x.dtype, copy=False).reshape(-1).view(np.uint8)))
    finally:
        if f is not None:
            f.close()
    if failure is not None:
        raise failure


def save_pretrained(params: dict, cfg: TransformerConfig, path: str, *, max_shard_bytes: int = 5 * 2**30,
                    dtype=None, extra_config: dict | None = None, overwrite: bool = False) -> str:
    """Write `params` as an HF checkpoint directory that transformers loads as the same architecture.

    Files: config.json (see `hf_config_from`), model.safetensors, or model-0000k-of-0000n.safetensors
    plus model.safetensors.index.json when the tensors exceed max_shard_bytes. Each HF tensor (one
    layer of a stacked parameter) is gathered from the mesh and written before the next is fetched;
    with several processes all take part in the gathers and process 0 writes. The directory appears
    complete or not at all: it is written under a temporary name in the same parent and renamed.
    overwrite=True replaces a checkpoint in `path`: its config.json and safetensors files (an old
    checkpoint's other shards included), keeping every other file there (tokenizer files,
    generation_config.json, a README); a non-empty directory that holds no checkpoint (a run
    directory, say) is refused either way, so nothing that is not a checkpoint is ever replaced.
    dtype: storage dtype of the files (default: each parameter's own). Returns `path`.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_pretrained: {path} is a file; a checkpoint is a directory")
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if present and not overwrite:
        raise FileExistsError(f"save_pretrained: {path} exists and is not empty (pass overwrite=True)")
    if present and not any(name in (SINGLE_FILE, INDEX_FILE) for name in present):
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        raise FileExistsError(f"save_pretrained: {path} holds files but no checkpoint ({shown}); write the "
                              f"checkpoint into a new or empty directory (overwrite=True only replaces a checkpoint)")
    dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    tensors = _hf_tensors(params, cfg)
    shards, size = [[]], 0
    for entry in tensors:
        nbytes = math.prod(entry[1].hf_shape) * np.dtype(dtype or entry[2].dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    dtypes = {np.dtype(dtype or e[2].dtype).name for e in tensors}
    file_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    # Several processes: a failure of process 0's writing is held while it takes part in the remaining
    # gathers (the others wait in each), then raised on every process (`agree_on_failure`) at the end
    several = jax.process_count() > 1
    writer, failure = jax.process_index() == 0, None
    tmp = None
    try:
        if writer:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
                os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the checkpoint private to this user
            except OSError as e:
                if not several:
                    raise
                failure = e
        for file, entries in zip(names, shards):
            if writer and failure is None:
                try:
                    _write_safetensors(os.path.join(tmp, file), entries, dtype)
                except OSError as e:  # its gathers all made (`_write_safetensors`)
                    if not several:
                        raise
                    failure = e
            else:
                for _, _, x, layer in entries:  # take part in the collective gathers
                    _gather(x if layer is None else x[layer])
        if writer and failure is None:
            if len(shards) > 1:
                total = sum(math.prod(e[1].hf_shape) * np.dtype(dtype or e[2].dtype).itemsize for e in tensors)
                index = {"metadata": {"total_size": total},
                         "weight_map": {e[0]: file for file, entries in zip(names, shards) for e in entries}}
                with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                    json.dump(index, f, indent=2, sort_keys=True)
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(hf_config_from(cfg, dtype=file_dtype, extra_config=extra_config), f, indent=2,
                          sort_keys=True)
            if os.path.exists(path):
                old = path + ".old-" + os.path.basename(tmp)
                os.rename(path, old)
                os.rename(tmp, path)
                for name in os.listdir(old):  # moved after the swap: until then they are still in `old`
                    if not _checkpoint_owned(name):
                        os.rename(os.path.join(old, name), os.path.join(path, name))
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
            tmp = None
    except OSError as e:
        if not several:
            raise
        failure = e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    from rljax.distributed import agree_on_failure

    # several processes: every one returns once the checkpoint is there, or raises with process 0
    agree_on_failure(failure, f"save_pretrained: writing {path}")
    return path
