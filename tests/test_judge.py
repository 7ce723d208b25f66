"""The AI judge (`rljax.rewards.judge`): pairwise and pointwise probabilities equal a naive unbatched
forward (one example at a time, softmax by hand) for an rljax model with the char tokenizer and for one with
an HF tokenizer's chat template; order averaging, the position-consistency rate, the judge's accuracy and the
direct reward by hand on a judge whose logits are constructed; bucketed shapes compile once; errors name the
bad choice tokens, the sample with non-finite logits and the pair too long for the judge; templates must show
every field; the direct reward's baseline must be a mapping; a model with only `last_hidden` and `logits` (the
documented interface) judges."""
import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.models import Model, last_token_index, preset
from rljax.rewards import judge as J
from rljax.tokenizer import CharTokenizer, HFTokenizer

TOK = CharTokenizer()
FIXTURE = Path(__file__).parent / "fixtures" / "hf_tokenizer"
# answers of two lengths (14 and 15 characters): the naive forwards compile for few shapes
QUESTIONS = ["3+4=", "12*3=", "9-1=", "7+7=", "10-3="]
A = ["3+4=7;answer:7", "12*3=6;answer:6", "9-1=8;answer:8", "7+7=14;answer:1", "10-3=7;answer:7"]
B = ["3+4=8;answer:8", "12*3=36;answer:3", "9-1=8;answer:9", "7+7=41;answer:4", "10-3=7;answer:5"]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def char_judge():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=128))
    # batch_size 4: the 8 prompts of 4 pairs go in two chunks of 4, right-padded to a bucketed width
    return J.Judge(model, model.init(jax.random.key(0)), TOK, J.JudgeConfig(batch_size=4))


@functools.partial(jax.jit, static_argnames=("model",))
def _full_logits(params, tokens, *, model):
    return model(params, tokens)


def _naive_next_logits(judge, ids):
    """One example, one full forward with no padding: the logits after the last prompt token [V]."""
    logits = _full_logits(judge.params, jnp.asarray([ids], jnp.int32), model=judge.model)
    return np.asarray(logits[0, -1], np.float64)


def _naive_pairwise(judge, questions, a, b):
    cfg = judge.cfg
    i1, i2 = (judge.tokenizer.encode(t, add_bos=False)[0] for t in cfg.choice_tokens)

    def first(q, x, y):
        ids = J.judge_prompt_ids(judge.tokenizer, cfg.pairwise_template.format(question=q, first=x, second=y),
                                 chat=cfg.chat)
        l = _naive_next_logits(judge, ids)
        return np.exp(l[i1]) / (np.exp(l[i1]) + np.exp(l[i2]))

    p_ab = np.array([first(q, x, y) for q, x, y in zip(questions, a, b)])
    p_ba = np.array([first(q, y, x) for q, x, y in zip(questions, a, b)])
    return p_ab, p_ba


def test_pairwise_and_pointwise_equal_a_naive_unbatched_forward(char_judge):
    j = J.judge_pairwise(char_judge, QUESTIONS, A, B)
    p_ab, p_ba = _naive_pairwise(char_judge, QUESTIONS, A, B)
    np.testing.assert_allclose(j.p_ab, p_ab, atol=1e-5)
    np.testing.assert_allclose(j.p_ba, p_ba, atol=1e-5)
    np.testing.assert_allclose(j.p, 0.5 * (p_ab + 1 - p_ba), atol=1e-5)
    np.testing.assert_array_equal(j.consistent, (p_ab > 0.5) == (p_ba < 0.5))
    # pointwise: P(yes) and the expected score over the digit vocabulary, each by hand
    cfg = char_judge.cfg
    yes = J.judge_pointwise(char_judge, QUESTIONS, A)
    scores = J.pointwise_reward(char_judge, score=True)(QUESTIONS, A)
    digit_ids = [TOK.encode(t, add_bos=False)[0] for t in cfg.score_tokens]
    for i, (q, x) in enumerate(zip(QUESTIONS, A)):
        l = _naive_next_logits(char_judge, [TOK.bos_id] + TOK.encode(f"{q}\n{x}\ngood:", add_bos=False))
        ly, ln = l[TOK.encode("y", add_bos=False)[0]], l[TOK.encode("n", add_bos=False)[0]]
        np.testing.assert_allclose(yes[i], [1 / (1 + np.exp(ln - ly)), 1 / (1 + np.exp(ly - ln))], atol=1e-5)
        d = np.exp(l[digit_ids] - l[digit_ids].max())
        np.testing.assert_allclose(scores[i], (d / d.sum()) @ np.arange(10.0), atol=1e-4)


def test_bucketed_shapes_compile_once_for_batches_of_similar_size(char_judge):
    J.judge_pairwise(char_judge, QUESTIONS[:3], A[:3], B[:3])  # 6 prompts: a chunk of 4 and one of 2
    before = J._choice_logits._cache_size()
    # 4 pairs = 8 prompts: chunks of 4 and 4 rows; widths of the same buckets -> no new compile
    J.judge_pairwise(char_judge, QUESTIONS, A, B)
    J.judge_pairwise(char_judge, QUESTIONS[:2], B[:2], A[:2])
    assert J._choice_logits._cache_size() - before <= 1


def test_chat_template_judge_renders_the_user_message_and_equals_the_naive_forward():
    tok = HFTokenizer.from_pretrained(FIXTURE)
    model = Model(preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64,
                         vocab_size=tok.vocab_size, max_seq_len=256))
    judge = J.Judge(model, model.init(jax.random.key(1)), tok, J.JudgeConfig(batch_size=8))
    text = J.pairwise_prompt(judge.cfg, "3+4=", "7", "8")
    ids = J.judge_prompt_ids(tok, text)
    assert ids == tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
    assert tok.decode(ids, skip_special=False, stop_at_eos=False).endswith("better:<|im_end|>\n<|im_start|>assistant\n")
    assert J.judge_prompt_ids(tok, text, chat=False) == tok.encode(text, add_bos=True)
    q, a, b = ["3+4=", "1+1="], ["7", "2"], ["8", "11"]
    j = J.judge_pairwise(judge, q, a, b)
    p_ab, p_ba = _naive_pairwise(judge, q, a, b)
    np.testing.assert_allclose(j.p_ab, p_ab, atol=1e-5)
    np.testing.assert_allclose(j.p, 0.5 * (p_ab + 1 - p_ba), atol=1e-5)
    with pytest.raises(ValueError, match=r"not single tokens: 'yes' -> \[96, 76, 90\]"):
        J.judge_pointwise(J.Judge(model, judge.params, tok, J.JudgeConfig(yes_no=("yes", "n"))), q, a)


def test_a_hugging_face_checkpoint_loaded_by_rljax_judges_like_the_naive_forward():
    """The tiny random Llama fixture (tests/fixtures/hf/llama, vocabulary 256) as the judge, with the char
    tokenizer (its ids fit that vocabulary)."""
    from rljax.models import load_pretrained

    cfg, params = load_pretrained(str(Path(__file__).parent / "fixtures" / "hf" / "llama"))
    judge = J.Judge(Model(cfg), params, TOK, J.JudgeConfig(batch_size=8, min_bucket=32))
    j = J.judge_pairwise(judge, QUESTIONS[:2], A[:2], B[:2])
    p_ab, p_ba = _naive_pairwise(judge, QUESTIONS[:2], A[:2], B[:2])
    np.testing.assert_allclose(j.p_ab, p_ab, atol=1e-5)
    np.testing.assert_allclose(j.p_ba, p_ba, atol=1e-5)


@dataclass(frozen=True)
class TableModel:
    """A 'judge' whose next-token logits are a constructed table row of the last token: logits = table[last]."""

    vocab_size: int

    def last_hidden(self, params, tokens, mask):
        # the "hidden state" at each row's last real token is that token itself
        return tokens[jnp.arange(tokens.shape[0]), last_token_index(mask)][:, None]

    def logits(self, params, hidden):
        return params["table"][hidden[..., 0]]  # a gather, so a NaN row reaches only its own token


def _table_judge(rows: dict[str, tuple[float, float]]):
    """A judge asked '{question}:{first}:{second}', so the prompt's last token is the second answer's last
    character; rows: that character -> the logits of "1" and "2"."""
    V = TOK.vocab_size
    table = np.zeros((V, V), np.float32)
    one, two = TOK.encode("1", add_bos=False)[0], TOK.encode("2", add_bos=False)[0]
    for ch, (l1, l2) in rows.items():
        c = TOK.encode(ch, add_bos=False)[0]
        table[c, one], table[c, two] = l1, l2
    return J.Judge(TableModel(V), {"table": jnp.asarray(table)}, TOK,
                   J.JudgeConfig(pairwise_template="{question}:{first}:{second}"))


def test_order_averaging_and_position_consistency_by_hand_on_a_constructed_judge():
    judge = _table_judge({"a": (2.0, 0.0), "b": (0.0, 1.0), "c": (1.0, 0.0), "d": (0.0, 0.0)})
    # pair 0: a = "xa", b = "xb". a first -> last char 'b': p_ab = σ(0 - 1); b first -> 'a': p_ba = σ(2 - 0)
    # pair 1: a = "xc", b = "xa". p_ab = σ(2) (last 'a'), p_ba = σ(1) (last 'c'): both orders say "first"
    # pair 2: a = "xa", b = "xd". p_ab = σ(0) = ½ (a tie picks nothing), p_ba = σ(2)
    j = J.judge_pairwise(judge, ["q", "q", "q"], ["xa", "xc", "xa"], ["xb", "xa", "xd"])
    p_ab = np.array([_sigmoid(-1.0), _sigmoid(2.0), 0.5])
    p_ba = np.array([_sigmoid(2.0), _sigmoid(1.0), _sigmoid(2.0)])
    np.testing.assert_allclose(j.p_ab, p_ab, atol=1e-6)
    np.testing.assert_allclose(j.p_ba, p_ba, atol=1e-6)
    np.testing.assert_allclose(j.p, [0.5 * (0.26894142 + 1 - 0.88079708), 0.5 * (0.88079708 + 1 - 0.73105858),
                                     0.5 * (0.5 + 1 - 0.88079708)], atol=1e-6)
    np.testing.assert_array_equal(j.consistent, [True, False, False])  # pair 0: both orders pick b
    assert J.position_consistency(j.p_ab, j.p_ba) == pytest.approx(1 / 3)
    # the judge's accuracy against gold: chosen is the gold-better answer; p(chosen > rejected) > ½ counts
    acc = J.judge_accuracy(judge, [dict(prompt="q", chosen="xb", rejected="xa"),   # p = 1 - 0.194 > ½: right
                                   dict(prompt="q", chosen="xc", rejected="xa")])  # p = 0.575 > ½: right
    assert acc == dict(judge_accuracy=1.0, judge_position_consistency=0.5, judge_pairs=2)
    # the direct form's reward: p(completion > baseline of its prompt)
    reward = J.pairwise_reward(judge, {"q": "xb", "r": "xa"})
    np.testing.assert_allclose(reward(["q", "r"], ["xa", "xc"]), [j.p[0], j.p[1]], atol=1e-6)
    with pytest.raises(KeyError, match="no baseline answer for prompt 'z'"):
        reward(["z"], ["xa"])


def test_bad_choice_tokens_and_non_finite_logits_are_named():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))
    params = {}  # never reached: the tokens are checked first
    with pytest.raises(ValueError, match=r"choice_tokens must each be a single token .*'one' -> \[.*\], 'é' -> \[\]"):
        J.judge_pairwise(J.Judge(model, params, TOK, J.JudgeConfig(choice_tokens=("one", "é"))), ["q"], ["a"], ["b"])
    with pytest.raises(ValueError, match=r"map to the same ids"):
        J.choice_ids(TOK, ("1", "1"))
    with pytest.raises(ValueError, match=r"JudgeConfig.pairwise_template: uses the field\(s\) \['answer'\]; its fields "
                                         r"are \{question\}, \{first\}, \{second\}"):
        J.JudgeConfig(pairwise_template="{question} {answer}")
    judge = _table_judge({"a": (1.0, 0.0), "b": (np.nan, 0.0)})
    with pytest.raises(J.JudgeOutputError, match=r"non-finite logits \[nan, 0.0\] for sample 1 .*pair 1 \(a first\): "
                                                 r"question '7\+7=', a 'xa', b 'xb'"):
        J.judge_pairwise(judge, ["3+4=", "7+7="], ["xb", "xa"], ["xa", "xb"])
    with pytest.raises(ValueError, match="2 questions, 1 first and 2 second"):
        J.judge_pairwise(judge, ["q", "q"], ["xa"], ["xb", "xa"])


def test_templates_must_show_every_field_and_be_fillable():
    """A template without one of its answer fields would have the judge compare an answer with nothing."""
    with pytest.raises(ValueError, match=r"^JudgeConfig.pairwise_template: never shows \{second\}; the template must "
                                         r"show every one of \{question\}, \{first\}, \{second\}$"):
        J.JudgeConfig(pairwise_template="{question} 1:{first} better:")
    with pytest.raises(ValueError, match=r"^JudgeConfig.pointwise_template: never shows \{question\}, \{answer\}"):
        J.JudgeConfig(pointwise_template="good:")
    with pytest.raises(ValueError, match=r"^JudgeConfig.pairwise_template: uses the field\(s\) \['first.x'\]"):
        J.JudgeConfig(pairwise_template="{question}{first.x}{second}")
    with pytest.raises(ValueError, match=r"^JudgeConfig.pairwise_template: cannot be filled with text answers: "
                                         r"Unknown format code 'd'"):
        J.JudgeConfig(pairwise_template="{question:d}{first}{second}")
    with pytest.raises(ValueError, match=r"^JudgeConfig.pairwise_template: not a str.format template"):
        J.JudgeConfig(pairwise_template="{question}{first}{second")
    with pytest.raises(ValueError, match=r"^JudgeConfig.score_values: must be finite"):
        J.JudgeConfig(score_values=(0.0, float("nan")), score_tokens=("0", "1"))
    with pytest.raises(ValueError, match=r"^JudgeConfig.min_bucket: must be >= 1, got 0$"):
        J.JudgeConfig(min_bucket=0)
    # each field may appear more than once, in any order
    cfg = J.JudgeConfig(pairwise_template="{second}|{first}|{question}|{first}")
    assert J.pairwise_prompt(cfg, "q", "a", "b") == "b|a|q|a"


def test_pairwise_reward_takes_only_a_mapping_baseline():
    judge = _table_judge({"a": (1.0, 0.0)})
    with pytest.raises(TypeError, match=r"^pairwise_reward: baseline must be a mapping prompt -> baseline answer, "
                                        r"got list$"):
        J.pairwise_reward(judge, ["ab", "cd"])  # dict() of it would be {"a": "b", "c": "d"}
    from types import MappingProxyType

    reward = J.pairwise_reward(judge, MappingProxyType({"q": "xa"}))
    np.testing.assert_allclose(reward(["q"], ["xa"]), [0.5], atol=1e-7)  # an answer against itself: p = ½


def test_a_comparison_too_long_for_the_judge_is_named_before_any_forward():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=32))
    judge = J.Judge(model, model.init(jax.random.key(0)), TOK, J.JudgeConfig(batch_size=4))
    # "[bos]1+1=\n1:2\n2:" + 30 x's + "\nbetter:": 1 + 11 + 30 + 8 = 50 tokens, in either order
    n = len(J.judge_prompt_ids(TOK, J.pairwise_prompt(judge.cfg, "1+1=", "2", "x" * 30)))
    assert n == 50
    with pytest.raises(ValueError, match=r"^judge: prompt 1 has 50 tokens, more than the model's max_seq_len=32: "
                                         r"pair 1 \(a first\): question '1\+1=', a '2', b 'x{30}'; shorten the "
                                         r"answers or use a judge with a longer context$"):
        J.judge_pairwise(judge, ["3+4=", "1+1="], ["7", "2"], ["8", "x" * 30])
    with pytest.raises(ValueError, match=r"^judge: prompt 0 has .* tokens, more than the model's max_seq_len=32: "
                                         r"question '1\+1=', answer 'y{40}'"):
        J.judge_pointwise(judge, ["1+1="], ["y" * 40])
    # at the limit exactly it runs: 32 tokens
    fits = "x" * (30 - (n - 32))
    assert len(J.judge_prompt_ids(TOK, J.pairwise_prompt(judge.cfg, "1+1=", "2", fits))) == 32
    assert J.judge_pairwise(judge, ["1+1="], ["2"], [fits]).p.shape == (1,)


def test_a_model_with_only_last_hidden_and_logits_judges_like_the_model(char_judge):
    """The interface the Judge docstring names: last_hidden(params, tokens, mask) and logits(params, hidden)."""

    @dataclass(frozen=True)
    class Minimal:
        m: object

        def last_hidden(self, params, tokens, mask):
            return self.m.last_hidden(params, tokens, mask)

        def logits(self, params, hidden):
            return self.m.logits(params, hidden)

    bare = J.Judge(Minimal(char_judge.model), char_judge.params, TOK, char_judge.cfg)
    got = J.judge_pairwise(bare, QUESTIONS[:2], A[:2], B[:2])
    p_ab, p_ba = _naive_pairwise(char_judge, QUESTIONS[:2], A[:2], B[:2])
    np.testing.assert_allclose(got.p_ab, p_ab, atol=1e-5)
    np.testing.assert_allclose(got.p_ba, p_ba, atol=1e-5)
