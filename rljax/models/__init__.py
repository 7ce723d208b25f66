"""Model stack: config, transformer, pure-function wrapper, log-probabilities, HF checkpoints."""
from rljax.models.config import PRESETS, RopeScaling, TransformerConfig, preset
from rljax.models.hf import CheckpointFormatError, load_pretrained, save_pretrained
from rljax.models.transformer import KVCache, Model, Transformer, add_head, last_token_index

__all__ = ["PRESETS", "RopeScaling", "TransformerConfig", "preset", "KVCache", "Model", "Transformer", "add_head",
           "last_token_index", "CheckpointFormatError", "load_pretrained", "save_pretrained"]
