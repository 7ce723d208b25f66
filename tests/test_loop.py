"""Collation, the resumable iterator, run_loop (skips, resume) and the SIGKILL kill-and-resume test."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from rljax.checkpoint import Checkpointer
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.models import Model, preset
from rljax.phases import LoopConfig, NonFiniteLossError, SFTPhaseConfig, run_loop, sft
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer


def test_collate_prompt_completion_layout():
    tok = CharTokenizer()
    b = collate_prompt_completion(tok, [("1+2=", "3"), ("10*10=", "100")], min_bucket=4)
    assert b.tokens.shape == (2, 16)  # longest row: bos + 6 + 3 + eos = 11 -> bucket 16
    row0 = [tok.bos_id] + tok.encode("1+2=", add_bos=False) + tok.encode("3", add_bos=False) + [tok.eos_id]
    np.testing.assert_array_equal(b.tokens[0, :7], row0)
    assert (b.tokens[0, 7:] == tok.pad_id).all()
    np.testing.assert_array_equal(b.attention_mask[0], [1] * 7 + [0] * 9)
    np.testing.assert_array_equal(b.loss_mask[0], [0] * 5 + [1, 1] + [0] * 9)  # "3" and eos
    np.testing.assert_array_equal(b.loss_mask[1, :11], [0] * 7 + [1] * 4)
    with pytest.raises(ValueError, match="row 1: 11 tokens exceed max_length=8"):
        collate_prompt_completion(tok, [("1+2=", "3"), ("10*10=", "100")], max_length=8)
    with pytest.raises(ValueError, match="row 0: the completion is empty"):
        collate_prompt_completion(tok, [("1+2=", "")], add_eos=False)
    with pytest.raises(ValueError, match=r"row 1: the completion is empty \(training would teach eos alone\)"):
        collate_prompt_completion(tok, [("1+2=", "3"), ("1+2=", "")])  # with eos too: it taught eos alone
    from rljax.data.lengths import Tokens
    stop = collate_prompt_completion(tok, [("1+2=", Tokens([tok.eos_id]))])  # stopping at once, said explicitly
    np.testing.assert_array_equal(stop.loss_mask[0, :6], [0] * 5 + [1])


def test_batch_iterator_is_a_pure_function_of_position():
    it = BatchIterator(list(range(10)), 3, lambda rows: rows, seed=4)
    assert it.batches_per_epoch == 3
    first = [it.batch_at(n) for n in range(6)]
    again = BatchIterator(list(range(10)), 3, lambda rows: rows, seed=4)
    assert [again.batch_at(n) for n in range(6)] == first
    epoch0 = sorted(sum(first[:3], []))
    assert len(set(epoch0)) == 9 and first[:3] != first[3:]  # no repeats within an epoch; reshuffled after
    resumed = [b for _, b in zip(range(3), (b for _, b in it.iterate(start=3)))]
    assert resumed == first[3:]
    assert BatchIterator(list(range(10)), 3, lambda r: r, seed=5).batch_at(0) != first[0]
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchIterator([1, 2], 3, lambda r: r)


def test_run_loop_stops_after_consecutive_non_finite_steps(tiny, capsys):
    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))

    def step(state, batch):
        return state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + batch), {
            "loss": np.float32(np.nan if batch else 1.0), "skipped": np.int32(batch)}

    class Data:
        def batch_at(self, position):
            return int(position >= 2)

    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 consecutive steps \(steps 3..5\)"):
        run_loop(state, step, Data(), LoopConfig(steps=10, max_consecutive_skips=3, progress=False))
    # a run shorter than the limit is still refused when none of its steps was finite, and a run that
    # ends on skipped steps says so
    with pytest.raises(NonFiniteLossError, match=r"non-finite at every step this run made \(steps 1..2\)"):
        run_loop(state, step, type("AllBad", (), {"batch_at": lambda self, p: 1})(),
                 LoopConfig(steps=2, progress=False))
    out = run_loop(state, step, Data(), LoopConfig(steps=4, max_consecutive_skips=3, progress=False))
    assert int(out.step) == 4 and int(out.skipped_steps) == 2
    assert "the last 2 step(s) had a non-finite loss or gradient and were skipped (steps 3..4)" in capsys.readouterr().out


def test_skipped_steps_between_logged_rows_are_logged_and_said(tiny, tmp_path, capsys):
    """Steps skipped between two logged rows (never on a logged step) once left every metrics row at
    skipped 0: each row now carries skipped_since_last_log, here 2, 1 and 0 by hand, and a warning says it."""
    from rljax.metrics import read_metrics

    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))
    bad = {1, 3, 7}  # data positions whose step is non-finite: steps 2, 4 (rows at 5) and 8 (row at 10)

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": np.float32(np.nan if batch else 1.0),
                                                    "skipped": np.int32(batch)}

    data = type("Data", (), {"batch_at": lambda self, p: int(p in bad)})()
    run_loop(state, step, data, LoopConfig(steps=15, log_every=5, progress=False), run_dir=str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert [(r["step"], r["train/skipped_since_last_log"], r["train/skipped"]) for r in rows] == [
        (5, 2, 0), (10, 1, 0), (15, 0, 0)]
    out = capsys.readouterr().out
    assert "[train] warning: 2 of steps 1..5 had a non-finite loss" in out and "1 of steps 6..10" in out
    with pytest.raises(ValueError, match="LoopConfig.keep_checkpoints: must be >= 1, got 0"):
        LoopConfig(keep_checkpoints=0)


def test_sft_phase_resumes_from_run_dir_and_rejects_a_mismatched_optimizer(tiny, tmp_path, capsys):
    model, _ = tiny
    tok = CharTokenizer()
    data = BatchIterator([("1+2=", "3"), ("2*4=", "8"), ("9-3=", "6"), ("7+7=", "14")], 2,
                         lambda rows: collate_prompt_completion(tok, rows), seed=0)
    opt = OptimizerConfig(lr=1e-2, total_steps=8)
    cfg = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=8, checkpoint_every=4, progress=False))
    m = Model(preset("tiny", n_layers=1, vocab_size=tok.vocab_size))  # resuming does not depend on depth
    full = sft(create_state(m, opt, jax.random.key(0)), data, cfg, model=m, run_dir=str(tmp_path / "a"))
    half = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=4, checkpoint_every=4, progress=False))
    sft(create_state(m, opt, jax.random.key(0)), data, half, model=m, run_dir=str(tmp_path / "b"))
    resumed = sft(create_state(m, opt, jax.random.key(9)), data, cfg, model=m, run_dir=str(tmp_path / "b"))
    assert int(resumed.step) == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), full.params, resumed.params)
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [(x["step"], x.get("event")) for x in lines] == [(4, None), (4, "resumed"), (8, None)]
    with pytest.raises(ValueError, match="does not match cfg.optimizer"):
        sft(create_state(m, OptimizerConfig(grad_accum=2), jax.random.key(0)), data, cfg, model=m)
    # resuming under another configuration is allowed, and said field by field (the loop's length is not one)
    capsys.readouterr()
    other = SFTPhaseConfig(optimizer=OptimizerConfig(lr=2e-2, total_steps=8),
                           loop=LoopConfig(steps=9, checkpoint_every=4, progress=False))
    sft(create_state(m, opt, jax.random.key(9)), data, other, model=m, run_dir=str(tmp_path / "b"))
    out = capsys.readouterr().out
    assert ("[sft] warning: resuming at step 8 under another configuration than the checkpoint's (optimizer.lr: "
            "0.01 -> 0.02); the steps before 8 ran with the saved values") in out
    sft(create_state(m, opt, jax.random.key(9)), data, cfg, model=m, run_dir=str(tmp_path / "a"))  # the same: silent
    assert "warning" not in capsys.readouterr().out
    # other data (three examples of the four, batch size 1): batch n is another batch now, which is said
    fewer = BatchIterator(data.examples[:3], 1, data.collate, seed=0)
    longer = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=10, checkpoint_every=4, progress=False))
    sft(create_state(m, opt, jax.random.key(9)), fewer, longer, model=m, run_dir=str(tmp_path / "a"))
    assert ("[sft] warning: resuming at step 8 with other data than the checkpoint's (batch_size: 2 -> 1; "
            "examples: 4 -> 3)") in capsys.readouterr().out
    # the state the last phase returned, continued in its directory with other data (expert iteration's
    # rounds): the checkpoint is at the given state's own step, so no saved step ran on the old data: silent
    at4 = sft(create_state(m, opt, jax.random.key(0)), data, half, model=m, run_dir=str(tmp_path / "c"))
    capsys.readouterr()
    sft(at4, fewer, cfg, model=m, run_dir=str(tmp_path / "c"))
    assert "warning" not in capsys.readouterr().out
    # a shorter run than the checkpoint's: the saved state comes back (nothing undone), which is said
    short = SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=5, checkpoint_every=4, progress=False))
    back = sft(create_state(m, opt, jax.random.key(9)), data, short, model=m, run_dir=str(tmp_path / "b"))
    assert int(back.step) == 9
    assert "the checkpoint in" in (out := capsys.readouterr().out) and "is at step 9, past steps=5" in out
    with pytest.raises(ValueError, match="BatchIterator: seed must be >= 0, got -1"):
        BatchIterator(data.examples, 2, data.collate, seed=-1)


# orbax's failed read of the truncated step leaves asyncio callbacks behind, reported when collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sft_resumes_past_a_damaged_latest_checkpoint_and_finishes_like_an_uninterrupted_run(tiny, tmp_path):
    """A run stopped at step 6 (checkpoints 2, 4, 6) whose step 6 is then truncated: the rerun warns
    naming it, resumes from step 4, saves 6 and 8 again, and ends bit-identical to a run never stopped."""
    from rljax.checkpoint import DamagedCheckpointWarning

    tok = CharTokenizer()
    data = BatchIterator([("1+2=", "3"), ("2*4=", "8"), ("9-3=", "6"), ("7+7=", "14")], 2,
                         lambda rows: collate_prompt_completion(tok, rows), seed=0)
    opt = OptimizerConfig(lr=1e-2, total_steps=8)
    m = Model(preset("tiny", n_layers=1, vocab_size=tok.vocab_size))  # resuming does not depend on depth

    def cfg(steps):
        return SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=steps, checkpoint_every=2, progress=False))

    full = sft(create_state(m, opt, jax.random.key(0)), data, cfg(8), model=m)
    run, ckpts = str(tmp_path / "run"), tmp_path / "run" / "checkpoints"
    sft(create_state(m, opt, jax.random.key(0)), data, cfg(6), model=m, run_dir=run)
    data_file = max((p for p in (ckpts / "6" / "state").glob("ocdbt.process_*/d/*")), key=os.path.getsize)
    os.truncate(data_file, os.path.getsize(data_file) // 2)
    with pytest.warns(DamagedCheckpointWarning) as caught:
        resumed = sft(create_state(m, opt, jax.random.key(9)), data, cfg(8), model=m, run_dir=run)
    assert [str(w.message).split(" (")[0].split(";")[0] for w in caught] == [
        f"checkpoint {ckpts / '6'} is damaged or unreadable", f"restored {ckpts / '4'} instead"]
    assert int(resumed.step) == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), full.params, resumed.params)
    assert sorted(os.listdir(ckpts)) == ["4", "6", "6.damaged", "8"]  # keep=3 counts good steps only
    with Checkpointer(str(ckpts)) as ck:
        _, meta = ck.restore(create_state(m, opt, jax.random.key(1)))
    assert meta["data_position"] == 8 and meta["config"]["optimizer.lr"] == 1e-2  # what the steps computed with


def _experiment(run_dir, cache_dir):
    cmd = [sys.executable, "-m", "experiments.sft_arithmetic", "--preset", "tiny", "--steps", "40",
           "--batch-size", "8", "--n-train", "400", "--n-test", "8", "--checkpoint-every", "4",
           "--log-every", "4", "--progress", "false", "--evaluate", "false", "--run-dir", run_dir]
    # The three runs share JAX's persistent compilation cache: the first compiles the train step, the
    # others load that executable (the same program, so the bitwise comparison is unaffected) instead
    # of compiling it again, which was most of each run's time.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return cmd, env


def _final_params(run_dir):
    tok = CharTokenizer()
    model = Model(preset("tiny", vocab_size=tok.vocab_size))
    target = create_state(model, OptimizerConfig(total_steps=40), jax.random.key(0))
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ck:
        assert ck.latest_step() == 40
        state, meta = ck.restore(target)
    assert meta["data_position"] == 40
    return state


@pytest.mark.slow  # 25-75 s: the default suite keeps its 15-minute budget; .ci/run runs the slow tier
def test_sigkill_and_rerun_finishes_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    ref_dir, run_dir, cache_dir = str(tmp_path / "ref"), str(tmp_path / "killed"), str(tmp_path / "xla_cache")
    cmd, env = _experiment(ref_dir, cache_dir)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)

    cmd, env = _experiment(run_dir, cache_dir)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a few checkpoints exist, mid-training
        steps = [int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []) if d.isdigit()]
        if steps and max(steps) >= 12:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert killed_at < 40, "the run finished before it could be killed; the test proves nothing"

    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from" in out.stdout
    from rljax.metrics import read_metrics

    # the killed run's lines past its last checkpoint were dropped on resume, then logged again once
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(4, 41, 4))
    assert [r["step"] for r in read_metrics(run_dir, events=True) if "event" in r] == [killed_at]
    a, b = _final_params(ref_dir), _final_params(run_dir)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.opt_state,
                 b.opt_state)


def test_run_loop_logs_evaluates_and_checkpoints_on_schedule(tiny, tmp_path):
    from rljax.metrics import read_metrics

    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))
    seen = []

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": np.float32(batch), "skipped": np.int32(0)}

    def eval_fn(s):
        seen.append(int(s.step))
        return {"score": float(s.step) * 10}

    class Data:
        def batch_at(self, position):
            return float(position)

    cfg = LoopConfig(steps=7, log_every=3, eval_every=2, checkpoint_every=5, progress=False)
    out = run_loop(state, step, Data(), cfg, run_dir=str(tmp_path), eval_fn=eval_fn)
    assert int(out.step) == 7 and seen == [2, 4, 6, 7]
    rows = read_metrics(str(tmp_path))
    assert [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(3, 2.0), (6, 5.0), (7, 6.0)]
    assert [(r["step"], r["train/eval/score"]) for r in rows if "train/eval/score" in r] == [
        (2, 20.0), (4, 40.0), (6, 60.0), (7, 70.0)]
    with Checkpointer(str(tmp_path / "checkpoints")) as ck:
        assert ck.all_steps() == [5, 7]

    # the finished run called again: its final evaluation is read back, not run and logged twice
    seen.clear()
    again = run_loop(state, step, Data(), cfg, run_dir=str(tmp_path), eval_fn=eval_fn)
    assert int(again.step) == 7 and seen == []
    assert read_metrics(str(tmp_path)) == rows
    # a longer run in the same directory evaluates at its own end
    longer = run_loop(state, step, Data(), dataclasses.replace(cfg, steps=8), run_dir=str(tmp_path), eval_fn=eval_fn)
    assert int(longer.step) == 8 and seen == [8]
    assert [(r["step"], r["train/eval/score"]) for r in read_metrics(str(tmp_path)) if "train/eval/score" in r][-2:] \
        == [(7, 70.0), (8, 80.0)]


def test_a_fresh_start_drops_the_lines_a_run_killed_before_its_first_checkpoint_wrote(tiny, tmp_path):
    from rljax.metrics import MetricsWriter, read_metrics

    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": np.float32(batch), "skipped": np.int32(0)}

    class Data:
        def batch_at(self, position):
            return float(position)

    with MetricsWriter(str(tmp_path)) as w:  # the killed run: 3 logged steps, no checkpoint; another phase's line
        for k in (1, 2, 3):
            w.write(k, {"loss": 99.0}, prefix="train/")
        w.write(1, {"loss": 7.0}, prefix="other/")
    run_loop(state, step, Data(), LoopConfig(steps=2, log_every=1, progress=False), run_dir=str(tmp_path))
    assert [(r["step"], r.get("train/loss"), r.get("other/loss")) for r in read_metrics(str(tmp_path))] == [
        (1, None, 7.0), (1, 0.0, None), (2, 1.0, None)]


def test_tokens_per_second_counts_every_real_token_of_the_batch():
    from rljax.data.batch import PromptBatch
    from rljax.phases import _tokens

    batch = collate_prompt_completion(CharTokenizer(), [("1+2=", "3"), ("12*4=", "48")])
    # bos + prompt + completion + eos, padding out: 7 + 9, not the sft loss's own count of completion tokens
    assert _tokens(batch, {"tokens": 5.0}) == 16 == int(np.asarray(batch.attention_mask).sum())
    # an RL step's batch holds prompts only: the step's count (prompts + completions) is taken
    prompts = PromptBatch(tokens=np.ones((2, 4), np.int32), mask=np.ones((2, 4), np.int32), metadata={})
    assert _tokens(prompts, {"tokens": 64.0}) == 64 and _tokens(prompts, {}) == 0


def test_unshuffled_batches_read_every_row_in_order_as_one_cycle():
    # 5 rows in batches of 2: rows 0 1 | 2 3 | 4 0 | 1 2 | 3 4 | 0 1 ... (no row left out every pass)
    calls = []
    it = BatchIterator(list("abcde"), 2, lambda r: calls.append(r) or "".join(r), shuffle=False)
    assert [it.batch_at(n) for n in range(7)] == ["ab", "cd", "ea", "bc", "de", "ab", "cd"]
    assert len(calls) == 5  # N / gcd(N, B) = 5 distinct batches, each collated once
    # divisible sizes: the same batches as before, every pass
    assert [BatchIterator(list("abcd"), 2, "".join, shuffle=False).batch_at(n) for n in range(4)] == [
        "ab", "cd", "ab", "cd"]


def test_batch_iterator_collates_a_recurring_batch_once():
    TOK_CACHE, calls = CharTokenizer(), []

    def collate(rows):
        calls.append(list(rows))
        return collate_prompt_completion(TOK_CACHE, rows)

    rows = [("1+2=", "3"), ("2*4=", "8"), ("9-3=", "6"), ("7+7=", "14")]
    fixed = BatchIterator(rows, 4, collate, shuffle=False)  # the data set is one batch
    fresh = BatchIterator(rows, 4, lambda r: collate_prompt_completion(TOK_CACHE, r), shuffle=False, cache=0)
    for n in range(6):
        a, b = fixed.batch_at(n), fresh.batch_at(n)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert len(calls) == 1
    # unshuffled: each batch of the epoch is collated once, then repeats every epoch
    calls.clear()
    two = BatchIterator(rows, 2, collate, shuffle=False)
    batches = [two.batch_at(n) for n in range(6)]
    assert len(calls) == 2 and batches[0] is batches[2] is batches[4] and batches[1] is batches[3]
    # shuffled: cached only while every ordered draw fits (4 of 4: 24 <= 64), and equal to collating again
    calls.clear()
    shuffled = BatchIterator(rows, 4, collate, seed=3)
    fresh = BatchIterator(rows, 4, lambda r: collate_prompt_completion(TOK_CACHE, r), seed=3, cache=0)
    for n in range(60):
        for x, y in zip(jax.tree.leaves(shuffled.batch_at(n)), jax.tree.leaves(fresh.batch_at(n))):
            np.testing.assert_array_equal(x, y)
    assert len(calls) == len({tuple(shuffled.indices_at(n)) for n in range(60)}) < 60
    # more distinct batches than the cache holds: collated every time (nothing kept)
    many = BatchIterator(list(range(100)), 10, lambda r: r)
    assert many._cache is None and BatchIterator(list(range(100)), 10, lambda r: r, shuffle=False)._cache == {}


def test_default_buckets_do_not_inflate_tiny_rows():
    from rljax.buckets import bucket_length

    assert [bucket_length(n) for n in (1, 2, 3, 5, 9, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket_length(2, minimum=16) == 16 and bucket_length(40, maximum=48) == 48
    b = collate_prompt_completion(CharTokenizer(), [("1", "2")])  # bos 1 2 eos: 4 tokens, not 16
    assert b.tokens.shape == (1, 4)


def test_buckets_above_64_step_by_a_quarter_octave():
    """Powers of two up to 64, then 4 widths per octave: padding under 25%, few shapes."""
    from rljax.buckets import bucket_length

    assert [bucket_length(n) for n in (64, 65, 80, 81, 97, 112, 113, 128, 129, 257, 1000)] == \
        [64, 80, 80, 96, 112, 112, 128, 128, 160, 320, 1024]
    assert all(n <= bucket_length(n) < 1.25 * n for n in range(65, 4097))
    assert len({bucket_length(n) for n in range(1, 1025)}) == 7 + 4 * 4  # 1..64, then 4 an octave
    # the minimum is kept (10 -> 128), and an octave reached through it is not split below it
    assert bucket_length(10, minimum=128) == 128 and bucket_length(130, minimum=128) == 160
    assert bucket_length(97, maximum=100) == 100
    tok = CharTokenizer()
    b = collate_prompt_completion(tok, [("1" * 40, "2" * 55)], add_bos=False)  # 40 + 55 + eos = 96 tokens
    assert b.tokens.shape == (1, 96) and int(b.attention_mask.sum()) == 96


def test_the_failing_step_is_logged_the_bar_moves_every_step_and_a_continuation_is_not_a_resume(
        tiny, tmp_path, capsys, monkeypatch):
    """The step that raises NonFiniteLossError is in metrics.jsonl (its row, skipped, NaN loss); with
    log_every=0 the progress bar still advances one step at a time; a phase called again from the state its
    checkpoint holds (a pipeline's next round in the same directory) says "continuing", writes no
    "resumed" marker, and one with an earlier state says "resumed"; evaluation and checkpoint time is
    not counted in tokens/s."""
    from rljax import phases
    from rljax.metrics import read_metrics

    model, _ = tiny
    state = create_state(model, OptimizerConfig(), jax.random.key(0))

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": np.float32(np.nan if batch else 1.0),
                                                    "skipped": np.int32(batch)}

    data = type("Data", (), {"batch_at": lambda self, p: int(p >= 2)})()
    with pytest.raises(NonFiniteLossError):
        run_loop(state, step, data, LoopConfig(steps=10, log_every=100, max_consecutive_skips=3, progress=False),
                 run_dir=str(tmp_path / "a"))
    rows = [r for r in read_metrics(str(tmp_path / "a")) if "train/loss" in r]
    assert [(r["step"], r["train/skipped"], r["train/skipped_since_last_log"]) for r in rows] == [(5, 1, 3)]
    assert np.isnan(rows[0]["train/loss"])

    updates = []

    class Bar:
        def __init__(self, total, *, initial=0, desc="", disable=False):
            self.n = initial

        def update(self, n=1, **postfix):
            self.n += n
            updates.append((n, bool(postfix)))

        def close(self):
            pass

    monkeypatch.setattr(phases, "Progress", Bar)
    good = type("Good", (), {"batch_at": lambda self, p: 0})()
    run_loop(state, step, good, LoopConfig(steps=4, log_every=0, progress=True))
    assert updates == [(1, False), (1, False), (1, False), (1, True)]  # the last step logged, with its metrics

    d = str(tmp_path / "b")
    first = run_loop(state, step, good, LoopConfig(steps=3, progress=False), run_dir=d)
    capsys.readouterr()
    run_loop(first, step, good, LoopConfig(steps=5, progress=False), run_dir=d)  # from the checkpoint's own step
    assert "[train] continuing from" in capsys.readouterr().out
    run_loop(state, step, good, LoopConfig(steps=6, progress=False), run_dir=d)  # an earlier state: a resume
    assert "[train] resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(d, events=True) if r.get("event") == "resumed"] == [5]

    def slow_eval(s):
        time.sleep(0.5)
        return {"x": 1.0}

    def timed(state, batch):
        time.sleep(0.02)
        return step(state, batch)

    tokens = np.ones((2, 50), np.int32)
    from rljax.data import SequenceBatch

    batch = SequenceBatch(tokens=tokens, attention_mask=tokens, loss_mask=tokens)
    steady = type("Steady", (), {"batch_at": lambda self, p: batch})()
    run_loop(state, lambda s, b: timed(s, 0), steady, LoopConfig(steps=4, log_every=2, eval_every=1, progress=False),
             run_dir=str(tmp_path / "c"), eval_fn=slow_eval)
    rates = [r["train/tokens_per_s"] for r in read_metrics(str(tmp_path / "c")) if "train/tokens_per_s" in r]
    # 100 tokens per 20 ms step, up to 100 ms each on a loaded machine: > 1000 tokens/s; with an evaluation counted
    # (each interval of 2 steps holds one or two) at most 200 / 0.54 = 370
    assert len(rates) == 2 and all(r > 100 / 0.1 for r in rates), rates


def test_a_phase_whose_steps_leave_accumulated_batches_unapplied_is_refused(tiny):
    model, _ = tiny
    opt = OptimizerConfig(grad_accum=4, total_steps=2)
    state = create_state(model, opt, jax.random.key(0))
    with pytest.raises(ValueError, match=r"^sft: loop.steps=7 is not a multiple of optimizer.grad_accum=4: the last 3 "
                                         r"batch\(es\) would be accumulated and never applied"):
        sft(state, None, SFTPhaseConfig(optimizer=opt, loop=LoopConfig(steps=7, progress=False)), model=model)
