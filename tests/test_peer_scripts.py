"""The peer scripts (benchmarks/peers/, run in their own torch environment) stay matched to rljax.

They cannot import rljax or run here (no torch), so the constants they share with rljax's
benchmarks are read from their source: the character vocabulary, GRPO prompts and toy reward.
"""
import ast
import os
import string

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
