"""benchmarks.cpu_profile: XLA op times per program from a jax.profiler trace."""
import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from benchmarks.cpu_profile import (Config, dumped_hlo, hlo_ops, main, op_instance_times, op_kind, op_times, read_trace, report,
                                    report_instances)


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


FUSED_HLO = """HloModule jit_step, entry_computation_layout={(bf16[64,32]{1,0}, bf16[32,16]{1,0})->f32[64,16]{1,0}}

%fused_computation.7 (param_0.1: bf16[64,32], param_1.2: bf16[32,16]) -> f32[64,16] {
  %param_0.1 = bf16[64,32]{1,0} parameter(0)
  %param_1.2 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.3 = f32[64,16]{1,0} dot(%param_0.1, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (a: bf16[64,32], b: bf16[32,16]) -> f32[64,16] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %ynn_fusion.4 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.7
  ROOT %tanh.5 = f32[64,16]{1,0} tanh(%ynn_fusion.4)
}
"""


def test_hlo_ops_finds_each_instances_products_and_flops(tmp_path):
    """A fusion's products are its called computation's; flops = 2 x output elements x contracted
    elements; rates in the instance table count every call (an op in a loop runs many times)."""
    ops = hlo_ops(FUSED_HLO)
    fused = ops["ynn_fusion.4"]
    assert (fused.shape, fused.opcode, fused.flops) == ("f32[64,16]", "fusion", 2 * 64 * 16 * 32)
    assert fused.products == ("bf16[64,32] x bf16[32,16]",)
    assert (ops["tanh.5"].flops, ops["tanh.5"].products, ops["tanh.5"].opcode) == (0, (), "tanh")
    ev = lambda name, dur: {"ph": "X", "name": name, "dur": dur,  # noqa: E731
                            "args": {"hlo_module": "jit_step", "hlo_op": name}}
    times = op_instance_times([ev("ynn_fusion.4", 10.0), ev("ynn_fusion.4", 10.0), ev("tanh.5", 5.0)])
    assert times == {"jit_step": {"ynn_fusion.4": (pytest.approx(2e-5), 2), "tanh.5": (pytest.approx(5e-6), 1)}}
    lines = report_instances(times["jit_step"], ops, top=5).splitlines()
    rate = 2 * 2 * 64 * 16 * 32 / 2e-5 / 1e9  # two calls in 20 microseconds
    assert "ynn_fusion.4" in lines[0] and f"{rate:,.1f} GFLOP/s" in lines[0] and "2x" in lines[0]
    assert "tanh.5" in lines[1] and "GFLOP/s" not in lines[1] and "tanh" in lines[1]
    assert "unknown.1" in report_instances({"unknown.1": (1e-3, 1)}, ops, top=1)  # not in the HLO: name only
    (tmp_path / "module_0001.jit_step.cpu_after_optimizations.txt").write_text(FUSED_HLO)
    assert dumped_hlo(str(tmp_path), "jit_step") == FUSED_HLO and dumped_hlo(str(tmp_path), "jit_other") is None


def test_hlo_ops_reads_a_compiled_programs_product():
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's HLO")
    a, b = jnp.ones((96, 40)), jnp.ones((40, 24))
    text = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile().as_text()
    products = {name: op for name, op in hlo_ops(text).items() if op.flops}  # the dot, and a fusion calling it
    assert products and all(op.flops == 2 * 96 * 24 * 40 and op.products == ("f32[96,40] x f32[40,24]",)
                            for op in products.values()), products


def test_one_train_step_is_profiled_with_its_products(capsys):
    """--program: one train step of benchmarks.cpu_dots (tiny shapes), its op table and the slowest
    instances with the products read from the compiled HLO; a bad name names the field."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's thunk events")
    with pytest.raises(ValueError, match="--program: 'sft' is not grpo or one of grpo-update"):
        Config(program="sft")
    # 400 instances, enough to reach the products: under the tests' loop emitters (conftest) this
    # small step's element-wise fusions outlast its tiny products, which fell out of the 40 slowest
    times = main(Config(program="dpo", smoke=True, warmup=1, instances=400))
    assert sum(times["jit_step"].values()) > 0
    out = capsys.readouterr().out
    table = out[out.index("jit_step: the 400 slowest op instances"):]
    assert " x " in table and "GFLOP/s" in table, table  # at least one product with its rate
