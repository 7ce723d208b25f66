"""OREO step throughput beside PPO on the same tokens, and the cost of value-guided search.

    python -m benchmarks.oreo [--preset small --batch 16 --seq 256 --steps 5]

Step: one OREO step (`make_oreo_step`: the value model's forward, whose V_old feeds the
policy and through which the critic's gradient is pulled back, the policy's
forward/backward with the reference's forward and the exact full-vocabulary KL, the
value model's backward, both optimizer updates) against a PPO update on the
same [batch, seq] tokens with a separate critic (policy step + critic regression
step), and against that update plus the two forwards PPO's prepare needs (reference
log-probs and V_old), which the OREO step contains. Tokens/s counts batch x seq.

Search: a random model of the preset, prompts of 8 tokens, step ends at any of 4
token ids (a random model ends a step after ~16 tokens), value-guided search for each B
(B beams x B steps, scored by a value model), against greedy decoding and best-of-N
with N chosen to generate the same number of tokens: wall time and generated tokens
per problem. Figures are medians after a compile call (the search: `search_reps` timed calls).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import banner, block, timeit
from rljax.cli import parse_config


@dataclass
class Config:
    preset: str = "small"
    batch: int = 16
    seq: int = 256
    steps: int = 5
    search_prompts: int = 8
    search_reps: int = 1  # timed calls after the compile call (a B = 7 search takes minutes on 2 cores)
    beams: tuple[int, ...] = (3, 5, 7)
    max_new_tokens: int = 96
    max_step_tokens: int = 24
    max_rounds: int = 8
    smoke: bool = False


def bench_step(cfg: Config) -> dict:
    from rljax.data.batch import OREOBatch
    from rljax.losses import PPOConfig, PolicyBatch, ppo_loss
    from rljax.losses.actor_critic import token_values, value_loss
    from rljax.losses.oreo import OREOConfig
    from rljax.models import Model, preset
    from rljax.models.logprobs import token_logprobs
    from rljax.oreo_training import create_oreo_state, make_oreo_step, value_model_of, value_params_from
    from rljax.state import OptimizerConfig, create_state, make_train_step

    model = Model(preset(cfg.preset))
    params = model.init(jax.random.key(0))
    opt = OptimizerConfig(lr=1e-5, schedule="constant")
    rng = np.random.default_rng(0)
    B, T = cfg.batch, cfg.seq
    tokens = jnp.asarray(rng.integers(3, model.config.vocab_size, (B, T)), jnp.int32)
    ones = jnp.ones((B, T), jnp.int32)
    loss_mask = (jnp.arange(T)[None] >= T // 4).astype(jnp.int32) * ones
    rewards = jnp.asarray(rng.integers(0, 2, B), jnp.float32)
    batch = OREOBatch(tokens=tokens, attention_mask=ones, loss_mask=loss_mask, rewards=rewards)
    _, state = create_oreo_state(model, params, opt, jax.random.key(1))
    step = make_oreo_step(model, OREOConfig(), opt)
    holder = {"s": state}

    def oreo_call():
        holder["s"], m = step(holder["s"], batch)
        return m

    t_oreo = timeit(oreo_call, reps=cfg.steps)
    vm = value_model_of(model)
    policy = create_state(model, opt, jax.random.key(2), params=params)
    critic = create_state(vm, opt, jax.random.key(3), params=value_params_from(model, params))
    zeros = jnp.zeros((B, T - 1), jnp.float32)
    pb = PolicyBatch(tokens=tokens, attention_mask=ones, loss_mask=loss_mask, old_logprobs=zeros,
                     advantages=jnp.asarray(rng.standard_normal((B, T - 1)), jnp.float32), rewards=rewards,
                     group_ids=jnp.arange(B), ref_logprobs=zeros, returns=zeros, old_values=zeros)
    pcfg = PPOConfig(kl_coef=0.0)
    p_step = make_train_step(functools.partial(ppo_loss, model=model, cfg=pcfg), opt)
    c_step = make_train_step(functools.partial(value_loss, model=vm, cfg=pcfg), opt)
    ref_fn = jax.jit(functools.partial(token_logprobs, model=model))
    val_fn = jax.jit(functools.partial(token_values, model=vm))
    ppo_state = {"p": policy, "c": critic}

    def ppo_update():
        ppo_state["p"], m = p_step(ppo_state["p"], pb)
        ppo_state["c"], _ = c_step(ppo_state["c"], pb)
        return m

    def ppo_with_prepare():
        return block((ref_fn(params, tokens, ones), val_fn(ppo_state["c"].params, tokens, ones))), ppo_update()

    t_ppo = timeit(ppo_update, reps=cfg.steps)
    t_ppo_full = timeit(ppo_with_prepare, reps=cfg.steps)
    n = B * T
    out = dict(oreo_s=t_oreo, ppo_update_s=t_ppo, ppo_prepare_update_s=t_ppo_full)
    print(f"OREO step {t_oreo * 1e3:.1f} ms = {n / t_oreo:,.0f} tok/s | PPO update (policy + critic) "
          f"{t_ppo * 1e3:.1f} ms = {n / t_ppo:,.0f} tok/s | PPO ref + V_old forwards + update "
          f"{t_ppo_full * 1e3:.1f} ms "
          f"= {n / t_ppo_full:,.0f} tok/s | OREO / (PPO with forwards) = {t_oreo / t_ppo_full:.2f}x", flush=True)
    return out


def bench_search(cfg: Config) -> dict:
    from rljax.models import Model, preset
    from rljax.oreo_training import value_model_of, value_params_from, value_scorer
    from rljax.sampling import SampleConfig, ValueSearchConfig, sample, value_guided_beam_search

    model = Model(preset(cfg.preset, max_seq_len=max(1024, 16 + cfg.max_rounds * cfg.max_step_tokens)))
    params = model.init(jax.random.key(0))
    vm = value_model_of(model)
    vp = value_params_from(model, params)
    vp = {**vp, "value_head": 0.1 * jax.random.normal(jax.random.key(4), vp["value_head"].shape)}
    scorer = value_scorer(vm)
    rng = np.random.default_rng(1)
    P = cfg.search_prompts
    prompts = rng.integers(3, model.config.vocab_size, (P, 8)).astype(np.int32)
    mask = np.ones_like(prompts)
    ends = (10, 11, 12, 13)
    greedy_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, greedy=True)
    roll = {}

    def greedy():
        roll["g"] = sample(params, prompts, mask, jax.random.key(0), model=model, cfg=greedy_cfg)
        return roll["g"].tokens

    t_greedy = timeit(greedy, reps=3)
    greedy_tokens = float(np.asarray(roll["g"].lengths).mean())
    # best-of-N's N matches the search's tokens with the mean length of a sample (T = 1), not of greedy
    probe = sample(params, prompts, mask, jax.random.key(3), model=model,
                   cfg=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=4))
    sample_tokens = float(np.asarray(probe.lengths).mean())
    print(f"greedy: {t_greedy / P * 1e3:.1f} ms/problem, {greedy_tokens:.0f} tokens/problem; a sample at T = 1: "
          f"{sample_tokens:.0f} tokens", flush=True)
    out = dict(greedy=dict(ms_per_problem=t_greedy / P * 1e3, tokens_per_problem=greedy_tokens), beams={})
    for b in cfg.beams:
        scfg = ValueSearchConfig(beams=b, step_end_ids=ends, max_step_tokens=cfg.max_step_tokens,
                                 max_new_tokens=cfg.max_new_tokens, max_rounds=cfg.max_rounds)
        res = {}

        def search():
            res["r"] = value_guided_beam_search(params, prompts, mask, scorer, vp, jax.random.key(1), model=model,
                                                cfg=scfg)
            return res["r"].tokens

        t = timeit(search, reps=cfg.search_reps)
        tokens = res["r"].generated / P
        n = max(1, int(round(tokens / sample_tokens)))
        bon_cfg = SampleConfig(max_new_tokens=cfg.max_new_tokens, n=n)

        def best_of_n():
            r = sample(params, prompts, mask, jax.random.key(2), model=model, cfg=bon_cfg)
            roll["b"] = r
            return scorer(vp, r.tokens, r.attention_mask)

        t_bon = timeit(best_of_n, reps=cfg.search_reps)
        bon_tokens = float(np.asarray(roll["b"].lengths).sum()) / P
        out["beams"][b] = dict(search_ms_per_problem=t / P * 1e3, search_tokens_per_problem=tokens,
                               rounds=res["r"].rounds, best_of_n=n, bon_ms_per_problem=t_bon / P * 1e3,
                               bon_tokens_per_problem=bon_tokens)
        print(f"B = {b}: search {t / P * 1e3:.1f} ms/problem, {tokens:.0f} tokens/problem, {res['r'].rounds} rounds "
              f"| best-of-{n}: {t_bon / P * 1e3:.1f} ms/problem, {bon_tokens:.0f} tokens/problem", flush=True)
    return out


def main(cfg: Config) -> dict:
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.seq, cfg.steps, cfg.search_prompts = "tiny", 2, 32, 1, 2
        cfg.beams, cfg.max_new_tokens, cfg.max_step_tokens, cfg.max_rounds = (2,), 16, 4, 4
    banner("OREO", cfg)
    t0 = time.perf_counter()
    out = dict(step=bench_step(cfg), search=bench_search(cfg))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main(parse_config(Config))
