"""Model stack: config, transformer, pure-function wrapper, log-probabilities."""
from rljax.models.config import PRESETS, TransformerConfig, preset
from rljax.models.transformer import KVCache, Model, Transformer, add_head, last_token_index

__all__ = ["PRESETS", "TransformerConfig", "preset", "KVCache", "Model", "Transformer", "add_head", "last_token_index"]
