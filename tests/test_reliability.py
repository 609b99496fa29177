"""Fault tolerance in-process: checksums, damaged checkpoints, non-finite steps, metrics rows,
config validation and the workdir lock (issue 16). The CLI drills are tests/test_drills.py."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import tiny_config
from m5p import (checkpointing, config_check, failures, metrics_writer, nonfinite, optim,
                 sharding, state_checksum, train, workdir_lock)
from m5p import state as state_lib


# ---------------------------------------------------------------------------
# Checksums.


def test_checksum_is_exact_on_any_mesh_and_sees_one_changed_bit():
  rng = np.random.default_rng(0)
  tree = {"w": rng.standard_normal((16, 8)).astype(np.float32),
          "b": rng.standard_normal((8,)).astype(np.float32).astype(jnp.bfloat16),
          "count": np.int32(7)}
  devices = np.asarray(jax.devices())
  mesh_a = jax.sharding.Mesh(devices.reshape(8, 1), ("x", "y"))
  mesh_b = jax.sharding.Mesh(devices.reshape(2, 4), ("x", "y"))
  put = lambda mesh, spec: {k: jax.device_put(v, NamedSharding(mesh, spec if np.ndim(v) == 2 else P()))
                            for k, v in tree.items()}
  a = state_checksum.summarize(put(mesh_a, P("x", None)), mesh_a)
  b = state_checksum.summarize(put(mesh_b, P("y", "x")), mesh_b)
  assert a == b and not a["nonfinite"] and state_checksum.differences(a, b) == []
  flipped = dict(tree, w=tree["w"].copy())
  flipped["w"].view(np.uint32)[3, 5] ^= 1  # The lowest mantissa bit of one element.
  c = state_checksum.summarize({k: jnp.asarray(v) for k, v in flipped.items()})
  assert state_checksum.differences(a, c) == ["['w']"]
  nan = state_checksum.summarize({"w": jnp.asarray(tree["w"]).at[0, 0].set(jnp.nan)})
  assert nan["nonfinite"] == {"['w']": 1}


# ---------------------------------------------------------------------------
# Checkpoints: damage, fallback, tmp folders, non-finite states, shapes.


@pytest.fixture(scope="module")
def small_state():
  """A tiny model's sharded train state on one device (no train step compiled)."""
  c = tiny_config()
  c.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1))
  mesh = sharding.make_mesh(c.mesh)
  model = train.make_model(c)
  tx, _ = optim.make_optimizer(c)
  state, shardings = state_lib.create_sharded_state(model, tx, c, mesh)
  return c, mesh, model, tx, state, shardings


def _data_files(step_dir):
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return sorted((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _damage(step_dir, kind):
  if kind == "random_bytes":
    path = _data_files(step_dir)[-1]
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 3)
      f.write(np.random.default_rng(0).bytes(min(4096, os.path.getsize(path) // 3)))
  elif kind == "truncated":
    path = _data_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "zeroed":
    path = _data_files(step_dir)[-1]
    with open(path, "r+b") as f:
      f.write(b"\0" * os.path.getsize(path))
  elif kind == "deleted_data":
    os.remove(_data_files(step_dir)[-1])
  elif kind == "empty_step":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind in ("_METADATA", "manifest.ocdbt"):
    os.remove(os.path.join(step_dir, "state", kind))
  elif kind == "meta":
    shutil.rmtree(os.path.join(step_dir, "meta"))
  elif kind == "values_changed":  # Readable, wrong values: as if bits flipped in the data.
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    leaf = sorted(meta["integrity"]["leaves"])[0]
    meta["integrity"]["leaves"][leaf] = "%08x" % (int(meta["integrity"]["leaves"][leaf], 16) ^ 1)
    json.dump(meta, open(path, "w"))
  else:
    raise ValueError(kind)


DAMAGE = ["random_bytes", "truncated", "zeroed", "deleted_data", "empty_step", "_METADATA",
          "manifest.ocdbt", "meta", "values_changed"]


@pytest.fixture(scope="module")
def two_checkpoints(small_state, tmp_path_factory):
  """A workdir with checkpoints 1 (the state) and 2 (params + 1), saved once and copied per test."""
  c, mesh, _, _, state, _ = small_state
  workdir = str(tmp_path_factory.mktemp("two_checkpoints"))
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False, mesh=mesh)
  ckpt.save(1, state, None, {"step": 1, "config": c.to_json()}, force=True)
  newer = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1, state.params))
  ckpt.save(2, newer, None, {"step": 2, "config": c.to_json()}, force=True)
  ckpt.close()
  return workdir


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(small_state, two_checkpoints,
                                                              tmp_path, caplog, kind):
  c, mesh, model, tx, state, shardings = small_state
  workdir = str(tmp_path / "w")
  shutil.copytree(two_checkpoints, workdir)
  _damage(os.path.join(workdir, "checkpoints", "2"), kind)
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False, mesh=mesh)
  with caplog.at_level(logging.ERROR, logger="m5p"):
    restored, _, step = ckpt.restore_latest(state_lib.abstract_state(shardings, model, tx, c),
                                            None, c)
  ckpt.close()
  assert step == 1
  assert state_checksum.summarize(restored) == state_checksum.summarize(state)
  text = caplog.text
  assert "step 2" in text and os.path.join("checkpoints", "2") in text, text
  if kind == "values_changed":
    assert "differ from their checksums at save time" in text, text
  assert os.path.isdir(os.path.join(workdir, "checkpoints.damaged", "2"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "2"))


def test_every_checkpoint_damaged_is_a_user_error_and_nothing_moves(small_state, tmp_path):
  c, mesh, model, tx, state, shardings = small_state
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3, async_save=False, mesh=mesh)
  ckpt.save(1, state, None, {"step": 1, "config": c.to_json()}, force=True)
  ckpt.close()
  _damage(os.path.join(tmp_path, "checkpoints", "1"), "random_bytes")
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3, async_save=False, mesh=mesh)
  with pytest.raises(failures.UserError, match="no usable checkpoint.*step 1"):
    ckpt.restore_latest(state_lib.abstract_state(shardings, model, tx, c), None, c)
  ckpt.close()
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "1"))


def test_unfinished_save_is_reported_and_removed(tmp_path, caplog):
  tmp = tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  with caplog.at_level(logging.WARNING, logger="m5p"):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.close()
  assert not tmp.exists()
  assert "step 30" in caplog.text and str(tmp) in caplog.text


def test_non_finite_state_is_never_saved(small_state, tmp_path):
  c, mesh, _, _, state, _ = small_state
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, async_save=False, mesh=mesh)
  bad = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  with pytest.raises(failures.Diverged, match="step 5: .* non-finite"):
    ckpt.save(5, bad, None, {"step": 5, "config": c.to_json()}, force=True)
  ckpt.close()
  assert ckpt.all_steps() == []


def test_checkpoint_of_another_width_names_the_parameter_and_the_field(small_state, tmp_path):
  c, mesh, model, tx, state, shardings = small_state
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, async_save=False, mesh=mesh)
  ckpt.save(3, state, None, {"step": 3, "config": c.to_json()}, force=True)
  wide = tiny_config(**{"model.width": 48})
  target = state_lib.abstract_state(shardings, model, tx, c)  # A wider embedding, as width 48's.
  embed = target.params["word_embed"]["embedding"]
  target.params["word_embed"]["embedding"] = jax.ShapeDtypeStruct(
      (embed.shape[0], 48), embed.dtype, sharding=embed.sharding)
  with pytest.raises(failures.ConfigError) as e:
    ckpt.restore_latest(target, None, wide)
  ckpt.close()
  msg = str(e.value)
  assert "params/word_embed/embedding: (600, 32) in the checkpoint vs (600, 48) here" in msg, msg
  assert "model.width: 32 (checkpoint) vs 48 (config)" in msg, msg
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "3"))  # Not taken for damage.


# ---------------------------------------------------------------------------
# Non-finite steps.


def test_non_finite_step_keeps_the_state_and_says_so(monkeypatch):
  """The trainer's step on a stand-in loss (compiles in a second): a non-finite loss
  leaves params and optimizer state bit for bit, counts the step, flags it."""
  def value_and_grad(params, batch, rng):  # pylint: disable=unused-argument
    loss_fn = lambda p: jnp.sum(p["w"] * batch["x"]) ** 2
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return (loss, {"loss": loss, "contrastive": loss}), grads

  monkeypatch.setattr(train, "make_value_and_grad", lambda model, config: value_and_grad)
  c = tiny_config()
  tx, schedule = optim.make_optimizer(c)
  params = {"w": jnp.arange(4, dtype=jnp.float32)}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  step = jax.jit(train.make_train_step(None, tx, schedule, c))
  before = state_checksum.summarize(state)
  skipped, metrics = step(state, {"x": jnp.asarray([1.0, jnp.nan, 0.0, 1.0])})
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  assert int(skipped.step) == 1
  assert state_checksum.summarize(skipped.replace(step=state.step)) == before
  stepped, metrics = step(skipped, {"x": jnp.ones(4)})
  assert float(metrics["nonfinite"]) == 0.0 and int(stepped.step) == 2
  assert state_checksum.summarize(stepped.replace(step=state.step)) != before


def test_monitor_policies():
  bad = {"loss": jnp.float32(jnp.nan), "mlm": jnp.float32(jnp.inf), "contrastive": jnp.float32(1.0),
         "nonfinite": jnp.float32(1.0)}
  good = {"loss": jnp.float32(1.0), "nonfinite": jnp.float32(0.0)}
  c = tiny_config(**{"optim.nonfinite_max_consecutive": 2})
  m = nonfinite.Monitor(c)
  m.push(5, bad)
  m.push(6, good)  # The streak resets.
  m.push(7, bad)
  with pytest.raises(failures.Diverged) as e:
    m.push(8, bad)
    m.drain()
  assert str(e.value).startswith("step 8: non-finite loss=nan, mlm=inf; 2 bad step(s) in a row")
  assert e.value.first_bad_step == 7 and m.total == 3
  stop = nonfinite.Monitor(tiny_config(**{"optim.nonfinite": "stop"}))
  with pytest.raises(failures.Diverged, match="step 3"):
    stop.push(3, bad)
    stop.drain()


def test_checkpoints_of_a_diverged_state_are_set_aside(small_state, tmp_path):
  c, mesh, _, _, state, _ = small_state
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5, async_save=False, mesh=mesh)
  for step in (2, 4, 6):
    ckpt.save(step, state, None, {"step": step, "config": c.to_json()}, force=True)
  assert ckpt.set_aside_from(4) == [4, 6]
  assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints.diverged")) == ["4", "6"]


# ---------------------------------------------------------------------------
# metrics.jsonl after a resume.


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": s}) for s in range(1, 8)]
  path.write_text("\n".join(rows) + '\n{"step": 8, "lo')  # The last write was cut by a kill.
  assert metrics_writer.truncate_after(str(path), 5) == 3
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
  assert metrics_writer.truncate_after(str(path), 5) == 0


# ---------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("overrides, fragment", [
    ({"total_steps": 0}, "config.total_steps=0: expected >= 1"),
    ({"total_steps": -5}, "config.total_steps=-5"),
    ({"log_every": -1}, "config.log_every=-1: expected >= 0 (0 = off"),
    ({"batch_size": 12, "mesh.data": 8}, "batch_size=12 is not divisible by the mesh's data x fsdp = 8"),
    ({"mesh.data": 3}, "does not divide the 8 devices"),
    ({"optim.nonfinite": "ignore"}, "config.optim.nonfinite='ignore'"),
    ({"accum_steps": 3}, "accum_steps=3: batch_size=16 must be divisible"),
])
def test_config_problems_name_the_field(overrides, fragment):
  with pytest.raises(failures.ConfigError, match=None) as e:
    config_check.check(tiny_config(**overrides), num_devices=8)
  assert fragment in str(e.value), str(e.value)


def test_zero_intervals_are_off_not_errors():
  config_check.check(tiny_config(log_every=0, ckpt_every=0, eval_every=0), num_devices=8)
  assert train._every(0, 5, 6) is False and train._every(0, 6, 6) is True  # pylint: disable=protected-access


def test_unknown_override_gets_did_you_mean():
  c = tiny_config()
  out = config_check.unknown_overrides(c, ["--config.optim.lrr=1", "--config.nonexistent=1",
                                           "--config.optim.lr=1", "--workdir=x"])
  assert out[0].startswith("--config.optim.lrr=1: config has no field 'optim.lrr'; did you mean "
                           "config.optim.lr?")
  assert "nonexistent" in out[1] and len(out) == 2


def test_vocab_smaller_than_the_tokenizer_is_refused(tiny_dataset):
  have = config_check.tokenizer_vocab_size(tiny_dataset)
  config_check.check_dataset(tiny_config(**{"data.vocab_size": have}), tiny_dataset)
  with pytest.raises(failures.ConfigError, match=f"vocab_size={have - 1} is smaller .*{have} pieces"):
    config_check.check_dataset(tiny_config(**{"data.vocab_size": have - 1}), tiny_dataset)


# ---------------------------------------------------------------------------
# Workdir lock.


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(holder, f)
  return path


def test_live_holder_is_named_and_refused(tmp_path):
  parent = os.getppid()  # A live process on this host that is not us.
  started = workdir_lock._process_start_time(parent) + 1  # pylint: disable=protected-access
  _write_lock(str(tmp_path), pid=parent, host=socket.gethostname(), started=started,
              command="python -m m5p.main ...")
  with pytest.raises(workdir_lock.WorkdirBusy) as e:
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass
  assert f"pid {parent} on host {socket.gethostname()}, started" in str(e.value)
  # The same pid, but its process started after the lock was written: a reused pid, stale.
  _write_lock(str(tmp_path), pid=parent, host=socket.gethostname(), started=started - 3600)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass


def test_stale_lock_is_taken_over_with_a_notice(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(str(tmp_path), pid=dead.pid, host=socket.gethostname(), started=time.time())
  with caplog.at_level(logging.WARNING, logger="m5p"):
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
      with workdir_lock.WorkdirLock(str(tmp_path)):  # Re-entrant within a process.
        pass
      assert json.load(open(lock.path))["pid"] == os.getpid()
  assert f"pid {dead.pid} is not running" in caplog.text
  assert not os.path.exists(os.path.join(tmp_path, workdir_lock.LOCK_FILE))


def test_lock_of_another_host_goes_stale_with_its_heartbeat(tmp_path):
  path = _write_lock(str(tmp_path), pid=1, host="elsewhere", started=time.time())
  with pytest.raises(workdir_lock.WorkdirBusy, match="host elsewhere"):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass
  old = time.time() - workdir_lock.STALE_AFTER_S - 10
  os.utime(path, (old, old))
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass
