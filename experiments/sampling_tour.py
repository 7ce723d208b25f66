"""Sampling tour: the model stack end to end on CPU.

Builds the `small` preset with the character tokenizer, encodes arithmetic
prompts, samples completions with the KV-cache sampler (n per prompt, top-p),
runs beam search, checks that the sampler's log-probabilities agree with a
full forward pass, and measures decode throughput with and without the cache.
The model is randomly initialised (experiments.sft_arithmetic trains one), so
the completions are noise; the numbers are real.

    python -m experiments.sampling_tour [--preset small] [--smoke]

Outputs go to runs/sampling_tour-<time>/ (config.json, results.json).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.cli import apply_preset, make_run_dir, run, save_config
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from rljax.sampling import BeamConfig, SampleConfig, beam_search, sample
from rljax.tokenizer import CharTokenizer


@dataclass
class Config:
    preset: str = "small"
    seed: int = 0
    n: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    num_beams: int = 4
    run_root: str = "runs"
    smoke: bool = False


PROMPTS = ["23+58*2=", "7*(4+5)=", "100-37=", "12*12-4="]


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, preset="tiny", max_new_tokens=8, n=2)
    run_dir = make_run_dir(cfg.run_root, "sampling_tour")
    save_config(cfg, run_dir)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, vocab_size=tok.vocab_size))  # the model's vocabulary is the tokenizer's
    c = model.config
    print(f"model: preset {cfg.preset}, {c.num_params()/1e6:.2f}M params (d{c.d_model}, {c.n_layers} layers, "
          f"{c.n_heads} heads / {c.n_kv_heads} kv heads); devices: {jax.devices()}")
    key_init, key_sample = jax.random.split(jax.random.key(cfg.seed))
    params = jax.jit(model.init)(key_init)  # jitted: one compile, not op by op
    prompts, mask = tok.encode_batch(PROMPTS, padding_side="left")

    scfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)
    t = time.perf_counter()
    r = jax.block_until_ready(sample(params, prompts, mask, key_sample, model=model, cfg=scfg))
    first = time.perf_counter() - t
    t = time.perf_counter()
    r = jax.block_until_ready(sample(params, prompts, mask, key_sample, model=model, cfg=scfg))
    warm = time.perf_counter() - t
    new_tokens = int(r.lengths.sum())
    print(f"\nsampled {r.tokens.shape[0]} completions ({cfg.n} per prompt), {new_tokens} new tokens: "
          f"{warm*1e3:.0f} ms ({new_tokens/warm:.0f} tok/s; first call with compile {first:.1f} s)")
    texts = tok.decode_batch(np.asarray(r.completions))
    for i in range(0, len(texts), cfg.n):
        print(f"  {PROMPTS[i // cfg.n]!r:14} -> {texts[i]!r}")

    lp = jax.jit(token_logprobs, static_argnames="model")(params, r.tokens, r.attention_mask, model=model)
    on = np.asarray(r.loss_mask[:, 1:]).astype(bool)
    lp_err = float(np.abs(np.asarray(lp)[on] - np.asarray(r.logprobs)[on]).max())
    print(f"sampler log-probs vs full forward: max |diff| = {lp_err:.2e}")

    bcfg = BeamConfig(num_beams=cfg.num_beams, max_new_tokens=min(cfg.max_new_tokens, 16), eos_id=tok.eos_id)
    beams = beam_search(params, prompts, mask, model=model, cfg=bcfg)
    best = tok.decode_batch(np.asarray(beams.tokens[:, 0, beams.prompt_length:]))
    print(f"beam search (K={cfg.num_beams}) best: {best[0]!r} score {float(beams.scores[0, 0]):.3f}")

    greedy = SampleConfig(max_new_tokens=cfg.max_new_tokens, greedy=True, eos_id=-1)
    big = np.repeat(prompts, 8, axis=0)
    bmask = np.repeat(mask, 8, axis=0)
    jax.block_until_ready(sample(params, big, bmask, key_sample, model=model, cfg=greedy))
    t = time.perf_counter()
    jax.block_until_ready(sample(params, big, bmask, key_sample, model=model, cfg=greedy))
    rate = big.shape[0] * cfg.max_new_tokens / (time.perf_counter() - t)
    print(f"greedy decode, batch {big.shape[0]}, {cfg.max_new_tokens} new tokens: {rate:.0f} new tok/s")

    results = dict(config=asdict(cfg), params=c.num_params(), sample_tok_per_s=new_tokens / warm,
                   greedy_tok_per_s=rate, logprob_max_abs_diff=lp_err, samples=texts[:: cfg.n],
                   beam_best=best, compile_s=first)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n| quantity | value |\n|---|---|\n| params | {c.num_params()/1e6:.2f}M |\n"
          f"| sampled tok/s (n={cfg.n}, top-p {cfg.top_p}) | {new_tokens/warm:.0f} |\n"
          f"| greedy decode tok/s (batch {big.shape[0]}) | {rate:.0f} |\n"
          f"| sampler vs forward log-prob diff | {lp_err:.1e} |\n\nwrote {run_dir}")
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
