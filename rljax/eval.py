"""Evaluation of a policy on problems with checkable answers, loading a finished run, and exporting a policy.

  complete          completion texts of prompts: greedy, or n samples per prompt at a temperature
  exact_match       fraction of right answers: greedy (the default), or the mean over n samples per
                    problem at a temperature (pass@1 as RL papers report it); returns the texts too
  correctness       [P, n] right / wrong of n completions per problem
  pass_at_k         the unbiased pass@k estimate from [P, n] correctness (Chen et al., 2021)
  evaluate_policy   one results row of a policy on held-out problems: accuracy greedy and sampled,
                    mean reward, completion length, KL to another policy (a stage's start)
  finished_run      whether a run directory holds its final checkpoint
  load_finished     the state of a finished run's final checkpoint; a missing or unfinished run
                    raises UnfinishedRunError naming the directory (it never starts a new run)
  export_policy     save_pretrained + the tokenizer files + a generation_config.json that lists every
                    stop id, so transformers and vLLM load and stop the policy as the sampler did

A problem is any object: `prompt(problem) -> str` gives its prompt text (default: `problem.prompt`)
and `check(problem, completion) -> bool | float` says whether a completion is right (default:
`rljax.data.arithmetic.check_answer`, the arithmetic task's final answer).
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import Checkpointer
from rljax.models.hf import save_pretrained
from rljax.models.transformer import check_scorer
from rljax.distributed import on_main, to_host
from rljax.sampling import SampleConfig, filled_prompts, sample, tokenizer_ids, truncate_prompts

__all__ = ["TOKENIZER_FILES", "UnfinishedRunError", "PolicyEvalConfig", "complete", "correctness", "evaluate_policy",
           "exact_match", "pass_at_k", "finished_run", "load_finished", "export_policy"]

# What a served checkpoint needs besides config.json and the weights (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def _prompt_of(problem) -> str:
    return problem.prompt


def _arithmetic_check(problem, completion: str) -> bool:
    from rljax.data.arithmetic import check_answer

    return check_answer(problem, completion)


# ----------------------------------------------------------------------------- generation and accuracy
def complete(params, model, tok, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1,
             temperature: float = 0.0, key=None, batch_size: int | None = None, add_bos: bool = True,
             truncate: bool = False) -> list[str]:
    """Completion texts of `prompts` [P]: P * n strings, sample j of prompt i at index i * n + j.

    temperature 0: greedy decoding (then n > 1 repeats the greedy decode). Sampling stops at every
    stop id of `tok` (`tokenizer_ids`). key: the PRNG key of the samples (default `jax.random.key(0)`;
    greedy decoding does not use it). batch_size None: every prompt in one `sample` call, prompts
    left-padded to the longest; otherwise calls of `batch_size` prompts each (the last filled with
    copies of its first prompt so that every call has one shape; the copies are dropped), call b
    with key `jax.random.fold_in(key, b)`. On a mesh a call's prompts are filled the same way up to
    a multiple of `prompt_multiple(model, n)`; on several processes every process passes the same
    prompts and gets every text. add_bos: passed to `tok.encode_batch` (False for chat
    templates, which write bos themselves). truncate: keep the last `max_seq_len - max_new_tokens`
    tokens of a longer prompt (as `RLConfig.truncate_prompts` does in RL) instead of failing.
    """
    if len(prompts) == 0:
        raise ValueError("complete: no prompts")
    cfg = SampleConfig(max_new_tokens=max_new_tokens, n=n, temperature=temperature, **tokenizer_ids(tok))
    key = jax.random.key(0) if key is None else key
    chunks = [(list(prompts), key)] if batch_size is None else [
        (list(prompts[s:s + batch_size]), jax.random.fold_in(key, b))
        for b, s in enumerate(range(0, len(prompts), batch_size))]
    texts: list[str] = []
    for chunk, k in chunks:
        real = len(chunk)
        chunk = filled_prompts(chunk, model, n, batch_size)
        tokens, mask = tok.encode_batch(chunk, add_bos=add_bos, padding_side="left")
        if truncate:
            tokens, mask, _ = truncate_prompts(tokens, mask, model.config.max_seq_len - max_new_tokens,
                                               pad_id=tok.pad_id)
        r = sample(params, tokens, mask, k, model=model, cfg=cfg)
        texts += tok.decode_batch(to_host(r.completions))[:real * n]
    return texts


def correctness(problems: Sequence[Any], texts: Sequence[str], *, n: int = 1,
                check: Callable[[Any, str], Any] | None = None) -> np.ndarray:
    """float64 [P, n]: check(problem i, texts[i * n + j]) for the P problems and their n completions each
    (the layout `complete` returns)."""
    if len(texts) != len(problems) * n:
        raise ValueError(f"correctness: {len(texts)} texts for {len(problems)} problems x n = {n}")
    check = _arithmetic_check if check is None else check
    return np.array([float(check(problems[i // n], t)) for i, t in enumerate(texts)],
                    np.float64).reshape(len(problems), n)


def exact_match(params, model, tok, problems: Sequence[Any], max_new_tokens: int, *, n: int = 1,
                temperature: float = 0.0, key=None, check: Callable[[Any, str], Any] | None = None,
                prompt: Callable[[Any], str] | None = None, batch_size: int | None = None, add_bos: bool = True,
                truncate: bool = False) -> tuple[float, list[str]]:
    """(accuracy, texts): the mean of `correctness` over every problem and sample, and the P * n
    completion texts (sample j of problem i at i * n + j).

    Greedy decoding (temperature 0, the default) gives greedy exact match; n samples per problem at
    `temperature` give the sampled accuracy, the mean over samples (pass@1 as RL papers report it;
    pass an explicit `key`, default `jax.random.key(0)`). prompt(problem) -> prompt text (default
    `problem.prompt`); check(problem, text) -> right or not (default: the arithmetic task's
    `check_answer`); batch_size, add_bos, truncate: as in `complete`.
    """
    prompt = _prompt_of if prompt is None else prompt
    texts = complete(params, model, tok, [prompt(p) for p in problems], max_new_tokens=max_new_tokens, n=n,
                     temperature=temperature, key=key, batch_size=batch_size, add_bos=add_bos, truncate=truncate)
    return float(np.mean(correctness(problems, texts, n=n, check=check))), texts


def pass_at_k(correct, k: int) -> float:
    """The unbiased pass@k estimate, averaged over problems: correct [P, n] (truthy = right), n >= k;
    per problem with c right of n, 1 - C(n - c, k) / C(n, k), the probability that k of its n samples
    drawn without replacement hold at least one right one. pass_at_k(c, 1) is the mean of c."""
    values = np.asarray(correct)
    if values.ndim != 2:
        raise ValueError(f"pass_at_k: correct must be [problems, samples], got shape {values.shape}")
    other = np.argwhere(~np.isin(values, (0, 1)))  # partial credit or NaN: neither right nor wrong
    if other.size:
        i, j = other[0]
        raise ValueError(f"pass_at_k: correct must hold 0/1 (or bools); problem {i}, sample {j} is {values[i, j].item()!r} "
                         "(a check with partial credit has an accuracy, the mean, but no pass@k)")
    c = values.astype(bool)
    n = c.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, {n}] (the samples per problem), got {k}")
    return float(np.mean([1.0 - math.comb(n - int(r), k) / math.comb(n, k) for r in c.sum(axis=1)]))


@dataclass(frozen=True)
class PolicyEvalConfig:
    """How `evaluate_policy` measures a policy: max_new_tokens per completion; samples: completions
    per problem at temperature 1 (the sampled accuracy, reward, length and KL; 0: greedy only);
    seed: the key of the samples (the same for every policy, so two policies are compared on
    the same draws of the sampler's noise); batch_size: problems per sampling call (None: all at once)."""

    max_new_tokens: int = 32
    samples: int = 4
    seed: int = 7
    batch_size: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.samples < 0:
            raise ValueError(f"PolicyEvalConfig: need max_new_tokens >= 1 and samples >= 0, got "
                             f"{self.max_new_tokens}, {self.samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"PolicyEvalConfig.batch_size: must be >= 1 or None, got {self.batch_size}")


@functools.partial(jax.jit, static_argnames=("model",))
def _start_logprobs(params, tokens, attention_mask, *, model):
    from rljax.models.logprobs import token_logprobs

    return token_logprobs(params, tokens, attention_mask, model=model)


def evaluate_policy(params, model, tok, problems: Sequence[Any], cfg: PolicyEvalConfig = PolicyEvalConfig(), *,
                    check: Callable[[Any, str], Any] | None = None, prompt: Callable[[Any], str] | None = None,
                    reward_fn: Callable | None = None, start_params=None, start_model=None,
                    rewards: dict[str, Callable] | None = None, add_bos: bool = True) -> dict:
    """One results row of the policy `params` on held-out `problems` (JSON-able floats):

      accuracy_greedy     greedy exact match (`exact_match`)
      accuracy_sampled    the mean correctness of cfg.samples completions per problem at temperature 1
      reward_mean         reward_fn(prompts, completions, problems=...) over those samples (with reward_fn)
      <name>_mean         the same for each {name: fn} of `rewards` (e.g. a gold score and a reward
                          model's proxy of it, on the same samples)
      completion_length   their mean length in tokens (the stop token included)
      kl_to_start         with start_params: (1/N) Σ_i Σ_t (ℓ_t − ℓ^start_t) over the N samples, the k1
                          estimate of the sequence-level KL(π ‖ π_start) (exact in expectation: the
                          samples come from π at temperature 1, whose log-probs ℓ the sampler returns);
                          start_model: the start policy's model (default `model`; its vocabulary must
                          hold the policy's, as a padded embedding table of the same tokenizer does)

    check, prompt, add_bos: as in `exact_match` (default: the arithmetic task's check, `problem.prompt`).
    The samples use key `jax.random.key(cfg.seed)` (batch b: fold_in(key, b))."""
    from rljax.models.logprobs import target_mask
    from rljax.rewards.rules import COMPLETION_IDS, completion_id_lists, score_with_failures, takes_completion_ids

    if len(problems) == 0:
        raise ValueError("evaluate_policy: no problems")
    if start_params is not None:
        check_scorer(start_model or model, model, "evaluate_policy: start_model (the start policy)")
    prompt = _prompt_of if prompt is None else prompt
    texts = [prompt(p) for p in problems]
    row = {"accuracy_greedy": exact_match(params, model, tok, problems, cfg.max_new_tokens, check=check,
                                          prompt=prompt, batch_size=cfg.batch_size, add_bos=add_bos)[0]}
    if cfg.samples == 0:
        return row
    n = cfg.samples
    sampling = SampleConfig(max_new_tokens=cfg.max_new_tokens, n=n, temperature=1.0, **tokenizer_ids(tok))
    key = jax.random.key(cfg.seed)
    size = len(texts) if cfg.batch_size is None else cfg.batch_size
    completions, lengths, kls, completion_ids = [], [], [], []
    named = dict(rewards or {})
    if reward_fn is not None:
        named["reward"] = reward_fn
    wants_ids = any(takes_completion_ids(fn) for fn in named.values())  # gathered only for a function taking them
    for b, lo in enumerate(range(0, len(texts), size)):
        chunk = texts[lo:lo + size]
        real = len(chunk)
        chunk = filled_prompts(chunk, model, n, size)  # one shape for every call
        tokens, mask = tok.encode_batch(chunk, add_bos=add_bos, padding_side="left")
        roll = sample(params, tokens, mask, jax.random.fold_in(key, b), model=model, cfg=sampling)
        kl = None
        if start_params is not None:
            start = _start_logprobs(start_params, roll.tokens, roll.attention_mask, model=start_model or model)
            kl = ((roll.logprobs - start) * target_mask(roll.loss_mask, roll.attention_mask)).sum(axis=1)
        ids, lens, kl = to_host((roll.completions, roll.lengths, kl))
        completions += tok.decode_batch(ids)[:real * n]
        lengths += lens[:real * n].tolist()
        if wants_ids:
            completion_ids += completion_id_lists(ids[:real * n], lens[:real * n])
        if kl is not None:
            kls += kl[:real * n].tolist()
    row["accuracy_sampled"] = float(np.mean(correctness(problems, completions, n=n, check=check)))
    flat = [p for p in problems for _ in range(n)]
    for name, fn in named.items():
        ids = {COMPLETION_IDS: completion_ids} if takes_completion_ids(fn) else {}
        scores = score_with_failures(fn, [t for t in texts for _ in range(n)], completions, problems=flat, **ids)
        row[f"{name}_mean"] = float(np.mean(scores.rewards))
    row["completion_length"] = float(np.mean(lengths))
    if start_params is not None:
        row["kl_to_start"] = float(np.mean(kls))
    return row


# ----------------------------------------------------------------------------- finished runs
class UnfinishedRunError(FileNotFoundError):
    """A run directory without its final checkpoint (missing, or stopped before its last step)."""


def _checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def finished_run(run_dir: str, steps: int) -> bool:
    """True when `run_dir`/checkpoints holds the checkpoint of step `steps` as its latest (the final
    checkpoint of a phase run for `steps` steps, e.g. `rljax.phases.sft` with a run_dir)."""
    ckpt_dir = _checkpoint_dir(run_dir)
    if not os.path.isdir(ckpt_dir):  # Checkpointer would create it
        return False
    with Checkpointer(ckpt_dir) as ck:
        return ck.latest_step() == steps


def load_finished(run_dir: str, target, *, steps: int):
    """The state saved in the final checkpoint (step `steps`) of the run in `run_dir`, restored onto
    the structure, dtypes and shardings of `target` (e.g. `create_state(model, optimizer, key)` with
    the run's model and optimizer; its values are not used). Take `.params` for the weights.

    Raises UnfinishedRunError naming the directory when it has no checkpoints or its latest
    checkpoint is not step `steps`; it never starts or resumes the run. A damaged final
    checkpoint raises rljax.checkpoint.DamagedCheckpointError: no fallback to an earlier step,
    whose weights would not be the finished run's.
    """
    ckpt_dir = _checkpoint_dir(run_dir)
    if not os.path.isdir(ckpt_dir):
        raise UnfinishedRunError(f"{run_dir}: no finished run there (no checkpoints directory {ckpt_dir}); "
                                 f"run its training first or pass the directory of a finished run")
    with Checkpointer(ckpt_dir) as ck:
        latest = ck.latest_step()
        if latest != steps:
            found = "no checkpoint" if latest is None else f"its latest checkpoint is step {latest}"
            raise UnfinishedRunError(f"{run_dir}: the run is not finished: {found}, its final step is {steps}")
        state, _ = ck.restore(target, step=steps)
    return state


# ----------------------------------------------------------------------------- export
def export_policy(params, model, tok, model_dir: str | None, path: str, *, dtype=None) -> str:
    """Write `params` as a Hugging Face checkpoint in `path`: `save_pretrained` (config.json naming
    tok's bos / eos / pad ids, safetensors in `dtype`, default the parameters'), the TOKENIZER_FILES
    present in `model_dir` (None: none), and a generation_config.json (the copied one, updated) whose
    eos_token_id lists every stop id of `tok` (`tok.eos_ids`), so that vLLM / transformers stop where
    the sampler did. `rljax.models.hf.load_pretrained(path)` gives back the same params. `path` may be
    new, empty or a checkpoint (`model_dir` itself included: its weights are replaced, its other files
    kept); a directory of other files, such as a run directory, is refused. On several processes every
    one calls it (the weights are gathered collectively) and process 0 writes. Returns `path`.
    """
    save_pretrained(params, model.config, path, dtype=dtype, overwrite=True,
                    extra_config=dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    # on several processes every one takes part in save_pretrained's gathers; one writes the rest
    on_main(f"export_policy: writing {path}", _write_policy_files, tok, model_dir, path)
    return path


def _write_policy_files(tok, model_dir: str | None, path: str) -> None:
    """export_policy's files beside the weights: the tokenizer files and generation_config.json."""
    in_place = model_dir is not None and os.path.abspath(model_dir) == os.path.abspath(path)
    for name in TOKENIZER_FILES if model_dir is not None and not in_place else ():  # in place: kept as they are
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), path)
    gen_path = os.path.join(path, "generation_config.json")
    gen = {}
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
    gen.update(eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
    if tok.bos_id is not None:
        gen["bos_token_id"] = tok.bos_id
    with open(gen_path, "w") as f:
        json.dump(gen, f, indent=2)
