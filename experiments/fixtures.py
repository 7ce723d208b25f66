"""What the HF studies' `--smoke` runs start from (`grpo_math`, `r1_pipeline`): the test fixtures'
tiny Qwen2 architecture and tokenizer, and eight GSM8K rows. Not a study: the studies import it,
none imports another study."""
from __future__ import annotations

import os
import shutil

import jax

from rljax.distributed import on_main
from rljax.eval import TOKENIZER_FILES
from rljax.models.hf import config_from_hf, read_hf_config, save_pretrained
from rljax.models.transformer import Model
from rljax.tokenizer import HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SMOKE_ARCH = os.path.join(FIXTURES, "hf", "qwen2")
SMOKE_TOKENIZER = os.path.join(FIXTURES, "hf_tokenizer")
SMOKE_DATA = os.path.join(FIXTURES, "math", "gsm8k_tiny.jsonl")


def write_smoke_model(path: str, seed: int = 0) -> str:
    """An HF checkpoint directory for --smoke: the Qwen2 fixture's architecture, random weights and
    vocab_size = the tokenizer fixture's, saved with save_pretrained, plus the tokenizer fixture's files
    (on several processes every one calls it and process 0 writes)."""
    tok = HFTokenizer.from_pretrained(SMOKE_TOKENIZER)
    arch = config_from_hf(read_hf_config(SMOKE_ARCH), vocab_size=tok.vocab_size, max_seq_len=512)
    params = jax.jit(Model(arch).init)(jax.random.key(seed))  # jitted: one compile, not op by op
    save_pretrained(params, arch, path, overwrite=True,
                    extra_config=dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    # several processes: each takes part in save_pretrained, process 0 copies the tokenizer's files
    on_main(f"write_smoke_model: {path}", _copy_tokenizer_files, path)
    return path


def _copy_tokenizer_files(path: str) -> None:
    for name in os.listdir(SMOKE_TOKENIZER):
        if name in TOKENIZER_FILES:
            shutil.copy(os.path.join(SMOKE_TOKENIZER, name), path)
