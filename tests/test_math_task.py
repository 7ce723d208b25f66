"""The math task (GSM8K / MATH problems as a `rljax.tasks.Task` of a Hugging Face tokenizer) and
`select_layers` (a student made of some of the teacher's blocks)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fixtures, grpo_math
from rljax.data.math import MathProblem
from rljax.data.synthetic import preference_pairs
from rljax.models import Model, preset
from rljax.models.transformer import select_layers
from rljax.rewards.math_answers import math_answer_reward, think_answer_format_reward
from rljax.tasks.math import MATH_CORRUPTIONS, chat_prompt, math_task, read_problems
from rljax.tokenizer import HFTokenizer

TOK = HFTokenizer.from_pretrained(fixtures.SMOKE_TOKENIZER)
PROBLEMS = read_problems(fixtures.SMOKE_DATA, "gsm8k")


def test_prompts_encode_to_the_chat_template_ids_and_references_earn_full_reward():
    task = math_task(TOK, style="think")
    for p in PROBLEMS:
        template = chat_prompt(TOK, p.question, grpo_math.SYSTEM_PROMPTS["think"])
        # what the recipes encode (add_bos=True) is the template's ids; the tokenizer adds bos itself
        assert TOK.encode(task.prompt(p)) == ([TOK.bos_id] if TOK.add_bos_token else []) + TOK.encode(
            template, add_bos=False)
        ref = task.reference(p)
        assert task.check(p, ref) and task.well_formed(ref) and task.gold_score(p, ref) == pytest.approx(1.0)
        assert math_answer_reward([""], [ref], answers=[p.answer])[0] == 1
    # a template that writes bos itself (Llama 3's) does not get it twice
    llama = HFTokenizer.from_pretrained(fixtures.SMOKE_TOKENIZER)
    llama.chat_template = llama.chat_template["llama3"]
    p = PROBLEMS[0]
    text = chat_prompt(llama, p.question, "sys")
    assert text.startswith(llama.special_tokens["bos_token"])
    ids = llama.encode(math_task(llama, system_prompt="sys").prompt(p))
    assert ids == llama.encode(text, add_bos=False) and ids.count(llama.bos_id) == 1


@pytest.mark.parametrize("style", ["think", "boxed"])
def test_corruptions_and_gold_score_by_hand(style):
    task = math_task(TOK, style=style)
    p = MathProblem("How many?", "Tom has 3 apples and buys 4 more, so 3 + 4 = 7.", "7")
    rng = np.random.default_rng(0)
    wrong = task.candidate(p, rng, "wrong_answer")
    assert not task.check(p, wrong) and task.well_formed(wrong)
    assert task.gold_score(p, wrong) == pytest.approx(0.2)  # 0.8 · 0 + 0.2 · 1
    truncated = task.candidate(p, rng, "truncated")
    assert truncated == "Tom has 3 apples and buys 4" and not task.check(p, truncated) and not task.well_formed(truncated)
    unformatted = task.candidate(p, rng, "unformatted")
    assert not task.well_formed(unformatted)
    assert task.gold_score(p, unformatted) == pytest.approx(0.8 * float(task.check(p, unformatted)))
    assert task.kinds == ("reference",) + MATH_CORRUPTIONS
    if style == "think":  # the same format rule as the RL reward's
        for c in (wrong, truncated, unformatted, task.reference(p)):
            assert task.well_formed(c) == bool(think_answer_format_reward([""], [c])[0])
    else:
        assert not task.well_formed("\\boxed{7} and \\boxed{8}") and not task.well_formed("\\boxed{7")
    # synthetic preference pairs over math problems (the R1 pipeline's reward-model data): no alphabet check
    pairs = preference_pairs(PROBLEMS, 0, task=task, noise_free=True)
    assert len(pairs) == len(PROBLEMS) and all(r["gold_margin"] >= 0 for r in pairs)
    with pytest.raises(ValueError, match="has no problem generator"):
        task.split(2, 1)


def test_select_layers_keeps_the_chosen_blocks():
    """All blocks in order: the same logits. Blocks [0, 2] of a model whose block 1 is the identity (its attention
    output and MLP down projections zero, so the residual passes through): the same logits again."""
    model = Model(preset("tiny", n_layers=3, vocab_size=60, max_seq_len=32))
    params = model.init(jax.random.key(0))
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % 60

    def logits(m, p):
        return np.asarray(m.logits(p, m.forward(p, tokens)[0]))

    same, same_params = select_layers(model, params, range(3))
    np.testing.assert_array_equal(logits(same, same_params), logits(model, params))
    layers = dict(params["layers"])
    layers["attn"] = dict(layers["attn"], o_proj=layers["attn"]["o_proj"].at[1].set(0.0))
    layers["mlp"] = dict(layers["mlp"], down=layers["mlp"]["down"].at[1].set(0.0))
    skipped = dict(params, layers=layers)
    student, student_params = select_layers(model, skipped, [0, 2])
    assert student.config.n_layers == 2 and student_params["layers"]["mlp"]["up"].shape[0] == 2
    np.testing.assert_allclose(logits(student, student_params), logits(model, skipped), atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[0, 3\] must be distinct indices in 0..2; \[3\] are not"):
        select_layers(model, params, [0, 3])
    with pytest.raises(ValueError, match="must be distinct"):
        select_layers(model, params, [1, 1])
