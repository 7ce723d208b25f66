"""SFT on the embedded arithmetic task: held-out exact-match accuracy before and after.

    python -m experiments.sft_arithmetic                  # small preset, level 1, about 5 minutes on 2 CPU cores
    python -m experiments.sft_arithmetic --smoke          # seconds
    python -m experiments.sft_arithmetic --run-dir runs/x # resume (or start) in a fixed directory

Writes config.json, metrics.jsonl, checkpoints/, loss.png and results.json under
the run directory. Running the same command with the same --run-dir after a crash
resumes from the last checkpoint and ends with the same parameters.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rljax.cli import make_run_dir, parse_config, save_config
from rljax.data.arithmetic import check_answer, make_split
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.metrics import plot_metrics
from rljax.models import Model, preset
from rljax.phases import LoopConfig, SFTPhaseConfig, sft
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer


@dataclass
class Config:
    preset: str = "small"
    dtype: str = "float32"
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    levels: tuple[int, ...] = (1,)
    n_train: int = 1000
    n_test: int = 128
    max_new_tokens: int = 48
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    run_dir: str | None = None
    run_root: str = "runs"
    progress: bool = True
    evaluate: bool = True
    smoke: bool = False


def optimizer_config(cfg: Config) -> OptimizerConfig:
    return OptimizerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=max(cfg.steps, 1),
                           schedule="cosine", weight_decay=0.01)


def build_model(cfg: Config, tok) -> Model:
    return Model(preset(cfg.preset, vocab_size=tok.vocab_size, dtype=cfg.dtype))


def exact_match(params, model, tok, problems, max_new_tokens, *, n: int = 1, temperature: float = 0.0,
                key=None) -> tuple[float, list[str]]:
    """Fraction of right final answers over every test prompt: greedy decoding
    (temperature 0, the default), or `n` samples per prompt at `temperature`
    (mean over samples: pass@1 as RL papers report it). Returns (accuracy, texts)."""
    prompts, mask = tok.encode_batch([p.prompt for p in problems], padding_side="left")
    cfg = SampleConfig(max_new_tokens=max_new_tokens, n=n, temperature=temperature, eos_id=tok.eos_id,
                       pad_id=tok.pad_id)
    r = sample(params, prompts, mask, jax.random.key(0) if key is None else key, model=model, cfg=cfg)
    texts = tok.decode_batch(np.asarray(r.completions))
    return float(np.mean([check_answer(p, t) for p, t in zip((p for p in problems for _ in range(n)), texts)])), texts


def apply_smoke(cfg: Config) -> None:
    if cfg.smoke:
        cfg.preset, cfg.steps, cfg.batch_size, cfg.n_train, cfg.n_test = "tiny", 12, 8, 256, 16
        cfg.checkpoint_every, cfg.log_every, cfg.max_new_tokens, cfg.warmup_steps = 6, 4, 24, 2


def main(cfg: Config) -> dict:
    apply_smoke(cfg)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, "sft_arithmetic")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir)
    tok = CharTokenizer()
    model = build_model(cfg, tok)
    train, test = make_split(cfg.n_train, cfg.n_test, levels=cfg.levels, seed=cfg.seed)
    data = BatchIterator([(p.prompt, p.completion) for p in train], cfg.batch_size,
                         lambda rows: collate_prompt_completion(tok, rows, max_length=model.config.max_seq_len),
                         seed=cfg.seed)
    opt = optimizer_config(cfg)
    state = create_state(model, opt, jax.random.key(cfg.seed))
    print(f"sft_arithmetic: preset {cfg.preset} ({model.config.num_params()/1e6:.2f}M params), "
          f"{len(train)} train / {len(test)} test problems, levels {cfg.levels}, {cfg.steps} steps x "
          f"{cfg.batch_size}; run dir {run_dir}")

    before = exact_match(state.params, model, tok, test, cfg.max_new_tokens)[0] if cfg.evaluate else None
    t0 = time.perf_counter()
    phase = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=cfg.steps, log_every=cfg.log_every,
                                                          checkpoint_every=cfg.checkpoint_every,
                                                          progress=cfg.progress))
    state = sft(state, data, phase, model=model, run_dir=run_dir)
    train_s = time.perf_counter() - t0
    results = dict(config=asdict(cfg), run_dir=run_dir, params=model.config.num_params(), train_seconds=train_s)
    if cfg.evaluate:
        after, texts = exact_match(state.params, model, tok, test, cfg.max_new_tokens)
        results.update(accuracy_before=before, accuracy_after=after,
                       examples=[dict(prompt=p.prompt, target=p.completion, output=t)
                                 for p, t in zip(test[:5], texts[:5])])
        print(f"\n| held-out exact match ({len(test)} problems) | accuracy |\n|---|---|\n"
              f"| before SFT | {before:.1%} |\n| after {cfg.steps} SFT steps | {after:.1%} |\n")
        for e in results["examples"][:3]:
            print(f"  {e['prompt']!r} -> {e['output']!r}  (target {e['target']!r})")
    try:
        results["plot"] = plot_metrics(run_dir, ["sft/loss"], os.path.join(run_dir, "loss.png"), smooth=3)
    except (ValueError, ImportError) as e:  # too few points or no matplotlib: the run itself is fine
        print(f"(no plot: {e})")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"train time {train_s:.0f} s; wrote {run_dir}")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
