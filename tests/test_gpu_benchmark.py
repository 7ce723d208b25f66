"""benchmarks.gpu's profile reader: device time per kernel from a perfetto trace, summed by hand."""
import gzip
import json

from benchmarks.gpu import _device_times


def _write(tmp_path, events):
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return tmp_path


def test_device_times_sum_the_gpu_stream_lines_only(tmp_path):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "Stream #3(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 4, "args": {"name": "XLA Modules"}},
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 9, "args": {"name": "python3"}},
    ]
    x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur}  # noqa: E731
    events = meta + [x(1, 3, "fusion_1", 2.0), x(1, 3, "nvjet_gemm", 5.0), x(1, 3, "fusion_1", 3.0),
                     x(1, 4, "jit_step", 100.0), x(7, 9, "PjitFunction(step)", 50.0)]
    totals, path = _device_times(str(_write(tmp_path, events)))
    assert dict(totals) == {"fusion_1": 5.0, "nvjet_gemm": 5.0}  # not the module span, not the host
    assert path.endswith("host.trace.json.gz")


def test_device_times_on_a_cpu_trace_count_every_event(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 7, "tid": 1, "name": "a", "dur": 1.5}, {"ph": "X", "pid": 7, "tid": 2, "name": "a",
                                                                         "dur": 2.5}]
    totals, _ = _device_times(str(_write(tmp_path, events)))
    assert dict(totals) == {"a": 4.0}


def test_fit_prediction_is_linear_in_rows():
    """need(b) = 2 GiB + b * 96 MiB: with 50 GiB free, (50 - 2) GiB / 96 MiB = 512 rows; rounded down to
    a multiple of 8, never below the first size."""
    from benchmarks.gpu import predict_rows

    GiB, MiB = 1 << 30, 1 << 20
    rows, per_row, fixed = predict_rows(2 * GiB + 8 * 96 * MiB, 2 * GiB + 16 * 96 * MiB, 8, 50 * GiB)
    assert (rows, per_row, fixed) == (512, 96 * MiB, 2 * GiB)
    assert predict_rows(2 * GiB + 8 * 96 * MiB, 2 * GiB + 16 * 96 * MiB, 8, 50 * GiB - 1)[0] == 504
    assert predict_rows(2 * GiB + 8 * 96 * MiB, 2 * GiB + 16 * 96 * MiB, 8, 1 * GiB)[0] == 8
