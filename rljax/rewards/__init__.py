"""Rewards: host-side rule rewards on decoded text and the checks around calling them; learned
rewards (reward models, verifiers, process reward models) as reward functions; best-of-N; an AI judge
(RLAIF, `rljax.rewards.judge`)."""
from rljax.rewards.judge import Judge, JudgeConfig, judge_pairwise, judge_pointwise, pairwise_reward, pointwise_reward
from rljax.rewards.math_answers import math_answer_reward, think_answer_format_reward, think_answer_tag_reward
from rljax.rewards.learned import (STEP_AGGREGATIONS, aggregate_steps, best_of_n, likelihood_reward,
                                        majority_vote, prm_reward, reward_model_reward, running_normaliser,
                                        step_scorer)
from rljax.rewards.rules import (RewardCallConfig, RewardError, Scores, arithmetic_answer_reward,
                                 arithmetic_format_reward, arithmetic_step_reward, length_penalty, score,
                                 RewardSum, TrainingProgress, score_with_failures, weighted_sum)

__all__ = ["Judge", "JudgeConfig", "RewardCallConfig", "RewardError", "STEP_AGGREGATIONS", "Scores", "aggregate_steps",
           "arithmetic_answer_reward", "arithmetic_format_reward", "arithmetic_step_reward", "best_of_n",
           "judge_pairwise", "judge_pointwise", "length_penalty", "likelihood_reward", "majority_vote", "math_answer_reward", "pairwise_reward", "pointwise_reward", "prm_reward",
           "RewardSum", "reward_model_reward", "running_normaliser", "score", "score_with_failures", "step_scorer",
           "think_answer_format_reward", "think_answer_tag_reward", "TrainingProgress", "weighted_sum"]
