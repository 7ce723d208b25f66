"""Seconds per GRPO (or PPO) iteration, split into sampling / scoring / reference log-probs / values / update.

    python -m benchmarks.grpo_step                       # both configurations below
    python -m benchmarks.grpo_step --which trl           # the peer's configuration only
    python -m benchmarks.grpo_step --which small --iterations 3
    python -m benchmarks.grpo_step --which trl --algo ppo   # PPO (value head on the policy) at the same shape
    python -m benchmarks.grpo_step --which trl --track-kl off --dtype bfloat16   # beside trl_grpo.py --bf16
    python -m benchmarks.grpo_step --which trl --minibatches 4 --grad-accum 4   # the same update in 4 micro-batches
    python -m benchmarks.grpo_step --which trl --track-kl off --compare-dots   # Eigen vs YNNPACK products, one process
    python -m benchmarks.grpo_step --which trl --track-kl off --remat full     # beside trl_grpo.py --grad-ckpt

"trl" is the configuration of the peer script benchmarks/peers/trl_grpo.py, TRL's
GRPOTrainer (run `.peer/venv/bin/python benchmarks/peers/trl_grpo.py` in the same
sitting for the ratio; `make peer-env` creates .peer/venv): a random Llama with
hidden 256, 4 layers, 4 heads (no GQA), MLP 1024, untied head, the character
vocabulary of CharTokenizer (the peer builds the same 58 ids); 16 prompts x 8
samples x 128 new tokens forced to full length (eos never ends a row); float32;
beta = 0 (no reference model: track_kl off); one update per iteration; the same
toy reward. It is timed once more with track_kl on (--track-kl both, the default),
which adds the reference forward pass the KL metrics need. Prompts (5 tokens: BOS + 4 characters, as in
the peer) go in a bucket of 8 (TRL pads to the longest prompt, 5). "small" is the `small` preset at 64 prompts x 8 x 64 tokens.
The first iteration (compilation) is reported apart; figures are medians. With
--algo ppo the policy gets a value head; one forward for V_old ("values") is added
and the update also trains the value head (β = 0, one epoch, one minibatch).
--compare-dots builds the iteration twice in one process, its train step and scoring passes
compiled with Eigen's matrix products (`RLJAX_CPU_DOTS=eigen`) and with XLA's default, YNNPACK
(`=ynn`), and alternates the two iteration by iteration (the order flipped each time), so that the
machine's drift falls on both; it prints both splits and the ratio of each stage. Sampling is the
same program in both (rljax leaves it with XLA's default). benchmarks.cpu_dots does the same for
single compiled programs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import jax

from benchmarks.common import banner, cpu_dots_env, iteration_medians, peak_rss_mib
from rljax.cli import parse_config
from rljax.algorithms import get_algorithm
from rljax.losses import with_value_head
from rljax.models import Model, TransformerConfig, preset
from rljax.rl import RLConfig, create_rl_state, make_rl_iteration
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig
from rljax.tokenizer import CharTokenizer

TRL_PROMPTS = [f"{i}+{j}=" for i, j in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 4), (6, 3),
                                        (8, 1), (3, 3), (5, 5), (7, 2), (9, 9), (1, 1), (2, 7), (6, 6)]]


@dataclass
class Config:
    which: str = "both"  # trl | small | both
    algo: str = "grpo"  # grpo | ppo
    iterations: int = 5  # timed iterations after the first
    epochs: int = 1  # passes over each iteration's samples
    minibatches: int = 1  # updates per pass
    grad_accum: int = 1  # micro-batches per optimizer update (OptimizerConfig.grad_accum); divides minibatches
    dtype: str = "float32"  # matmul compute dtype (bfloat16: f32 weights, optimizer and accumulation)
    remat: str = "none"  # none | dots | full: TransformerConfig.remat (beside trl_grpo.py --grad-ckpt)
    track_kl: str = "both"  # off | on | both: time the iteration without and/or with the KL metrics
    compare_dots: bool = False  # alternate Eigen- and YNNPACK-compiled iterations in one process
    smoke: bool = False


def reward_digits(prompts, completions, **_):
    """The peer's toy reward: share of digit characters, + 0.5 if the completion has '='."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) + (0.5 if "=" in c else 0.0) for c in completions]


STAGES = ("sample", "score", "ref", "values", "update")


def trl_model(dtype: str = "float32", remat: str = "none") -> Model:
    """The peer's Llama (`benchmarks/peers/trl_grpo.py`): d256 x 4 layers, 4 heads of 64, MHA, SwiGLU
    1024, untied, max 512 positions, rope theta 10000, eps 1e-6, CharTokenizer's vocabulary."""
    return Model(TransformerConfig(vocab_size=CharTokenizer().vocab_size, d_model=256, n_layers=4, n_heads=4,
                                   n_kv_heads=4, mlp_dim=1024, max_seq_len=512, tie_embeddings=False,
                                   rope_theta=10_000.0, norm_eps=1e-6, scan_layers=False, dtype=dtype, remat=remat))


def rl_config(n: int, max_new: int, *, min_prompt_bucket: int = 16, algo: str = "grpo", epochs: int = 1,
              minibatches: int = 1, grad_accum: int = 1, track_kl: bool = False) -> RLConfig:
    """The benchmark's RL settings: no KL penalty (beta = 0, as the peer), `n` samples of exactly
    `max_new` tokens (no eos), AdamW at a constant 1e-4."""
    return RLConfig(algorithm=get_algorithm(algo).with_kl_coef(0.0), epochs=epochs, minibatches=minibatches,
                    sampling=SampleConfig(max_new_tokens=max_new, n=n, eos_id=-1, pad_id=CharTokenizer().pad_id,
                                          min_prompt_bucket=min_prompt_bucket),
                    optimizer=OptimizerConfig(lr=1e-4, schedule="constant", grad_accum=grad_accum),
                    track_kl=track_kl)


def run(name: str, model: Model, prompts: list[str], n: int, max_new: int, iterations: int, track_kl: bool,
        min_prompt_bucket: int = 16, algo: str = "grpo", epochs: int = 1, minibatches: int = 1,
        grad_accum: int = 1, compare_dots: bool = False) -> dict:
    tok = CharTokenizer()
    params = model.init(jax.random.key(0))
    if algo == "ppo":
        model, params = with_value_head(model, params)
    cfg = rl_config(n, max_new, min_prompt_bucket=min_prompt_bucket, algo=algo, epochs=epochs,
                    minibatches=minibatches, grad_accum=grad_accum, track_kl=track_kl)
    banner(f"grpo_step {name} {algo} (track_kl={track_kl})",
           f"{model.config.num_params():,} params, d{model.config.d_model} x {model.config.n_layers} layers, "
           f"{len(prompts)} prompts x {n} samples x {max_new} new tokens, prompt bucket >= {min_prompt_bucket}, "
           f"{model.config.dtype}, remat {model.config.remat}, beta=0, {epochs} epochs x {minibatches} minibatches, "
           f"{grad_accum} micro-batches per update{'; Eigen against YNNPACK, alternated' if compare_dots else ''}")
    tokens, mask = tok.encode_batch(prompts, padding_side="left")
    variants = {}  # label -> [iteration, state, rows]
    for label in (("eigen", "ynn") if compare_dots else ("",)):
        with cpu_dots_env(label) if label else contextlib.nullcontext():  # read when the jits are built
            it = make_rl_iteration(model, cfg, reward_digits, tok.decode_batch)
        variants[label] = [it, create_rl_state(model, params, cfg, jax.random.key(1)), []]
    labels = list(variants)
    for i in range(iterations + 1):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            v = variants[label]
            t = time.perf_counter()
            v[1], m = v[0](v[1], tokens, mask)
            v[2].append(dict(m, total=time.perf_counter() - t))
    outs = {label: report(f"[{label}] " if label else "", v[2], len(prompts) * n * max_new)
            for label, v in variants.items()}
    peak = peak_rss_mib()
    print(f"peak RSS of the process so far: {peak:,.0f} MiB")
    if not compare_dots:
        return dict(outs[""], peak_rss_mib=peak)
    e, y = outs["eigen"], outs["ynn"]
    pairs = zip(variants["eigen"][2][1:], variants["ynn"][2][1:])
    wins = sum(a["time_update_s"] < b["time_update_s"] for a, b in pairs)
    print("Eigen / YNNPACK, medians: " + ", ".join(f"{k} {e[k] / y[k]:.3f}" for k in ("total", *STAGES) if y[k] > 0)
          + f"; Eigen's update faster in {wins} of {iterations} iterations")
    return dict(eigen=e, ynn=y, eigen_update_wins=wins, peak_rss_mib=peak)


def report(prefix: str, rows: list[dict], tokens_per_iter: int) -> dict:
    """Print and return the medians of the iterations after the first (which compiles)."""
    first, rest = rows[0], rows[1:]
    out = iteration_medians(rest, STAGES)
    print(f"{prefix}first iteration (compiles) {first['total']:.2f} s; median of {len(rest)}: "
          f"{out['total']:.3f} s/iteration; per stage (medians): sample {out['sample']:.3f}, score "
          f"{out['score']:.3f}, ref {out['ref']:.3f}, values {out['values']:.3f}, update {out['update']:.3f}, "
          f"other {out['other']:.3f}")
    print(f"{prefix}generated tokens/s {tokens_per_iter / out['sample']:,.0f}; iteration tokens/s "
          f"{tokens_per_iter / out['total']:,.0f}; mean completion length {rest[-1]['completion_length']:.0f}")
    return out


def main(cfg: Config) -> None:
    from rljax.host_memory import release_compiler_memory

    get_algorithm(cfg.algo)  # an unknown name is refused before anything is built
    for field, allowed in (("which", ("trl", "small", "both")), ("track_kl", ("off", "on", "both"))):
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"--{field.replace('_', '-')}: {getattr(cfg, field)!r} is not one of {' | '.join(allowed)}")
    release_compiler_memory()  # what rljax.cli.run does for every experiment
    tok = CharTokenizer()
    iterations = 1 if cfg.smoke else cfg.iterations
    if cfg.which in ("trl", "both"):
        model = trl_model(cfg.dtype, cfg.remat)
        prompts, max_new = (TRL_PROMPTS[:4], 16) if cfg.smoke else (TRL_PROMPTS, 128)
        for track_kl in {"off": (False,), "on": (True,), "both": (False, True)}[cfg.track_kl]:
            # prompts are 5 tokens (bos + 4 chars): a bucket of 8 instead of the default 16
            run("trl-config", model, prompts, 8, max_new, iterations, track_kl, min_prompt_bucket=8, algo=cfg.algo,
                epochs=cfg.epochs, minibatches=cfg.minibatches, grad_accum=cfg.grad_accum,
                compare_dots=cfg.compare_dots)
    if cfg.which in ("small", "both"):
        model = Model(preset("small", vocab_size=tok.vocab_size, dtype=cfg.dtype, remat=cfg.remat))
        prompts = [TRL_PROMPTS[i % 16] for i in range(8 if cfg.smoke else 64)]
        run("small", model, prompts, 8, 16 if cfg.smoke else 64, iterations, track_kl=False, algo=cfg.algo,
            epochs=cfg.epochs, minibatches=cfg.minibatches, grad_accum=cfg.grad_accum, compare_dots=cfg.compare_dots)


if __name__ == "__main__":
    main(parse_config(Config))
