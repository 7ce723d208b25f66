"""rljax.recipes.tasks: input handling of the one-call entry points. A JSONL file, a Parquet file, a list of
dicts and a datasets.Dataset give the same batches; a bad row raises DataError naming the row and field
before anything trains; extra columns reach the reward functions aligned with their prompts; chat
templates are applied when the tokenizer has one; a rerun in the same run_dir resumes."""
import dataclasses
import functools
import hashlib
import json
import os
import warnings

import jax
import numpy as np
import pytest

from rljax.data.adapters import DataError
from rljax.models import Model, preset
from rljax.cli import ConfigMismatchError
from rljax.recipes import GRPOTaskConfig, SFTTaskConfig, dpo, grpo, load_model, sft
from rljax.recipes.tasks import (DPOTaskConfig, TaskConfig, combine_rewards, preference_batches, prompt_batches,
                                 reward_batches, sft_batches)
from rljax.metrics import read_metrics
from rljax.tokenizer import CharTokenizer, HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer()

SFT_ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]
PAIR_ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4)
             for b in range(3)]
SCORE_ROWS = [{"prompt": f"{a}+{b}=", "response": str(a * b), "score": float(a - b)} for a in range(4)
              for b in range(3)]
PROMPT_ROWS = [{"prompt": f"{a}+{b}=", "answer": a + b, "level": "easy" if a < 2 else "hard"} for a in range(4)
               for b in range(3)]


SMALL = Model(preset("tiny", vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                     mlp_dim=64, max_seq_len=64))
_init = jax.jit(SMALL.init)  # one compile for the file; op by op, every init compiled its ops again


def small_model():
    """(model, params, tokenizer): a 1-layer model, so a test compiles in seconds; fresh params each call."""
    return SMALL, _init(jax.random.key(0)), TOK


def sources(rows, tmp_path):
    """The same rows as a list of dicts, a JSONL file, a Parquet file and a datasets.Dataset."""
    import datasets

    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    return {"list": rows, "jsonl": str(path), "parquet": str(tmp_path / "rows.parquet"), "dataset": ds}


def leaves(batch):
    if hasattr(batch, "metadata"):  # PromptBatch
        return [batch.tokens, batch.mask, json.dumps(batch.metadata, sort_keys=True)]
    return jax.tree.leaves(batch)


@pytest.mark.parametrize("kind", ["sft", "pairs", "scores", "dpo", "prompts"])
def test_every_source_gives_the_same_batches(kind, tmp_path):
    cfg = TaskConfig(batch_size=4) if kind != "dpo" else DPOTaskConfig(batch_size=4, max_prompt_length=3)
    rows, build = {
        "sft": (SFT_ROWS, lambda d: sft_batches(TOK, d, cfg)),
        "pairs": (PAIR_ROWS, lambda d: reward_batches(TOK, d, cfg)[0]),
        "scores": (SCORE_ROWS, lambda d: reward_batches(TOK, d, cfg)[0]),
        "dpo": (PAIR_ROWS, lambda d: preference_batches(TOK, d, cfg)),
        "prompts": (PROMPT_ROWS, lambda d: prompt_batches(TOK, d, cfg)),
    }[kind]
    its = {name: build(src) for name, src in sources(rows, tmp_path).items()}
    for position in range(5):  # past the first epoch: the reshuffle is the same too
        want = leaves(its["list"].batch_at(position))
        for name, it in its.items():
            got = leaves(it.batch_at(position))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{kind}, {name}, {position}")
    if kind in ("pairs", "scores"):
        assert reward_batches(TOK, rows, cfg)[1] == kind


def test_prompt_batches_are_left_padded_with_the_columns_as_metadata():
    b = prompt_batches(TOK, PROMPT_ROWS, TaskConfig(batch_size=3, seed=4)).batch_at(0)
    texts = TOK.decode_batch(b.tokens, stop_at_eos=False)
    by_prompt = {r["prompt"]: r for r in PROMPT_ROWS}
    assert b.tokens.shape == b.mask.shape and b.tokens.shape[0] == 3 and np.all(b.mask[:, -1] == 1)
    assert b.metadata["answer"] == [by_prompt[t]["answer"] for t in texts]
    assert b.metadata["level"] == [by_prompt[t]["level"] for t in texts]


@pytest.mark.parametrize("source", ["list", "jsonl"])
def test_a_bad_row_raises_data_error_naming_row_and_field_before_training(source, tmp_path):
    rows = [dict(r) for r in SFT_ROWS]
    rows[2] = {"prompt": "1+1="}  # no completion
    data = rows if source == "list" else sources(rows, tmp_path)["jsonl"]
    # from a file, the row is named by its file and 1-based line (row 2 counted from 0 is line 3)
    where = r"row 2" if source == "list" else r"rows\.jsonl, line 3 \(row 2, counted from 0\)"
    with pytest.raises(DataError, match=where + r": field 'completion' is missing"):
        sft(small_model(), data, SFTTaskConfig(steps=1), run_dir=str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing was written, let alone trained

    pairs = [dict(r) for r in PAIR_ROWS]
    pairs[3]["chosen"] = "  "
    with pytest.raises(DataError, match=r"row 3: field 'chosen' is empty"):
        preference_batches(TOK, pairs, DPOTaskConfig(batch_size=2))
    prompts = [dict(r) for r in PROMPT_ROWS]
    prompts[1]["prompt"] = 7
    with pytest.raises(DataError, match=r"row 1: field 'prompt' must be a string"):
        prompt_batches(TOK, prompts, TaskConfig(batch_size=2))
    prompts[1]["prompt"] = [{"role": "robot", "content": "hi"}]
    with pytest.raises(DataError, match=r"row 1: field 'prompt\[0\].role' must be one of"):
        prompt_batches(TOK, prompts, TaskConfig(batch_size=2))
    with pytest.raises(DataError, match=r"row 0: expected a dict"):
        sft_batches(TOK, ["1+1=2"], TaskConfig(batch_size=1))
    with pytest.raises(DataError, match=r"clash"):
        prompt_batches(TOK, [{"prompt": "1+1=", "key": 1}], TaskConfig(batch_size=1))


def test_a_jsonl_file_gives_its_values_as_written_and_bad_files_are_named(tmp_path):
    """A column of "007", 5 and "0.50" reaches the reward functions as those values (as from a list,
    not as datasets' JSON reader unifies them: 7, 5, 0.5), and a type error names its own line; an
    empty file, or chosen == rejected, is a DataError naming the file and line before anything trains."""
    rows = [{"prompt": "1+1=", "answer": "007"}, {"prompt": "2+2=", "answer": 5}, {"prompt": "3+3=", "answer": "0.50"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = prompt_batches(TOK, str(path), TaskConfig(batch_size=3)).batch_at(0).metadata["answer"]
    assert sorted(got, key=str) == ["0.50", "007", 5]
    (tmp_path / "int.jsonl").write_text('{"prompt": "a", "completion": "0"}\n\n{"prompt": "b", "completion": 2}\n')
    with pytest.raises(DataError, match=r"int\.jsonl, line 3 \(row 1, counted from 0\): field 'completion' must be a "
                                        r"string, got int 2"):
        sft_batches(TOK, str(tmp_path / "int.jsonl"), TaskConfig(batch_size=1))
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}: no rows"):
            sft_batches(TOK, str(tmp_path / name), TaskConfig(batch_size=1))
    pairs = [dict(r) for r in PAIR_ROWS]
    pairs[5]["rejected"] = pairs[5]["chosen"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    same = r"pairs\.jsonl, line 6 \(row 5, counted from 0\): fields 'chosen' and 'rejected' are the same text"
    with pytest.raises(DataError, match=same):
        preference_batches(TOK, str(tmp_path / "pairs.jsonl"), DPOTaskConfig(batch_size=2))
    with pytest.raises(DataError, match=same):
        dpo(small_model(), str(tmp_path / "pairs.jsonl"), DPOTaskConfig(steps=1, batch_size=2),
            run_dir=str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    (tmp_path / "nulls.jsonl").write_text('{"prompt": "a", "completion": null}\n')
    with pytest.raises(DataError, match=r"line 1 \(row 0, counted from 0\): field 'completion' is missing or null"):
        sft_batches(TOK, str(tmp_path / "nulls.jsonl"), TaskConfig(batch_size=1))


def test_settings_that_cannot_work_are_refused_before_anything_trains(tmp_path):
    model = small_model()
    with pytest.raises(TypeError, match=r"expected a \(Model, params, tokenizer\) tuple in that order, got "
                                        r"\(dict, Model, CharTokenizer\)"):
        load_model((model[1], model[0], model[2]))
    with pytest.raises(ValueError, match="dtype, max_seq_len: they apply to a model loaded from a checkpoint"):
        sft(model, SFT_ROWS, SFTTaskConfig(steps=1, dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"SFTTaskConfig.dtype: one of \('float32', 'bfloat16', 'float16'\)"):
        SFTTaskConfig(dtype="float8")
    with pytest.raises(ValueError, match="OptimizerConfig.lr: must be a finite number, got nan"):
        sft(model, SFT_ROWS, SFTTaskConfig(steps=1, lr=float("nan")))
    with pytest.raises(ValueError, match=r"minibatches: 3 does not divide the 8 rows an iteration samples"):
        GRPOTaskConfig(batch_size=2, n=4, minibatches=3)
    with pytest.raises(ValueError, match=r"DPOTaskConfig.method: 'kto' is not one of \['cdpo', 'dpo', "):
        DPOTaskConfig(method="kto")  # when the config is made, not when the task starts
    with pytest.raises(ValueError, match="DPOConfig.beta: must be > 0, got 0.0"):
        DPOTaskConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"DPOTaskConfig.beta: orpo has no β \(its loss's fields: "):
        DPOTaskConfig(method="orpo", beta=0.5)
    with pytest.raises(ValueError, match="DPOTaskConfig.nll_coef: orpo's objective is the chosen completions' NLL"):
        DPOTaskConfig(method="orpo", nll_coef=0.5)
    for method in ("hinge", "ipo", "simpo"):
        with pytest.raises(ValueError, match=f"DPOTaskConfig.label_smoothing: .* not {method}"):
            DPOTaskConfig(method=method, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"DPOConfig.label_smoothing: must be in \[0, 0.5\), got 0.5"):
        DPOTaskConfig(label_smoothing=0.5)
    run_dir = tmp_path / "grpo"
    with pytest.raises(ValueError, match=r"max_new_tokens: 64 leaves no room for a prompt in the model's "
                                         r"max_seq_len 64"):
        grpo(model, PROMPT_ROWS, lambda prompts, completions, **c: [0.0] * len(completions),
             GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=64, progress=False), run_dir=str(run_dir))
    assert not os.path.exists(run_dir / "checkpoints")
    from rljax.models.hf import resolve_path

    for missing in ("./nope", str(tmp_path / "nope"), "~/surely/not/here"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
            resolve_path(missing)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file; a checkpoint is a directory"):
        resolve_path(str(tmp_path / "file"))


def test_a_rerun_in_the_same_run_dir_resumes(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    cfg = SFTTaskConfig(steps=3, batch_size=4, lr=3e-3, progress=False)
    first = sft(small_model(), SFT_ROWS, cfg, run_dir=run_dir)
    assert [h["step"] for h in first.history] == [1, 2, 3] and int(first.state.step) == 3
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    digest = hashlib.sha256(json.dumps(SFT_ROWS, sort_keys=True).encode()).hexdigest()[:16]  # by hand
    assert saved["task"] == "sft" and saved["config"]["steps"] == 3 and saved["data"] == f"<12 rows, sha256 {digest}>"

    again = sft(small_model(), SFT_ROWS, cfg, run_dir=run_dir)  # finished: restored, nothing trained
    assert "resumed" in capsys.readouterr().out
    assert len(read_metrics(run_dir)) == 3 and again.history == first.history
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(first.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a run directory holds one run: another config, data set or task is refused before anything trains
    five = SFTTaskConfig(steps=5, batch_size=4, lr=3e-3, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"another configuration \(steps: 3 -> 5\).*allow_change=True"):
        sft(small_model(), SFT_ROWS, five, run_dir=run_dir)
    with pytest.raises(ConfigMismatchError, match=r"data: '<12 rows, sha256 \w+>' -> '<11 rows, sha256 \w+>'; lr: "
                                                  r"0.003 -> 1.0"):
        sft(small_model(), SFT_ROWS[:11], SFTTaskConfig(steps=3, batch_size=4, lr=1.0), run_dir=run_dir)
    # the same number of rows with other contents is another data set too (once recorded as '<12 rows>' alike),
    # and other starting weights another model
    other_rows = [dict(r, completion=r["completion"] + "0") for r in SFT_ROWS]
    with pytest.raises(ConfigMismatchError, match=r"data: '<12 rows, sha256 \w+>' -> '<12 rows, sha256 \w+>'"):
        sft(small_model(), other_rows, cfg, run_dir=run_dir)
    with pytest.raises(ConfigMismatchError, match=r"model: '<Model [\d,]+ params sha256 \w+, "):
        sft((SMALL, _init(jax.random.key(1)), TOK), SFT_ROWS, cfg, run_dir=run_dir)
    with pytest.raises(ConfigMismatchError, match=r"holds a 'sft' run .* give the dpo run a run_dir of its own"):
        dpo(small_model(), PAIR_ROWS, DPOTaskConfig(steps=3, batch_size=4, progress=False), run_dir=run_dir)
    assert len(read_metrics(run_dir)) == 3 and not os.path.exists(os.path.join(run_dir, "config_changes.jsonl"))
    # how the run shows may change (progress, log_every); with allow_change the run goes on with the new steps
    longer = sft(small_model(), SFT_ROWS, dataclasses.replace(five, progress=True, log_every=1), run_dir=run_dir,
                 allow_change=True)  # two more steps, from step 3
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5] and int(longer.state.step) == 5
    assert longer.metrics == {k: v for k, v in longer.history[-1].items() if k != "step"}
    with open(os.path.join(run_dir, "config_changes.jsonl")) as f:
        assert json.loads(f.read())["changes"] == {"steps": [3, 5]}
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["config"]["steps"] == 5  # the next rerun compares with the run as it now is
    sft(small_model(), SFT_ROWS, five, run_dir=run_dir)  # finished: restored, nothing trained

    # a config field added after the run was saved reads, where config.json lacks it, as its default (the
    # behaviour the run had): the same run resumes; another value of it is a change, named
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["config"].pop("warmup_steps") == 0
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(saved, f)
    sft(small_model(), SFT_ROWS, five, run_dir=run_dir)
    with pytest.raises(ConfigMismatchError, match=r"another configuration \(warmup_steps: 0 -> 2\)"):
        sft(small_model(), SFT_ROWS, dataclasses.replace(five, warmup_steps=2), run_dir=run_dir)
    from rljax.cli import json_value
    from rljax.recipes.tasks import GRPOTaskConfig, _field_defaults
    for config_type in (SFTTaskConfig, GRPOTaskConfig):  # nested defaults (reward_call) as config.json holds them
        assert _field_defaults(config_type) == json.loads(json.dumps(dataclasses.asdict(config_type()),
                                                                     default=json_value))


def test_a_config_holding_an_algorithm_reads_the_same_in_every_process(tmp_path):
    """config.json names an Algorithm's functions by module and name, not by memory address (which
    differs between processes and would make every rerun a ConfigMismatchError)."""
    from rljax.algorithms import get_algorithm
    from rljax.recipes.tasks import _run_dir

    cfg = GRPOTaskConfig(algorithm=get_algorithm("dr_grpo"))
    with _run_dir(str(tmp_path), "grpo", cfg, small_model(), PROMPT_ROWS):
        pass
    with open(tmp_path / "config.json") as f:
        text = f.read()
    assert " at 0x" not in text and '"loss": "rljax.losses.grpo.grpo_loss"' in text


def test_a_failed_run_without_a_run_dir_says_its_checkpoints_are_gone():
    def broken(prompts, completions, **columns):
        raise RuntimeError("the verifier is down")

    cfg = GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=4, progress=False)
    with pytest.raises(Exception) as info:
        grpo(small_model(), PROMPT_ROWS, broken, cfg)
    assert any("run_dir=None, so its checkpoints in the temporary" in n for n in info.value.__notes__)


def test_grpo_reward_functions_get_the_columns_of_their_prompts(tmp_path):
    calls = []

    def correct(prompts, completions, answer, level, **columns):
        calls.append((list(prompts), list(completions), list(answer), list(level)))
        return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

    def brevity(prompts, completions, **columns):
        return [-len(c) / 10 for c in completions]

    cfg = GRPOTaskConfig(steps=2, batch_size=2, n=2, max_new_tokens=4, lr=1e-3, progress=False, algorithm="rloo")
    result = grpo(small_model(), PROMPT_ROWS, [correct, (0.5, brevity)], cfg)
    assert result.run_dir is None and [h["step"] for h in result.history] == [1, 2]
    by_prompt = {r["prompt"]: r for r in PROMPT_ROWS}
    assert len(calls) == 2
    expected_means = []
    for prompts, completions, answer, level in calls:
        assert len(prompts) == len(completions) == 4  # batch_size x n
        assert prompts[0] == prompts[1] and prompts[2] == prompts[3]  # n samples per prompt, in order
        assert answer == [by_prompt[p]["answer"] for p in prompts] and level == [by_prompt[p]["level"] for p in prompts]
        expected_means.append(np.mean([float(c.strip() == str(a)) - 0.5 * len(c) / 10
                                       for c, a in zip(completions, answer)]))
    np.testing.assert_allclose([h["reward_mean"] for h in result.history], expected_means, atol=1e-6)


def test_combine_rewards_sums_and_weights():
    a = lambda prompts, completions, **m: [1.0] * len(completions)  # noqa: E731
    b = lambda prompts, completions, x, **m: list(x)  # noqa: E731
    assert combine_rewards(a) is a and combine_rewards([a]) is a
    np.testing.assert_allclose(combine_rewards([a, b])(["p", "q"], ["c", "d"], x=[2.0, 3.0]), [3.0, 4.0])
    np.testing.assert_allclose(combine_rewards([(2.0, a), (-1.0, b)])(["p"], ["c"], x=[5.0]), [-3.0])
    with pytest.raises(TypeError, match="not callable"):
        combine_rewards([a, 7])
    with pytest.raises(TypeError, match="'b': a reward model given here needs reward_models="):
        combine_rewards([a, "b"])  # a string names a reward model, as in TRL


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    tok = HFTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "hf_tokenizer"))
    rows = [{"prompt": "What is 2 + 2?", "answer": 4},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And 3 + 3?"}],
             "answer": 6}]
    cfg = TaskConfig(batch_size=2, chat_template=None, system_prompt="Think.")
    b = prompt_batches(tok, rows, cfg).batches.batch_at(0)
    texts = {a: tok.decode(t[m == 1].tolist(), stop_at_eos=False, skip_special=False)
             for a, t, m in zip(b.metadata["answer"], b.tokens, b.mask)}
    assert texts[4] == tok.apply_chat_template([{"role": "system", "content": "Think."},
                                                {"role": "user", "content": "What is 2 + 2?"}],
                                               add_generation_prompt=True)
    assert texts[6] == tok.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True)  # its own system
    plain = prompt_batches(tok, rows[:1], TaskConfig(batch_size=1, chat_template=False)).batch_at(0)
    assert plain.tokens[0, plain.mask[0] == 1].tolist() == tok.encode("What is 2 + 2?", add_bos=True)
    with pytest.raises(ValueError, match="no chat template"):
        prompt_batches(TOK, rows[:1], TaskConfig(batch_size=1, chat_template=True))


def test_load_model_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="HF checkpoint path or a \\(Model, params, tokenizer\\) tuple"):
        load_model(42)
    model, params, tok = load_model(small_model(), head="reward")
    assert "reward" in model.config.heads and tok is TOK


def test_grpo_task_config_hands_its_reward_call_config_to_the_rl_loop():
    from rljax.rewards import RewardCallConfig

    call = RewardCallConfig(timeout_s=5.0, on_failure="value", failure_value=-1.0, batch_size=1, workers=8)
    assert GRPOTaskConfig(reward_call=call).rl_config(CharTokenizer()).reward_call == call
    assert GRPOTaskConfig().rl_config(CharTokenizer()).reward_call == RewardCallConfig()  # the default: one call
    rl = GRPOTaskConfig(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1,
                        mask_truncated=True).rl_config(CharTokenizer())
    assert (rl.sampling.temperature, rl.sampling.top_p, rl.sampling.top_k, rl.sampling.min_p,
            rl.sampling.repetition_penalty, rl.mask_truncated) == (0.7, 0.9, 5, 0.1, 1.1, True)
    assert rl.sampling.eos_id == CharTokenizer().eos_id


def fixture_tokenizer(template=None):
    """The HF fixture tokenizer (default template: ChatML with a default system message), with `template`
    (a name among its templates, or Jinja source) as its only chat template when given."""
    import copy

    tok = HFTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "hf_tokenizer"))
    if template is not None:
        tok = copy.copy(tok)
        tok.chat_template = tok.chat_template.get(template, template)
    return tok


def row_text(batch, tok, k=0):
    """(the text of row k, the text of its trained tokens), special tokens shown."""
    n = int(batch.attention_mask[k].sum())
    ids, mask = batch.tokens[k, :n].tolist(), batch.loss_mask[k, :n].tolist()
    show = functools.partial(tok.decode, stop_at_eos=False, skip_special=False)
    return show(ids), show([i for i, m in zip(ids, mask) if m])


def test_ultrachat_rows_train_on_their_messages_not_their_prompt_column(tmp_path):
    """UltraChat's rows are {prompt, prompt_id, messages}: with no `completion` column the conversation is the
    example (as TRL reads them), and `prompt` (a copy of the first turn) is left aside; once the `prompt`
    column sent them to the prompt/completion path and "field 'completion' is missing"."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rows = [{"prompt": "hi", "prompt_id": "x1", "messages": chat}]
    path = tmp_path / "ultrachat.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    for data in (rows, str(path)):
        b = sft_batches(TOK, data, TaskConfig(batch_size=1)).batch_at(0)
        n = int(b.attention_mask[0].sum())
        # written out: simple_template's "role: content" lines, then the last reply and eos trained
        prompt = TOK.encode("user: hi\nassistant: yo\nuser: 2+2?\nassistant: ", add_bos=True, add_eos=False)
        assert b.tokens[0, :n].tolist() == prompt + TOK.encode("4", add_bos=False, add_eos=True)
        assert b.loss_mask[0, :n].tolist() == [0] * len(prompt) + [1, 1]
    tok = fixture_tokenizer()
    text, trained = row_text(sft_batches(tok, rows, TaskConfig(batch_size=1)).batch_at(0), tok)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>")
    assert trained == "4<|im_end|>"
    # a `completion` column still means prompt/completion rows, whatever else the row holds
    b = sft_batches(TOK, [dict(rows[0], completion="ho")], TaskConfig(batch_size=1)).batch_at(0)
    assert b.tokens[0, :int(b.attention_mask[0].sum())].tolist() == TOK.encode("hi", add_bos=True, add_eos=False) + \
        TOK.encode("ho", add_bos=False, add_eos=True)


NO_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}"
             "{% endif %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
             "{% endif %}")


def test_a_chat_template_that_raises_names_the_row_and_its_line(tmp_path):
    tok = fixture_tokenizer(NO_SYSTEM)
    ok = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
                        {"role": "assistant", "content": "a"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(ok) + "\n\n" + json.dumps(bad) + "\n")  # the blank line: row 1 is line 3
    with pytest.raises(DataError, match=r"^row 1: chat template raised: no system messages$"):
        sft_batches(tok, [ok, bad], TaskConfig(batch_size=1))
    with pytest.raises(DataError, match=r"chats\.jsonl, line 3 \(row 1, counted from 0\): chat template raised: "
                                        r"no system messages$"):
        sft_batches(tok, str(path), TaskConfig(batch_size=1))
    prompts = [{"prompt": "x"}, {"prompt": "y"}]
    with pytest.raises(DataError, match=r"^row 0: chat template raised: no system messages$"):
        prompt_batches(tok, prompts, TaskConfig(batch_size=1, system_prompt="Be brief."))
    # a template that does not compile is no row's fault: its own error, naming no row
    with pytest.raises(ValueError, match=r"^chat template does not compile"):
        sft_batches(fixture_tokenizer("{% for m in messages %}"), [ok], TaskConfig(batch_size=1))


def test_a_template_that_ignores_the_generation_prompt_is_warned_of(tmp_path):
    """The training text is the prompt rendered with add_generation_prompt, then the completion; a template
    that ignores add_generation_prompt renders the conversation with "<assistant>" before the reply, which
    the training text lacks (the completion is joined onto the user's turn): a warning names the row."""
    tok = fixture_tokenizer("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")
    rows = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"rows\.jsonl, line 1 \(row 0, counted from 0\): .*after the rendered "
                                         r"prompt it writes '<assistant>4</s>', not the completion '4'.* 2 of 2 rows"):
        b = sft_batches(tok, str(path), TaskConfig(batch_size=1)).batch_at(0)
    assert row_text(b, tok)[0] in ("<user>2+2?</s>4<|im_end|>", "<user>3+3?</s>6<|im_end|>")  # as before: a warning
    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    with pytest.warns(UserWarning, match=r"^row 0: .*writes '<assistant>4</s>', not the chosen '4'"):
        preference_batches(tok, pairs, DPOTaskConfig(batch_size=1))
    with pytest.warns(UserWarning, match=r"^row 0: .*writes '<assistant>4</s>', not the chosen '4'"):
        reward_batches(tok, pairs, TaskConfig(batch_size=1))
    # templates that do render prompt then reply: ChatML, and Llama 3 (which trims the reply) with a padded one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for template in (None, "llama3"):
            sft_batches(fixture_tokenizer(template), rows + [{"prompt": "1+1?", "completion": " 2 "}],
                        TaskConfig(batch_size=1))


def test_truncate_prompt_keeps_the_chat_templates_leading_tokens():
    """The audit's row: with Llama 3's template the prompt is <|begin_of_text|>, the user header, the user's
    text, then the assistant header. overlong="truncate_prompt" used to cut its first tokens, the template's
    own; it now cuts the user's text after them, as it keeps bos before a plain prompt."""
    tok = fixture_tokenizer("llama3")
    rows = [{"prompt": "word " * 30, "completion": "four"}]
    head = "<|begin_of_text|>\n<|start_header_id|>user<|end_header_id|>\n\n"  # the template's text, written out
    prompt = tok.apply_chat_template([{"role": "user", "content": "word " * 30}], add_generation_prompt=True)
    assert prompt.startswith(head)
    prompt_ids, head_ids = (tok.encode(t, add_bos=False, add_eos=False) for t in (prompt, head))
    completion_ids = tok.encode("four", add_bos=False, add_eos=True)
    full = sft_batches(tok, rows, TaskConfig(batch_size=1)).batch_at(0)
    assert full.tokens[0, :int(full.attention_mask[0].sum())].tolist() == prompt_ids + completion_ids
    n = len(prompt_ids) + len(completion_ids)
    with pytest.warns(UserWarning, match=rf"overlong='truncate_prompt': 1 of 1 rows exceed max_length={n - 10}"):
        cut = sft_batches(tok, rows, TaskConfig(batch_size=1, max_length=n - 10, overlong="truncate_prompt"))
    b = cut.batch_at(0)
    assert b.tokens[0, :int(b.attention_mask[0].sum())].tolist() == \
        head_ids + prompt_ids[len(head_ids) + 10:] + completion_ids
    text, trained = row_text(b, tok)
    assert text.startswith(head + "word") and trained == "four<|im_end|>"
    assert text.endswith("word<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nfour<|im_end|>")
    # a row whose completion alone leaves no room after the template's leading tokens is refused, naming them
    with pytest.raises(DataError, match=rf"row 0: the completion is 5 tokens, with the prompt's {len(head_ids)} "
                                        r"special token\(s\) more than max_length=10"):
        sft_batches(tok, rows, TaskConfig(batch_size=1, max_length=10, overlong="truncate_prompt"))


def test_dpo_max_prompt_length_keeps_the_chat_templates_leading_tokens():
    """DPO's max_prompt_length cut a chat prompt's first tokens, the template's own (<|begin_of_text|> and the
    user header); it now cuts the user's text after them, as GRPO's truncate_prompt does, in the batches and
    in the lengths the data set is fitted by. A limit within the template's text is refused naming the row."""
    tok = fixture_tokenizer("llama3")
    rows = [{"prompt": "word " * 30, "chosen": "four", "rejected": "five"}]
    head = "<|begin_of_text|>\n<|start_header_id|>user<|end_header_id|>\n\n"  # the template's text, written out
    prompt = tok.apply_chat_template([{"role": "user", "content": "word " * 30}], add_generation_prompt=True)
    prompt_ids, head_ids = (tok.encode(t, add_bos=False, add_eos=False) for t in (prompt, head))
    assert prompt.startswith(head) and len(prompt_ids) > len(head_ids) + 20
    n = len(head_ids) + 20
    answers = [tok.encode(a, add_bos=False, add_eos=True) for a in ("four", "five")]
    b = preference_batches(tok, rows, DPOTaskConfig(batch_size=1, max_prompt_length=n,
                                                    share_prompt=False)).batch_at(0)
    for k in range(2):
        ids = b.tokens[0, k][b.attention_mask[0, k] > 0].tolist()
        assert ids == head_ids + prompt_ids[-20:] + answers[k]
        text = tok.decode(ids, stop_at_eos=False, skip_special=False)
        assert text.startswith(head) and "word<|eot_id|>" in text and text.count("word") < 30  # header, text's end
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" + ("four", "five")[k] + "<|im_end|>")
    shared = preference_batches(tok, rows, DPOTaskConfig(batch_size=1, max_prompt_length=n,
                                                         share_prompt=True)).batch_at(0)
    assert shared.tokens[0][shared.attention_mask[0] > 0].tolist() == head_ids + prompt_ids[-20:] + answers[0] + \
        answers[1]
    # fitted as collated: a max_length that holds the cut prompt and either answer keeps the row
    fitted = preference_batches(tok, rows, DPOTaskConfig(batch_size=1, max_prompt_length=n, share_prompt=False,
                                                         max_length=n + len(answers[0]), overlong="error")).batch_at(0)
    np.testing.assert_array_equal(fitted.tokens[0, 0][fitted.attention_mask[0, 0] > 0], b.tokens[0, 0][
        b.attention_mask[0, 0] > 0])
    with pytest.raises(DataError, match=rf"row 0: max_prompt_length={len(head_ids)} leaves no room for the prompt's "
                                        rf"text after the chat template's {len(head_ids)} leading tokens"):
        preference_batches(tok, rows, DPOTaskConfig(batch_size=1, max_prompt_length=len(head_ids)))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_sft_on_a_hub_style_folder_trains_on_its_train_split_only(tmp_path, kind):
    """A folder with a train and a test split (hub-style shards, or train.jsonl beside test.jsonl): the
    task's rows are the train split's, never the test rows (which once came too)."""
    import datasets

    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    train, test = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}], \
        [{"prompt": "9+9=", "completion": "18"}]
    for split, rows in (("train", train), ("test", test)):
        if kind == "parquet":
            datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        else:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    it = sft_batches(TOK, str(folder), TaskConfig(batch_size=2))
    for position in range(3):
        b = it.batch_at(position)
        texts = sorted(TOK.decode(t[m == 1].tolist(), stop_at_eos=False) for t, m in zip(b.tokens, b.attention_mask))
        assert texts == ["1+1=2", "2+2=4"]


def test_grpo_prompts_are_tokenized_and_fitted_when_the_data_set_is_built(tmp_path):
    """RL prompts longer than max_length: truncate_prompt (GRPO's default) keeps bos and the last tokens,
    drop leaves the row out, error names the file and line; text the tokenizer cannot encode names its
    row and field before anything trains."""
    rows = [{"prompt": "1+2=", "answer": 3}, {"prompt": "12345678+1=", "answer": 12345679},
            {"prompt": "4+4=", "answer": 8}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert GRPOTaskConfig().overlong == "truncate_prompt"
    cfg = GRPOTaskConfig(batch_size=3, seed=0)
    with pytest.warns(UserWarning, match="overlong='truncate_prompt': 1 of 3 rows"):
        b = prompt_batches(TOK, rows, cfg, max_length=6).batch_at(0)
    ids = {tuple(t[m == 1]) for t, m in zip(b.tokens, b.mask)}
    # 12 tokens (bos + 11 characters) cut to 6: bos and the last 5 characters
    assert ids == {tuple(TOK.encode("1+2=")), tuple(TOK.encode("4+4=")), (TOK.bos_id, *TOK.encode("78+1=", add_bos=False))}
    kept = dict(zip((tuple(t[m == 1]) for t, m in zip(b.tokens, b.mask)), b.metadata["answer"]))
    assert kept[(TOK.bos_id, *TOK.encode("78+1=", add_bos=False))] == 12345679  # its own row's columns
    with pytest.warns(UserWarning, match="overlong='drop'"):
        dropped = prompt_batches(TOK, rows, dataclasses.replace(cfg, batch_size=2, overlong="drop"), max_length=6)
    assert sorted(dropped.batch_at(0).metadata["answer"] + dropped.batch_at(1).metadata["answer"]) == [3, 3, 8, 8]
    with pytest.raises(DataError, match=rf"^{path}, line 2 \(row 1, counted from 0\): 12 tokens exceed max_length=6; "
                                        r"1 of 3 rows are longer"):
        prompt_batches(TOK, str(path), dataclasses.replace(cfg, overlong="error"), max_length=6)
    with pytest.raises(ValueError, match="GRPOTaskConfig.overlong: one of 'error', 'drop', 'truncate_prompt'"):
        GRPOTaskConfig(overlong="truncate_completion")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": "What?", "answer": 0}]))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=rf"^{bad}, line 4 \(row 3, counted from 0\): prompt: unknown character 'W' at "
                                        r"position 0 of 'What\?'$"):
        grpo(small_model(), str(bad), lambda prompts, completions, **c: [0.0] * len(completions),
             GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=4, progress=False), run_dir=str(run_dir))
    assert not run_dir.exists()


def test_a_model_tuple_with_a_smaller_vocabulary_and_a_teacher_algorithm_are_refused(tmp_path):
    model, params, tok = small_model()
    tiny_vocab = Model(dataclasses.replace(model.config, vocab_size=tok.vocab_size - 1))
    with pytest.raises(ValueError, match=rf"^model: the Model's vocab_size={tok.vocab_size - 1} is smaller than the "
                                         rf"tokenizer's {tok.vocab_size} ids"):
        load_model((tiny_vocab, tiny_vocab.init(jax.random.key(0)), tok))
    with pytest.raises(ValueError, match="GRPOTaskConfig.algorithm: on_policy_distill distils from a frozen teacher"):
        grpo((model, params, tok), PROMPT_ROWS, lambda prompts, completions, **c: [0.0] * len(completions),
             GRPOTaskConfig(steps=1, batch_size=2, n=2, max_new_tokens=4, algorithm="on_policy_distill",
                            progress=False), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_run_record_names_a_dataset_by_fingerprint_and_a_folder_by_its_absolute_path(tmp_path, monkeypatch):
    import datasets

    from rljax.recipes.tasks import _describe

    a = datasets.Dataset.from_list(SFT_ROWS)
    b = datasets.Dataset.from_list([dict(r, completion=r["completion"] + "0") for r in SFT_ROWS])
    assert len(a) == len(b) and _describe(a) != _describe(b)  # the same count, other rows
    assert _describe(a) == f"<Dataset of {len(a)} rows fingerprint {a._fingerprint}>"
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _describe("ckpt") == _describe(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    assert _describe("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id as given
    from rljax.recipes.tasks import _flat_record

    old = {"task": "sft", "model": "ckpt", "data": "<12 rows>", "config": {"lr": 1.0}}  # recorded relative before
    assert _flat_record(old) == _flat_record(dict(old, model=str(tmp_path / "ckpt")))


def test_recipes_train_on_a_mesh_as_on_one_device(tmp_path):
    """mesh=: a checkpoint folder is loaded straight onto the mesh and a model tuple placed on it; SFT, KTO and
    GRPO trained on a data x fsdp = 2 x 2 mesh of simulated devices give the one-device run's losses and
    parameters, held sharded over the mesh, and the same evaluations on eval_data (8 rows; GRPO's prompts in
    batches of 2, each filled to the mesh's 4 rows with copies)."""
    from conftest import run_with_devices

    out = run_with_devices(f"""
        import os, shutil, jax, numpy as np
        from rljax.models import Model, preset, save_pretrained
        from rljax.models.logprobs import token_logprobs
        from rljax.recipes import GRPOTaskConfig, KTOTaskConfig, SFTTaskConfig, grpo, kto, sft
        from rljax.sharding import make_mesh
        from rljax.tokenizer import HFTokenizer

        tok_dir = os.path.join("tests", "fixtures", "hf_tokenizer")
        tok = HFTokenizer.from_pretrained(tok_dir)
        cfg = preset("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64, vocab_size=tok.vocab_size,
                     max_seq_len=64)
        model = Model(cfg)
        params = model.init(jax.random.key(0))
        ckpt = {str(tmp_path / "ckpt")!r}
        save_pretrained(params, cfg, ckpt)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, name), ckpt)
        mesh = make_mesh(data=2, fsdp=2)
        rows = [{{"prompt": f"{{a}}+{{b}}=", "completion": str(a + b)}} for a in range(4) for b in range(3)]

        def same(a, b, what):
            assert [h["step"] for h in a.history] == [h["step"] for h in b.history] == [1, 2], what
            for k in ("loss", "reward_mean", "kl_k3"):
                if k in a.history[0]:
                    np.testing.assert_allclose([h[k] for h in a.history], [h[k] for h in b.history], rtol=1e-4,
                                               atol=1e-6, err_msg=what + " " + k)
            assert a.eval_metrics.keys() == b.eval_metrics.keys() and a.eval_metrics, what
            for k in a.eval_metrics:
                np.testing.assert_allclose(a.eval_metrics[k], b.eval_metrics[k], rtol=1e-4, atol=1e-6,
                                           err_msg=what + " eval " + k)
            # the trained models compute the same: Adam moves a weight whose gradient is ~0 (the embedding row
            # of a token no row holds) by up to lr a step whichever sign rounding gives it, so the weights
            # themselves are compared through what they compute
            tokens, mask = tok.encode_batch([r["prompt"] + r["completion"] for r in rows])
            np.testing.assert_allclose(np.asarray(token_logprobs(a.params, tokens, mask, model=a.model)),
                                       np.asarray(token_logprobs(b.params, tokens, mask, model=b.model)), rtol=1e-4,
                                       atol=1e-5, err_msg=what)
            leaf = b.params["layers"]["mlp"]["gate"]
            assert b.model.mesh is mesh and leaf.sharding.mesh == mesh and len(leaf.addressable_shards) == 4, what
            assert leaf.addressable_shards[0].data.size * 2 == leaf.size, what  # split over fsdp

        scfg = SFTTaskConfig(steps=2, batch_size=4, lr=3e-3, progress=False)
        same(sft(ckpt, rows, scfg, eval_data=rows[:8]), sft(ckpt, rows, scfg, mesh=mesh, eval_data=rows[:8]),
             "sft from a checkpoint")
        # KTO with the checkpoint's chat template: each batch's mismatched pairs split over the mesh with its rows
        feedback = [{{"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0 else "x" * (1 + i % 3),
                      "label": i % 2 == 0}} for i, r in enumerate(rows)]
        kcfg = KTOTaskConfig(steps=2, batch_size=4, lr=3e-3, progress=False)
        same(kto(ckpt, feedback, kcfg, eval_data=feedback[:8]), kto(ckpt, feedback, kcfg, mesh=mesh,
                                                                     eval_data=feedback[:8]), "kto from a checkpoint")
        gcfg = GRPOTaskConfig(steps=2, batch_size=2, n=2, max_new_tokens=4, lr=1e-2, progress=False)
        reward = lambda prompts, completions, **_: [float(len(c) % 3) for c in completions]  # noqa: E731
        prompts = [{{"prompt": r["prompt"]}} for r in rows]
        same(grpo((model, params, tok), prompts, reward, gcfg, eval_data=prompts[:8]),
             grpo((model, params, tok), prompts, reward, gcfg, mesh=mesh, eval_data=prompts[:8]), "grpo from a tuple")
        print("MESH_TASKS_OK")
    """, n_devices=4)
    assert "MESH_TASKS_OK" in out


def test_dpo_task_config_maps_trl_s_rpo_weight_and_label_smoothing_onto_the_loss():
    """nll_coef (TRL's "sft" term beside "sigmoid", RPO), label_smoothing (cDPO's ε, robust DPO's flip rate) and
    logp_reduction reach the method's loss config; the recipe's first-step loss with nll_coef = 1 is the plain one plus the chosen NLL."""
    from rljax.losses.preference import DPOConfig, SimPOConfig

    assert DPOTaskConfig(nll_coef=0.5).loss() == DPOConfig(nll_coef=0.5)
    assert DPOTaskConfig(method="simpo", nll_coef=0.5, beta=2.5).loss() == SimPOConfig(nll_coef=0.5, beta=2.5)
    assert DPOTaskConfig(label_smoothing=0.2).loss() == DPOConfig(label_smoothing=0.2)
    assert DPOTaskConfig(method="cdpo", label_smoothing=0.05).loss() == DPOConfig(label_smoothing=0.05)
    assert DPOTaskConfig(method="robust_dpo", label_smoothing=0.2).loss() == DPOConfig(flip_rate=0.2)
    assert DPOTaskConfig(method="cdpo", label_smoothing=0.0).loss() == DPOConfig()
    assert DPOTaskConfig(logp_reduction="mean").loss() == DPOConfig(logp_reduction="mean")  # TRL's sigmoid_norm
    with pytest.raises(ValueError, match="ORPOConfig.logp_reduction: odds need a probability, so only 'mean'"):
        DPOTaskConfig(method="orpo", logp_reduction="sum")
    with pytest.raises(ValueError, match=r"DPOConfig.logp_reduction: 'max' not in \('sum', 'mean'\)"):
        DPOTaskConfig(logp_reduction="max")
    cfg = DPOTaskConfig(steps=1, batch_size=4, progress=False)
    plain = dpo(small_model(), PAIR_ROWS, cfg).history[0]
    rpo = dpo(small_model(), PAIR_ROWS, dataclasses.replace(cfg, nll_coef=1.0)).history[0]
    assert rpo["nll"] == pytest.approx(plain["nll"], rel=1e-6) and plain["nll"] > 0
    assert rpo["loss"] == pytest.approx(plain["loss"] + plain["nll"], rel=1e-5)
