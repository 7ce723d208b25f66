"""Math word problems (GSM8K, MATH: `rljax.data.math.MathProblem`) as a `Task` of a Hugging Face model.

    tok = HFTokenizer.from_pretrained(model_dir)
    task = math_task(tok, style="think")                   # or "boxed"
    problems = read_problems("gsm8k_train.jsonl", "gsm8k")   # no generator: the problems come from data
    task.prompt(problems[0])     # the chat template over [system, user: question], with the assistant header
    task.reference(problems[0])  # "<think>\\n<solution>\\n</think>\\n<answer>18</answer>"
    task.check(problems[0], completion), task.well_formed(completion), task.gold_score(problems[0], completion)

so every recipe written against `rljax.tasks.Task` (`rljax.r1.r1_pipeline`, expert iteration, the
evaluations) runs on real checkpoints and data sets unchanged. What the task's functions are:

  prompt      `chat_prompt(tok, question, system_prompt)`: the model's chat template; when the tokenizer
              prepends bos itself (`add_bos_token`) and the template also writes it, the template's copy is
              dropped from the text, so `encode(prompt)` (add_bos=True, as the recipes encode) gives exactly
              the template's ids
  reference   `sft_target(problem, style)`: the worked solution in the answer style
                boxed  "<solution>\\nThe final answer is \\boxed{<answer>}."
                think  "<think>\\n<solution>\\n</think>\\n<answer><answer></answer>"
              where the chat template's generation prompt already ends in "<think>" (R1-distill models),
              the think reference starts after it: "<solution>\\n</think>\\n<answer>...", no second tag
  check       the final answer (`extract_answer`) equals the reference (`answers_match`): the reward of
              `rljax.rewards.math_answers.math_answer_reward`
  well_formed well_formed(completion, prompt=None). think: `think_answer_format_reward([prompt], [completion])`
              = 1, so a prompt ending in "<think>" supplies the opening tag; without a prompt, the task's
              own prompts decide (whether its chat template ends the generation prompt in "<think>").
              boxed: exactly one closed \\boxed{...}. `format_reward` passes each sample's prompt.
  gold_score  0.8 · right + 0.2 · well formed (the order synthetic preference pairs are labelled by)
  corrupt     "wrong_answer" (the reference with another final answer: a number moved by ±1..9, else a
              digit changed, another choice letter, "+1" appended or the answer negated, the first that
              `check` rejects; ValueError naming the answer when none is), "truncated" (the first half of
              the solution, no answer), "unformatted" (the solution and the right answer outside the
              style's markers)
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable

import numpy as np

from rljax.data.adapters import DataError, _json_lines, _read_text, load_records
from rljax.data.math import MathProblem, answers_match, extract_answer, gsm8k, last_boxed, math_problems, \
    normalize_number
from rljax.rewards.math_answers import prefills_think, think_answer_format_reward
from rljax.tasks.base import Task

__all__ = ["ANSWER_STYLES", "MATH_CORRUPTIONS", "SYSTEM_PROMPTS", "chat_prompt", "math_answer_correct",
           "math_task", "read_problems", "sft_target"]

SYSTEM_PROMPTS = {
    "boxed": "Solve the math problem step by step. Put the final answer in \\boxed{}.",
    "think": ("A conversation between User and Assistant. The Assistant first thinks about the reasoning process "
              "and then gives the answer. The reasoning is enclosed in <think> </think> and the answer in "
              "<answer> </answer> tags: <think> reasoning </think><answer> answer </answer>."),
}
ANSWER_STYLES = tuple(SYSTEM_PROMPTS)
MATH_CORRUPTIONS = ("wrong_answer", "truncated", "unformatted")
_RIGHT_WEIGHT, _FORMAT_WEIGHT = 0.8, 0.2  # gold_score = 0.8 · right + 0.2 · well formed


def _check_style(style: str) -> str:
    if style not in SYSTEM_PROMPTS:
        raise ValueError(f"style: {style!r} is not one of {list(ANSWER_STYLES)}")
    return style


def read_problems(source: str, data_format: str) -> list[MathProblem]:
    """Problems of a GSM8K- or MATH-style data set. .jsonl / .json files are read directly (no
    `datasets` needed); anything else goes through load_records. Errors name the file and row."""
    if data_format not in ("gsm8k", "math"):
        raise ValueError(f"data_format: {data_format!r} is not 'gsm8k' or 'math'")
    if not source:
        raise ValueError("no data file given")
    adapter = gsm8k if data_format == "gsm8k" else math_problems
    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        text = _read_text(source)
        rows = None
        if source.endswith(".json"):  # one JSON list, or JSON lines under a .json name (as datasets allows)
            try:
                rows = json.loads(text)
            except json.JSONDecodeError:
                pass
        if rows is None:
            rows = []
            for lineno, line in _json_lines(text):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{source}: expected a list of rows, got {type(rows).__name__}")
    else:
        rows = load_records(source)
    try:
        problems = adapter(rows)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    if not problems:
        raise DataError(f"{source}: no problems")
    return problems


def chat_prompt(tok, question: str, system_prompt: str | None) -> str:
    """The prompt text of one problem, the same in SFT and RL: the model's chat template over
    [system, user] with the generation prompt (the assistant header), so the completion is the
    assistant's reply. Tokenize with add_bos=False: the template writes bos itself."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def sft_target(problem: MathProblem, style: str, *, prefilled_think: bool = False) -> str:
    """The reference solution written in the answer style the reward reads (see the module docstring).
    prefilled_think: the prompt already ends in "<think>" (the chat template opens the reasoning), so
    the think-style target starts inside the reasoning block rather than opening a second one."""
    if _check_style(style) == "think":
        opening = "" if prefilled_think else "<think>\n"
        return f"{opening}{problem.solution}\n</think>\n<answer>{problem.answer}</answer>"
    return f"{problem.solution}\nThe final answer is \\boxed{{{problem.answer}}}."


def math_answer_correct(problem: MathProblem, completion: str) -> float:
    """1.0 when the completion's final answer (`extract_answer`) equals the problem's (`answers_match`), else 0.0:
    `math_answer_reward` of one completion."""
    return float(answers_match(extract_answer(completion), problem.answer))


def _well_formed(style: str, default_prompt: Callable[[], str]):
    """well_formed(completion, prompt=None) of the style; a None prompt is `default_prompt()`'s text."""
    if style == "think":
        def think_answer(completion: str, prompt: str | None = None) -> bool:
            context = default_prompt() if prompt is None else prompt
            return bool(think_answer_format_reward([context], [completion])[0])

        return think_answer

    def boxed_once(completion: str, prompt: str | None = None) -> bool:
        try:
            return len(re.findall(r"\\(?:boxed|fbox)\b", completion)) == 1 and last_boxed(completion) is not None
        except ValueError:  # an unclosed \boxed{
            return False

    return boxed_once


_CHOICE = re.compile(r"(?<![A-Za-z\\])[A-E](?![A-Za-z])")  # a multiple-choice letter, "A" or "\text{(B)}"


def _wrong_answers(answer: str, rng: np.random.Generator):
    """Candidate wrong final answers, most plausible first: a number moved by ±1..9 (an integer stays one);
    else one digit changed, another choice letter (A-E), "+1" appended, the answer negated. Appending a digit
    is not among them: math-verify reads "\\frac{1}{2}1" or "\\pi1" as a product with 1, the same value."""
    value = normalize_number(answer)
    if value is not None:
        for _ in range(3):
            shifted = value + int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
            yield str(int(shifted)) if shifted.denominator == 1 else str(float(shifted))
        return
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    for _ in range(5 if digits else 0):
        i = digits[int(rng.integers(len(digits)))]
        other = [d for d in "0123456789" if d != answer[i]]
        yield answer[:i] + other[int(rng.integers(len(other)))] + answer[i + 1:]
    choices = list(_CHOICE.finditer(answer))
    if choices:
        m = choices[-1]
        other = [c for c in "ABCDE" if c != m.group()]
        yield answer[:m.start()] + other[int(rng.integers(len(other)))] + answer[m.end():]
    yield f"{answer}+1"
    yield f"-({answer})"


def _corrupt(style: str, reference_of: Callable[[MathProblem, str], str]):
    """corrupt(problem, rng, kind); reference_of(problem, answer): the problem's reference with that final answer."""
    def corrupt(problem: MathProblem, rng: np.random.Generator, kind: str) -> str:
        if kind == "wrong_answer":
            tried = []
            for answer in _wrong_answers(problem.answer, rng):
                completion = reference_of(problem, answer)
                if not math_answer_correct(problem, completion):  # the value must change, not just the text
                    return completion
                tried.append(answer)
            raise ValueError(f"math task: found no wrong answer for the reference answer {problem.answer!r}: "
                             f"every candidate tried ({', '.join(map(repr, tried))}) still equals it")
        if kind == "truncated":
            words = problem.solution.split()
            return " ".join(words[:max(len(words) // 2, 1)])
        if kind == "unformatted":
            return f"{problem.solution}\nSo the answer is {problem.answer}."
        raise ValueError(f"math task: unknown corruption {kind!r}; expected one of {MATH_CORRUPTIONS}")

    return corrupt


def _no_generator(rng, level):
    raise ValueError("the math task has no problem generator: its problems come from data files "
                     "(`rljax.tasks.math.read_problems`); split them yourself")


def math_task(tok, *, style: str = "think", system_prompt: str | None = None, name: str | None = None) -> Task:
    """GSM8K / MATH problems as a `Task` of the Hugging Face tokenizer `tok` (its chat template) and the answer
    `style` ("think" or "boxed"); system_prompt: None for the style's default (SYSTEM_PROMPTS), "" for none.
    name: default "math-<style>". See the module docstring for each function."""
    style = _check_style(style)
    system = SYSTEM_PROMPTS[style] if system_prompt is None else system_prompt
    bos = getattr(tok, "special_tokens", {}).get("bos_token") if getattr(tok, "add_bos_token", False) else None

    def prompt(problem: MathProblem) -> str:
        text = chat_prompt(tok, problem.question, system)
        # encode(add_bos=True) prepends bos: the template's own copy would make two
        return text[len(bos):] if bos and text.startswith(bos) else text

    @functools.cache
    def template_prompt() -> str:
        # The generation prompt's end does not depend on the question: one rendering tells whether the
        # template opens the reasoning ("<think>"), for a well_formed called without its prompt (rejection
        # sampling calls well_formed(completion)).
        return prompt(MathProblem("1 + 1 = ?", "", "2"))

    well_formed = _well_formed(style, template_prompt)

    def reference_of(problem: MathProblem, answer: str) -> str:
        return sft_target(MathProblem(problem.question, problem.solution, answer), style,
                          prefilled_think=prefills_think(prompt(problem)))

    def gold_score(problem: MathProblem, completion: str) -> float:
        return (_RIGHT_WEIGHT * math_answer_correct(problem, completion)
                + _FORMAT_WEIGHT * float(well_formed(completion, prompt(problem))))

    return Task(name=name or f"math-{style}", generate=_no_generator, key=lambda p: p.question,
                extract=extract_answer, check=lambda p, c: bool(math_answer_correct(p, c)), gold_score=gold_score,
                corrupt=_corrupt(style, reference_of), corruptions=MATH_CORRUPTIONS, prompt=prompt,
                reference=lambda p: reference_of(p, p.answer), separator=None, well_formed=well_formed,
                well_formed_reads_prompt=True, alphabet=None,
                description=f"math word problems from data files, answers in the {style} style, prompts through "
                            "the model's chat template")
