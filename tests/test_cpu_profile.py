"""benchmarks.cpu_profile: XLA op times per program from a jax.profiler trace."""
import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from benchmarks.cpu_profile import op_kind, op_times, read_trace, report


def test_op_times_sums_complete_events_per_program_and_kind():
    ev = lambda name, dur, module="jit_a", ph="X": {  # noqa: E731
        "ph": ph, "name": name, "dur": dur, "args": {"hlo_module": module, "hlo_op": name}}
    events = [ev("ynn_fusion.3", 1500), ev("ynn_fusion.12", 500), ev("dot", 250), ev("dot", 250, "jit_b"),
              ev("dot.1", 1e6, ph="B"),  # not a complete event
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6, "args": {}},  # no op named
              {"ph": "X", "name": "PjitFunction", "dur": 9e6}]
    times = op_times(events)
    assert times == {"jit_a": {"ynn_fusion": pytest.approx(2e-3), "dot": pytest.approx(2.5e-4)},
                     "jit_b": {"dot": pytest.approx(2.5e-4)}}
    assert [op_kind(o) for o in ("ynn_fusion.12", "dot", "copy_bitcast_fusion.5")] == \
        ["ynn_fusion", "dot", "copy_bitcast_fusion"]
    lines = report(times, top=1).splitlines()  # the larger program first, its largest kind only
    assert lines[0] == "jit_a: 2 ms of thread time" and "88.9%  ynn_fusion" in lines[1] and len(lines) == 4
    assert report(times, top=1, min_share=0.2).splitlines()[2:] == ["1 smaller programs: 0.2 ms"]  # jit_b: 11%


def test_read_trace_takes_the_newest_file_and_names_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_trace(str(tmp_path))
    for i, name in enumerate(("old", "new")):
        d = tmp_path / "plugins" / name
        d.mkdir(parents=True)
        with gzip.open(d / "host.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": [{"name": name}]}, f)
        os.utime(d / "host.trace.json.gz", (1000 + i, 1000 + i))
    assert read_trace(str(tmp_path)) == [{"name": "new"}]


def test_a_traced_program_is_found_by_its_name(tmp_path):
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's thunk events")

    def scaled_sum(x):
        return jnp.tanh(x @ x.T).sum()

    f = jax.jit(scaled_sum)
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    times = op_times(read_trace(str(tmp_path)))
    assert "jit_scaled_sum" in times and sum(times["jit_scaled_sum"].values()) > 0, times
