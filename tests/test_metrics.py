import builtins
import json
import math
import os
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rljax.metrics import MetricsWriter, Progress, format_number, format_postfix, plot_metrics, read_metrics

TB_MODULES = ("tensorboardX", "torch", "flax.metrics.tensorboard", "tensorflow")


def _strict_json(line):
    """json.loads that fails the test on bare NaN / Infinity tokens."""
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c!r} in {line!r}"))


def _no_tb_backend(monkeypatch):
    """Make every TensorBoard backend fail to import."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if any(name == m or name.startswith(m + ".") for m in TB_MODULES):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_write_read_roundtrip(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"loss": 1.5, "np_f32": np.float32(0.25), "np_i": np.int64(7), "flag": True})
        w.write(1, {"jax_i": jnp.asarray(3, jnp.int32), "jax_f": jnp.asarray(0.5, jnp.float32),
                    "bf16": jnp.asarray(1.5, jnp.bfloat16), "np0d": np.array(2.0)})
        w.write(2, {"nan": float("nan"), "inf": np.float64(np.inf), "ninf": jnp.asarray(-jnp.inf)}, prefix="eval/")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    raw = [_strict_json(line) for line in lines]
    assert raw[2]["eval/nan"] == "nan" and raw[2]["eval/inf"] == "inf" and raw[2]["eval/ninf"] == "-inf"

    recs = read_metrics(str(tmp_path))
    assert recs == read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert all(isinstance(r["time"], float) for r in recs)

    r0, r1, r2 = recs
    assert r0["loss"] == 1.5 and r0["np_f32"] == 0.25 and r0["flag"] == 1
    assert r0["np_i"] == 7 and isinstance(r0["np_i"], int)
    assert isinstance(r0["flag"], int)
    assert r1["jax_i"] == 3 and isinstance(r1["jax_i"], int)
    assert r1["jax_f"] == 0.5 and isinstance(r1["jax_f"], float)
    assert r1["bf16"] == 1.5 and r1["np0d"] == 2.0
    assert set(r2) == {"step", "time", "eval/nan", "eval/inf", "eval/ninf"}
    assert math.isnan(r2["eval/nan"])
    assert r2["eval/inf"] == math.inf and r2["eval/ninf"] == -math.inf


def test_flushes_each_write_and_appends_on_reopen(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, {"a": 1.0})
    # Readable before close: the line was flushed.
    assert [r["a"] for r in read_metrics(tmp_path)] == [1.0]
    w.close()
    w.close()  # idempotent

    with MetricsWriter(tmp_path, tensorboard=False) as w2:
        w2.write(2, {"a": 2.0})
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["a"]) for r in recs] == [(1, 1.0), (2, 2.0)]
    with pytest.raises(ValueError, match="closed"):
        w2.write(3, {"a": 3.0})


def test_non_scalar_and_reserved_names_raise(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="grad_norm"):
            w.write(0, {"grad_norm": np.ones(3)})
        with pytest.raises(ValueError, match="train/logits"):
            w.write(0, {"logits": jnp.ones((1,))}, prefix="train/")
        with pytest.raises(ValueError, match="step"):
            w.write(0, {"step": 1})
    # Nothing was written by the failed calls.
    assert read_metrics(tmp_path) == []


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n\n{"step": 1, "a": \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3"):
        read_metrics(tmp_path)


def test_resume_drops_this_phases_records_past_the_step_and_marks_it(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": float(step)}, prefix="sft/")
        w.write(5, {"score": 0.5}, prefix="sft/eval/")
        for step in range(1, 4):
            w.write(step * 2, {"loss": -float(step)}, prefix="rm/")  # another phase in the same file
    before = (tmp_path / "metrics.jsonl").read_text().splitlines()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "sft/lo')  # the killed run died in the middle of a line

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((a, b)), real_replace(a, b))[1])
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        assert w.resume(3, prefix="sft/") == 4  # steps 4, 5, the eval at 5 and the cut line
        w.write(4, {"loss": 40.0}, prefix="sft/")
    assert renamed and renamed[0][1] == str(tmp_path / "metrics.jsonl")  # rewritten whole, then renamed

    raw = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in before]
    kept = [r for r in kept if not (r["step"] > 3 and any(k.startswith("sft/") for k in r))]
    assert raw[:-2] == kept  # the other lines, unchanged and in order
    assert {k: raw[-2][k] for k in ("step", "event", "phase")} == {"step": 3, "event": "resumed", "phase": "sft/"}
    assert [(r["step"], r.get("sft/loss"), r.get("rm/loss")) for r in read_metrics(tmp_path)] == [
        (1, 1.0, None), (2, 2.0, None), (3, 3.0, None), (2, None, -1.0), (4, None, -2.0), (6, None, -3.0),
        (4, 40.0, None)]  # event records only on request
    assert len(read_metrics(tmp_path, events=True)) == 8
    with pytest.raises(ValueError, match=r"available: \['rm/loss', 'sft/loss'\]"):  # the marker is no metric
        plot_metrics(tmp_path, ["nope"], str(tmp_path / "x.png"))

    with MetricsWriter(tmp_path, tensorboard=False) as w:  # resuming again at the same step: nothing to drop
        assert w.resume(4, prefix="sft/", mark=False) == 0
    with pytest.raises(ValueError, match="reserved"):
        MetricsWriter(tmp_path, tensorboard=False).write(1, {"event": 1})


def test_plot_metrics(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(20):
            w.write(step, {"loss": 1.0 / (step + 1), "reward": float(step % 5)})
        w.write(20, {"loss": float("nan")})
    out = plot_metrics(tmp_path, ["loss", "reward"], str(tmp_path / "plots" / "m.png"), smooth=4, title="run")
    assert out == str(tmp_path / "plots" / "m.png")
    data = open(out, "rb").read()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 5000

    with pytest.raises(ValueError, match=r"available: \['loss', 'reward'\]"):
        plot_metrics(tmp_path, ["loss", "nope"], str(tmp_path / "x.png"))
    assert not os.path.exists(tmp_path / "x.png")


def test_tensorboard_true_without_backend_raises(tmp_path, monkeypatch):
    _no_tb_backend(monkeypatch)
    with pytest.raises(ImportError, match="tensorboardX"):
        MetricsWriter(tmp_path / "run", tensorboard=True)
    # tensorboard=None silently falls back to JSON lines only.
    with MetricsWriter(tmp_path / "run2") as w:
        assert not w.tensorboard
        w.write(0, {"a": 1.0})
    assert not os.path.exists(tmp_path / "run2" / "tb")
    assert read_metrics(tmp_path / "run2")[0]["a"] == 1.0


def test_tensorboard_uses_backend_writer(tmp_path, monkeypatch):
    """With a (fake) tensorboardX, scalars go to <run_dir>/tb with prefixed tags and steps; the writer is made
    at the first write, with a file-name suffix that orders its sessions."""
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir, **kwargs):
            calls.append(("init", logdir, kwargs))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        assert w.tensorboard and calls == []
        w.write(5, {"loss": jnp.asarray(0.5), "n": 3}, prefix="train/")
    suffix = f".00000.{os.getpid()}"  # the first session in the directory, and this process
    assert calls == [("init", os.path.join(str(tmp_path), "tb"), dict(purge_step=None, filename_suffix=suffix)),
                     ("scalar", "train/loss", 0.5, 5), ("scalar", "train/n", 3, 5), ("flush",), ("close",)]


def test_tensorboard_event_files_read_back(tmp_path):
    """Real tensorboardX event files, read with a TFRecord reader of our own (CRCs checked): the tags, steps
    and values written, non-finite ones included; a resumed run's restart marker makes TensorBoard's view
    equal to metrics.jsonl after the resume; two sessions in the same second do not overwrite each other."""
    import tensorboardX  # noqa: F401  (the dev extra installs it: this test never skips)
    from event_files import event_files, same_value, tb_events, tb_scalars
    from tensorboardX.proto import event_pb2

    first = {1: 2.5, 2: 2.0, 3: 1.75, 4: 1.5, 5: 1.25}  # the killed run: checkpoint at 3, logged up to 5
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        for step, loss in first.items():
            w.write(step, {"loss": loss, "grad_norm": np.float32(0.1 * step)}, prefix="sft/")
        w.write(3, {"score": float("nan"), "bad": float("inf")}, prefix="sft/eval/")
        w.write(5, {"score": 0.5}, prefix="sft/eval/")
    # the killed run's file as TensorBoard reads it: every point, float32 values
    raw = tb_scalars(tmp_path / "tb", purge=False)
    assert raw["sft/loss"] == list(first.items())
    assert raw["sft/grad_norm"] == [(s, float(np.float32(np.float32(0.1 * s)))) for s in first]
    assert math.isnan(raw["sft/eval/score"][0][1]) and raw["sft/eval/score"][1] == (5, 0.5)
    assert raw["sft/eval/bad"] == [(3, math.inf)]

    with MetricsWriter(tmp_path, tensorboard=True) as w:  # the rerun, resumed from the checkpoint at step 3
        assert w.resume(3, prefix="sft/") == 3  # steps 4, 5 and the eval at 5
        for step in (4, 5, 6):
            w.write(step, {"loss": -float(step), "grad_norm": -np.inf if step == 6 else 1.0}, prefix="sft/")
    files = event_files(tmp_path / "tb")
    assert len(files) == 2  # the rerun opened its own file (same second or not) and kept the first one
    marks = [e for e in tb_events(tmp_path / "tb") if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in marks] == [(4, event_pb2.SessionLog.START)]
    assert tb_scalars(tmp_path / "tb", purge=False)["sft/loss"] == list(first.items()) + [(4, -4.0), (5, -5.0),
                                                                                         (6, -6.0)]

    # what TensorBoard shows equals what metrics.jsonl holds after the resume, tag by tag
    shown = tb_scalars(tmp_path / "tb")
    logged: dict = {}
    for r in read_metrics(tmp_path):
        for k, v in r.items():
            if k not in ("step", "time"):
                logged.setdefault(k, []).append((r["step"], float(np.float32(v))))
    assert sorted(shown) == sorted(logged) == ["sft/eval/bad", "sft/eval/score", "sft/grad_norm", "sft/loss"]
    for tag in logged:
        assert len(shown[tag]) == len(logged[tag]), tag
        assert all(s == t and same_value(a, b) for (s, a), (t, b) in zip(shown[tag], logged[tag])), tag
    assert shown["sft/loss"] == [(1, 2.5), (2, 2.0), (3, 1.75), (4, -4.0), (5, -5.0), (6, -6.0)]
    assert shown["sft/grad_norm"][-1] == (6, -math.inf)


def test_wandb_offline_with_a_fake_module(tmp_path, monkeypatch):
    """MetricsWriter(wandb=WandbConfig()) with a fake `wandb`: init (offline, dir, stored id, resume, the run
    dir's config.json), log (values and steps), finish; a second session resumes the same run id."""
    from rljax.metrics import WANDB_ID_FILE, WandbConfig

    calls = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run_dir = tmp_path / "rl-seed0"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"lr": 2e-5, "seeds": [0]}))
    with MetricsWriter(run_dir, tensorboard=False, wandb=WandbConfig()) as w:
        assert w.wandb and calls == []  # the W&B run starts at the first write
        w.write(1, {"loss": 0.5, "reward_mean": np.float32(0.25)}, prefix="rl/")
        w.write(2, {"loss": float("nan"), "n": np.int64(3)}, prefix="rl/")
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and set(run_id) <= set("abcdefghijklmnopqrstuvwxyz0123456789")
    (kind, kwargs), *rest = calls
    assert kind == "init" and kwargs == dict(project="rljax", entity=None, group=None, name="rl-seed0", tags=None,
                                              mode="offline", dir=str(run_dir), id=run_id, resume="allow",
                                              config={"lr": 2e-5, "seeds": [0]}, reinit="create_new")
    assert rest[0] == ("log", {"rl/loss": 0.5, "rl/reward_mean": 0.25}, 1)
    assert rest[1][0] == "log" and rest[1][2] == 2 and math.isnan(rest[1][1]["rl/loss"]) and rest[1][1]["rl/n"] == 3
    assert rest[2:] == [("finish",)]  # and closing again (the with block) does not finish twice
    logged = [(r["step"], r["rl/loss"]) for r in read_metrics(run_dir)]  # the same values as metrics.jsonl
    assert logged[0] == (1, 0.5) and math.isnan(logged[1][1])

    calls.clear()  # the rerun: resumed at step 1; the same W&B run id, an explicit config, the other options
    cfg = WandbConfig(project="p", mode="online", entity="me", group="study", name="n", tags=("a", "b"))
    with MetricsWriter(run_dir, tensorboard=False, wandb=cfg, config={"x": 1}) as w:
        w.resume(1, prefix="rl/")
        w.write(2, {"loss": 0.25}, prefix="rl/")
    assert calls == [("init", dict(project="p", entity="me", group="study", name="n", tags=["a", "b"],
                                   mode="online", dir=str(run_dir), id=run_id, resume="allow", config={"x": 1},
                                   reinit="create_new")),
                     ("log", {"rl/loss": 0.25}, 2), ("finish",)]
    calls.clear()
    MetricsWriter(run_dir, tensorboard=False, wandb=WandbConfig()).close()  # nothing written: no W&B run
    assert calls == []
    # a pipeline's phase in run_dir/policy: named "<run>/policy", with the run's config.json
    with MetricsWriter(run_dir / "policy", tensorboard=False, wandb=WandbConfig()) as w:
        w.write(1, {"loss": 0.5}, prefix="sft/")
    assert calls[0][1]["name"] == "rl-seed0/policy" and calls[0][1]["config"] == {"lr": 2e-5, "seeds": [0]}


def test_wandb_missing_names_the_extra(tmp_path, monkeypatch):
    from rljax.metrics import WandbConfig

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rljax\[wandb\]'"):
        MetricsWriter(tmp_path, tensorboard=False, wandb=WandbConfig())
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # refused before anything was opened
    with pytest.raises(ValueError, match="mode"):
        WandbConfig(mode="offline-please")
    with pytest.raises(TypeError, match="WandbConfig"):
        MetricsWriter(tmp_path, tensorboard=False, wandb=True)


def test_wandb_real_package_offline(tmp_path, monkeypatch):
    """The real wandb in offline mode (no network, no account): the run's .wandb log, read back with a reader of
    our own, holds the run id, project and config, and every value at its step; a second session resumes the
    same run id in a second offline run directory."""
    pytest.importorskip("wandb")
    from event_files import same_value, wandb_records
    from rljax.metrics import WANDB_ID_FILE, WandbConfig

    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written under $HOME
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.001}))
    with MetricsWriter(tmp_path, tensorboard=False, wandb=WandbConfig(project="rljax-test")) as w:
        w.write(1, {"loss": 2.0, "acc": 0.25}, prefix="rl/")
        w.write(2, {"loss": float("nan"), "acc": 0.5}, prefix="rl/")
    with MetricsWriter(tmp_path, tensorboard=False, wandb=WandbConfig(project="rljax-test")) as w:
        w.resume(2, prefix="rl/")
        w.write(3, {"loss": 1.0, "acc": 0.75}, prefix="rl/")
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    runs = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    assert len(runs) == 2 and all(d.endswith(f"-{run_id}") for d in runs)
    history = {}
    for d in runs:
        (log,) = [f for f in os.listdir(tmp_path / "wandb" / d) if f.endswith(".wandb")]
        # wandb-core (a separate process) may still be writing the log when finish() returns: a complete
        # log ends with an "exit" record, there within seconds
        deadline = time.monotonic() + 60
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(tmp_path / "wandb" / d / log)):
            assert time.monotonic() < deadline, f"{d}: the offline run's log was never completed"
            time.sleep(0.2)
        for r in wandb_records(tmp_path / "wandb" / d / log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert r.run.run_id == run_id and r.run.project == "rljax-test"
                config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
                assert config["lr"] == 0.001
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json.replace("NaN", "null"))
                         for i in r.history.item}
                history[r.history.step.num] = {k: v for k, v in items.items() if k.startswith("rl/")}
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("rl/")} for r in read_metrics(tmp_path)}
    assert sorted(history) == sorted(logged) == [1, 2, 3]
    for step, values in logged.items():
        assert sorted(history[step]) == sorted(values)
        assert all(same_value(values[k], math.nan if history[step][k] is None else history[step][k])
                   for k in values)


def test_format_number():
    assert format_number(1234567) == "1.23M"
    assert format_number(5600.0) == "5.6k"
    assert format_number(0.0123456) == "0.01235"
    assert format_number(1.23456) == "1.235"
    assert format_number(42) == "42"
    assert format_number(999999) == "1M"
    assert format_number(-2500) == "-2.5k"
    assert format_number(3.2e9) == "3.2G"
    assert format_number(float("nan")) == "nan"
    assert format_number(np.float32(0.5)) == "0.5"
    assert format_number(jnp.asarray(12, jnp.int32)) == "12"
    assert format_number("warmup") == "warmup"
    assert format_postfix({"loss": 1.2341, "tok/s": 5600.0}) == "loss=1.234 tok/s=5.6k"


def test_progress_disabled_counts():
    with Progress(10, initial=2, disable=True) as p:
        p.update()
        p.update(3, loss=0.123456, **{"tok/s": 12345.0})
        assert p.n == 6
        assert p.postfix == "loss=0.1235 tok/s=12.3k"
    p.close()


def test_progress_enabled_shows_postfix(capsys):
    p = Progress(4, desc="rl")
    p.update(2, loss=1.5)
    p.close()
    err = capsys.readouterr().err
    assert "rl" in err and "loss=1.5" in err and "2/4" in err


def test_progress_postfix_picks_the_phases_metrics_in_order():
    from rljax.metrics import progress_postfix

    metrics = {"loss": 0.5, "reward_mean": np.float32(0.25), "accuracy": 0.125, "tokens": 640.0}
    rl = {"reward": "reward_mean", "acc": "accuracy", "kl": "kl_k3"}
    assert progress_postfix(metrics, rl, 900.0) == {"reward": 0.25, "acc": 0.125, "tok/s": 900.0}
    assert list(progress_postfix(metrics, {"acc": "accuracy", "reward": "reward_mean"})) == ["acc", "reward"]
    assert progress_postfix(metrics, {"loss": "loss"}, 5600.0) == {"loss": 0.5, "tok/s": 5600.0}
    assert format_postfix(progress_postfix(metrics, rl, 5600.0)) == "reward=0.25 acc=0.125 tok/s=5.6k"


def test_a_cut_last_line_is_read_around_and_repaired_by_resume(tmp_path):
    """A killed run's last record cut short (or whole but without its newline): read_metrics leaves a cut
    line out with a warning, and resume repairs the file so the marker is a line of its own and the next
    resume reads it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: the last line is cut short"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}')  # whole, no newline: nothing to drop at step 2
    with MetricsWriter(tmp_path) as w:
        assert w.resume(2) == 0
    with MetricsWriter(tmp_path) as w:
        w.resume(2)  # a second resume reads the file the first one left
    assert [(r["step"], r.get("event")) for r in read_metrics(tmp_path, events=True)] == [
        (1, None), (2, None), (2, "resumed"), (2, "resumed")]
