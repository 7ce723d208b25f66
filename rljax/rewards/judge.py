"""An AI judge (RLAIF): a causal LM asked which of two answers is better, or whether one answer is good.

A judge is any causal LM with its tokenizer, `Judge(model, params, tokenizer, cfg)`: an rljax model
(e.g. `CharTokenizer` and a tiny preset) or a Hugging Face checkpoint loaded by
`rljax.models.load_pretrained` with its `HFTokenizer`. The question and the answers are written into a
text template (`JudgeConfig.pairwise_template`, `pointwise_template`); when the tokenizer has a chat
template the text is the user message, rendered with the generation prompt
(`HFTokenizer.apply_chat_template`), so the judge's reply comes next.

Pairwise (Lee et al. 2023, RLAIF). With ℓ_1, ℓ_2 the judge's next-token logits of the two choice
tokens (`choice_tokens`, default "1" and "2") at the position right after the prompt,

    P(first better | q, a, b) = softmax(ℓ_1, ℓ_2)_1 = σ(ℓ_1 − ℓ_2).

Position bias: both orders are judged and averaged,

    p_ab = P(first better | q, a, b),  p_ba = P(first better | q, b, a),
    p(a ≻ b) = ½ (p_ab + 1 − p_ba),

and a pair is position-consistent when both orders pick the same answer, (p_ab > ½) = (p_ba < ½); the
position-consistency rate is the fraction of such pairs (`position_consistency`).

Pointwise (the direct form of RLAIF): P(yes | q, a) = softmax over the `yes_no` tokens' logits, first
entry; or an expected score E[s] = Σ_k softmax(ℓ)_k · v_k over a score vocabulary (`score_tokens` with
values `score_values`).

Batching: prompts are right-padded to a bucketed width and the row count to a bucketed size
(`rljax.buckets.bucket_length`, the reward-model scorer's `_batch_rows`), in chunks of
`JudgeConfig.batch_size` rows, so the one jitted forward compiles a few times in a run.

Errors: a choice token that is not a single token of the tokenizer is a ValueError naming it; a prompt
longer than the judge's max_seq_len is a ValueError naming the sample (its question and answers, and for a
pair the order) and the sizes; a non-finite judge logit is a `JudgeOutputError` naming the sample.
"""
from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax.distributed import process_local

__all__ = ["Judge", "JudgeConfig", "JudgeOutputError", "PairwiseJudgement", "choice_ids", "choice_logits", "consistent_pairs",
           "expected_score", "judge_pairwise", "judge_pointwise", "judge_prompt_ids", "order_averaged",
           "pairwise_prompt", "pairwise_reward", "pointwise_prompt", "pointwise_reward", "position_consistency",
           "judge_accuracy"]


class JudgeOutputError(ValueError):
    """The judge gave a non-finite logit for a sample (named in the message)."""


def _check_template(name: str, template: str, fields: tuple[str, ...]) -> None:
    """A str.format template must show every one of `fields` (a pairwise template without {second} would
    have the judge compare an answer with nothing, and p would still look like a preference) and no other
    field; a field it cannot fill (a format spec such as {question:d}, an attribute {first.x}) is refused
    here too, naming the template."""
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # an unbalanced brace
        raise ValueError(f"JudgeConfig.{name}: not a str.format template: {e}") from None
    other = sorted({f for f in used if f not in fields})
    if other:
        raise ValueError(f"JudgeConfig.{name}: uses the field(s) {other}; its fields are "
                         f"{', '.join('{' + f + '}' for f in fields)}")
    missing = [f for f in fields if f not in used]
    if missing:
        raise ValueError(f"JudgeConfig.{name}: never shows {', '.join('{' + f + '}' for f in missing)}; the "
                         f"template must show every one of {', '.join('{' + f + '}' for f in fields)}")
    try:
        template.format(**{f: "x" for f in fields})
    except (ValueError, TypeError) as e:  # e.g. a format spec that a string does not take
        raise ValueError(f"JudgeConfig.{name}: cannot be filled with text answers: {e}") from None


@dataclass(frozen=True)
class JudgeConfig:
    """How a judge is asked.

    pairwise_template: a str.format template that shows each of {question}, {first}, {second} and no other
    field (checked); choice_tokens: the two tokens that mean "first better" and "second better".
    pointwise_template: likewise with {question}, {answer};
    yes_no: the tokens meaning yes and no; score_tokens / score_values: a score vocabulary and the value
    of each token (`expected_score`). chat: render the filled template through the tokenizer's chat
    template when it has one (add_bos is then the template's business). batch_size: rows per forward;
    min_bucket: the narrowest padded width."""

    pairwise_template: str = "{question}\n1:{first}\n2:{second}\nbetter:"
    choice_tokens: tuple[str, str] = ("1", "2")
    pointwise_template: str = "{question}\n{answer}\ngood:"
    yes_no: tuple[str, str] = ("y", "n")
    score_tokens: tuple[str, ...] = tuple("0123456789")
    score_values: tuple[float, ...] = tuple(float(v) for v in range(10))
    chat: bool = True
    batch_size: int = 64
    min_bucket: int = 16

    def __post_init__(self):
        if len(self.choice_tokens) != 2 or len(self.yes_no) != 2:
            raise ValueError(f"JudgeConfig: choice_tokens and yes_no need two tokens each, got "
                             f"{self.choice_tokens}, {self.yes_no}")
        if len(self.score_tokens) != len(self.score_values) or len(self.score_tokens) < 2:
            raise ValueError(f"JudgeConfig: score_tokens ({len(self.score_tokens)}) and score_values "
                             f"({len(self.score_values)}) must have the same length >= 2")
        if not all(np.isfinite(v) for v in self.score_values):
            raise ValueError(f"JudgeConfig.score_values: must be finite, got {self.score_values}")
        for name in ("batch_size", "min_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"JudgeConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name, fields in (("pairwise_template", ("question", "first", "second")),
                             ("pointwise_template", ("question", "answer"))):
            _check_template(name, getattr(self, name), fields)


@dataclass(frozen=True)
class Judge:
    """A causal LM as a judge: its params, its tokenizer, and how it is asked (cfg).

    model needs `last_hidden(params, tokens [B, T], mask [B, T]) -> hidden [B, D]` (the last layer's state
    at each row's last real token of right-padded rows) and `logits(params, hidden [B, D]) -> [B, V]` (the
    LM head): the judge's next-token logits after a prompt are logits(params, last_hidden(params, tokens,
    mask)), as `rljax.models.Model` computes them.

    On several processes the judge runs on each process's own devices (`rljax.distributed.process_local`,
    done here, a collective: make the Judge on every process at the same point), so a process can judge
    rows of its own (`pairwise_reward` / `pointwise_reward` in the RL iteration)."""

    model: Any
    params: Any
    tokenizer: Any
    cfg: JudgeConfig = JudgeConfig()

    def __post_init__(self):
        model, params = process_local(self.model, self.params)
        object.__setattr__(self, "model", model)  # frozen: set once, here
        object.__setattr__(self, "params", params)


class PairwiseJudgement(NamedTuple):
    """Per pair [N]: p (order-averaged P(a ≻ b)), p_ab (a shown first), p_ba (b shown first: P(b ≻ a) in
    that order), consistent (both orders pick the same answer)."""

    p: np.ndarray
    p_ab: np.ndarray
    p_ba: np.ndarray
    consistent: np.ndarray


# ----------------------------------------------------------------------------- prompts and tokens
def pairwise_prompt(cfg: JudgeConfig, question: str, first: str, second: str) -> str:
    return cfg.pairwise_template.format(question=question, first=first, second=second)


def pointwise_prompt(cfg: JudgeConfig, question: str, answer: str) -> str:
    return cfg.pointwise_template.format(question=question, answer=answer)


def _has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None and hasattr(tokenizer, "apply_chat_template")


def judge_prompt_ids(tokenizer, text: str, *, chat: bool = True) -> list[int]:
    """The judge's input ids for a filled template: the chat template's rendering of one user message
    with the generation prompt (when `chat` and the tokenizer has one), else [bos] text."""
    if chat and _has_chat_template(tokenizer):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer.encode(text, add_bos=True))


def choice_ids(tokenizer, tokens: Sequence[str], *, what: str = "choice_tokens") -> np.ndarray:
    """int32 [K]: the id of each token; a token that is not exactly one token of the tokenizer (or two
    tokens with one id) is a ValueError naming them."""
    ids, bad = [], []
    for t in tokens:
        try:
            enc = list(tokenizer.encode(t, add_bos=False))
        except ValueError:
            enc = []
        if len(enc) != 1:
            bad.append(f"{t!r} -> {enc}")
        else:
            ids.append(enc[0])
    if bad:
        raise ValueError(f"judge: {what} must each be a single token of the tokenizer; not single tokens: "
                         f"{', '.join(bad)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"judge: {what} {tuple(tokens)} map to the same ids {ids}")
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------- the forward
@functools.partial(jax.jit, static_argnames=("model",))
def _choice_logits(params, tokens, mask, ids, *, model):
    """tokens, mask [B, T] (right-padded), ids [K] -> the next-token logits of ids after each row [B, K]."""
    return model.logits(params, model.last_hidden(params, tokens, mask))[:, ids]


def choice_logits(judge: Judge, prompts: Sequence[Sequence[int]], ids: np.ndarray, *,
                  describe: Callable[[int], str] | None = None) -> np.ndarray:
    """float32 [N, K]: the judge's next-token logits of the K `ids` after each of the N prompts (id rows),
    in chunks of cfg.batch_size rows, each padded to bucketed shapes (`rljax.rewards.learned._batch_rows`).

    Every prompt must fit the judge's context, L = model.config.max_seq_len (`_row_limit`; a model without a
    config is not checked): a longer one is a ValueError naming its index, its length, L and, with
    `describe(i) -> str`, the sample it came from (checked before any forward, which would refuse the
    batch without naming a row)."""
    from rljax.rewards.learned import _batch_rows, _row_limit

    if len(prompts) == 0:
        return np.zeros((0, len(ids)), np.float32)
    has_context = getattr(getattr(judge.model, "config", None), "max_seq_len", None) is not None
    fit = _row_limit("judge", judge.model, judge.tokenizer, None, "error", False) if has_context else None
    if fit is not None:
        for i, row in enumerate(prompts):
            if len(row) > fit.limit:
                said = f": {describe(i)}" if describe is not None else ""
                raise ValueError(f"judge: prompt {i} has {len(row)} tokens, more than {fit.what}{said}; shorten "
                                 "the answers or use a judge with a longer context")
    out = []
    for lo in range(0, len(prompts), judge.cfg.batch_size):
        rows = prompts[lo:lo + judge.cfg.batch_size]
        tokens, mask, B = _batch_rows(rows, judge.tokenizer.pad_id, min_bucket=judge.cfg.min_bucket,
                                      limit=None if fit is None else fit.limit)
        out.append(np.asarray(_choice_logits(judge.params, tokens, mask, jnp.asarray(ids), model=judge.model))[:B])
    return np.concatenate(out).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check_finite(logits: np.ndarray, describe) -> None:
    bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=-1))
    if len(bad):
        i = int(bad[0])
        raise JudgeOutputError(f"judge: non-finite logits {logits[i].tolist()} for sample {i} ({len(bad)} such "
                               f"samples): {describe(i)}")


# ----------------------------------------------------------------------------- pairwise
def order_averaged(p_ab, p_ba) -> np.ndarray:
    """p(a ≻ b) = ½ (p_ab + 1 − p_ba): the position-debiased probability [N] from P(first better) with a
    first (p_ab) and with b first (p_ba)."""
    return 0.5 * (np.asarray(p_ab, np.float64) + 1.0 - np.asarray(p_ba, np.float64))


def consistent_pairs(p_ab, p_ba) -> np.ndarray:
    """bool [N]: both orders pick the same answer, (p_ab > ½) == (p_ba < ½) (a tie at ½ in either order
    picks nothing and counts as inconsistent)."""
    p_ab, p_ba = np.asarray(p_ab), np.asarray(p_ba)
    return ((p_ab > 0.5) & (p_ba < 0.5)) | ((p_ab < 0.5) & (p_ba > 0.5))


def position_consistency(p_ab, p_ba) -> float:
    """The position-consistency rate: the fraction of pairs whose two orders pick the same answer."""
    c = consistent_pairs(p_ab, p_ba)
    if c.size == 0:
        raise ValueError("position_consistency: no pairs")
    return float(c.mean())


def judge_pairwise(judge: Judge, questions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> PairwiseJudgement:
    """Judge N pairs (questions[i], a[i], b[i]) in both orders, as one batched pass over 2N prompts.

    p_ab[i] = σ(ℓ_1 − ℓ_2) for the prompt with a[i] first; p_ba[i] the same with b[i] first;
    p = ½ (p_ab + 1 − p_ba) = P(a ≻ b). Shapes [N] float64 (consistent: bool)."""
    if not len(questions) == len(a) == len(b):
        raise ValueError(f"judge_pairwise: {len(questions)} questions, {len(a)} first and {len(b)} second answers")
    cfg = judge.cfg
    ids = choice_ids(judge.tokenizer, cfg.choice_tokens)
    texts = ([pairwise_prompt(cfg, q, x, y) for q, x, y in zip(questions, a, b)]
             + [pairwise_prompt(cfg, q, y, x) for q, x, y in zip(questions, a, b)])
    n = len(questions)

    def describe(i):
        k = i % n if n else 0
        order = "a first" if i < n else "b first"
        return f"pair {k} ({order}): question {questions[k]!r}, a {a[k]!r}, b {b[k]!r}"

    logits = choice_logits(judge, [judge_prompt_ids(judge.tokenizer, t, chat=cfg.chat) for t in texts], ids,
                           describe=describe)
    _check_finite(logits, describe)
    first = _softmax(logits.astype(np.float64))[:, 0]
    p_ab, p_ba = first[:n], first[n:]
    return PairwiseJudgement(order_averaged(p_ab, p_ba), p_ab, p_ba, consistent_pairs(p_ab, p_ba))


def judge_accuracy(judge: Judge, pairs: Sequence[dict]) -> dict:
    """The judge against gold on rows {prompt, chosen, rejected} (chosen the gold-better answer):
    accuracy = mean[p(chosen ≻ rejected) > ½], position_consistency, and pairs (their number)."""
    if not pairs:
        raise ValueError("judge_accuracy: no pairs")
    j = judge_pairwise(judge, [r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                       [r["rejected"] for r in pairs])
    return dict(judge_accuracy=float(np.mean(j.p > 0.5)), judge_position_consistency=float(j.consistent.mean()),
                judge_pairs=len(pairs))


def pairwise_reward(judge: Judge, baseline: Mapping[str, str]) -> callable:
    """The direct form's reward against a fixed baseline answer: fn(prompts, completions, **_) -> float32[B],
    r_i = p(completion_i ≻ baseline(prompt_i)) (order-averaged, `judge_pairwise`). baseline: a mapping
    prompt -> baseline answer (e.g. the SFT policy's greedy answer); anything else (a list of answers, whose
    pairing with prompts would be a guess) is a TypeError naming the argument; a prompt without an answer is
    a KeyError naming it."""
    if not isinstance(baseline, Mapping):
        # dict(["ab", "cd"]) would silently build {"a": "b", "c": "d"}
        raise TypeError(f"pairwise_reward: baseline must be a mapping prompt -> baseline answer, got "
                        f"{type(baseline).__name__}")
    table = dict(baseline)

    def reward(prompts, completions, **_):
        missing = [p for p in prompts if p not in table]
        if missing:
            raise KeyError(f"pairwise_reward: no baseline answer for prompt {missing[0]!r} ({len(missing)} missing)")
        return judge_pairwise(judge, list(prompts), list(completions), [table[p] for p in prompts]).p.astype(
            np.float32)

    reward.__name__ = "judge_pairwise_reward"
    return reward


# ----------------------------------------------------------------------------- pointwise
def judge_pointwise(judge: Judge, questions: Sequence[str], answers: Sequence[str], *,
                    tokens: Sequence[str] | None = None) -> np.ndarray:
    """float64 [N, K]: softmax over the logits of `tokens` (default cfg.yes_no: column 0 is P(yes)) after the
    pointwise prompt of each (question, answer)."""
    if len(questions) != len(answers):
        raise ValueError(f"judge_pointwise: {len(questions)} questions but {len(answers)} answers")
    cfg = judge.cfg
    tokens = cfg.yes_no if tokens is None else tuple(tokens)
    ids = choice_ids(judge.tokenizer, tokens, what="pointwise tokens")
    prompts = [judge_prompt_ids(judge.tokenizer, pointwise_prompt(cfg, q, x), chat=cfg.chat)
               for q, x in zip(questions, answers)]
    def describe(i):
        return f"question {questions[i]!r}, answer {answers[i]!r}"

    logits = choice_logits(judge, prompts, ids, describe=describe)
    _check_finite(logits, describe)
    return _softmax(logits.astype(np.float64))


def expected_score(probs, values: Sequence[float]) -> np.ndarray:
    """E[s] = Σ_k probs[:, k] · values[k]: probs [N, K] (rows sum to 1), values [K] -> [N]."""
    probs, values = np.asarray(probs, np.float64), np.asarray(values, np.float64)
    if probs.ndim != 2 or probs.shape[1] != values.shape[0]:
        raise ValueError(f"expected_score: probs {probs.shape} do not match {values.shape[0]} values")
    return probs @ values


def pointwise_reward(judge: Judge, *, score: bool = False) -> callable:
    """The direct form's pointwise reward, fn(prompts, completions, **_) -> float32[B]: P(yes) (score False)
    or the expected score over cfg.score_tokens / score_values (score True)."""
    cfg = judge.cfg

    def reward(prompts, completions, **_):
        if score:
            probs = judge_pointwise(judge, prompts, completions, tokens=cfg.score_tokens)
            return expected_score(probs, cfg.score_values).astype(np.float32)
        return judge_pointwise(judge, prompts, completions)[:, 0].astype(np.float32)

    reward.__name__ = "judge_score_reward" if score else "judge_yes_reward"
    return reward
