"""Helpers shared by the peer scripts in this folder (imported as a sibling module, not part of rljax).

Importing this module first makes the Hugging Face libraries work offline: nothing is downloaded,
every model is built from a config with a seeded random initialisation and every tokenizer is
built in code. It needs only the peer environment (`make peer-env`), never jax or rljax.
"""
from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import warnings  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402

# transformers 5 warns about its own renamed attribute whenever TRL reads it: noise in every step's output
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# rljax.tokenizer.CharTokenizer's vocabulary, in its order: pad 0, bos 1, eos 2, then one id per
# character of rljax.tokenizer.DEFAULT_ALPHABET (58 entries). Kept as a literal so these scripts
# run without rljax installed; tests/test_peer_scripts.py checks that the two stay equal.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
ALPHABET = string.digits + "+-*/=()<>.,:;?!'\"" + " \n" + string.ascii_lowercase


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def char_tokenizer(padding_side: str = "left", bos: bool = False):
    """A `PreTrainedTokenizerFast` with one token per character and the ids of rljax's CharTokenizer.

    With bos=True, encoding prepends "<s>" as rljax's CharTokenizer does; otherwise it adds no special
    token. A character outside the alphabet is an error, not an unknown token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, bos_tok, eos = SPECIAL_TOKENS
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # "<unk>" absent: unknown chars raise
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, "\n" too
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos_tok} $A", pair=f"{bos_tok} $A $B",
                                                            special_tokens=[(bos_tok, vocab[bos_tok])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, bos_token=bos_tok, eos_token=eos,
                                   padding_side=padding_side, clean_up_tokenization_spaces=False)


def llama_config(*, vocab: int, d_model: int, layers: int, heads: int, mlp: int, max_positions: int = 512,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    """Llama shape matching rljax's TransformerConfig at the same numbers: multi-head attention (as many
    key/value heads as query heads), SwiGLU MLP, untied LM head, RoPE theta 10,000, RMSNorm eps 1e-6."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=False, rope_theta=10_000.0, rms_norm_eps=1e-6,
                       pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)


def build_model(config, seed: int, cls=None):
    """A randomly initialised float32 model from `config` (LlamaForCausalLM unless `cls` is given)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(config).float()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    return model


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def versions() -> str:
    import sys

    import torch

    # benchmarks/cpuinfo.py (no jax import), shared with rljax's benchmark banners; it reads
    # rljax.host_memory from the source tree (the project root), which needs no jax either
    bench_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [bench_dir, os.path.dirname(bench_dir)]
    from cpuinfo import cpu_description, host_memory_description

    parts = [f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    for name in ("transformers", "trl", "datasets", "tokenizers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts.append(f"{cpus} cpus | {cpu_description()} | {host_memory_description()}")
    return " | ".join(parts)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def checkpointing(args_cls, on: bool) -> dict:
    """The keyword that turns gradient (activation) checkpointing on or off in `args_cls`: transformers 5
    renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def step_clock():
    """A transformers TrainerCallback that records the wall seconds of every optimizer step (`.times`)
    and prints one line per step in place of the progress bar and log dictionaries."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)
            print(f"  step {len(self.times)}/{state.max_steps}: {self.times[-1]:.3f} s", flush=True)

    return StepClock()


def no_dataset_progress_bars() -> None:
    """The trainers' constructors map over the data set; their progress bars are noise here."""
    import datasets

    datasets.disable_progress_bars()


def quiet(trainer) -> None:
    """Drop the trainer's progress bar and per-step log printing (the logs stay in state.log_history)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
