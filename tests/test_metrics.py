import builtins
import json
import math
import os
import sys
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
    """With a (fake) tensorboardX, scalars go to <run_dir>/tb with prefixed tags and steps."""
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        assert w.tensorboard
        w.write(5, {"loss": jnp.asarray(0.5), "n": 3}, prefix="train/")
    assert calls == [("init", os.path.join(str(tmp_path), "tb")), ("scalar", "train/loss", 0.5, 5),
                     ("scalar", "train/n", 3, 5), ("flush",), ("close",)]


def test_tensorboard_event_files(tmp_path):
    from rljax.metrics import _import_tb_backend

    if _import_tb_backend() is None:
        pytest.skip("no TensorBoard backend (tensorboardX, torch, tensorflow) installed")
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write(0, {"loss": 1.0})
        w.write(1, {"loss": 0.5})
    events = [f for _, _, files in os.walk(tmp_path / "tb") for f in files if "tfevents" in f]
    assert events


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
