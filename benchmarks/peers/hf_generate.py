"""Peer baseline for `benchmarks/decode.py` and `benchmarks/forward_backward.py`: Hugging Face
`generate` decode throughput and a torch training step, on CPU, for the small Llama shape those
benchmarks time as their "HF shape" rows.

    .peer/venv/bin/python benchmarks/peers/hf_generate.py                 # the matched configuration
    .peer/venv/bin/python benchmarks/peers/hf_generate.py --batch 4 --prompt 8 --new-tokens 8 \
        --train-batch 4 --train-seq 16 --reps 1 --train-steps 1        # a quick check that it runs

(`make peer-env` creates .peer/venv; `make bench-peers` runs this script with the other peers.)

Model: a randomly initialised LlamaForCausalLM (seed 0), hidden 256, 4 layers, 4 query and 4
key/value heads, SwiGLU MLP 688, vocabulary 64, untied head, float32: 3.2M parameters, the shape
of rljax's `TransformerConfig(vocab_size=64, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
mlp_dim=688)`.

generate  batch 32, prompt 64 random ids, exactly 64 new tokens (min_new_tokens = max_new_tokens,
          so EOS never ends a row early), greedy, under torch.inference_mode, three ways: the default
          dynamic KV cache, `cache_implementation="static"` (no torch.compile), and `use_cache=False`
          (the whole sequence recomputed at every step). New tokens/s and ms per generate are the
          median over --reps calls after one warm-up call (reported apart); the three outputs are
          checked to be the same tokens.
train     forward + backward + AdamW (lr 3e-4) on batch 32 x 128 tokens (next-token loss), float32
          and with bf16 autocast; median ms per step over --train-steps after two warm-up steps.
          GFLOP/s use rljax's count (6 x (parameters without the token embedding) + 12 x T x D x L
          per token), and the percentage is of a float32 matmul peak measured in the same run, as
          `benchmarks/forward_backward.py` reports its own.

Compare figures taken on the same machine in the same sitting; the ratio is what carries over.
"""
from __future__ import annotations

import peer_common as pc  # first: sets the offline environment before the HF imports

import argparse  # noqa: E402
import time  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=pc.HelpFormatter)
    ap.add_argument("--parts", default="generate,train", help="comma-separated: generate, train")
    ap.add_argument("--caches", default="dynamic,static,none",
                    help="generate modes, comma-separated: dynamic, static, none (use_cache=False)")
    ap.add_argument("--vocab", type=int, default=64, help="vocabulary size")
    ap.add_argument("--d-model", type=int, default=256, help="hidden size")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (as many key/value heads)")
    ap.add_argument("--mlp", type=int, default=688, help="SwiGLU hidden width (1024: the TRL scripts' model)")
    ap.add_argument("--batch", type=int, default=32, help="generate: rows")
    ap.add_argument("--prompt", type=int, default=64, help="generate: prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per row (always all of them)")
    ap.add_argument("--reps", type=int, default=5,
                    help="generate: timed calls per cache mode (no cache: 1); decode.py times 5 for its HF-shape rows")
    ap.add_argument("--train-batch", type=int, default=32, help="train: rows per step")
    ap.add_argument("--train-seq", type=int, default=128, help="tokens per training row")
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per precision after 2 warm-up steps")
    ap.add_argument("--train-precisions", default="fp32,bf16",
                    help="train: comma-separated fp32, bf16 (bf16 autocast; very slow on CPUs without native bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init and the data")
    return ap.parse_args()


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    x = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        x @ x
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ x
        times.append(time.perf_counter() - t)
    return 2 * n**3 / pc.median(times) / 1e9


def bench_generate(model, a) -> None:
    import torch

    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(3, a.vocab, (a.batch, a.prompt), generator=g)
    mask = torch.ones_like(prompt)
    modes = {"dynamic": ("dynamic KV cache (default)", {}),
             "static": ("static KV cache, no compile", {"cache_implementation": "static"}),
             "none": ("no cache (use_cache=False)", {"use_cache": False})}

    def generate(kw):
        with torch.inference_mode():
            return model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, **kw)

    print(f"\n[generate] {describe(model, a.mlp)}, fp32, batch {a.batch}, prompt {a.prompt}, "
          f"{a.new_tokens} new tokens, greedy")
    outputs = {}
    for key in [m.strip() for m in a.caches.split(",") if m.strip()]:
        label, kw = modes[key]
        try:
            t = time.perf_counter()
            out = generate(kw)
            first = time.perf_counter() - t
            times = []
            for _ in range(1 if key == "none" else a.reps):
                t = time.perf_counter()
                out = generate(kw)
                times.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - one failing mode must not hide the others
            print(f"  {label:28s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        s = pc.median(times)
        outputs[label] = out
        print(f"  {label:28s} {a.batch * a.new_tokens / s:9.0f} new tok/s  ({s * 1e3:8.1f} ms per generate, "
              f"{s / a.new_tokens * 1e3:6.2f} ms/token-step; median of {len(times)}; first call {first:.2f} s)")
    if len(outputs) > 1:
        ref_label, ref = next(iter(outputs.items()))
        same = all(torch.equal(o, ref) for o in outputs.values())
        print(f"  all modes give the same tokens as the {ref_label}: {same}")


def bench_train(model, a, peak: float) -> None:
    import torch

    n = sum(p.numel() for p in model.parameters())
    n_body = n - a.vocab * a.d_model  # rljax's count leaves out the token embedding only
    T = a.train_seq
    flops = (6 * n_body + 12 * T * a.d_model * a.layers) * a.train_batch * T
    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, a.vocab, (a.train_batch, T), generator=g)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    print(f"\n[train] fwd+bwd+AdamW, {describe(model, a.mlp)}, batch {a.train_batch} x {T} tokens")
    precisions = [p.strip() for p in a.train_precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--train-precisions: fp32 and/or bf16, got {a.train_precisions!r}")
    for bf16 in [p == "bf16" for p in precisions]:
        for _ in range(2):
            step(bf16)
        times = []
        for _ in range(a.train_steps):
            t = time.perf_counter()
            loss = step(bf16)
            times.append(time.perf_counter() - t)
        s = pc.median(times)
        print(f"  {'bf16 autocast' if bf16 else 'float32':13s} {s * 1e3:7.1f} ms/step | "
              f"{a.train_batch * T / s:7.0f} tok/s | {flops / s / 1e9:6.1f} GFLOP/s | "
              f"{flops / s / 1e9 / peak * 100:5.1f}% of fp32 peak | loss {loss:.3f} (median of {len(times)})")


def describe(model, mlp: int) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"{n / 1e6:.2f}M params, d{c.hidden_size} L{c.num_hidden_layers} heads "
            f"{c.num_attention_heads}/{c.num_key_value_heads} mlp {mlp} vocab {c.vocab_size}")


def main() -> None:
    a = parse_args()
    pc.set_threads(a.threads)
    import torch

    torch.manual_seed(a.seed)
    print("== HF generate and torch train step (peer of benchmarks/decode.py and benchmarks/forward_backward.py)")
    print(pc.versions())
    print(f"config: {vars(a)}")
    cfg = pc.llama_config(vocab=a.vocab, d_model=a.d_model, layers=a.layers, heads=a.heads, mlp=a.mlp,
                          max_positions=max(512, a.prompt + a.new_tokens, a.train_seq))
    model = pc.build_model(cfg, a.seed).eval()
    print(f"attention implementation: {model.config._attn_implementation}")
    parts = {p.strip() for p in a.parts.split(",")}
    if "generate" in parts:
        bench_generate(model, a)
    if "train" in parts:
        peak = matmul_peak_gflops()
        print(f"\nmeasured matmul peak: float32 {peak:.1f} GFLOP/s (2048 x 2048, median of 10)")
        bench_train(model, a, peak)
    print(f"\npeak RSS {pc.peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
