"""Rejection sampling and expert iteration: the keep / deduplicate / cap logic against hand-computed
cases; rejection sampling on the arithmetic task; expert iteration (tiny model, 2 rounds) resuming
bit-identically after kills between rounds and inside a round's SFT; other arguments and a missing
stage input refused naming the stage and the file; from_base training the starting state each round."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from rljax.data.arithmetic import make_split, well_formed
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.eval import PolicyEvalConfig
from rljax.expert_iteration import ExpertIterationConfig, RejectionConfig, expert_iteration, rejection_sample, \
    select_samples
from rljax.models import Model, preset
from rljax.phases import LoopConfig, SFTPhaseConfig, sft
from rljax.pipelines import StageArgumentsError, read_results
from rljax.rewards.rules import arithmetic_answer_reward
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
OPT = OptimizerConfig(lr=3e-3, schedule="constant")


class Killed(BaseException):
    """A simulated kill (like KeyboardInterrupt, not caught by `except Exception`)."""


def test_select_samples_keeps_deduplicates_and_caps_as_computed_by_hand():
    prompts = ["p0", "p1", "p2"]
    completions = ["a", "b", "a", "c",   # p0: "b" below the threshold, "c" malformed, the second "a" a repeat
                   "x", "y", "z", "x",   # p1: all pass; the second "x" a repeat; cap 2 drops "z"
                   "u", "v", "w", "t"]   # p2: all below the threshold
    rewards = [1.0, 0.5, 1.0, 2.0, 3.0, 2.0, 1.0, 3.0, 0.0, 0.0, 0.9, 0.99]
    ok = [True, True, True, False] + [True] * 8
    rows, stats = select_samples(prompts, completions, rewards, n=4, threshold=1.0, max_per_prompt=2,
                                 well_formed=ok)
    assert [(r["prompt"], r["completion"], r["reward"], r["sample"]) for r in rows] == [
        ("p0", "a", 1.0, 0), ("p1", "x", 3.0, 0), ("p1", "y", 2.0, 1)]
    assert stats == dict(samples=12, passed=6, reward_failed=0, below_threshold=5, malformed=1, duplicates=2,
                         over_cap=1, kept=3,
                         kept_fraction=0.25, prompts=3, prompts_with_kept=2, prompts_with_kept_fraction=2 / 3,
                         sampled_reward_mean=pytest.approx(np.mean(rewards)))
    # without deduplication or a cap: every passing sample, highest reward first within a prompt
    rows, stats = select_samples(prompts, completions, rewards, n=4, threshold=1.0, deduplicate=False,
                                 well_formed=ok)
    assert [r["completion"] for r in rows] == ["a", "a", "x", "x", "y", "z"]
    assert stats["kept"] == stats["passed"] == 6 and stats["duplicates"] == stats["over_cap"] == 0
    # the highest-reward copy of a repeated completion is the one kept; ties go to the earlier sample
    rows, _ = select_samples(["q"], ["s", "s", "r"], [1.0, 2.0, 2.0], n=3, threshold=0.0, max_per_prompt=1)
    assert [(r["completion"], r["sample"]) for r in rows] == [("s", 1)]
    with pytest.raises(ValueError, match="need 6 completions and rewards"):
        select_samples(prompts[:2], completions, rewards, n=3, threshold=1.0)
    with pytest.raises(ValueError, match="RejectionConfig.max_per_prompt"):
        RejectionConfig(max_per_prompt=0)


def test_select_samples_pools_a_repeated_prompt_and_never_keeps_a_failed_reward_call():
    # "p" given twice (a round with more prompt slots than prompts): one prompt of 4 samples, deduplicated and capped
    # together, as if drawn in one call; "q"'s best sample scored a stand-in after its reward call failed
    prompts = ["p", "q", "p"]
    completions = ["a", "b", "c", "d", "a", "e"]
    rewards = [1.0, 2.0, 5.0, 1.0, 3.0, 1.5]
    failed = [False, False, True, False, False, False]
    rows, stats = select_samples(prompts, completions, rewards, n=2, threshold=1.0, max_per_prompt=2, failed=failed)
    # p: samples a(1.0) b(2.0) a(3.0) e(1.5) -> a(3.0, slot 2) b(2.0); e over the cap, the other a a repeat
    assert [(r["prompt"], r["completion"], r["reward"], r["prompt_index"], r["sample"]) for r in rows] == [
        ("p", "a", 3.0, 2, 0), ("p", "b", 2.0, 0, 1), ("q", "d", 1.0, 1, 1)]
    assert stats == dict(samples=6, passed=5, reward_failed=1, below_threshold=0, malformed=0, duplicates=1,
                         over_cap=1, kept=3, kept_fraction=0.5, prompts=2, prompts_with_kept=2,
                         prompts_with_kept_fraction=1.0, sampled_reward_mean=pytest.approx(np.mean([1, 2, 1, 3, 1.5])))
    with pytest.raises(ValueError, match=r"failed has shape \(2,\), expected \(6,\)"):
        select_samples(prompts, completions, rewards, n=2, threshold=1.0, failed=[True, False])


def test_rejection_sample_stops_at_the_tokenizers_stop_ids():
    from rljax.sampling import sample, tokenizer_ids
    from rljax.tokenizer import HFTokenizer

    # an HF tokenizer whose stop ids (4, 1, 7) and pad (2) are not SampleConfig's defaults (eos 2, pad 0)
    tok = HFTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "fixtures", "hf_tokenizer"))
    model = Model(preset("tiny", n_layers=1, vocab_size=tok.vocab_size, max_seq_len=64))
    params = create_state(model, OPT, jax.random.key(0)).params
    params = dict(params, lm_head=params["lm_head"] * 0)  # uniform next token: some rows stop, most run on
    prompts = ["hello world", "abc", "xyz q", "foo"]
    cfg = RejectionConfig(samples=16, threshold=1.0, deduplicate=False, sampling=SampleConfig(max_new_tokens=40))
    rows, stats = rejection_sample(params, prompts, lambda p, c, **_: np.ones(len(c), np.float32), cfg, model=model,
                                   tokenizer=tok, key=jax.random.key(1))
    # the same draws replayed: the rows that wrote one of the tokenizer's stop ids are the ones kept
    tokens, mask = tok.encode_batch(prompts, padding_side="left")
    replay = sample(params, tokens, mask, jax.random.fold_in(jax.random.key(1), 0), model=model,
                    cfg=SampleConfig(max_new_tokens=40, n=16, **tokenizer_ids(tok)))
    stopped = np.isin(np.asarray(replay.completions), tok.eos_ids).any(axis=1)
    assert 0 < stopped.sum() < 64 and stats["kept"] == int(stopped.sum()) == 64 - stats["truncated"]
    assert sorted((r["prompt_index"], r["sample"]) for r in rows) == [divmod(int(k), 16) for k in np.flatnonzero(stopped)]


@pytest.fixture(scope="module")
def warm():
    """A tiny 1-layer model after 120 SFT steps on level-1 arithmetic: it writes the format and gets a few
    answers right at temperature 1, so rejection sampling keeps some samples and drops most."""
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size, max_seq_len=64))
    train, test = make_split(256, 8, levels=(1,), seed=0)
    collate = functools.partial(collate_prompt_completion, TOK, max_length=64)
    state = create_state(model, OPT, jax.random.key(0))
    data = BatchIterator([(p.prompt, p.completion) for p in train], 16, collate, seed=0)
    state = sft(state, data, SFTPhaseConfig(optimizer=OPT, loop=LoopConfig(steps=120, log_every=60, progress=False)),
                model=model)
    return model, state, train, test


SAMPLING = SampleConfig(max_new_tokens=20, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


def test_rejection_sample_keeps_right_well_formed_answers(warm):
    model, state, train, _ = warm
    problems = train[:20]
    cfg = RejectionConfig(samples=4, threshold=1.0, max_per_prompt=2, prompts_per_batch=8, sampling=SAMPLING)
    kw = dict(model=model, tokenizer=TOK, key=jax.random.key(1), well_formed=well_formed, problems=problems)
    rows, stats = rejection_sample(state.params, [p.prompt for p in problems], arithmetic_answer_reward, cfg, **kw)
    print(stats)
    assert stats["samples"] == 80 and 0 < stats["kept"] < 80
    by_prompt = {}
    for r in rows:
        p = problems[r["prompt_index"]]
        assert r["prompt"] == p.prompt and r["reward"] == 1.0
        assert arithmetic_answer_reward([p.prompt], [r["completion"]], problems=[p])[0] == 1.0
        assert well_formed(r["completion"])
        by_prompt.setdefault(r["prompt_index"], []).append(r["completion"])
    assert all(len(v) == len(set(v)) <= 2 for v in by_prompt.values())
    assert stats["prompts_with_kept"] == len(by_prompt)
    assert stats["kept_fraction"] == stats["kept"] / 80
    again, _ = rejection_sample(state.params, [p.prompt for p in problems], arithmetic_answer_reward, cfg, **kw)
    assert again == rows  # a function of the key
    with pytest.raises(ValueError, match="metadata 'problems' has 3 entries for 20 prompts"):
        rejection_sample(state.params, [p.prompt for p in problems], arithmetic_answer_reward, cfg,
                         **dict(kw, problems=problems[:3]))


def _ei_config(**changes):
    base = dict(rounds=2, prompts_per_round=16, steps_per_round=3, batch_size=4, optimizer=OPT,
                rejection=RejectionConfig(samples=4, threshold=1.0, max_per_prompt=2, prompts_per_batch=16,
                                          sampling=SAMPLING),
                evaluation=PolicyEvalConfig(max_new_tokens=20, samples=2), log_every=1, checkpoint_every=1,
                eval_every=1, progress=False)
    return ExpertIterationConfig(**{**base, **changes})


def _ei(warm, run_dir, calls, *, kill_round=None, kill_step=None, allow_change=False, **changes):
    """Expert iteration from the warm model. calls records the round of every rejection-sampling reward
    call; kill_round=r raises in round r's reward call; kill_step=s raises when the SFT phase evaluates
    step s (checkpoints every step, after the eval)."""
    model, state, train, test = warm
    problems = train[:32]

    def reward(prompts, completions, *, problems):
        calls.append(len(calls))
        if kill_round is not None and len(calls) - 1 == kill_round:
            raise Killed(f"reward call {kill_round}")
        return arithmetic_answer_reward(prompts, completions, problems=problems)

    def eval_fn(s):
        if kill_step is not None and int(s.step) == kill_step:
            raise Killed(f"step {kill_step}")
        return {}

    return expert_iteration(state, [p.prompt for p in problems], reward, _ei_config(**changes), model=model,
                            tokenizer=TOK, key=jax.random.key(3), held_out=test, well_formed=well_formed,
                            run_dir=run_dir, allow_change=allow_change, eval_fn=eval_fn,
                            eval_reward_fn=arithmetic_answer_reward, problems=problems)


def _same(x, y):
    def data(a):
        return jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(data(a)), np.asarray(data(b)))


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_expert_iteration_resumes_bit_identically_after_kills_between_and_inside_rounds(warm, tmp_path):
    model, state0, _, _ = warm
    start = int(state0.step)
    calls = []
    full, rows = _ei(warm, str(tmp_path / "full"), calls)
    assert len(calls) == 2 and int(full.step) == start + 6
    assert [r["stage"] for r in rows] == ["start", "round-0", "round-1"] and [r["round"] for r in rows] == [-1, 0, 1]
    for r in rows[1:]:
        assert r["samples"] == 64 and 0 < r["kept"] <= 32 and r["trained_kept"] == r["kept"]
        assert r["kept_fraction"] == r["kept"] / 64 and r["kl_to_start"] > 0
    for r in rows:
        assert {"accuracy_greedy", "accuracy_sampled", "reward_mean", "completion_length"} <= set(r)
        assert r["reward_mean"] == r["accuracy_sampled"]  # the answer reward is the sampled accuracy
    print(json.dumps(rows, indent=1))
    assert read_results(str(tmp_path / "full")) == rows
    table = open(tmp_path / "full" / "results.md").read().splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| stage | round |") and "kept_fraction" in table[0]
    assert json.load(open(tmp_path / "full" / "round-1" / "results.json")) == rows[2]

    run = str(tmp_path / "killed")
    calls = []
    with pytest.raises(Killed):  # round 0 done; killed in round 1's rejection sampling (between rounds)
        _ei(warm, run, calls, kill_round=1)
    assert len(calls) == 2 and not os.path.exists(os.path.join(run, "round-1", "samples.json"))
    calls = []
    with pytest.raises(Killed):  # killed inside round 1's SFT, after its step start + 5
        _ei(warm, run, calls, kill_step=start + 5)
    assert len(calls) == 1  # round 0 is not sampled again
    assert not os.path.exists(os.path.join(run, "round-1", "results.json"))
    calls = []
    resumed, resumed_rows = _ei(warm, run, calls)
    assert calls == []  # round 1's samples were saved: reused
    _same(full, resumed)
    assert resumed_rows == rows and read_results(run) == rows
    lines = [json.loads(x) for x in open(os.path.join(run, "policy", "metrics.jsonl"))]
    assert [x["step"] for x in lines if "sft/loss" in x] == list(range(start + 1, start + 7))  # each step once

    # a rerun with other arguments is refused naming the stage and its file; nothing runs
    with pytest.raises(StageArgumentsError, match=r"stage 'start': .*start/stage.json was written by other "
                                                  r"arguments \(config.steps_per_round: 3 -> 4\)"):
        _ei(warm, run, calls, steps_per_round=4)
    # allow_change (the study's --force-config) records the new arguments; every stage had finished: none reruns
    again, _ = _ei(warm, run, calls, steps_per_round=4, allow_change=True)
    _same(full, again)
    changes = [json.loads(x)["changes"] for x in open(os.path.join(run, "start", "stage_changes.jsonl"))]
    assert changes == [{"config.steps_per_round": [3, 4]}]
    # a finished stage's input that went missing is named with its file
    os.remove(os.path.join(run, "round-0", "samples.json"))
    with pytest.raises(FileNotFoundError, match=r"stage 'round-0': its data .*round-0/samples.json is missing"):
        _ei(warm, run, calls, steps_per_round=4)
    assert calls == []


def test_expert_iteration_from_base_trains_the_starting_state_each_round(warm, tmp_path):
    model, state0, _, _ = warm
    start = int(state0.step)
    calls = []
    state, rows = _ei(warm, str(tmp_path / "base"), calls, from_base=True, accumulate=True, eval_every=0)
    assert int(state.step) == start + 3  # round 1 restarted from the base's step, 3 steps
    for r in (0, 1):
        with open(tmp_path / "base" / f"policy-round-{r}" / "metrics.jsonl") as f:
            steps = [json.loads(x)["step"] for x in f if "sft/loss" in x]
        assert steps == [start + 1, start + 2, start + 3]
    assert rows[2]["trained_kept"] == rows[1]["kept"] + rows[2]["kept"]  # accumulate: both rounds' samples


def test_a_round_keeping_nothing_trains_the_general_rows_with_a_warning_and_rounds_continue_silently(
        warm, tmp_path, capsys):
    """RAFT (from the current policy): a threshold nothing reaches keeps no sample, so each round trains on the
    general rows alone, which is warned of; round 1 continues round 0's state in the same phase directory with its
    own shuffling seed, which is not "other data than the checkpoint's" (its checkpoint is the state given)."""
    model, state, train, _ = warm
    problems = train[:8]
    general = [(p.prompt, p.completion) for p in train[8:16]]
    cfg = _ei_config(rejection=RejectionConfig(samples=2, threshold=100.0, prompts_per_batch=8, sampling=SAMPLING),
                     prompts_per_round=8, steps_per_round=2, eval_every=0, checkpoint_every=0)
    with pytest.warns(UserWarning, match="round 0 kept no sample .*: the policy trains on the sft_rows alone"):
        out, rows = expert_iteration(state, [p.prompt for p in problems], arithmetic_answer_reward, cfg, model=model,
                                     tokenizer=TOK, key=jax.random.key(3), sft_rows=general, problems=problems,
                                     run_dir=str(tmp_path / "raft"))
    assert [(r["kept"], r["trained_kept"], r["trained_general"], r["sft_steps"]) for r in rows] == [
        (0, 0, 8, int(state.step) + 2), (0, 0, 8, int(state.step) + 4)]
    assert int(out.step) == int(state.step) + 4
    assert "other data than the checkpoint's" not in capsys.readouterr().out


@pytest.mark.slow  # an experiment's whole --smoke run; .ci/run runs the slow tier
def test_experiment_smoke_trains_sft_first_then_rounds_and_reruns_to_the_same_table(tmp_path):
    """`python -m experiments.expert_iteration --smoke` (SFT smoke first, then 2 rounds); run again in the same
    directory it redoes nothing and reports the same rows."""
    from experiments import expert_iteration as ex

    cfg = dict(smoke=True, sft_run_dir=str(tmp_path / "sft"), run_dir=str(tmp_path / "ei"), progress=False)
    res = ex.main(ex.Config(**cfg))
    rows = res["rows"]
    assert [r["stage"] for r in rows] == ["start", "round-0", "round-1"]
    for r, row in enumerate(rows[1:]):
        assert row["samples"] == 16 * 2 and row["trained_general"] == 16 and row["sft_steps"] == 4 * (r + 1)
        assert row["kept"] == row["trained_kept"] and 0 <= row["kept_fraction"] <= 1
        assert row["kl_to_start"] > 0  # four SFT steps moved the policy
    for row in rows:
        n = 16  # held-out problems; greedy and 2 samples each
        assert abs(row["accuracy_greedy"] * n - round(row["accuracy_greedy"] * n)) < 1e-9
        assert abs(row["accuracy_sampled"] * 2 * n - round(row["accuracy_sampled"] * 2 * n)) < 1e-9
        assert row["reward_mean"] == row["accuracy_sampled"]
    assert read_results(str(tmp_path / "ei")) == rows
    assert os.path.exists(tmp_path / "ei" / "results.md")
    again = ex.main(ex.Config(**cfg))
    assert again["rows"] == rows
