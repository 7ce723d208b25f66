"""DPO step time and memory, with a live reference and with precomputed reference log-probs, beside SFT.

    python -m benchmarks.preference [--preset small --batch 32 --seq 128 --steps 10]

The same tokens per step for all three: SFT on [batch, seq], DPO on batch / 2 pairs
[batch / 2, 2, seq] (chosen and rejected in one forward pass), completions the second
half of every row. "live": the frozen reference's forward runs every step, inside the
train step's program as `rljax.phases.preference` builds it (`with_live_reference`), and its
params stay in memory; "precomputed": the batch carries S_ref, as `cached_reference_logps`
gives it. Memory is XLA's compiled estimate for the gradient computation (arguments, the
reference's params included, + temporaries) plus the optimizer state: what the device must hold.
The aim: DPO with precomputed references within 1.2x of SFT per token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import numpy as np

from benchmarks.common import banner, timeit
from rljax.cli import parse_config


@dataclass
class Config:
    preset: str = "small"
    batch: int = 32
    seq: int = 128
    steps: int = 10
    smoke: bool = False


def _compiled_bytes(fn, *args) -> int:
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.temp_size_in_bytes) if mem is not None else 0


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(cfg: Config) -> dict:
    if cfg.smoke:
        cfg.preset, cfg.batch, cfg.seq, cfg.steps = "tiny", 4, 32, 2
    from rljax.data import SequenceBatch
    from rljax.data.batch import PreferenceBatch
    from rljax.losses import SFTConfig, sft_loss
    from rljax.losses.preference import DPOConfig, dpo_loss, reference_logps, with_live_reference
    from rljax.models import Model, preset
    from rljax.state import OptimizerConfig, create_state, make_train_step

    banner("preference (DPO)", cfg)
    rng = np.random.default_rng(0)
    opt = OptimizerConfig(total_steps=cfg.steps + 4)
    model = Model(preset(cfg.preset))
    tokens = rng.integers(3, model.config.vocab_size, (cfg.batch, cfg.seq)).astype(np.int32)
    ones = np.ones_like(tokens)
    completion = np.zeros_like(tokens)
    completion[:, cfg.seq // 2:] = 1
    B = cfg.batch // 2
    pairs = PreferenceBatch(tokens=tokens.reshape(B, 2, cfg.seq), attention_mask=ones.reshape(B, 2, cfg.seq),
                            loss_mask=completion.reshape(B, 2, cfg.seq))
    reference = model.init(jax.random.key(1))
    ref_fn = jax.jit(functools.partial(reference_logps, model=model))
    precomputed = pairs.replace(ref_logps=np.asarray(ref_fn(reference, pairs)))
    sft_fn = functools.partial(sft_loss, model=model, cfg=SFTConfig())
    dpo_fn = functools.partial(dpo_loss, model=model, cfg=DPOConfig())
    sft_step = make_train_step(sft_fn, opt)
    dpo_step = make_train_step(dpo_fn, opt)
    live_prepare = functools.partial(with_live_reference, model=model)
    live_step = make_train_step(dpo_fn, opt, prepare=live_prepare)

    def live_fn(params, batch, frozen):
        return dpo_fn(params, live_prepare(jax.lax.stop_gradient(frozen), batch))

    out = {}
    sft_batch = SequenceBatch(tokens, ones, completion)
    # name, step, its loss, the batch, the frozen arguments after it
    cases = (("sft", sft_step, sft_fn, sft_batch, ()),
             ("dpo_precomputed", dpo_step, dpo_fn, precomputed, ()),
             ("dpo_live", live_step, live_fn, pairs, (reference,)))
    for name, step, fn, batch, frozen in cases:
        state = [create_state(model, opt, jax.random.key(0))]

        def run(step=step, batch=batch, frozen=frozen, state=state):
            state[0], m = step(state[0], batch, *frozen)
            return m

        s = timeit(run, reps=cfg.steps, warmup=2)
        state0 = create_state(model, opt, jax.random.key(0))
        # the gradient computation's arguments and temporaries, plus the optimizer state beside it
        mem = _compiled_bytes(jax.value_and_grad(fn, has_aux=True), state0.params, batch, *frozen) + \
            _tree_bytes(state0.opt_state)
        out[f"{name}_ms"] = s * 1e3
        out[f"{name}_tok_s"] = cfg.batch * cfg.seq / s
        out[f"{name}_mib"] = mem / 2**20
        print(f"{name}: {s * 1e3:.1f} ms/step, {out[f'{name}_tok_s']:,.0f} tokens/s, ~{out[f'{name}_mib']:.0f} MiB")
    for name in ("dpo_precomputed", "dpo_live"):
        out[f"{name}_over_sft_time"] = out[f"{name}_ms"] / out["sft_ms"]
        print(f"{name} / SFT step time per token: {out[f'{name}_over_sft_time']:.2f}x; memory "
              f"{out[f'{name}_mib'] / out['sft_mib']:.2f}x")
    return out


if __name__ == "__main__":
    main(parse_config(Config))
