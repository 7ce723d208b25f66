"""Damaged checkpoints: each kind of damage (truncated, deleted data file, lost _METADATA, bytes
overwritten inside a data file, a changed meta) is named in one line, and restore falls back to the previous step
with exactly the values saved there, or raises when asked; training then saves on as usual."""
import glob
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.checkpoint import (CheckpointMismatchError, Checkpointer, DamagedCheckpointError, DamagedCheckpointWarning,
                              restore_latest, state_digest)
from rljax.state import TrainState


def _values(s: int) -> dict:
    """The arrays saved at step `s`, from numpy's generator alone (the expected values of a restore).
    Random bits do not compress, so zstd stores `w` as it is and bytes changed inside it are read
    back without complaint, as in a large checkpoint; only the digest sees them."""
    g = np.random.default_rng(s)
    bits = g.integers(0, 2**32, (64, 64), dtype=np.uint32) & np.uint32(0xBFFFFFFF)  # finite, |w| < 2
    return {"w": bits.view(np.float32),
            "b": g.standard_normal(8).astype(jnp.bfloat16),
            "n": g.integers(-100, 100, (3,), dtype=np.int32)}


def _state(s: int) -> TrainState:
    v = _values(s)
    return TrainState(step=jnp.asarray(s, jnp.int32), params={"w": jnp.asarray(v["w"]), "b": jnp.asarray(v["b"])},
                      opt_state={"n": jnp.asarray(v["n"])}, rng=jax.random.key(s),
                      skipped_steps=jnp.asarray(0, jnp.int32))


def _target() -> TrainState:  # a fresh state: structure, dtypes and shardings only
    return _state(0)


def _assert_is_step(state, meta, s: int) -> None:
    v = _values(s)
    assert int(state.step) == s and meta == {"data_position": s}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), v["w"])
    np.testing.assert_array_equal(np.asarray(state.params["b"]), v["b"])
    np.testing.assert_array_equal(np.asarray(state.opt_state["n"]), v["n"])
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(jax.random.key(s)))


def _save(d, steps, keep=3) -> None:
    with Checkpointer(str(d), keep=keep, async_save=False) as ck:
        for s in steps:
            ck.save(_state(s), {"data_position": s})


def _data_file(step_dir: str) -> str:
    """The largest of orbax's data files in a step (ocdbt layout): the one holding `w`."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    assert files, f"no data files under {step_dir}: orbax's layout changed"
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    f = _data_file(step_dir)
    os.truncate(f, os.path.getsize(f) // 2)


def _delete_data(step_dir):
    os.remove(_data_file(step_dir))


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _bit_rot(step_dir):
    """Overwrite 1 KiB in the middle of the data file: orbax reads it without complaint."""
    f = _data_file(step_dir)
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(b"\x5a" * 1024)


# each damage, and what the one-line message must say about it
DAMAGE = {"truncated": (_truncate, 'Error reading "params.w'),
          "deleted_data": (_delete_data, 'Error reading "params.w'),
          "deleted_metadata": (_delete_metadata, f"({os.path.join('state', '_METADATA')} missing;"),
          "bit_rot": (_bit_rot, "the arrays read differ from the digest saved with them")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, kind):
    damage, reason = DAMAGE[kind]
    d = tmp_path / "ckpt"
    _save(d, [1, 2, 3])
    bad = os.path.join(str(d), "3")
    damage(bad)
    with Checkpointer(str(d), keep=3) as ck:
        assert ck.latest_step() == 3  # not yet known to be damaged
        with pytest.warns(DamagedCheckpointWarning) as caught:
            state, meta = ck.restore(_target())
        _assert_is_step(state, meta, 2)
        first, second = (str(w.message) for w in caught)
        assert first.startswith(f"checkpoint {bad} is damaged") and reason in first and "\n" not in first
        assert second == f"restored {d / '2'} instead; damaged, renamed: {bad} -> {bad}.damaged"
        # set aside, not picked again: the step list and latest_step now name good steps only
        assert ck.latest_step() == 2 and ck.all_steps() == [1, 2]
    assert sorted(os.listdir(d)) == ["1", "2", "3.damaged"]


@pytest.mark.parametrize("kind", ["truncated", "bit_rot"])
def test_on_damaged_raise_names_the_step_in_one_line(tmp_path, kind):
    damage, reason = DAMAGE[kind]
    d = tmp_path / "ckpt"
    _save(d, [1, 2])
    bad = os.path.join(str(d), "2")
    damage(bad)
    with Checkpointer(str(d), on_damaged="raise") as ck:
        with pytest.raises(DamagedCheckpointError) as err:
            ck.restore(_target())
        assert str(err.value).startswith(f"checkpoint {bad} is damaged") and reason in str(err.value)
        assert "\n" not in str(err.value) and err.value.paths == [bad]
        assert ck.latest_step() == 2  # nothing changed on disk
        _assert_is_step(*ck.restore(_target(), step=1), 1)  # an explicit good step still restores
    assert sorted(os.listdir(d)) == ["1", "2"]
    with Checkpointer(str(d)) as ck, pytest.raises(DamagedCheckpointError, match=f"checkpoint {bad} is damaged"):
        ck.restore(_target(), step=2)  # an explicit step never falls back


def test_all_damaged_names_every_step_and_renames_nothing(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, [1, 2, 3])
    for s, kind in zip((1, 2, 3), ("bit_rot", "deleted_metadata", "truncated")):
        DAMAGE[kind][0](os.path.join(str(d), str(s)))
    with Checkpointer(str(d)) as ck:
        with pytest.warns(DamagedCheckpointWarning), pytest.raises(DamagedCheckpointError) as err:
            ck.restore(_target())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no checkpoint in {d} can be restored")
    for s in (1, 2, 3):
        assert f"checkpoint {os.path.join(str(d), str(s))} is damaged" in msg
    assert err.value.paths == [os.path.join(str(d), str(s)) for s in (3, 2, 1)]
    assert sorted(os.listdir(d)) == ["1", "2", "3"]  # a rerun must not quietly start from nothing


# orbax's failed reads leave asyncio callbacks behind, reported when collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_intact_checkpoints_of_another_state_are_said_to_be_another_run(tmp_path):
    """A target of other leaves or shapes is not damage: CheckpointMismatchError names the leaves (no
    step set aside, no fallback); a target of other dtypes restores the saved values, checked against
    their digest as written, cast to the target's dtypes."""
    d = tmp_path / "ckpt"
    _save(d, [1, 2])
    step2 = os.path.join(str(d), "2")
    cases = ((_target().replace(params={"w": jnp.zeros((64, 64), jnp.float32)}), "in the checkpoint only: params.b"),
             (_target().replace(params={**_target().params, "c": jnp.zeros(3)}), "not in the checkpoint: params.c"),
             (_target().replace(params={**_target().params, "w": jnp.zeros((64, 32))}),
              "other shapes: params.w (64, 64) saved, (64, 32) given"))
    for other, said in cases:
        with Checkpointer(str(d)) as ck, warnings.catch_warnings():
            warnings.simplefilter("error", DamagedCheckpointWarning)
            with pytest.raises(CheckpointMismatchError) as err:
                ck.restore(other)
        assert str(err.value) == (f"checkpoint {step2} holds another state than the one given to restore it into "
                                  f"({said}): it was saved by another model, head, optimizer or configuration "
                                  "(a run directory holds one run)")
    assert sorted(os.listdir(d)) == ["1", "2"]
    t = _target()
    low = t.replace(params={"w": t.params["w"].astype(jnp.bfloat16), "b": t.params["b"].astype(jnp.float32)})
    with Checkpointer(str(d)) as ck:
        state, meta = ck.restore(low)
    assert state.params["w"].dtype == jnp.bfloat16 and state.params["b"].dtype == jnp.float32
    v = _values(2)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), v["w"].astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(state.params["b"]), v["b"].astype(np.float32))
    assert int(state.step) == 2 and meta == {"data_position": 2}


def test_training_saves_on_after_a_fallback(tmp_path):
    """After falling back from a damaged step 3 to step 2, saving steps 3, 4, 5 again works and
    keep=3 counts only good steps; restore then returns the new step 5."""
    d = tmp_path / "ckpt"
    _save(d, [1, 2, 3])
    _bit_rot(os.path.join(str(d), "3"))
    with pytest.warns(DamagedCheckpointWarning):
        state = restore_latest(_target(), str(d))
    assert int(state.step) == 2
    with Checkpointer(str(d), keep=3, async_save=False) as ck:
        assert ck.latest_step() == 2
        for s in (3, 4, 5):  # the run continues from step 2 and saves as it goes
            ck.save(_state(s), {"data_position": s})
        assert ck.all_steps() == [3, 4, 5]
        _assert_is_step(*ck.restore(_target()), 5)
        _assert_is_step(*ck.restore(_target(), step=3), 3)
    assert sorted(os.listdir(d)) == ["3", "3.damaged", "4", "5"]
    _bit_rot(os.path.join(str(d), "5"))  # a second damage of a step number already set aside once
    with Checkpointer(str(d)) as ck, pytest.warns(DamagedCheckpointWarning):
        _assert_is_step(*ck.restore(_target()), 4)
    assert sorted(os.listdir(d)) == ["3", "3.damaged", "4", "5.damaged"]


def test_a_changed_data_position_in_the_meta_is_damage(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, [1, 2])
    f = d / "2" / "meta" / "metadata"
    f.write_text(f.read_text().replace('"data_position": 2', '"data_position": 7'))  # still valid JSON
    with Checkpointer(str(d)) as ck, pytest.warns(DamagedCheckpointWarning) as caught:
        _assert_is_step(*ck.restore(_target()), 1)
    assert str(caught[0].message).startswith(
        f"checkpoint {d / '2'} is damaged: its meta ({{'data_position': 7}}) differs from the digest saved with it")


def test_digest_sees_one_changed_element_and_not_the_layout():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    base = state_digest({"x": jnp.asarray(x)})
    assert base == state_digest({"x": jnp.asarray(x.copy())}) and base.startswith("fp1:")
    flipped = x.copy()
    flipped.view(np.uint32)[3, 4] ^= 1  # one bit of one element
    assert state_digest({"x": jnp.asarray(flipped)}) != base
    assert state_digest({"x": jnp.asarray(x.T.copy().T)}) == base  # same values, other memory order
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert state_digest({"x": jnp.asarray(swapped)}) != base  # same multiset of values, other places
    assert state_digest({"y": jnp.asarray(x)}) != base  # the path counts
    assert state_digest({"x": jnp.asarray(x.reshape(7, 5))}) != base  # and the shape
    for arr in (np.array([True, False, True]), np.arange(6, dtype=np.int8), np.arange(4, dtype=jnp.bfloat16)):
        changed = arr.copy()
        changed[1] = not changed[1] if arr.dtype == bool else changed[1] + 1
        assert state_digest({"a": jnp.asarray(arr)}) != state_digest({"a": jnp.asarray(changed)}), arr.dtype


def test_checkpoint_without_a_digest_still_restores(tmp_path):
    """Steps saved before digests existed (no digest in the meta) restore without the check."""
    import orbax.checkpoint as ocp

    from rljax.checkpoint import _to_saveable

    d = tmp_path / "ckpt"
    with Checkpointer(str(d), async_save=False) as ck:
        ck._manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(_state(4))),
                                                    meta=ocp.args.JsonSave({"data_position": 4})))
        _assert_is_step(*ck.restore(_target()), 4)


def test_host_and_device_sums_agree_bit_for_bit():
    """One process sums on the host (numpy), several on the devices (XLA): a checkpoint written
    either way must verify the other way, so both give the same two words for every dtype."""
    import ml_dtypes

    from rljax.checkpoint import _host_leaf_sums, _leaf_sums

    rng = np.random.default_rng(0)
    device_sums = jax.jit(_leaf_sums)
    for dt in (np.float32, jnp.bfloat16, np.float16, np.int32, np.uint32, np.int8, np.uint8, np.bool_,
               ml_dtypes.int4, np.complex64):
        for shape in ((), (7,), (3, 5)):
            x = rng.normal(size=shape) * 5
            x = np.asarray(x + 1j * rng.normal(size=shape) if dt == np.complex64 else x)
            with np.errstate(invalid="ignore"):  # bool and int4 from arbitrary floats: the value does not matter
                x = x.astype(dt) if dt != np.uint32 and dt != np.uint8 else np.abs(x).astype(dt)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the uint32 arithmetic wraps on purpose, without a warning
                host = _host_leaf_sums(x)
            np.testing.assert_array_equal(host, device_sums(jnp.asarray(x)), err_msg=f"{dt} {shape}")
