"""Peer baseline for `benchmarks/grpo_step.py --which trl`: Hugging Face TRL's `GRPOTrainer` on CPU,
seconds per GRPO step at the same configuration.

    .peer/venv/bin/python benchmarks/peers/trl_grpo.py                    # the matched configuration
    .peer/venv/bin/python benchmarks/peers/trl_grpo.py --prompts 2 --gens 2 --max-new 8 --steps 2   # quick check

(`make peer-env` creates .peer/venv; run `python -m benchmarks.grpo_step --which trl` with rljax's
environment in the same sitting and compare the ratio, not absolute seconds.)

Configuration (the defaults), matched to `benchmarks/grpo_step.py`:
  model     a randomly initialised LlamaForCausalLM (seed 0): hidden 256, 4 layers, 4 query and 4
            key/value heads, SwiGLU MLP 1024, untied head, 512 positions, float32 (4.2M parameters)
  tokenizer one token per character with the ids of rljax's CharTokenizer (58 entries), built in code;
            like it, a BOS token first, so a prompt is 5 tokens (rljax pads it to a bucket of 8)
  batch     16 distinct arithmetic prompts ("1+2=", ...) x 8 generations = 128 completions a step,
            one optimizer step per generation batch (TRL's num_iterations = 1, no gradient accumulation)
  sampling  temperature 1, exactly --max-new (128) new tokens per completion: min_new_tokens forces
            full length so every step generates the same number of tokens (rljax sets eos_id = -1)
  loss      TRL's default GRPO loss with beta = 0 (no reference model), learning rate 1e-4, AdamW,
            no bf16, no gradient checkpointing (TRL turns both on by default: --bf16, --grad-ckpt)
  reward    share of digit characters in the completion, + 0.5 if it contains "=" (grpo_step.py's)

Reported: seconds per step (the first step, with its warm-up, apart; the median of the others),
generated tokens per second, and how much of a step is generation. TRL does not report phase times
itself (its profiling goes to W&B / MLflow only), so the script wraps two of the trainer's methods:
`_generate` (tokenising prompts, `model.generate`, decoding) and `_generate_and_score_completions`
(that plus rewards, advantages and the log-probs it needs). Where a TRL release lacks a method,
that phase is reported as not measured. A last line prints a sampled completion, to show that the
tokenizer round-trips. Nothing is downloaded or saved; the trainer's output folder is temporary.
"""
from __future__ import annotations

import peer_common as pc  # first: sets the offline environment before the HF imports

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# The prompts of benchmarks/grpo_step.py (TRL_PROMPTS there), in the same order.
PROMPTS = [f"{i}+{j}=" for i, j in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 4), (6, 3),
                                    (8, 1), (3, 3), (5, 5), (7, 2), (9, 9), (1, 1), (2, 7), (6, 6)]]


def digit_share_reward(prompts=None, completions=None, **_):
    """Share of digit characters in each completion, + 0.5 when it contains '='."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) + (0.5 if "=" in c else 0.0) for c in completions]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=pc.HelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts per step (cycled from the 16)")
    ap.add_argument("--gens", type=int, default=8, help="generations per prompt")
    ap.add_argument("--max-new", type=int, default=128, help="new tokens per completion")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is reported apart")
    ap.add_argument("--free-len", action="store_true", help="let completions end at EOS (timings then vary)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 adds a reference model")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (off: rljax's figure is fp32)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--d-model", type=int, default=256, help="hidden size")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (as many key/value heads)")
    ap.add_argument("--mlp", type=int, default=1024, help="SwiGLU hidden width")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init and the data")
    a = ap.parse_args()
    if a.gens < 2:
        ap.error("--gens must be at least 2 (GRPO normalises rewards within each group)")
    return a


def time_method(trainer, name: str, sink: list) -> bool:
    """Replace trainer.<name> by a wrapper that appends each call's wall seconds to `sink`."""
    inner = getattr(trainer, name, None)
    if inner is None:
        return False

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t)

    setattr(trainer, name, timed)
    return True


def main() -> None:
    a = parse_args()
    pc.set_threads(a.threads)
    pc.no_dataset_progress_bars()
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    print("== TRL GRPOTrainer (peer of benchmarks/grpo_step.py --which trl)")
    print(pc.versions())
    tok = pc.char_tokenizer(padding_side="left", bos=True)
    model = pc.build_model(pc.llama_config(vocab=len(tok), d_model=a.d_model, layers=a.layers, heads=a.heads,
                                           mlp=a.mlp, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                           eos_id=tok.eos_token_id), a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    completions = a.prompts * a.gens
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.prompts)]
    # one epoch covers every step: the same prompts each step, as rljax's benchmark does
    ds = Dataset.from_list([{"prompt": p} for p in prompts * a.steps])
    config = (f"{n_params:,} params, d{a.d_model} x {a.layers} layers, {a.heads} heads, MLP {a.mlp}, vocab {len(tok)}; "
              f"{a.prompts} prompts ({len(tok(prompts[0])['input_ids'])} tokens with BOS) x {a.gens} generations x "
              f"{a.max_new} new tokens "
              f"({'free length' if a.free_len else 'forced to full length'}); "
              f"{'bf16 autocast' if a.bf16 else 'float32'}, beta={a.beta}, grad_ckpt={a.grad_ckpt}, lr {a.lr}")
    print(f"config: {config}")

    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, seed=a.seed, report_to="none", save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, bf16=a.bf16, **pc.checkpointing(GRPOConfig, a.grad_ckpt),
            per_device_train_batch_size=completions,  # counted in completions
            gradient_accumulation_steps=1, num_generations=a.gens, max_completion_length=a.max_new,
            max_steps=a.steps, learning_rate=a.lr, beta=a.beta, temperature=1.0,
            generation_kwargs=None if a.free_len else {"min_new_tokens": a.max_new},
        )
        clock = pc.step_clock()
        t = time.perf_counter()
        trainer = GRPOTrainer(model=model, reward_funcs=digit_share_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[clock])
        init_s = time.perf_counter() - t
        pc.quiet(trainer)
        gen_times, gen_score_times = [], []
        has_gen = time_method(trainer, "_generate", gen_times)
        has_gen_score = time_method(trainer, "_generate_and_score_completions", gen_score_times)
        t = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t

        steps = clock.times
        rest = steps[1:] or steps
        step_s = pc.median(rest)
        gen_s = pc.median(gen_times[1:] or gen_times) if has_gen else None
        gen_score_s = pc.median(gen_score_times[1:] or gen_score_times) if has_gen_score else None
        logs = [h for h in trainer.state.log_history if "reward" in h]
        lengths = [h.get("completions/mean_length") for h in logs]
        # TRL's own per-step figure (it times training_step: generation, scoring, loss and backward)
        trl_step = [h["step_time"] for h in logs if "step_time" in h]

        print(f"trainer init {init_s:.2f} s; whole train() {train_s:.2f} s for {len(steps)} steps")
        print(f"first step (warm-up) {steps[0]:.3f} s; median of the {len(rest)} after it: {step_s:.3f} s/step; "
              f"{completions * a.max_new / step_s:,.0f} generated tokens per second of step")
        if gen_s is not None:
            print(f"generation {gen_s:.3f} s/step ({gen_s / step_s:.0%} of the step; "
                  f"{completions * a.max_new / gen_s:,.0f} generated tok/s)")
        else:
            print("generation time: not measured (this TRL has no GRPOTrainer._generate)")
        if gen_score_s is not None:
            print(f"generation + scoring + log-probs {gen_score_s:.3f} s/step; the rest of the step "
                  f"(loss, backward, optimizer) {step_s - gen_score_s:.3f} s")
        summary = {
            "config": config,
            "step_s": [round(x, 3) for x in steps],
            "first_step_s": round(steps[0], 3),
            "median_step_s_after_first": round(step_s, 3),
            "generate_s": [round(x, 3) for x in gen_times] if has_gen else None,
            "generate_and_score_s": [round(x, 3) for x in gen_score_times] if has_gen_score else None,
            "generation_share": round(gen_s / step_s, 3) if gen_s is not None else None,
            "rewards": [round(h["reward"], 3) for h in logs],
            "mean_completion_length": lengths,
            "trl_logged_step_time_s": [round(x, 3) for x in trl_step],
            "peak_rss_mib": round(pc.peak_rss_mib(), 1),
        }
        print("SUMMARY " + json.dumps(summary))
        with torch.no_grad():
            enc = tok(["1+2="], return_tensors="pt")
            torch.manual_seed(a.seed)
            out = trainer.model.generate(**enc, max_new_tokens=16, do_sample=True)
        print("sample completion of '1+2=':", repr(tok.decode(out[0][enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)))


if __name__ == "__main__":
    main()
