"""Peer baseline for offline preference and reward-model training: Hugging Face TRL's `DPOTrainer`
(with a live reference model or with precomputed reference log-probs), `KTOTrainer` and
`RewardTrainer` on CPU; seconds per optimizer step, tokens per second, peak memory.

    .peer/venv/bin/python benchmarks/peers/trl_offline.py --trainer dpo
    .peer/venv/bin/python benchmarks/peers/trl_offline.py --trainer dpo --precompute-ref
    .peer/venv/bin/python benchmarks/peers/trl_offline.py --trainer kto
    .peer/venv/bin/python benchmarks/peers/trl_offline.py --trainer reward
    .peer/venv/bin/python benchmarks/peers/trl_offline.py --trainer dpo --examples 2 --prompt-len 4 \
        --completion-len 4 --steps 2                                   # a quick check that it runs

(`make peer-env` creates .peer/venv; `make bench-peers` runs all four. Run one trainer per process:
peak memory is the process's.)

rljax's own offline benchmarks (`benchmarks/preference.py`, `benchmarks/reward_model.py`) time the
`small` preset on 32 x 128 random tokens; this script times a smaller, fixed configuration, the
same for all trainers (the defaults):
  model     a randomly initialised Llama (seed 0): hidden 256, 4 layers, 4 query and 4 key/value
            heads, SwiGLU MLP 1024, untied head, float32 (the model of trl_grpo.py, 4.2M parameters);
            for the reward model the same backbone under a one-output sequence-classification head
  tokenizer one token per character with the ids of rljax's CharTokenizer (58 entries), built in code
  data      made in memory from the seed, a fresh batch every step: prompts of --prompt-len (32)
            random characters, completions of exactly --completion-len (64) characters: chosen /
            desirable ones digits, rejected / undesirable ones lowercase letters. TRL appends an EOS
            to each completion, so every sequence is 32 + 64 + 1 = 97 tokens and no batch pads.
  step      --examples (16) per optimizer step:
              dpo     16 pairs = 32 sequences through the policy (forward + backward), and through
                      the frozen reference (forward) unless --precompute-ref, where the trainer's
                      constructor scores the whole data set once and training holds one model
              kto     16 unpaired completions, half desirable; TRL adds one mismatched "KL" sequence
                      per example (a no-grad policy forward) and runs the reference on both sets
                      unless --precompute-ref
              reward  16 pairs = 32 sequences, Bradley-Terry loss, no reference model
            AdamW as TRL configures it (the optimizer is printed), learning rate 1e-4, no bf16, no
            gradient checkpointing (TRL turns both on by default: --bf16, --grad-ckpt).

Reported: every step's seconds, the median of steps 2..N (the first, with warm-up, apart), tokens
per second (the tokens of every distinct sequence the step feeds the policy, counted from the
attention masks the trainer received; for KTO also without the KL sequences), examples per second,
constructor seconds (data preparation, and the reference pass with --precompute-ref), and the peak
resident memory of the process after the imports, before training and at the end.
"""
from __future__ import annotations

import peer_common as pc  # first: sets the offline environment before the HF imports

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import string  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=pc.HelpFormatter)
    ap.add_argument("--trainer", choices=("dpo", "kto", "reward"), required=True, help="which TRL trainer")
    ap.add_argument("--examples", type=int, default=16,
                    help="examples per optimizer step (dpo, reward: pairs; kto: unpaired completions)")
    ap.add_argument("--prompt-len", type=int, default=32, help="characters (= tokens) per prompt")
    ap.add_argument("--completion-len", type=int, default=64, help="characters (= tokens) per completion")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps, each on fresh examples")
    ap.add_argument("--precompute-ref", action="store_true",
                    help="dpo, kto: reference log-probs computed once in the constructor")
    ap.add_argument("--loss-type", default="sigmoid", help="dpo only: TRL loss type(s), comma-separated")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo, kto: beta")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--d-model", type=int, default=256, help="hidden size")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (as many key/value heads)")
    ap.add_argument("--mlp", type=int, default=1024, help="SwiGLU hidden width")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init and the data")
    a = ap.parse_args()
    if a.trainer == "reward" and a.precompute_ref:
        ap.error("--precompute-ref: a reward model has no reference model")
    if a.trainer != "dpo" and a.loss_type != "sigmoid":
        ap.error("--loss-type applies to --trainer dpo")
    if a.trainer == "kto" and (a.examples < 2 or a.examples % 2):
        ap.error("kto needs an even --examples >= 2 (balanced labels; the KL term pairs examples)")
    return a


def make_dataset(a, n: int, rng: random.Random):
    """n examples of fixed length; chosen / desirable completions are digits, the others letters."""
    from datasets import Dataset

    prompt_chars = [c for c in pc.ALPHABET if c != "\n"]

    def text(chars, k):
        return "".join(rng.choice(chars) for _ in range(k))

    prompts = [text(prompt_chars, a.prompt_len) for _ in range(n)]
    if a.trainer == "kto":
        labels = [i % 2 == 0 for i in range(n)]  # alternating: every batch of an even size is balanced
        completions = [text(string.digits if good else string.ascii_lowercase, a.completion_len) for good in labels]
        return Dataset.from_dict({"prompt": prompts, "completion": completions, "label": labels}), prompts + completions
    chosen = [text(string.digits, a.completion_len) for _ in range(n)]
    rejected = [text(string.ascii_lowercase, a.completion_len) for _ in range(n)]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}), prompts + chosen + rejected


def trainer_classes(kind: str):
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOConfig, DPOTrainer
    if kind == "reward":
        from trl import RewardConfig, RewardTrainer
        return RewardConfig, RewardTrainer
    try:
        from trl import KTOConfig, KTOTrainer
    except ImportError:  # releases that keep KTO under trl.experimental
        from trl.experimental.kto import KTOConfig, KTOTrainer
    return KTOConfig, KTOTrainer


def main() -> None:
    a = parse_args()
    pc.set_threads(a.threads)
    pc.no_dataset_progress_bars()
    import torch  # noqa: F401  (imported before the first memory reading: 'after imports')
    import datasets  # noqa: F401
    import trl  # noqa: F401
    from transformers import LlamaForSequenceClassification

    rss_imports = pc.peak_rss_mib()
    print(f"== TRL {a.trainer}{' (precomputed reference)' if a.precompute_ref else ''} step (peer baseline)")
    print(pc.versions())
    tok = pc.char_tokenizer(padding_side="left")
    cfg = pc.llama_config(vocab=len(tok), d_model=a.d_model, layers=a.layers, heads=a.heads, mlp=a.mlp,
                          pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    if a.trainer == "reward":
        cfg.num_labels = 1
        model = pc.build_model(cfg, a.seed, cls=LlamaForSequenceClassification)
    else:
        model = pc.build_model(cfg, a.seed)
    ref_model = None
    if a.trainer in ("dpo", "kto") and not a.precompute_ref:
        # TRL would load the reference from the policy's checkpoint path; this policy was built in memory,
        # so the reference is built the same way: same config and seed, hence the policy's initial weights
        ref_model = pc.build_model(cfg, a.seed).eval()
    n_params = sum(p.numel() for p in model.parameters())

    ds, texts = make_dataset(a, a.examples * a.steps, random.Random(a.seed))
    for t in texts[:8]:
        assert len(tok(t)["input_ids"]) == len(t), "the character tokenizer must give one token per character"

    Config, Trainer = trainer_classes(a.trainer)
    extra = {}
    if a.trainer in ("dpo", "kto"):
        extra.update(precompute_ref_log_probs=a.precompute_ref, beta=a.beta)
    if a.trainer == "dpo":
        extra["loss_type"] = [s.strip() for s in a.loss_type.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix=f"trl-{a.trainer}-") as out_dir:
        args = Config(output_dir=out_dir, use_cpu=True, seed=a.seed, report_to="none", save_strategy="no",
                      logging_steps=1, dataloader_num_workers=0, bf16=a.bf16, **pc.checkpointing(Config, a.grad_ckpt),
                      per_device_train_batch_size=a.examples, gradient_accumulation_steps=1, max_steps=a.steps,
                      learning_rate=a.lr, max_length=None, **extra)
        clock = pc.step_clock()
        t = time.perf_counter()
        refs = {} if a.trainer == "reward" else {"ref_model": ref_model}
        trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock], **refs)
        init_s = time.perf_counter() - t
        pc.quiet(trainer)

        # tokens fed to the policy, from the batches the trainer actually receives
        counts = []
        inner = trainer.training_step

        def counting_step(model, inputs, *rest, **kw):
            main_tok = int(inputs["attention_mask"].sum())
            kl_tok = int(inputs["KL_attention_mask"].sum()) if "KL_attention_mask" in inputs else 0
            slots = inputs["input_ids"].numel() + (inputs["KL_input_ids"].numel() if "KL_input_ids" in inputs else 0)
            counts.append((main_tok + kl_tok, main_tok, slots))
            return inner(model, inputs, *rest, **kw)

        trainer.training_step = counting_step
        optim = getattr(args.optim, "value", args.optim)
        holds_ref = getattr(trainer, "ref_model", None) is not None
        seq_tok = a.prompt_len + a.completion_len + 1
        if a.trainer == "dpo":
            desc = (f"DPO {'+'.join(args.loss_type)}, beta {args.beta}: {a.examples} pairs = {2 * a.examples} sequences"
                    f" per step, policy fwd+bwd{'' if a.precompute_ref else ' + reference fwd'}")
        elif a.trainer == "kto":
            desc = (f"KTO {args.loss_type}, beta {args.beta}: {a.examples} completions (+{a.examples} KL sequences) "
                    f"per step{'' if a.precompute_ref else ', reference fwd on both'}")
        else:
            desc = f"reward model (Bradley-Terry): {a.examples} pairs = {2 * a.examples} sequences per step"
        config = (f"{type(model).__name__} {n_params:,} params, d{a.d_model} x {a.layers} layers, {a.heads} heads, "
                  f"MLP {a.mlp}, vocab {len(tok)}; {desc}; {seq_tok} tokens a sequence (prompt {a.prompt_len} + "
                  f"completion {a.completion_len} + EOS); {'bf16 autocast' if a.bf16 else 'float32'}, "
                  f"grad_ckpt={a.grad_ckpt}, optim {optim}, lr {a.lr}; reference model held in training: {holds_ref}")
        print(f"config: {config}")
        print(f"constructor {init_s:.2f} s (data preparation{' and the reference pass' if a.precompute_ref else ''})")
        rss_before = pc.peak_rss_mib()
        t = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t
        rss_end = pc.peak_rss_mib()

    steps = clock.times
    rest = steps[1:] or steps
    step_s = pc.median(rest)
    all_tok, trained_tok, slots = counts[0]
    padded = any(c[0] != c[2] for c in counts) or len(set(counts)) != 1
    seq_measured = all_tok / (2 * a.examples)  # dpo, reward: chosen + rejected; kto: completions + KL sequences
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    print(f"first step (warm-up) {steps[0]:.3f} s; median of steps 2..{len(steps)}: {step_s:.3f} s/step")
    print(f"{all_tok:,} tokens per step -> {all_tok / step_s:,.0f} tok/s"
          + (f" ({trained_tok / step_s:,.0f} tok/s counting only the {a.examples} trained sequences)"
             if trained_tok != all_tok else "")
          + f"; {a.examples / step_s:.2f} examples/s" + ("; WARNING: batches were padded" if padded else ""))
    if seq_measured != seq_tok:
        print(f"WARNING: {seq_measured:g} tokens a sequence reached the model, not {seq_tok}")
    print(f"peak RSS {rss_end:,.0f} MiB (after imports {rss_imports:,.0f}, before training {rss_before:,.0f})")
    summary = {
        "trainer": a.trainer, "precompute_ref": a.precompute_ref, "config": config,
        "step_s": [round(x, 3) for x in steps], "first_step_s": round(steps[0], 3),
        "median_step_s_after_first": round(step_s, 3),
        "tok_per_step": all_tok, "tok_per_sequence": seq_measured, "trained_tok_per_step": trained_tok, "padded": padded,
        "tok_s": round(all_tok / step_s, 1), "trained_tok_s": round(trained_tok / step_s, 1),
        "examples_s": round(a.examples / step_s, 2), "init_s": round(init_s, 2), "train_s": round(train_s, 2),
        "peak_rss_mib": round(rss_end, 1), "peak_rss_mib_before_train": round(rss_before, 1),
        "peak_rss_mib_after_imports": round(rss_imports, 1), "loss": losses,
    }
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
