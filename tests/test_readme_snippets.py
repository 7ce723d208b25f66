"""README.md's "Tasks in a few lines": every ```python snippet under that heading runs as written, in a
temporary directory holding the files the snippets name (a random tiny Qwen2 HF checkpoint at tiny-qwen2/,
pairs.jsonl, feedback.jsonl, prompts.jsonl), and what each returns is checked against what is computed another
way: the first logged loss against its known value at the start (log 2 for a zero reward head and for DPO with
the policy equal to its reference, 1/2 for KTO there), the loss decreasing, the returned params against the
starting ones and against the final checkpoint written to run_dir (same digest), the reward model's accuracy
recomputed with `reward_model_reward`, GRPO's reward mean within the reward functions' range."""
import hashlib
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from experiments.fixtures import write_smoke_model
from rljax.checkpoint import Checkpointer, digest_params
from rljax.models.hf import load_pretrained
from rljax.rewards import reward_model_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Tasks in a few lines"


def readme_snippets() -> list[str]:
    """The ```python blocks between HEADING and the next level-2 heading of README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


SNIPPETS = {}
for _code in readme_snippets():
    _name = next(n for n in ("reward_model(", "dpo(", "kto(", "grpo(", "sft(") if n in _code)[:-1]
    SNIPPETS[_name] = _code

PAIRS = [{"prompt": f"Is {a} + {b} = {a + b}?", "chosen": "Yes, gladly!", "rejected": "no"}
         for a in range(4) for b in range(3)]
# the pairs as unpaired feedback: each chosen completion desirable, each rejected one not
FEEDBACK = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in PAIRS
            for k in ("chosen", "rejected")]
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(4) for b in range(3)]


def digest(params) -> str:
    h = hashlib.sha256()
    digest_params(params, h)
    return h.hexdigest()


def checkpoint_digest(run_dir: str, state) -> tuple[str, int]:
    """Digest of the params (the policy's for an RLState) in run_dir's latest checkpoint, and its step."""
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        restored, _ = ckpt.restore(state)
    finally:
        ckpt.close()
    params = restored.policy.params if hasattr(restored, "policy") else restored.params
    return digest(params), int(restored.step)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    write_smoke_model(str(d / "tiny-qwen2"))
    for name, rows in (("pairs.jsonl", PAIRS), ("feedback.jsonl", FEEDBACK), ("prompts.jsonl", PROMPTS)):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def run_snippet(name: str, workdir, monkeypatch) -> dict:
    code = SNIPPETS[name]
    assert len(code.strip().splitlines()) <= 10, f"the {name} snippet has more than 10 lines"
    monkeypatch.chdir(workdir)
    namespace = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    return namespace


def test_the_section_has_one_snippet_per_task():
    assert sorted(SNIPPETS) == ["dpo", "grpo", "kto", "reward_model", "sft"]


def test_sft_snippet(workdir, monkeypatch):
    ns = run_snippet("sft", workdir, monkeypatch)
    result = ns["result"]
    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, 9))
    assert losses[-1] < 0.8 * losses[0]
    # the snippet's starting params, initialised under jit (op by op, init compiles for tens of seconds)
    assert digest(result.params) != digest(jax.jit(ns["model"].init)(jax.random.key(0)))
    assert checkpoint_digest("runs/sft", result.state) == (digest(result.params), 8)
    with open("runs/sft/config.json") as f:
        assert json.load(f)["config"]["steps"] == 8


def test_reward_model_snippet(workdir, monkeypatch):
    result = run_snippet("reward_model", workdir, monkeypatch)["result"]
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: r = 0 for all
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert checkpoint_digest("runs/rm", result.state) == (digest(result.params), 8)
    # pairwise accuracy recomputed with the trained head as a reward function, on the chat-templated prompts
    tok = result.tokenizer
    scorer = reward_model_reward(result.model, result.params, tok, add_bos=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in PAIRS]
    chosen = scorer(prompts, [r["chosen"] for r in PAIRS])
    rejected = scorer(prompts, [r["rejected"] for r in PAIRS])
    assert np.mean(np.asarray(chosen) > np.asarray(rejected)) == 1.0


def test_dpo_snippet(workdir, monkeypatch):
    result = run_snippet("dpo", workdir, monkeypatch)["result"]
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert result.history[-1]["loss"] < result.history[0]["loss"] and result.metrics["margin"] > 0
    _, start = load_pretrained("tiny-qwen2")
    assert digest(result.params) != digest(start)
    assert checkpoint_digest("runs/dpo", result.state) == (digest(result.params), 6)


def test_kto_snippet(workdir, monkeypatch):
    result = run_snippet("kto", workdir, monkeypatch)["result"]
    first = result.history[0]  # policy = reference: every log-ratio 0, z0 = 0, each row's loss λ (1 − σ(0)) = 1/2
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["z0"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[-1]["loss"] < first["loss"]
    assert result.metrics["rewards_desirable"] > result.metrics["rewards_undesirable"]
    _, start = load_pretrained("tiny-qwen2")
    assert digest(result.params) != digest(start)
    assert checkpoint_digest("runs/kto", result.state) == (digest(result.params), 6)


def test_grpo_snippet(workdir, monkeypatch):
    result = run_snippet("grpo", workdir, monkeypatch)["result"]
    assert [h["step"] for h in result.history] == [1, 2]
    for h in result.history:  # correct in {0, 1} plus brevity in [-16 tokens' text / 100, 0]
        assert np.isfinite(h["reward_mean"]) and -2.0 <= h["reward_mean"] <= 1.0
    _, start = load_pretrained("tiny-qwen2")
    assert digest(result.params) != digest(start)
    assert checkpoint_digest("runs/grpo", result.state) == (digest(result.params), 2)
