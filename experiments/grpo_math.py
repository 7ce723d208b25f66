"""R1-style RL on math word problems with a Hugging Face model: optional SFT, then GRPO.

    python -m experiments.grpo_math --model path/to/Qwen2.5-0.5B-Instruct --data gsm8k_train.jsonl \\
        --eval-data gsm8k_test.jsonl --dtype bfloat16 --iterations 200
    python -m experiments.grpo_math --model DIR --data FILE --sft-data FILE --sft-steps 200   # SFT first
    python -m experiments.grpo_math --model DIR --data FILE --style think --format-reward 0.1 # <think>/<answer>
    python -m experiments.grpo_math --model DIR --data FILE --mesh-fsdp 8                      # 8 devices
    RLJAX_COORDINATOR=host0:1234 RLJAX_NUM_PROCESSES=2 RLJAX_PROCESS_ID=<0 or 1> python -m experiments.grpo_math \\
        --model DIR --data FILE --mesh-fsdp 16 --run-dir SHARED/run        # 2 hosts x 8 devices, on each host
    python -m experiments.grpo_math --model DIR --data FILE --remat full                       # less memory
    python -m experiments.grpo_math --smoke                                                    # CPU, seconds

The model is an HF Llama / Qwen2 / Qwen3 checkpoint directory (or hub id) read with
`rljax.models.hf.load_pretrained`, the tokenizer and its chat template with
`HFTokenizer.from_pretrained` from the same directory; sampling stops at every id of
the model's generation_config (`tokenizer_ids`). Data: GSM8K rows {question, answer
"... #### N"} (--data-format gsm8k) or MATH rows {problem, solution with \\boxed{}}
(--data-format math) from .jsonl / .json (read directly) or anything
`rljax.data.adapters.load_records` reads. Every prompt, in SFT and in RL alike, is the
model's chat template applied to [system, user: question] with the generation prompt
(`chat_prompt`); the SFT target is the reference solution in the answer style:

  boxed  "<solution>\\nThe final answer is \\boxed{<answer>}."
  think  "<think>\\n<solution>\\n</think>\\n<answer><answer></answer>"

Reward: `math_answer_reward` (1 when the extracted final answer equals the reference)
+ --format-reward x `think_answer_format_reward`. Outputs in the run directory:
sft/ (SFT metrics and checkpoints), metrics.jsonl and checkpoints/ (RL; rerunning the
command resumes; each reward term's mean is logged too, rl/reward_math_answer_reward_mean),
samples/iteration-NNNNNN.jsonl (every completion trained on with its reward, each reward term's
and its answer: `rljax.metrics.read_samples`; process 0 writes them), results.json, and
policy/: the final policy as an HF checkpoint with the tokenizer files and a
generation_config.json listing the stop ids, which transformers and vLLM load as they are
(`vllm serve <run-dir>/policy`).

--smoke runs on the test fixtures on CPU: the tiny Qwen2 fixture's architecture with
random weights and a vocabulary widened to the tokenizer fixture's 402 ids (the
checkpoint fixture's 160-id vocabulary belongs to no tokenizer), written with
save_pretrained to <run-dir>/smoke-model together with the tokenizer fixture, then
loaded back like any checkpoint; data tests/fixtures/math/gsm8k_tiny.jsonl.

--remat full (or dots) recomputes each layer's activations in the backward pass
(`TransformerConfig.remat`): less memory for more compute (at TRL's GRPO configuration on
CPU, the iteration's peak 2.3 -> 1.3 GB for 1.1-1.25x the update time; docs/performance.md).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from dataclasses import asdict, dataclass

import jax

from experiments.fixtures import SMOKE_DATA, write_smoke_model
from rljax.algorithms import get_algorithm
from rljax.checkpoint import digest_params, write_json
from rljax.cli import LoggingFlags, MeshFlags, apply_preset, make_run_dir, run, save_config
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.distributed import on_main, say, sync
from rljax.eval import exact_match, export_policy
from rljax.losses.sft import SFTConfig
from rljax.metrics import read_metrics
from rljax.models.config import REMAT_POLICIES
from rljax.models.hf import load_pretrained, read_hf_config, resolve_path
from rljax.models.transformer import Model
from rljax.phases import LoopConfig, PromptBatch, SFTPhaseConfig, rl, sft
from rljax.rewards.math_answers import math_answer_reward, prefills_think, think_answer_format_reward
from rljax.rewards.rules import weighted_sum
from rljax.rl import RLConfig, create_rl_state
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.tasks.math import SYSTEM_PROMPTS, chat_prompt, math_answer_correct, read_problems, sft_target
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import HFTokenizer




@dataclass
class Config(LoggingFlags, MeshFlags):
    model: str = ""  # HF checkpoint directory (or hub id) with the tokenizer files
    data: str = ""  # RL prompts: .jsonl / .json / .parquet / a directory / a hub name
    data_format: str = "gsm8k"  # gsm8k | math
    sft_data: str | None = None  # SFT on these problems' reference solutions first (None: no SFT)
    eval_data: str | None = None  # greedy accuracy before / after on these problems (None: no evaluation)
    eval_problems: int = 256  # at most this many evaluation problems
    style: str = "boxed"  # how the answer is asked for and, in SFT, written: boxed | think
    system_prompt: str | None = None  # None: the style's default (SYSTEM_PROMPTS)
    format_reward: float = 0.0  # weight of think_answer_format_reward in the reward
    # SFT
    sft_steps: int = 100
    sft_batch: int = 16
    sft_lr: float = 1e-5
    sft_max_length: int = 1024  # longer SFT rows are dropped (and counted)
    # RL
    algo: str = "grpo"
    iterations: int = 100
    prompts_per_iteration: int = 8
    n: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    lr: float = 1e-6
    minibatches: int = 1  # policy updates per iteration (each on prompts_per_iteration * n / minibatches rows)
    kl_coef: float | None = None  # None: the algorithm's default
    track_kl: bool = True
    checkpoint_every: int = 50
    # model and devices
    dtype: str | None = None  # parameter dtype, e.g. bfloat16 on GPU / TPU (None: the checkpoint's)
    max_seq_len: int | None = None  # None: the checkpoint's max_position_embeddings
    remat: str = "none"  # none | dots | full: recompute each layer in the backward pass (less memory, more compute)
    export_dtype: str | None = None  # dtype of the exported policy's weights (None: the parameters')
    eval_batch: int = 64
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def apply_smoke(cfg: Config) -> None:
    """Shrink to the test fixtures: seconds on a CPU (fields the user set keep their values)."""
    apply_preset(cfg, data=SMOKE_DATA, sft_data=SMOKE_DATA, eval_data=SMOKE_DATA, style="think", format_reward=0.1,
                 sft_steps=6, sft_batch=4, sft_lr=3e-3, iterations=2, prompts_per_iteration=4, n=4,
                 max_new_tokens=16, lr=1e-4, eval_problems=8, eval_batch=8, checkpoint_every=0)


def make_reward(cfg: Config):
    """math_answer_reward + format_reward x think_answer_format_reward."""
    terms = [(1.0, math_answer_reward)]
    if cfg.format_reward:
        terms.append((cfg.format_reward, think_answer_format_reward))
    return weighted_sum(*terms)


def rl_prompt_batch(tok: HFTokenizer, problems, system_prompt: str) -> PromptBatch:
    texts = [chat_prompt(tok, p.question, system_prompt) for p in problems]
    tokens, mask = tok.encode_batch(texts, add_bos=False, padding_side="left")
    return PromptBatch(tokens=tokens, mask=mask, metadata={"answers": [p.answer for p in problems]})


def sft_pairs(tok: HFTokenizer, problems, cfg: Config, system_prompt: str) -> tuple[list[tuple[str, str]], int]:
    """(prompt, target) pairs for SFT and the number dropped for exceeding sft_max_length tokens."""
    pairs, dropped = [], 0
    for p in problems:
        prompt = chat_prompt(tok, p.question, system_prompt)
        # a template whose generation prompt opens the reasoning ("<think>\n", R1-distill style): no second tag
        target = sft_target(p, cfg.style, prefilled_think=prefills_think(prompt))
        n = len(tok.encode(prompt, add_bos=False)) + len(tok.encode(target, add_bos=False)) + 1  # + eos
        if n > cfg.sft_max_length:
            dropped += 1
        else:
            pairs.append((prompt, target))
    return pairs, dropped


def greedy_accuracy(params, model: Model, tok: HFTokenizer, problems, cfg: Config, system_prompt: str,
                    batch: int) -> float:
    """Mean math_answer_reward of greedy completions of the chat prompts (`rljax.eval.exact_match` in
    batches of `batch`; a prompt longer than the cache allows keeps its end, as in RL)."""
    return exact_match(params, model, tok, problems, cfg.max_new_tokens, check=math_answer_correct,
                       prompt=lambda p: chat_prompt(tok, p.question, system_prompt), batch_size=batch,
                       add_bos=False, truncate=True)[0]


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_smoke(cfg)
    if cfg.style not in SYSTEM_PROMPTS:
        raise ValueError(f"Config.style: {cfg.style!r} is not one of {sorted(SYSTEM_PROMPTS)}")
    if not cfg.model and not cfg.smoke:
        raise ValueError("Config: no model; pass --model DIR (an HF checkpoint with its tokenizer files)")
    if not cfg.data:
        raise ValueError("Config: no data; pass --data FILE (GSM8K- or MATH-style rows)")
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"Config.remat: {cfg.remat!r} is not one of {REMAT_POLICIES}")
    algo = get_algorithm(cfg.algo)  # an unknown name is refused before a run directory is made
    if (cfg.prompts_per_iteration * cfg.n) % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches}: the {cfg.prompts_per_iteration} prompts x n = {cfg.n} "
                         "sampled rows of an iteration do not split into them")
    mesh = cfg.mesh()  # on several processes, one over all their devices (before a run directory is made)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"grpo_math-{cfg.algo}")
    os.makedirs(run_dir, exist_ok=True)
    smoke_model = not cfg.model  # --smoke: a random model written into the run directory
    if smoke_model:
        cfg.model = os.path.join(run_dir, "smoke-model")
    save_config(cfg, run_dir, allow_change=cfg.force_config)  # before anything is written or trained
    if smoke_model:
        write_smoke_model(cfg.model, seed=cfg.seed)  # on every process: process 0 writes
    system_prompt = SYSTEM_PROMPTS[cfg.style] if cfg.system_prompt is None else cfg.system_prompt

    model_dir = resolve_path(cfg.model)  # a hub id is fetched once; the tokenizer reads the same files
    tok = HFTokenizer.from_pretrained(model_dir)
    overrides = {"remat": cfg.remat}
    if cfg.max_seq_len is not None:
        overrides["max_seq_len"] = cfg.max_seq_len
    arch, params = load_pretrained(model_dir, mesh=mesh, dtype=cfg.dtype, config_overrides=overrides)
    if arch.vocab_size < tok.vocab_size:
        raise ValueError(f"{model_dir}: config.json vocab_size={arch.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} ids")
    model = Model(arch, mesh)
    say(f"grpo_math: {model_dir}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
        f"{tok}, mesh {cfg.mesh_axes() if mesh is not None else 'none'}")

    problems = read_problems(cfg.data, cfg.data_format)
    eval_set = read_problems(cfg.eval_data, cfg.data_format)[:cfg.eval_problems] if cfg.eval_data else []
    evaluate = functools.partial(greedy_accuracy, model=model, tok=tok, problems=eval_set, cfg=cfg,
                                 system_prompt=system_prompt, batch=cfg.eval_batch)
    results = dict(config=asdict(cfg), run_dir=run_dir, model_dir=model_dir)
    if eval_set:
        results["accuracy_start"] = evaluate(params)

    t0 = time.perf_counter()
    if cfg.sft_data:
        pairs, dropped = sft_pairs(tok, read_problems(cfg.sft_data, cfg.data_format), cfg, system_prompt)
        if dropped:
            say(f"grpo_math: dropped {dropped} SFT rows longer than sft_max_length={cfg.sft_max_length}")
        collate = functools.partial(collate_prompt_completion, tok, max_length=cfg.sft_max_length,
                                    add_bos=False, add_eos=True)
        opt = OptimizerConfig(lr=cfg.sft_lr, warmup_steps=min(10, cfg.sft_steps // 10), total_steps=cfg.sft_steps)
        state = create_state(model, opt, jax.random.key(cfg.seed), mesh=mesh, params=params)
        state = sft(state, BatchIterator(pairs, cfg.sft_batch, collate, seed=cfg.seed), SFTPhaseConfig(
            loss=SFTConfig(), optimizer=opt, loop=LoopConfig(steps=cfg.sft_steps, log_every=max(cfg.sft_steps // 20, 1),
                                                             checkpoint_every=cfg.checkpoint_every,
                                                             progress=cfg.progress, **cfg.loop_logging())),
                    model=model, mesh=mesh, run_dir=os.path.join(run_dir, "sft"))
        params = state.params
        results.update(sft_rows=len(pairs), sft_dropped=dropped, sft_seconds=time.perf_counter() - t0)
        if eval_set:
            results["accuracy_sft"] = evaluate(params)

    t1 = time.perf_counter()
    prompts = BatchIterator(problems, cfg.prompts_per_iteration,
                            functools.partial(rl_prompt_batch, tok, system_prompt=system_prompt), seed=cfg.seed + 1)
    rl_cfg = RLConfig(algorithm=cfg.algo,
                      sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=cfg.n, temperature=cfg.temperature,
                                            **tokenizer_ids(tok)),
                      optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant"), track_kl=cfg.track_kl,
                      minibatches=cfg.minibatches, truncate_prompts=True)
    if cfg.kl_coef is not None:
        rl_cfg = dataclasses.replace(rl_cfg, algorithm=algo.with_kl_coef(cfg.kl_coef))
    state = create_rl_state(model, params, rl_cfg, jax.random.key(cfg.seed))
    # chat prompts hold stop tokens (the system and user turns end in one): decode them whole
    state = rl(state, prompts, make_reward(cfg), rl_cfg, model=model, decode=tok.decode_batch,
               decode_prompts=functools.partial(tok.decode_batch, stop_at_eos=False), run_dir=run_dir,
               accuracy_fn=math_answer_reward, samples_every=1,
               loop=LoopConfig(steps=cfg.iterations, log_every=1, checkpoint_every=cfg.checkpoint_every,
                               progress=cfg.progress, **cfg.loop_logging()))
    results["rl_seconds"] = time.perf_counter() - t1
    if eval_set:
        results["accuracy_rl"] = evaluate(state.policy.params)
    # --max-seq-len bounds this run's KV cache only; the exported model keeps the checkpoint's context length
    hf_length = read_hf_config(model_dir).get("max_position_embeddings")
    export_model = Model(dataclasses.replace(arch, max_seq_len=int(hf_length)) if hf_length else arch, mesh)
    results["policy_dir"] = export_policy(state.policy.params, export_model, tok, model_dir,
                                          os.path.join(run_dir, "policy"), dtype=cfg.export_dtype)
    h = hashlib.sha256()
    digest_params(state.policy.params, h)
    results["policy_sha256"] = h.hexdigest()  # of the trained params (load_pretrained of policy/ gives the same)
    sync("grpo_math: metrics written")  # process 0 writes metrics.jsonl; every process reads it back
    rows = [r for r in read_metrics(run_dir) if "rl/reward_mean" in r]
    results.update(reward_first=rows[0]["rl/reward_mean"], reward_last=rows[-1]["rl/reward_mean"],
                   train_accuracy_first=rows[0]["rl/accuracy"], train_accuracy_last=rows[-1]["rl/accuracy"],
                   wall_seconds=time.perf_counter() - t0)
    table = "\n| grpo_math | value |\n|---|---|\n"
    for key, name in (("accuracy_start", "greedy accuracy of the checkpoint"), ("accuracy_sft", "after SFT"),
                      ("accuracy_rl", f"after {cfg.iterations} RL iterations")):
        if key in results:
            table += f"| {name} | {results[key]:.1%} |\n"
    table += (f"| mean reward first / last iteration | {results['reward_first']:.3f} / {results['reward_last']:.3f} |\n"
              f"| exported policy | {results['policy_dir']} |\n")
    say(table)
    path = os.path.join(run_dir, "results.json")
    on_main(f"grpo_math: writing {path}", write_json, path, results, default=str)  # atomically
    return results


if __name__ == "__main__":
    # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message; processes=True: one process
    # per host when the RLJAX_* / JAX_* coordinator variables are set (rljax.cli.run)
    run(main, Config, processes=True)
