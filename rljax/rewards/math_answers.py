"""Rule rewards for real math problems: final-answer correctness and the R1 reasoning format.

Both follow the reward-function contract of `rljax.rewards.rules`:
``reward_fn(prompts, completions, **metadata) -> float32[B]``.

  math_answer_reward         1 if the completion's final answer (`rljax.data.math.extract_answer`)
                             equals the reference (`answers_match`), else 0; metadata `answers`
  think_answer_format_reward 1 for "<think>reasoning</think><answer>answer</answer>" and nothing
                             else, else 0 (no partial credit)
  think_answer_tag_reward    partial credit for the same format: 0.25 per tag that appears exactly
                             once, for a model that does not yet produce the full format
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from rljax.data.math import answers_match, extract_answer

__all__ = ["math_answer_reward", "prefills_think", "think_answer_format_reward", "think_answer_tag_reward",
           "THINK_ANSWER_TAGS"]

THINK_ANSWER_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK_ANSWER = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def prefills_think(prompt: str) -> bool:
    """Whether the prompt ends in "<think>": R1-style prompts (a chat template's generation prompt, e.g.
    R1-distill models') often open the reasoning so that the model starts at once."""
    return prompt.rstrip().endswith("<think>")


def _with_prefilled_think(prompt: str, completion: str) -> str:
    """The completion with the prompt's opening "<think>" (`prefills_think`), which then belongs to the
    completion for format purposes."""
    return "<think>" + completion if prefills_think(prompt) else completion


def math_answer_reward(prompts, completions, *, answers: Sequence[str], **_) -> np.ndarray:
    """1 when the final answer extracted from the completion equals `answers[i]` mathematically
    (\\frac{1}{2} = 0.5, 1,234 = 1234; see `rljax.data.math.answers_match`), else 0. A completion
    without an extractable answer, or with a malformed one (an unclosed \\boxed{), earns 0."""
    return np.array([float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers)], np.float32)


def think_answer_format_reward(prompts, completions, **_) -> np.ndarray:
    """1 when the completion is exactly "<think>T</think><answer>A</answer>" (whitespace around
    and between the blocks allowed), with T and A non-empty and each of the four tags appearing
    once, else 0. A prompt ending in "<think>" counts as the completion's opening tag."""
    out = []
    for p, c in zip(prompts, completions):
        text = _with_prefilled_think(p, c)
        m = _THINK_ANSWER.fullmatch(text)
        ok = (m is not None and m.group("think").strip() != "" and m.group("answer").strip() != ""
              and all(text.count(tag) == 1 for tag in THINK_ANSWER_TAGS))
        out.append(float(ok))
    return np.array(out, np.float32)


def think_answer_tag_reward(prompts, completions, **_) -> np.ndarray:
    """Σ over the four tags <think>, </think>, <answer>, </answer> of 0.25 · [tag appears exactly
    once]: partial credit in [0, 1] that does not check the order (pair it with
    `think_answer_format_reward` for that). A prompt ending in "<think>" supplies that tag."""
    out = []
    for p, c in zip(prompts, completions):
        text = _with_prefilled_think(p, c)
        out.append(sum(0.25 for tag in THINK_ANSWER_TAGS if text.count(tag) == 1))
    return np.array(out, np.float32)
