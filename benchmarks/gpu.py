"""GPU benchmark of rljax's model at the shapes of its GPU peer baseline (the "anchor").

    python -m benchmarks.gpu                    # Qwen2.5-0.5B preset, random init, one GPU
    python -m benchmarks.gpu --tiny             # tiny shapes (runs on CPU too, for a dry run)

Parts (each guarded, so one failure does not hide the rest):
  check    on the device: KV-cache decode == full forward (float32), cuDNN attention ~= XLA attention (bf16)
  train    forward + backward + AdamW, batch 8 x 1024, bf16 compute, cuDNN attention, in the layouts
           --train-layouts names: anchor (params, grads, Adam state and the residual stream bf16:
           the anchor's layout), f32_stream (the same with rljax's default float32 stream), mixed
           (bf16 compute, float32 master weights and Adam state, bf16 stream)
  decode   greedy, batch 64, prompt 128, 256 new tokens, bf16 weights, one jitted while-loop over a
           KV cache; with each residual stream --decode-streams names (bfloat16, float32)
  grpo     one GRPO iteration (`rljax.rl.make_rl_iteration`): 64 prompts x 8 samples x 256 new tokens
           (forced to full length), bf16 compute with float32 master weights, cuDNN attention in the
           full-sequence passes, the KL metrics on (one
           reference forward), the update as one optimizer step accumulated over micro-batches of
           --grpo-micro rows; seconds split into sampling / scoring / reference / update, tokens/s,
           and the update's MFU (anchor's FLOP formula at the update's 512 x 384 tokens)
  profile  a jax.profiler trace of 3 train steps (the anchor's layout), of one greedy decode call and
           of one sampling call at the GRPO iteration's shape: device time per kernel, summed over
           the trace (largest first) and as a share of the total;
           with --profile-dir, the traces and the train step's optimised HLO are written there
  fit      the largest micro-batch (rows of prompt + new tokens) whose train step (bf16 compute, f32
           master weights, scanned layers, cuDNN attention) fits on the device,
           without and with rematerialisation (`remat="full"`): predicted from XLA's memory analysis
           of two sizes and confirmed by running it (or doubling from 8 until a size fails), for each
           --fit-remat setting (none,full); run each in a fresh process (`gpu_sitting.sh rl` does):
           what earlier parts leave in the device allocator's pool splits the memory a large batch
           needs into pieces (2026-12-04: 160 and 128 rows failed after the grpo part, 64 ran)

What it is compared with: the anchor, a plain, straightforward JAX implementation of the same
Qwen2.5-0.5B-shaped model (random init, bf16): a train step with cuDNN attention and greedy decoding
over a KV cache in one jitted loop, beside Hugging Face transformers on torch at the same shapes
(an eager train step; `generate` with the dynamic cache and with a static cache + torch.compile).
It is a peer baseline for the GPU machine only and is not in this repository (the CPU peers are
in benchmarks/peers/); run it in the same call as this benchmark so the figures share a machine.

FLOPs per step use the anchor's formula (6 x params x tokens, tied head counted, causal attention
12 L T D / 2 per token), so MFU figures compare directly with its output.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import banner, block, iteration_medians  # noqa: E402
from rljax.cli import parse_config  # noqa: E402
from rljax.models import Model, preset  # noqa: E402
from rljax.models.logprobs import token_logprobs  # noqa: E402
from rljax.sampling import SampleConfig, sample  # noqa: E402

SPEC_BF16_TFLOPS = 989.0


@dataclass
class Config:
    preset: str = "qwen2_5_0_5b"
    train_batch: int = 8
    train_seq: int = 1024
    gen_batch: int = 64
    prompt: int = 128
    new_tokens: int = 256
    iters: int = 10
    grpo_prompts: int = 64
    grpo_samples: int = 8
    grpo_micro: int = 32
    grpo_iters: int = 2
    fit_max: int = 1024
    fit_remat: str = "none,full"
    parts: str = "check,train,decode,grpo,profile,fit"
    train_layouts: str = "anchor,f32_stream,mixed"
    decode_streams: str = "bfloat16,float32"
    profile_dir: str = ""
    tiny: bool = False  # a dry run on a CPU: the tiny preset and sizes replace every size flag given


def anchor_flops(c, batch, seq):
    n = c.num_params()
    return 6 * n * batch * seq + 12 * c.n_layers * seq * c.d_model * batch * seq / 2


def part_check(cfg):
    c = preset("tiny", vocab_size=256, qkv_bias=True, tie_embeddings=True, scan_layers=False)
    model = Model(c)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, (4, 24)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    mask[2, :11] = 0
    full = model(params, tokens, mask)
    cache = model.init_cache(4, 32)
    h, cache = model.forward(params, tokens[:, :16], mask[:, :16], cache=cache)
    outs = [model.logits(params, h)]
    for t in range(16, 24):
        h, cache = model.forward(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        outs.append(model.logits(params, h))
    err = float(jnp.abs(jnp.where(mask[:, :, None] > 0, jnp.concatenate(outs, 1) - full, 0)).max())
    print(f"  KV cache vs full forward (float32, on {jax.devices()[0].device_kind}): max |diff| {err:.2e}")
    if jax.default_backend() == "gpu":
        bx = Model(c.replace(dtype="bfloat16"))
        bc = Model(c.replace(dtype="bfloat16", attention_impl="cudnn"))
        right = np.zeros_like(mask)
        for i, n in enumerate(mask.sum(1)):
            right[i, :n] = 1
        for name, m in (("left-padded (bias path)", mask), ("right-padded (causal path)", right)):
            lx, lc = token_logprobs(params, tokens, m, model=bx), token_logprobs(params, tokens, m, model=bc)
            print(f"  cuDNN vs XLA attention (bf16), {name}: token log-prob max |diff| "
                  f"{float(jnp.abs(lx - lc).max()):.3e}")


def _nll_train_step(model, opt, chunk=None):
    """(params, opt_state, tokens [B, T]) -> (params, opt_state, loss): mean next-token NLL, one AdamW step."""
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: -jnp.mean(token_logprobs(p, tokens, None, model=model, chunk_size=chunk)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _attention() -> str:
    """cuDNN's fused attention for full-sequence passes on a GPU (decoding keeps XLA's), XLA's elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


_PURE = dict(dtype="bfloat16", param_dtype="bfloat16")
TRAIN_LAYOUTS = {  # --train-layouts name: (label, TransformerConfig overrides)
    "anchor": ("pure bf16 (params/grads/Adam and residual stream bf16: the anchor's layout)",
               dict(_PURE, residual_dtype="bfloat16")),
    "f32_stream": ("pure bf16, float32 residual stream", _PURE),
    "mixed": ("bf16 compute, f32 master weights and Adam, bf16 stream", dict(dtype="bfloat16", residual_dtype="bfloat16")),
}


def _train_setup(cfg, layout):
    """The train step of `layout` at batch train_batch x train_seq (logits unchunked), compiled:
    (fn, params, opt_state, tokens, compile seconds, model config)."""
    config = preset(cfg.preset, scan_layers=False, attention_impl=_attention(), **TRAIN_LAYOUTS[layout][1])
    model = Model(config)
    tokens = jax.random.randint(jax.random.key(1), (cfg.train_batch, cfg.train_seq), 0, config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0))
    opt = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.jit(opt.init)(params)
    t0 = time.perf_counter()
    fn = jax.jit(_nll_train_step(model, opt, cfg.train_seq), donate_argnums=(0, 1)).lower(
        params, opt_state, tokens).compile()
    return fn, params, opt_state, tokens, time.perf_counter() - t0, config


def part_train(cfg):
    for name in cfg.train_layouts.split(","):
        if name not in TRAIN_LAYOUTS:
            raise ValueError(f"--train-layouts: {name!r} not in {sorted(TRAIN_LAYOUTS)}")
        label = TRAIN_LAYOUTS[name][0]
        try:
            fn, params, opt_state, tokens, compile_s, config = _train_setup(cfg, name)
            flops = anchor_flops(config, cfg.train_batch, cfg.train_seq)
            for _ in range(3):
                params, opt_state, loss = fn(params, opt_state, tokens)
            block((params, opt_state))
            t0 = time.perf_counter()
            for _ in range(cfg.iters):
                params, opt_state, loss = fn(params, opt_state, tokens)
            block((params, opt_state, loss))
            s = (time.perf_counter() - t0) / cfg.iters
            tf = flops / s / 1e12
            mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
            print(f"  train [{label}] batch {cfg.train_batch}x{cfg.train_seq}: {s*1e3:.1f} ms/step | "
                  f"{cfg.train_batch*cfg.train_seq/s:,.0f} tok/s | {tf:.1f} TFLOP/s = {tf/SPEC_BF16_TFLOPS*100:.1f}% "
                  f"of {SPEC_BF16_TFLOPS:.0f} spec | loss {float(loss):.3f} | compile {compile_s:.1f} s | "
                  f"peak mem {mem:.1f} GiB", flush=True)
            del params, opt_state, fn
        except Exception as e:  # noqa: BLE001
            print(f"  train [{label}] FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)


def _decode_setup(cfg, stream):
    model = Model(preset(cfg.preset, dtype="bfloat16", param_dtype="bfloat16", residual_dtype=stream,
                         scan_layers=False))
    params = jax.jit(model.init)(jax.random.key(0))
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (cfg.gen_batch, cfg.prompt), 0, model.config.vocab_size))
    scfg = SampleConfig(max_new_tokens=cfg.new_tokens, greedy=True, eos_id=-1, min_prompt_bucket=cfg.prompt)
    return lambda: sample(params, prompt, None, jax.random.key(0), model=model, cfg=scfg)


def part_decode(cfg):
    for stream in cfg.decode_streams.split(","):
        run = _decode_setup(cfg, stream)
        t0 = time.perf_counter()
        block(run())
        first = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            block(run())
            times.append(time.perf_counter() - t0)
        s = float(np.median(times))
        print(f"  decode greedy bf16 weights, {stream} stream, batch {cfg.gen_batch}, prompt {cfg.prompt}, "
              f"{cfg.new_tokens} new: {cfg.gen_batch*cfg.new_tokens/s:,.0f} new tok/s | "
              f"{s/cfg.new_tokens*1e3:.2f} ms/step | first call {first:.1f} s", flush=True)
        del run


def _device_times(trace_dir):
    """{kernel name: total µs} over the newest perfetto trace under trace_dir: the GPU's stream
    lines (one event per kernel launch; in CUDA graphs, too), or every host event on a CPU (dry
    runs). A kernel's name is the HLO fusion it runs (fusion.12 -> fusion_12), or a library's
    (cuBLAS's nvjet_*, cuDNN's)."""
    import collections
    import glob
    import gzip
    import json

    path = max(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    meta = [e for e in events if e.get("ph") == "M"]
    gpus = {e["pid"] for e in meta if e.get("name") == "process_name" and "GPU" in e.get("args", {}).get("name", "")}
    streams = {(e["pid"], e["tid"]) for e in meta if e.get("name") == "thread_name" and e["pid"] in gpus
               and e.get("args", {}).get("name", "").startswith("Stream")}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (not gpus or (e["pid"], e.get("tid")) in streams):
            totals[e["name"]] += e.get("dur", 0)
    return totals, path


def _print_times(label, totals, per, unit, top=25):
    import collections
    import re

    total = sum(totals.values())
    print(f"  profile [{label}]: {total / per / 1e3:.3f} ms per {unit} over {len(totals)} names", flush=True)
    for name, us in totals.most_common(top):
        print(f"    {us / per / 1e3:8.3f} ms {100 * us / max(total, 1):5.1f}%  {name[:110]}")
    groups = collections.Counter()
    for name, us in totals.items():  # the same kernel at many sites: fusion.12, fusion.13 -> fusion
        groups[re.sub(r"[._]\d+$", "", name)] += us
    print("    by family:", ", ".join(f"{n[:48]} {100 * us / max(total, 1):.1f}%" for n, us in groups.most_common(15)),
          flush=True)


def part_profile(cfg):
    import shutil
    import tempfile

    out = cfg.profile_dir or tempfile.mkdtemp(prefix="rljax-profile-")
    os.makedirs(out, exist_ok=True)
    fn, params, opt_state, tokens, _, _ = _train_setup(cfg, "anchor")
    if cfg.profile_dir:
        import gzip

        with gzip.open(os.path.join(out, "train_step.hlo.txt.gz"), "wt") as f:
            f.write(fn.as_text())
    for _ in range(2):
        params, opt_state, loss = fn(params, opt_state, tokens)
    block((params, opt_state))
    steps = 3
    with jax.profiler.trace(os.path.join(out, "train"), create_perfetto_trace=True):
        for _ in range(steps):
            params, opt_state, loss = fn(params, opt_state, tokens)
        block((params, opt_state, loss))
    totals, path = _device_times(os.path.join(out, "train"))
    _print_times("train step, anchor layout", totals, steps, "step")
    if cfg.profile_dir:
        shutil.copy(path, os.path.join(out, "train.trace.json.gz"))
    del params, opt_state, fn
    run = _decode_setup(cfg, "bfloat16")
    block(run())
    with jax.profiler.trace(os.path.join(out, "decode"), create_perfetto_trace=True):
        block(run())
    totals, path = _device_times(os.path.join(out, "decode"))
    _print_times(f"decode call, {cfg.new_tokens} new tokens incl. prefill", totals, cfg.new_tokens, "token step")
    if cfg.profile_dir:
        shutil.copy(path, os.path.join(out, "decode.trace.json.gz"))
    del run
    # the GRPO iteration's sampling: its prompts x samples rows, temperature 1, float32 master weights
    model, params, prompts = _grpo_setup(cfg)
    scfg = SampleConfig(max_new_tokens=cfg.new_tokens, n=cfg.grpo_samples, eos_id=-1, min_prompt_bucket=cfg.prompt)
    block(sample(params, prompts, None, jax.random.key(0), model=model, cfg=scfg))
    with jax.profiler.trace(os.path.join(out, "sample"), create_perfetto_trace=True):
        block(sample(params, prompts, None, jax.random.key(1), model=model, cfg=scfg))
    totals, _ = _device_times(os.path.join(out, "sample"))
    _print_times(f"GRPO sampling, {cfg.grpo_prompts * cfg.grpo_samples} rows x {cfg.new_tokens} new tokens, "
                 "temperature 1, f32 master weights", totals, cfg.new_tokens, "token step")


def _even_share(prompts, completions, **_):
    """A cheap token-level rule reward: the share of even token ids (decode writes ids as words)."""
    return [sum(int(t) % 2 == 0 for t in c.split()) / max(1, len(c.split())) for c in completions]


def _ids_as_words(ids):
    return [" ".join(map(str, row)) for row in np.asarray(ids).tolist()]


def _grpo_setup(cfg):
    """The GRPO iteration's model (bf16 compute, float32 master weights, `_attention()` in its
    full-sequence passes), its parameters and its grpo_prompts x prompt prompts."""
    model = Model(preset(cfg.preset, dtype="bfloat16", scan_layers=False, attention_impl=_attention()))
    params = jax.jit(model.init)(jax.random.key(0))
    prompts = np.asarray(jax.random.randint(jax.random.key(2), (cfg.grpo_prompts, cfg.prompt), 0,
                                            model.config.vocab_size))
    return model, params, prompts


def part_grpo(cfg):
    from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
    from rljax.state import OptimizerConfig

    model, params, prompts = _grpo_setup(cfg)
    rows = cfg.grpo_prompts * cfg.grpo_samples
    if rows % cfg.grpo_micro:
        raise ValueError(f"--grpo-micro {cfg.grpo_micro} does not divide the {rows} sampled rows")
    k = rows // cfg.grpo_micro
    rl = RLConfig(algorithm="grpo", minibatches=k, track_kl=True,
                  sampling=SampleConfig(max_new_tokens=cfg.new_tokens, n=cfg.grpo_samples, eos_id=-1,
                                        min_prompt_bucket=cfg.prompt),
                  optimizer=OptimizerConfig(lr=1e-6, schedule="constant", grad_accum=k))
    it = make_rl_iteration(model, rl, _even_share, _ids_as_words)
    state = create_rl_state(model, params, rl, jax.random.key(1))
    del params
    mask = np.ones_like(prompts)
    t0 = time.perf_counter()
    state, _ = it(state, prompts, mask)
    first = time.perf_counter() - t0
    ms = []
    for _ in range(cfg.grpo_iters):
        t0 = time.perf_counter()
        state, m = it(state, prompts, mask)
        ms.append(dict(m, total=time.perf_counter() - t0))
    med = iteration_medians(ms, ("sample", "score", "ref", "update"))
    seq = cfg.prompt + cfg.new_tokens
    tf = anchor_flops(model.config, rows, seq) / med["update"] / 1e12
    mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    print(f"  grpo iteration, {cfg.grpo_prompts} prompts x {cfg.grpo_samples} samples x {cfg.new_tokens} new "
          f"(prompt {cfg.prompt}), bf16 compute / f32 master, update = 1 optimizer step over {k} micro-batches "
          f"of {cfg.grpo_micro}: {med['total']:.2f} s/iteration; per stage (medians): sample {med['sample']:.2f}, "
          f"score {med['score']:.2f}, reference {med['ref']:.2f}, update {med['update']:.2f}, other {med['other']:.2f} | "
          f"{rows * cfg.new_tokens / med['total']:,.0f} new tok/s per iteration, "
          f"{rows * cfg.new_tokens / med['sample']:,.0f} while sampling | update {tf:.1f} TFLOP/s = "
          f"{tf / SPEC_BF16_TFLOPS * 100:.1f}% of spec | first iteration {first:.1f} s | peak mem {mem:.1f} GiB",
          flush=True)


def _compile_step(step, params, opt_state, rows, seq):
    tokens = jnp.zeros((rows, seq), jnp.int32)
    return jax.jit(step).lower(params, opt_state, tokens).compile(), tokens


def _runs(fn, params, opt_state, tokens) -> bool:
    try:
        block(fn(params, opt_state, tokens))
        return True
    except Exception as e:  # noqa: BLE001 -- out of memory shows up as several error types
        print(f"    batch {tokens.shape[0]} fails: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return False


def predict_rows(need_b0: int, need_2b0: int, b0: int, free: float) -> tuple[int, float, float]:
    """The largest multiple of 8 rows (at least b0) whose step needs at most `free` bytes, from the
    step's need (XLA's temporary + output bytes) at b0 and 2 b0 rows, taken as linear in the rows:
    need(b) = fixed + b per_row. Returns (rows, per_row, fixed)."""
    per_row = (need_2b0 - need_b0) / b0
    fixed = need_b0 - b0 * per_row
    return max(b0, int((free - fixed) / max(per_row, 1.0)) // 8 * 8), per_row, fixed


def part_fit(cfg):
    """Largest micro-batch whose bf16-compute train step (f32 master weights, AdamW) compiles and runs,
    without and with rematerialisation.

    On a device that reports its memory limit: XLA's memory analysis of the step at b and 2b rows
    gives the bytes per row and the fixed part (outputs, scratch), so the largest batch is predicted
    from the memory left (95% of the limit less what is in use), rounded down to a multiple of 8, and
    then compiled and run to confirm (two compiles and one run instead of one compile and run per
    doubling). Elsewhere, or if the prediction does not run: doubling from b until a size fails."""
    seq = cfg.prompt + cfg.new_tokens
    b0 = 1 if cfg.tiny else 8
    for remat in cfg.fit_remat.split(","):
        # scanned layers: one compiled layer body keeps the part's compiles short on a device
        model = Model(preset(cfg.preset, dtype="bfloat16", scan_layers=True, remat=remat, attention_impl=_attention()))
        params = jax.jit(model.init)(jax.random.key(0))
        opt = optax.adamw(1e-6)
        opt_state = jax.jit(opt.init)(params)
        step = _nll_train_step(model, opt)
        stats = jax.devices()[0].memory_stats() or {}
        fits, capped, how = 0, False, "doubling"
        if stats.get("bytes_limit"):
            need = []
            for rows in (b0, 2 * b0):
                fn, _ = _compile_step(step, params, opt_state, rows, seq)
                m = fn.memory_analysis()
                need.append(m.temp_size_in_bytes + m.output_size_in_bytes)
                del fn
            free = 0.95 * stats["bytes_limit"] - (jax.devices()[0].memory_stats() or stats).get("bytes_in_use", 0)
            pred, per_row, fixed = predict_rows(need[0], need[1], b0, free)
            capped = pred > cfg.fit_max
            pred = min(pred, cfg.fit_max)
            print(f"  fit [remat {remat}]: XLA's memory analysis: {per_row / 2**20:.1f} MiB a row of {seq} tokens, "
                  f"{fixed / 2**30:.2f} GiB fixed, {free / 2**30:.1f} GiB free -> batch {pred}", flush=True)
            fn, tokens = _compile_step(step, params, opt_state, pred, seq)
            if _runs(fn, params, opt_state, tokens):
                fits, how = pred, "memory analysis, then run"
            del fn
        if not fits:
            b = b0
            while b <= cfg.fit_max:
                try:
                    fn, tokens = _compile_step(step, params, opt_state, b, seq)
                except Exception as e:  # noqa: BLE001
                    print(f"    batch {b} does not compile: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    break
                ok = _runs(fn, params, opt_state, tokens)
                del fn
                if not ok:
                    break
                fits, b = b, b * 2
            capped = b > cfg.fit_max
        print(f"  fit [remat {remat}]: largest batch that fits {fits} x {seq} tokens ({how})"
              f"{' (the cap, --fit-max)' if capped else ''}", flush=True)
        del params, opt_state


PARTS = {"check": part_check, "train": part_train, "decode": part_decode, "grpo": part_grpo, "profile": part_profile,
         "fit": part_fit}


def main(cfg: Config) -> int:
    """Run cfg.parts in order; a part that fails is reported and the next one runs (a sitting's later
    parts still measure). -> the exit status: 1 when any part failed."""
    unknown = [p for p in cfg.parts.split(",") if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    if cfg.tiny:
        cfg.preset, cfg.train_batch, cfg.train_seq, cfg.gen_batch, cfg.prompt, cfg.new_tokens, cfg.iters = \
            "tiny", 2, 32, 2, 16, 8, 2
        cfg.grpo_prompts, cfg.grpo_samples, cfg.grpo_micro, cfg.grpo_iters, cfg.fit_max = 4, 2, 4, 2, 4
    banner("gpu", cfg)
    failed = []
    for part in cfg.parts.split(","):
        print(f"[{part}]", flush=True)
        try:
            PARTS[part](cfg)
        except Exception as e:  # noqa: BLE001
            failed.append(part)
            print(f"  {part} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
    if failed:
        print(f"failed parts: {','.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_config(Config)))
