"""HFTokenizer.from_pretrained and chat templates against outputs recorded from transformers.

tests/fixtures/hf_tokenizer/ holds a small byte-level BPE with three chat templates; expected.json is
what `transformers.AutoTokenizer` produced for it (tests/fixtures/make_tokenizer_fixtures.py, run in a
separate environment). rljax must give the same ids, decodes and rendered chats, character for character.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rljax.chat_template import render_chat_template
from rljax.data.adapters import Message
from rljax.tokenizer import ChatTemplateError, HFTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tokenizer"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
IDS = EXPECTED["special_token_ids"]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer.from_pretrained(FIXTURE)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A writable copy of the fixture, for variants of its config files."""
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for k, v in changes.items():
        if v is ...:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data), encoding="utf-8")


# ------------------------------------------------------------------ loading


def test_special_tokens_and_stop_ids(tok):
    assert tok.vocab_size == EXPECTED["vocab_size"] == 402
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        EXPECTED["bos_token_id"], EXPECTED["eos_token_id"], EXPECTED["pad_token_id"])
    assert tok.special_tokens == EXPECTED["special_tokens_map"]
    # generation_config.json lists <|im_end|>, <|end_of_text|>, <|eot_id|>, in that order.
    assert tok.eos_ids == (IDS["<|im_end|>"], IDS["<|end_of_text|>"], IDS["<|eot_id|>"]) == (4, 1, 7)
    # No add_bos_token in the config: tokenizer.json's post-processor prepends bos, so rljax does too.
    assert tok.add_bos_token is True
    assert set(tok.chat_template) == {"default", "llama3", "reasoning"}


@pytest.mark.parametrize("case", EXPECTED["encodings"], ids=lambda c: repr(c["text"])[:30])
def test_ids_and_decodes_match_transformers(tok, case):
    text = case["text"]
    assert tok.encode(text, add_bos=False) == case["ids"]
    assert tok.encode(text) == case["ids_with_special_tokens"]
    # transformers' decode keeps special tokens unless asked; rljax's decode maps to that with
    # stop_at_eos=False, skip_special=False.
    assert tok.decode(case["ids"], stop_at_eos=False, skip_special=False) == case["decoded"]
    assert tok.decode(case["ids_with_special_tokens"], stop_at_eos=False,
                      skip_special=False) == case["decoded_with_special_tokens"]
    assert tok.decode(case["ids_with_special_tokens"], stop_at_eos=False) == case["decoded_skip_special"]


def test_round_trips_of_unicode(tok):
    for case in EXPECTED["encodings"]:
        if "<|" not in case["text"]:
            assert tok.decode(tok.encode(case["text"], add_eos=True)) == case["text"]


def test_decode_stops_at_every_stop_id(tok):
    body = tok.encode("The answer is 42.", add_bos=False)
    for stop in tok.eos_ids:
        assert tok.decode([tok.bos_id, *body, stop, *body]) == "The answer is 42."
    # <|pad|> is not a stop id: skipped, and decoding goes on past it.
    assert tok.decode([*body, tok.pad_id, *body]) == "The answer is 42." * 2
    # Non-special added tokens (<think>) are text and survive skip_special.
    assert tok.decode(tok.encode("<think>a</think>")) == "<think>a</think>"


def test_left_padded_batch_round_trip(tok):
    texts = ["café", "日本語のテキスト 😀"]
    tokens, mask = tok.encode_batch(texts, add_eos=True, padding_side="left")
    assert tokens.dtype == np.int32 and tokens.shape == mask.shape
    assert tokens[0, 0] == tok.pad_id and mask[0, 0] == 0
    assert tok.decode_batch(tokens) == texts


def test_direct_construction_keeps_its_behaviour():
    t = HFTokenizer(FIXTURE)  # tokenizer.json only: tokens found by name, one stop id, no template
    assert (t.bos_id, t.eos_id) == (IDS["<|begin_of_text|>"], IDS["<|end_of_text|>"])
    assert t.eos_ids == (t.eos_id,) and t.add_bos_token and t.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------ chat templates


@pytest.mark.parametrize("case", EXPECTED["chats"], ids=lambda c: c["name"])
def test_chat_template_matches_transformers(tok, case):
    kw = dict(case["kwargs"], chat_template=case["template"])
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"], **kw)
    assert text == case["text"]
    ids = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                  tokenize=True, **kw)
    assert ids == case["ids"]


@pytest.mark.parametrize("case", EXPECTED["errors"], ids=lambda c: c["name"])
def test_template_errors_match_transformers(tok, case):
    with pytest.raises(ChatTemplateError, match="chat template raised") as info:
        tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                chat_template=case["template"], **case["kwargs"])
    assert case["message"] in str(info.value)


def test_default_template_and_generation_prompt(tok):
    chat = [{"role": "user", "content": "hi"}]
    # The "default" entry is used when no name is given; by hand from the ChatML template:
    assert tok.apply_chat_template(chat) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert tok.apply_chat_template(chat, add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(chat, tokenize=True)
    assert ids[0] == IDS["<|im_start|>"] and tok.bos_id not in ids  # nothing prepended to the template's text
    # A template given as source rather than a name; typed rljax Messages work as dicts.
    assert tok.apply_chat_template([Message("user", "x")], chat_template="{{ messages[0].content }}!") == "x!"


def test_message_errors_name_the_index(tok):
    with pytest.raises(ChatTemplateError, match=r"message 1 has no 'role'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ChatTemplateError, match=r"message 2 \(role 'user'\) has no 'content'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user"}])
    with pytest.raises(ChatTemplateError, match=r"message 0 \(role 'user'\) has no 'content'"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ChatTemplateError, match=r"message 0 must be a dict"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(ChatTemplateError, match="messages is empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="must be a list of dicts"):
        tok.apply_chat_template("hello")
    with pytest.raises(ChatTemplateError, match=r"'content' must be a string"):
        tok.apply_chat_template([{"role": "user", "content": 3}])


def test_template_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match=r"does not compile.*line 2"):
        render_chat_template("ok\n{% if %}", [{"role": "user", "content": "a"}])


def test_sandbox_refuses_internals():
    chat = [{"role": "user", "content": "a"}]
    with pytest.raises(ChatTemplateError, match="chat template raised"):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", chat)
    with pytest.raises(ChatTemplateError, match="underscore-prefixed"):
        render_chat_template("{% set ns = namespace(_x=1) %}", chat)


def test_template_variables():
    chat = [{"role": "user", "content": "a", "name": None}]
    src = "{{ bos_token }}|{{ messages[0] | tojson }}|{{ tools is none }}|{{ x }}|{{ add_generation_prompt }}"
    out = render_chat_template(src, chat, special_tokens={"bos_token": "<s>", "x": "special"}, x="kwarg",
                               add_generation_prompt=True)
    # None-valued keys are dropped; tojson keeps non-ASCII and does not HTML-escape; kwargs beat special tokens.
    assert out == '<s>|{"role": "user", "content": "a"}|True|kwarg|True'
    assert render_chat_template("{{ tools | tojson }}", chat, tools=[{"d": "<é>"}]) == '[{"d": "<é>"}]'
    assert render_chat_template("{% generation %}[{{ messages[0].content }}]{% endgeneration %}", chat) == "[a]"
    assert render_chat_template("{{ x }}", chat, x=np.int64(3)) == "3"


# ------------------------------------------------------------------ config variants


def test_single_string_template_and_int_eos(model_dir):
    _edit_json(model_dir / "tokenizer_config.json", chat_template="{{ eos_token }}")
    _edit_json(model_dir / "generation_config.json", eos_token_id=IDS["<|end_of_text|>"])
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_end|>"
    # eos_id (<|im_end|>, the config's eos_token) is a stop id even when generation_config omits it.
    assert t.eos_ids == (IDS["<|end_of_text|>"], IDS["<|im_end|>"])


def test_jinja_files_replace_config_templates(model_dir):
    (model_dir / "chat_template.jinja").write_text("file:{{ messages[0].content }}", encoding="utf-8")
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.chat_template == "file:{{ messages[0].content }}"
    (model_dir / "additional_chat_templates").mkdir()
    (model_dir / "additional_chat_templates" / "tool_use.jinja").write_text("tools:{{ tools | length }}")
    t = HFTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": "a"}]
    assert t.apply_chat_template(chat) == "file:a"
    assert t.apply_chat_template(chat, tools=[{"name": "f"}]) == "tools:1"  # the tool_use template, as transformers


def test_no_template_in_config(model_dir):
    _edit_json(model_dir / "tokenizer_config.json", chat_template=...)
    t = HFTokenizer.from_pretrained(model_dir)
    with pytest.raises(ChatTemplateError, match="no chat template.*tokenizer_config.json"):
        t.apply_chat_template([{"role": "user", "content": "a"}])


def test_several_templates_without_default(model_dir):
    _edit_json(model_dir / "tokenizer_config.json", chat_template=[{"name": "a", "template": "A"},
                                                                   {"name": "b", "template": "B"}])
    t = HFTokenizer.from_pretrained(model_dir)
    with pytest.raises(ChatTemplateError, match=r"several chat templates \(a, b\)"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    assert t.apply_chat_template([{"role": "user", "content": "x"}], chat_template="b") == "B"


def test_add_bos_and_missing_bos(model_dir):
    cfg = model_dir / "tokenizer_config.json"
    # An explicit add_bos_token is honoured (transformers 5.24's generic backend would keep the
    # post-processor's bos here; its model-specific tokenizers rebuild the post-processor from the flag).
    _edit_json(cfg, add_bos_token=False)
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.bos_id == 0 and t.encode("hi") == t.encode("hi", add_bos=False) == [79, 80]
    # No bos entry and add_bos_token false (Qwen's layout): no bos at all, even though a token named
    # like one exists; templates see no bos_token.
    _edit_json(cfg, bos_token=None)
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.bos_id is None and not t.add_bos_token and "bos_token" not in t.special_tokens
    assert t.encode("hi") == [79, 80]
    assert t.apply_chat_template([{"role": "user", "content": "a"}], chat_template="llama3").startswith("\n")
    # No bos entry but no add_bos_token either: transformers keeps the post-processor, which still
    # prepends <|begin_of_text|> (checked with transformers 5.24: [0, 79, 80]).
    _edit_json(cfg, add_bos_token=...)
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.bos_id == 0 and t.encode("hi") == [0, 79, 80] and "bos_token" not in t.special_tokens


def test_only_tokenizer_json(model_dir):
    for name in ("tokenizer_config.json", "generation_config.json"):
        (model_dir / name).unlink()
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.eos_id == IDS["<|end_of_text|>"] and t.eos_ids == (t.eos_id,) and t.chat_template is None


def test_config_errors_name_file_and_field(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        HFTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        HFTokenizer.from_pretrained(tmp_path)
    cfg, gen = model_dir / "tokenizer_config.json", model_dir / "generation_config.json"
    original = cfg.read_text(encoding="utf-8")
    _edit_json(cfg, eos_token="<|nope|>")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: field 'eos_token' = '<\|nope\|>' is not in"):
        HFTokenizer.from_pretrained(model_dir)
    cfg.write_text(original, encoding="utf-8")
    _edit_json(cfg, chat_template=[{"name": "a"}])
    with pytest.raises(ValueError, match=r"tokenizer_config.json: field 'chat_template\[0\]'"):
        HFTokenizer.from_pretrained(model_dir)
    cfg.write_text(original, encoding="utf-8")
    _edit_json(cfg, add_bos_token="yes")
    with pytest.raises(ValueError, match="field 'add_bos_token' must be true or false"):
        HFTokenizer.from_pretrained(model_dir)
    cfg.write_text(original, encoding="utf-8")
    _edit_json(gen, eos_token_id=[4, 100000])
    with pytest.raises(ValueError, match=r"generation_config.json: field 'eos_token_id' has id 100000"):
        HFTokenizer.from_pretrained(model_dir)
    _edit_json(gen, eos_token_id="4")
    with pytest.raises(ValueError, match=r"generation_config.json: field 'eos_token_id' must be an int"):
        HFTokenizer.from_pretrained(model_dir)
    gen.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        HFTokenizer.from_pretrained(model_dir)


def test_added_token_dict_in_config(model_dir):
    _edit_json(model_dir / "tokenizer_config.json",
               eos_token={"__type": "AddedToken", "content": "<|eot_id|>", "special": True})
    t = HFTokenizer.from_pretrained(model_dir)
    assert t.eos_id == IDS["<|eot_id|>"] and t.special_tokens["eos_token"] == "<|eot_id|>"
