"""Losses: pure functions `loss(params, batch, *, model, cfg) -> (scalar, metrics)`."""
from rljax.losses.grpo import GRPOConfig, grpo_advantages, grpo_loss
from rljax.losses.policy_gradient import (MRTConfig, PolicyBatch, ReinforceConfig, mrt_distribution, mrt_loss,
                                          reinforce_advantages, reinforce_loss)
from rljax.losses.sft import SFTConfig, sft_loss

__all__ = ["GRPOConfig", "MRTConfig", "PolicyBatch", "ReinforceConfig", "SFTConfig", "grpo_advantages", "grpo_loss",
           "mrt_distribution", "mrt_loss", "reinforce_advantages", "reinforce_loss", "sft_loss"]
