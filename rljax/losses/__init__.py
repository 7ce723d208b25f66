"""Losses: pure functions `loss(params, batch, *, model, cfg) -> (scalar, metrics)`."""
from rljax.losses.sft import SFTConfig, sft_loss

__all__ = ["SFTConfig", "sft_loss"]
