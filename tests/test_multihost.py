"""Multi-process training: two local processes (2 CPU devices each, one 4-device mesh) train exactly
like one process with 4 devices; `rljax.distributed` argument / environment handling."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE, ROOT
from rljax import distributed

ENV_NAMES = [v for names in distributed.ENV_VARS.values() for v in names] + [distributed.AUTO_ENV_VAR]


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Record jax.distributed.initialize calls instead of connecting; clear the environment."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    return calls


def test_initialize_single_process_is_a_no_op(fake_jax_distributed, monkeypatch):
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
    monkeypatch.setenv("RLJAX_NUM_PROCESSES", "1")
    assert distributed.initialize() is False
    assert fake_jax_distributed == []


def test_initialize_from_arguments_and_twice(fake_jax_distributed):
    assert distributed.initialize("127.0.0.1:1234", 2, 1, local_device_ids=[0]) is True
    assert fake_jax_distributed == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                                         local_device_ids=[0])]
    assert distributed.initialize("127.0.0.1:1234", 2, 1) is True  # already initialised: nothing more
    assert len(fake_jax_distributed) == 1


@pytest.mark.parametrize("prefix", ["RLJAX", "JAX"])
def test_initialize_from_environment(fake_jax_distributed, monkeypatch, prefix):
    names = {"RLJAX": ("RLJAX_COORDINATOR", "RLJAX_NUM_PROCESSES", "RLJAX_PROCESS_ID"),
             "JAX": ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}[prefix]
    for name, value in zip(names, ("10.0.0.1:99", "4", "3")):
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is True
    assert fake_jax_distributed == [dict(coordinator_address="10.0.0.1:99", num_processes=4, process_id=3,
                                         local_device_ids=None)]


def test_initialize_precedence(fake_jax_distributed, monkeypatch):
    """argument > RLJAX_* > JAX_*, setting by setting."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "jax:1")
    monkeypatch.setenv("RLJAX_COORDINATOR", "rljax:2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    monkeypatch.setenv("RLJAX_PROCESS_ID", "1")
    assert distributed.initialize(process_id=0) is True
    assert fake_jax_distributed == [dict(coordinator_address="rljax:2", num_processes=3, process_id=0,
                                         local_device_ids=None)]


def test_initialize_auto_lets_jax_find_the_cluster(fake_jax_distributed, monkeypatch):
    """RLJAX_DISTRIBUTED=auto with no setting given: jax.distributed.initialize() without arguments (JAX's
    own detection of a TPU pod, SLURM or Open MPI job; two real processes under a SLURM environment:
    tests/test_grpo_math.py); given settings win; "off" and unset are one process; another value, and a
    detection that finds nothing, are errors naming the variables."""
    monkeypatch.setenv("RLJAX_DISTRIBUTED", "auto")
    assert distributed.initialize() is False  # the fake joins no other process: jax.process_count() stays 1
    assert fake_jax_distributed == [dict(local_device_ids=None)]
    fake_jax_distributed.clear()
    assert distributed.initialize("127.0.0.1:1234", 2, 1) is True
    assert fake_jax_distributed == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                                         local_device_ids=None)]
    fake_jax_distributed.clear()
    for off in ("off", " OFF ", ""):
        monkeypatch.setenv("RLJAX_DISTRIBUTED", off)
        assert distributed.initialize() is False and fake_jax_distributed == []
    monkeypatch.setenv("RLJAX_DISTRIBUTED", "yes")
    with pytest.raises(ValueError, match="RLJAX_DISTRIBUTED='yes': 'auto' lets JAX find the processes"):
        distributed.initialize()

    def nothing_found(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setenv("RLJAX_DISTRIBUTED", "auto")
    monkeypatch.setattr(jax.distributed, "initialize", nothing_found)
    with pytest.raises(RuntimeError, match=r"RLJAX_DISTRIBUTED=auto, but JAX found no cluster to join \(coordinator_"
                                           r"address should be defined.\); set RLJAX_COORDINATOR, RLJAX_NUM_PROCESSES, "
                                           r"RLJAX_PROCESS_ID instead, or unset RLJAX_DISTRIBUTED"):
        distributed.initialize()


def test_initialize_errors(fake_jax_distributed, monkeypatch):
    with pytest.raises(ValueError, match=r"missing num_processes .*process_id") as e:
        distributed.initialize("127.0.0.1:1234")
    assert "missing coordinator_address" not in str(e.value)
    with pytest.raises(ValueError, match=r"missing coordinator_address .*RLJAX_COORDINATOR"):
        distributed.initialize(num_processes=2, process_id=0)
    monkeypatch.setenv("RLJAX_PROCESS_ID", "1")
    with pytest.raises(ValueError, match=r"missing coordinator_address .*num_processes"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process_id=2 with num_processes=2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"process_id=1 with num_processes=1"):
        distributed.initialize("127.0.0.1:1234", 1, 1)
    with pytest.raises(ValueError, match=r"process_id=-1"):
        distributed.initialize("127.0.0.1:1234", 2, -1)
    with pytest.raises(ValueError, match=r"num_processes must be >= 1"):
        distributed.initialize("127.0.0.1:1234", 0, 0)
    monkeypatch.setenv("RLJAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"num_processes must be an integer.*'two'.*RLJAX_NUM_PROCESSES"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"host:port"):
        distributed.initialize("localhost", 2, 0)
    assert fake_jax_distributed == []


def test_process_slice_and_single_process_helpers():
    assert distributed.process_slice(8) == slice(0, 8)  # this (single) process owns everything
    assert [distributed.process_slice(12, process_index=i, process_count=3) for i in range(3)] == [
        slice(0, 4), slice(4, 8), slice(8, 12)]
    rows = np.arange(12)
    parts = [rows[distributed.process_slice(12, process_index=i, process_count=4)] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), rows)
    with pytest.raises(ValueError, match=r"global batch size 10 is not divisible by the process count 3"):
        distributed.process_slice(10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        distributed.process_slice(8, process_index=2, process_count=2)
    assert distributed.is_main_process()
    distributed.sync("single process: no-op")
    batch = {"x": np.arange(6).reshape(3, 2), "n": np.int32(3)}
    assert distributed.local_rows(batch) is batch  # one process owns every row
    host = distributed.to_host({"x": jax.numpy.arange(4), "y": [np.float32(1.5)]})
    assert isinstance(host["x"], np.ndarray) and host["x"].tolist() == [0, 1, 2, 3] and host["y"][0] == 1.5


# One script for both runs: argv = process_id, port (0: single process), output JSON path.
WORKER = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np
    from jax.experimental.multihost_utils import process_allgather
    from rljax import distributed
    from rljax.losses import SFTConfig, sft_loss
    from rljax.models import Model, preset
    from rljax.sharding import make_mesh, shard_batch
    from rljax.state import OptimizerConfig, create_state, make_train_step
    from test_train import _batch

    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if port:
        assert distributed.initialize(f"127.0.0.1:{port}", 2, pid) is True
        assert distributed.initialize(f"127.0.0.1:{port}", 2, pid) is True  # harmless second call
        assert (jax.process_count(), jax.process_index(), jax.local_device_count()) == (2, pid, 2)
    else:
        assert distributed.initialize() is False and jax.process_count() == 1
    assert jax.device_count() == 4
    assert distributed.is_main_process() == (pid == 0)

    mesh = make_mesh(data=2, fsdp=2)
    opt = OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=10)
    model = Model(preset("tiny"), mesh=mesh)
    state = create_state(model, opt, jax.random.key(0), mesh=mesh)
    gate = state.params["layers"]["mlp"]["gate"]
    assert len(gate.sharding.device_set) == 4 and gate.addressable_shards[0].data.size * 2 == gate.size
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), opt, model=model, mesh=mesh)
    rows = distributed.process_slice(8)
    losses = []
    for i in range(4):
        local = jax.tree.map(lambda x: x[rows], _batch(10 + i, B=8))  # this process's rows only
        batch = shard_batch(local, mesh)
        assert batch.tokens.shape == (8, 16)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = process_allgather(state.params, tiled=True)  # global values on every process
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    checksums = {jax.tree_util.keystr(k): [float(np.sum(np.asarray(v, np.float64))),
                                           float(np.sum(np.abs(np.asarray(v, np.float64)))),
                                           float(np.sum(np.square(np.asarray(v, np.float64))))] for k, v in flat}
    checksums["total"] = [sum(c[j] for c in checksums.values()) for j in range(3)]
    distributed.sync("trained")
    with open(out, "w") as f:
        json.dump({"losses": losses, "checksums": checksums, "step": int(state.step),
                   "main": distributed.is_main_process()}, f)
    distributed.sync("written")
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    for name in ENV_NAMES:  # the workers are told explicitly
        env.pop(name, None)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


def launch_module(tmp_path, name: str, args: list, n_devices: int, process: int | None = None, port: int = 0,
                  env: dict | None = None):
    """`python -m <args>` (an experiment and its flags) on n_devices simulated CPU devices, as process
    `process` of two (connected through the RLJAX_* coordinator variables, as `rljax.cli.run` reads them)
    or alone, with `env` added to its environment; its output goes to tmp_path/<name>.log. -> (Popen, log
    path), as wait_for_workers takes them."""
    env = {**_env(n_devices), **(env or {})}
    if process is not None:
        env.update(RLJAX_COORDINATOR=f"127.0.0.1:{port}", RLJAX_NUM_PROCESSES="2", RLJAX_PROCESS_ID=str(process))
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def wait_for_workers(jobs: dict, *, timeout: float) -> None:
    """Wait for every worker {name: (Popen, log path)}; kill those still running when one fails or the time is
    up (a process waiting in a collective for a dead peer never ends), then fail with every log's tail."""
    deadline, failed = time.monotonic() + timeout, None
    try:
        for name, (proc, _) in jobs.items():
            try:
                if proc.wait(timeout=max(deadline - time.monotonic(), 1)) != 0:
                    failed = f"{name} exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"{name} timed out"
            if failed:
                break
    finally:
        for proc, _ in jobs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        logs = "\n".join(f"--- {n} (rc={p.returncode}):\n{log.read_text()[-5000:]}" for n, (p, log) in jobs.items())
        pytest.fail(f"{failed}\n{logs}")


def run_study_on_two_processes_and_one(tmp_path, study_args: list, *, timeout: float):
    """`python -m <study_args>` as two processes of 2 simulated devices (connected through the RLJAX_*
    variables, run root tmp_path/multi) and as one process of 4 devices (tmp_path/single); logs in
    tmp_path/{proc0,proc1,single}.log. -> (the multi run directory, the single one): exactly one each."""
    port = _free_port()
    jobs = {"proc0": launch_module(tmp_path, "proc0", study_args + ["--run-root", str(tmp_path / "multi")], 2, 0,
                                   port),
            "proc1": launch_module(tmp_path, "proc1", study_args + ["--run-root", str(tmp_path / "multi")], 2, 1,
                                   port),
            "single": launch_module(tmp_path, "single", study_args + ["--run-root", str(tmp_path / "single")], 4)}
    wait_for_workers(jobs, timeout=timeout)
    (multi,), (single,) = (list((tmp_path / d).iterdir()) for d in ("multi", "single"))  # one run directory each
    return multi, single


@pytest.mark.slow  # ~30 s; the default tier keeps a two-process run (the damaged checkpoint below)
def test_two_processes_train_like_one(tmp_path):
    """Processes 0 and 1 (2 devices each) feed their own 4 of 8 rows; losses and final parameters
    equal one process with 4 devices on the same (data=2, fsdp=2) mesh fed the whole batch."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    jobs = {}  # name -> (Popen, log path, output path)
    for name, args, n_dev in (("proc0", (0, port), 2), ("proc1", (1, port), 2), ("single", (0, 0), 4)):
        out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, str(script), *map(str, args), str(out)], env=_env(n_dev),
                                    cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        jobs[name] = (proc, log, out)

    wait_for_workers({name: (proc, log) for name, (proc, log, _) in jobs.items()}, timeout=300)

    res = {name: json.loads(out.read_text()) for name, (_, _, out) in jobs.items()}
    assert [res[n]["main"] for n in ("proc0", "proc1", "single")] == [True, False, True]
    assert res["proc0"]["step"] == res["single"]["step"] == 4
    # every process sees the same global results
    assert res["proc0"]["losses"] == res["proc1"]["losses"]
    assert res["proc0"]["checksums"] == res["proc1"]["checksums"]
    multi, single = res["proc0"], res["single"]
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    assert multi["losses"][-1] < multi["losses"][0]
    assert multi["checksums"].keys() == single["checksums"].keys()
    for key in single["checksums"]:
        # plain sums of random weights can be near 0: absolute slack scaled by the sum of |w|
        np.testing.assert_allclose(multi["checksums"][key][0], single["checksums"][key][0], rtol=1e-5,
                                   atol=1e-6 * single["checksums"][key][1], err_msg=key)
        np.testing.assert_allclose(multi["checksums"][key][1:], single["checksums"][key][1:], rtol=1e-5,
                                   err_msg=key)


# Two processes save a state sharded over both, one data file of the newest step is damaged, and
# both restore: argv = process_id, port, checkpoint directory, output JSON path, damage (rot | truncate).
CKPT_WORKER = textwrap.dedent("""
    import faulthandler, glob, json, os, sys, warnings
    faulthandler.dump_traceback_later(50, exit=True)  # a hung process shows where it waits
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rljax import distributed
    from rljax.checkpoint import Checkpointer, DamagedCheckpointWarning, state_digest
    from rljax.sharding import make_mesh
    from rljax.state import TrainState

    pid, port, d, out, damage = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    mesh = make_mesh(data=2, fsdp=2)
    rows = NamedSharding(mesh, P(("data", "fsdp")))  # each process holds half of the rows

    def values(s):  # the global arrays of step s, known to both processes
        g = np.random.default_rng(s)
        return (g.integers(0, 2**32, (8, 512), dtype=np.uint32) & np.uint32(0xBFFFFFFF)).view(np.float32)

    def put(x, sharding=NamedSharding(mesh, P())):  # global array from the same host value everywhere
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    def state(s, leaves=1):
        extra = {f"v{k}": put(values(s + 10 * k)[:, :8 * k], rows) for k in range(1, leaves)}
        return TrainState(step=put(np.int32(s)), params={"w": put(values(s), rows), **extra}, opt_state={},
                          rng=jax.random.wrap_key_data(put(jax.random.key_data(jax.random.key(s)))),
                          skipped_steps=put(np.int32(0)))

    res = {"digests": [state_digest(state(s)) for s in (1, 2)]}
    # several leaves spread over both processes: their sums are one program (one small program per leaf,
    # waited for together, deadlocked XLA:CPU's gloo collectives at random, and with them a save)
    res["many"] = [state_digest(state(s, leaves=40)) for s in (1, 2, 1, 2, 1, 2)]
    with Checkpointer(d, async_save=False) as ck:
        for s in (1, 2):
            ck.save(state(s), {"data_position": s})
    distributed.sync("saved")
    if pid == 0:  # damage the data file that process 1 wrote for step 2 (and only process 1 reads)
        f = max(glob.glob(os.path.join(d, "2", "state", "ocdbt.process_1", "d", "*")), key=os.path.getsize)
        if damage == "rot":
            with open(f, "r+b") as fh:
                fh.seek(os.path.getsize(f) // 2)
                fh.write(b"Z" * 1024)
        else:
            os.truncate(f, os.path.getsize(f) // 2)
    distributed.sync("damaged")
    with Checkpointer(d) as ck, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, meta = ck.restore(state(0))
        res["latest_after"] = ck.latest_step()
    res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, DamagedCheckpointWarning)]
    res["step"], res["meta"] = int(restored.step), meta
    w = values(1)
    res["shards_equal_step_1"] = all(bool(np.array_equal(np.asarray(sh.data), w[sh.index]))
                                     for sh in restored.params["w"].addressable_shards)
    distributed.sync("restored")
    res["listing"] = sorted(os.listdir(d))
    with open(out, "w") as f:
        json.dump(res, f)
""")


@pytest.mark.parametrize("damage", ["rot", "truncate"])
def test_two_processes_agree_on_a_damaged_checkpoint_and_fall_back(tmp_path, damage):
    """A state sharded over two processes has one digest, the same on both; damage to the data
    file only process 1 reads (bytes changed: the digest, computed across both, differs; truncated:
    process 1 alone fails to read it) makes both fall back to step 1 together."""
    script = tmp_path / "ckpt_worker.py"
    script.write_text(CKPT_WORKER)
    port, d = _free_port(), tmp_path / "ckpt"
    jobs = {}
    for pid in (0, 1):
        log = tmp_path / f"p{pid}.log"
        with open(log, "w") as f:
            jobs[f"p{pid}"] = (subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(d),
                                                 str(tmp_path / f"p{pid}.json"), damage], env=_env(2), cwd=ROOT,
                                                stdout=f, stderr=subprocess.STDOUT), log)
    wait_for_workers(jobs, timeout=120)
    res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in (0, 1)]
    assert res[0]["digests"] == res[1]["digests"] and res[0]["digests"][0] != res[0]["digests"][1]
    assert res[0]["many"] == res[1]["many"] == res[0]["many"][:2] * 3 and res[0]["many"][0] != res[0]["digests"][0]
    for r in res:
        assert r["step"] == 1 and r["meta"] == {"data_position": 1} and r["shards_equal_step_1"]
        assert r["latest_after"] == 1 and r["listing"] == ["1", "2.damaged"]
        reason = "the arrays read differ" if damage == "rot" else "or unreadable"
        assert r["warnings"] and r["warnings"][0].startswith(f"checkpoint {d}/2 is damaged"), r["warnings"]
        assert reason in r["warnings"][0]
