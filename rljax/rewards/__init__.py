"""Rewards: host-side rule rewards on decoded text, and the checks around calling them."""
from rljax.rewards.rules import (RewardError, arithmetic_answer_reward, arithmetic_format_reward,
                                 arithmetic_step_reward, length_penalty, score, weighted_sum)

__all__ = ["RewardError", "arithmetic_answer_reward", "arithmetic_format_reward", "arithmetic_step_reward",
           "length_penalty", "score", "weighted_sum"]
