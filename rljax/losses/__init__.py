"""Losses: pure functions `loss(params, batch, *, model, cfg) -> (scalar, metrics)`."""
from rljax.losses.actor_critic import A2CConfig, PPOConfig, a2c_loss, ppo_loss, with_value_head
from rljax.losses.grpo import CISPOConfig, GRPOConfig, GSPOConfig, cispo_loss, grpo_loss, gspo_loss
from rljax.losses.kl_control import adaptive_kl_controller, fixed_kl_controller
from rljax.data.batch import PolicyBatch
from rljax.losses.policy_gradient import MRTConfig, ReinforceConfig, mrt_distribution, mrt_loss, reinforce_loss
from rljax.losses.preference import (PREFERENCE_METHODS, DPOConfig, KTOConfig, ORPOConfig, SimPOConfig, dpo_loss,
                                     kto_loss, orpo_loss, preference_loss, simpo_loss)
from rljax.losses.reward_model import (FeedbackConfig, ImplicitPRMConfig, PointwiseConfig, RankingConfig,
                                      TokenLabelConfig, feedback_loss, implicit_prm_loss, pointwise_loss,
                                      ranking_loss, reward_model_loss, token_label_loss)
from rljax.losses.sft import SFTConfig, sft_loss
from rljax.losses.trpo import TRPOConfig, trpo_update

__all__ = ["PREFERENCE_METHODS", "DPOConfig", "KTOConfig", "ORPOConfig", "SimPOConfig", "dpo_loss", "kto_loss",
           "orpo_loss", "preference_loss", "simpo_loss",
           "FeedbackConfig", "ImplicitPRMConfig", "PointwiseConfig", "RankingConfig", "TokenLabelConfig",
           "feedback_loss", "implicit_prm_loss", "pointwise_loss", "ranking_loss", "reward_model_loss",
           "token_label_loss", "A2CConfig", "CISPOConfig", "GRPOConfig", "GSPOConfig", "cispo_loss",
           "gspo_loss", "MRTConfig", "PPOConfig", "PolicyBatch", "ReinforceConfig",
           "SFTConfig", "TRPOConfig", "a2c_loss", "adaptive_kl_controller", "fixed_kl_controller", "grpo_loss",
           "mrt_distribution", "mrt_loss", "ppo_loss", "reinforce_loss", "sft_loss",
           "trpo_update", "with_value_head"]
