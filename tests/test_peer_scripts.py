"""The peer scripts (benchmarks/peers/, run in their own torch environment) stay matched to rljax.

They cannot import rljax or run here (no torch), so the constants they share with rljax's
benchmarks are read from their source: the character vocabulary, GRPO prompts and toy reward.
"""
import ast
import os
import string

import numpy as np
import pytest

from benchmarks import grpo_step
from rljax.tokenizer import BOS_ID, DEFAULT_ALPHABET, EOS_ID, PAD_ID, CharTokenizer

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "peers")
SCRIPTS = ("peer_common.py", "hf_generate.py", "trl_grpo.py", "trl_offline.py")


def _module(name):
    with open(os.path.join(PEERS, name)) as f:
        return ast.parse(f.read(), filename=name)


def _constant(name, target):
    """The value of a module-level `target = <expression>` in a peer script."""
    for node in _module(name).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == target for t in node.targets):
            return eval(compile(ast.Expression(node.value), name, "eval"), {"string": string})
    raise AssertionError(f"{target} not found in {name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_peer_scripts_parse_and_say_what_they_measure(name):
    assert ast.get_docstring(_module(name))


def test_peer_tokenizer_has_char_tokenizer_ids():
    specials = _constant("peer_common.py", "SPECIAL_TOKENS")
    alphabet = _constant("peer_common.py", "ALPHABET")
    assert alphabet == DEFAULT_ALPHABET
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2) and len(specials) == 3
    assert len(specials) + len(alphabet) == CharTokenizer().vocab_size


def test_peer_grpo_prompts_and_reward_match_grpo_step():
    assert _constant("trl_grpo.py", "PROMPTS") == grpo_step.TRL_PROMPTS
    fn = next(n for n in _module("trl_grpo.py").body
              if isinstance(n, ast.FunctionDef) and n.name == "digit_share_reward")
    scope = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "trl_grpo.py", "exec"), scope)
    completions = ["12=3", "abc", "", "7 7 =", "=="]
    prompts = ["1+2="] * len(completions)
    assert scope["digit_share_reward"](prompts=prompts, completions=completions) == \
        grpo_step.reward_digits(prompts, completions)


def _peer_defaults(name):
    """{dest: default} of every `ap.add_argument("--flag", ..., default=...)` in a peer script."""
    out = {}
    for node in ast.walk(_module(name)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flag = node.args[0].value
            for kw in node.keywords:
                if kw.arg == "default":
                    out[flag.lstrip("-").replace("-", "_")] = ast.literal_eval(kw.value)
    return out


def test_offline_benchmark_has_trl_offline_defaults():
    from benchmarks.offline import Config

    peer, ours = _peer_defaults("trl_offline.py"), Config()
    for field in ("examples", "prompt_len", "completion_len", "steps", "beta", "lr", "d_model", "layers", "heads",
                  "mlp", "seed"):
        assert getattr(ours, field) == peer[field], field


@pytest.mark.parametrize("trainer", ["dpo", "kto"])
def test_offline_benchmark_makes_the_peers_text(trainer):
    """The same seed gives the same prompts and completions on both sides (the peer's `make_dataset`,
    run here with its `pc` replaced by the shared alphabet)."""
    import random
    import types

    from benchmarks.offline import Config, make_rows

    fn = next(n for n in _module("trl_offline.py").body if isinstance(n, ast.FunctionDef) and n.name == "make_dataset")
    scope = {"pc": types.SimpleNamespace(ALPHABET=DEFAULT_ALPHABET), "string": string, "random": random}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "trl_offline.py", "exec"), scope)
    args = types.SimpleNamespace(trainer=trainer, prompt_len=5, completion_len=7)
    ds, _ = scope["make_dataset"](args, 6, random.Random(3))
    rows = make_rows(Config(trainer=trainer, prompt_len=5, completion_len=7), 6, random.Random(3))
    if trainer == "kto":
        assert [(r["prompt"], r["completion"], r["desirable"]) for r in rows] == \
            list(zip(ds["prompt"], ds["completion"], ds["label"]))
    else:
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == \
            list(zip(ds["prompt"], ds["chosen"], ds["rejected"]))


def test_offline_benchmark_counts_the_peers_tokens():
    """A tiny run: every sequence is prompt + completion + EOS (no BOS), as TRL's, so a step feeds
    examples x 2 x (p + c + 1) tokens; the KTO step trains on half of them."""
    from benchmarks.offline import Config, main

    small = dict(examples=2, prompt_len=4, completion_len=5, steps=2, d_model=32, layers=1, heads=2, mlp=64)
    out = main(Config(trainer="kto", **small))
    assert out["padded_width"] == 16  # 10 tokens, bucketed
    assert out["tok_s"] == pytest.approx(2 * out["tok_s_trained"])
    assert out["tok_s"] * out["step_s"] == pytest.approx(2 * 2 * (4 + 5 + 1))
    longest = main(Config(trainer="reward", pad="longest", **small))
    assert longest["padded_width"] == 10
    # the step keeps at least the MLP's [rows, width, mlp] float32 activations of its layer for the backward
    assert longest["step_temp_mib"] * 2**20 >= 2 * 2 * 10 * 64 * 4


def test_gpu_benchmark_reward_reads_token_ids():
    """benchmarks.gpu's GRPO part scores decoded ids as words: the share of even ids."""
    from benchmarks.gpu import _even_share, _ids_as_words

    words = _ids_as_words(np.array([[2, 3, 4, 7], [1, 1, 1, 8]]))
    assert words == ["2 3 4 7", "1 1 1 8"]
    assert _even_share(["p", "p"], words) == [0.5, 0.25]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(capsys):
    """`python -m benchmarks.gpu --tiny --parts grpo` runs on CPU (the GPU sitting's script does not rot),
    and its time split adds up. `--tiny` times two iterations, whose median is their mean: the stages'
    medians plus "other"'s (each iteration's time outside the stages, >= 0) give the median iteration,
    up to the printed rounding (five numbers at 0.005 s each)."""
    import re

    from benchmarks.gpu import Config, main

    main(Config(tiny=True, parts="grpo"))
    line = next(l for l in capsys.readouterr().out.splitlines() if "grpo iteration" in l)
    found = re.search(r"([\d.]+) s/iteration; per stage \(medians\): sample ([\d.]+), score ([\d.]+), "
                      r"reference ([\d.]+), update ([\d.]+), other (-?[\d.]+) \|", line)
    assert found, line
    total, *stages, other = map(float, found.groups())
    assert stages[0] > 0 and stages[-1] > 0 and other >= 0 and "FAILED" not in line
    assert sum(stages) + other == pytest.approx(total, abs=0.026)
