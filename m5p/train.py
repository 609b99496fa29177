"""The training loop: one readable function, top to bottom.

mesh -> input pipeline -> model, optimizer, sharded state -> jitted step ->
restore the latest checkpoint if any (else start from config.init_from's
export, if any) -> loop (log, checkpoint, evaluate) -> final evaluation.

config.task picks what is trained, with the same loop, checkpoints and logs:
  'pretrain'  ScaleModel, the SCALE objective (m5p.losses.total), evaluated
              by retrieval / clustering / probe (m5p.evaluation.evaluator)
  'classify'  Classifier (backbone + the authors' head), cross-entropy on the
              `data.train_list` items (m5p.losses.classification), evaluated by
              top-1 / top-5 / macro-F1 (m5p.evaluation.classification)
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from m5p import (accumulation, checkpointing, config_check, distributed, failures, flops,
                 host_memory, nonfinite, optim, preemption, sharding, workdir_lock)
from m5p.data import convert, pipeline
from m5p.evaluation import any_modality as any_modality_lib
from m5p.evaluation import classification as classification_lib
from m5p.evaluation import embed as embed_lib
from m5p.evaluation import evaluator
from m5p.losses.classification import classification_loss
from m5p.losses.total import compute_loss
from m5p.metrics_writer import MetricsWriter
from m5p.models import classifier
from m5p.models.scale import ScaleModel
from m5p.state import (TrainState, abstract_state, create_sharded_state, load_export_params,
                       num_params)

log = logging.getLogger("m5p")

TASKS = ("pretrain", "classify")
LossFn = Callable[[dict, dict, ml_collections.ConfigDict], tuple[jax.Array, dict]]


def task(config: ml_collections.ConfigDict) -> str:
  name = config.get("task", "pretrain")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}: expected one of {TASKS}")
  return name


def num_classes(config: ml_collections.ConfigDict, data_dir: str | None = None) -> int:
  """config.classify.num_classes, else the dataset manifest's num_categories."""
  n = int(config.classify.num_classes) if "classify" in config else 0
  if n <= 0 and data_dir:
    n = int(convert.load_manifest(data_dir).get("num_categories") or 0)
  if n < 2:
    raise ValueError(f"task='classify' needs >= 2 classes: set config.classify.num_classes "
                     f"(the dataset {data_dir!r} gives {n}).")
  return n


def make_model(config: ml_collections.ConfigDict, data_dir: str | None = None) -> nn.Module:
  """The task's model: ScaleModel, or the Classifier around it."""
  if task(config) == "classify":
    return classifier.Classifier(config, num_classes(config, data_dir))
  return ScaleModel(config)


def loss_function(config: ml_collections.ConfigDict) -> LossFn:
  """(outputs, batch, config) -> (loss, metrics) of the task."""
  return classification_loss if task(config) == "classify" else compute_loss


def make_value_and_grad(model: nn.Module, config: ml_collections.ConfigDict
                        ) -> accumulation.ValueAndGrad:
  """(params, batch, dropout_rng) -> ((loss, metrics), grads) of the training
  loss on the global batch: one pass, or config.accum_steps micro-batches
  (m5p.accumulation: the same loss and gradients, less activation memory)."""
  accum_steps = int(config.get("accum_steps", 1))
  if accum_steps < 1:
    raise ValueError(f"config.accum_steps={accum_steps}: expected >= 1")
  if accum_steps > 1:
    if task(config) != "pretrain":
      raise ValueError(f"config.accum_steps={accum_steps}: accumulation is for the pretraining "
                       "objective (m5p.accumulation); use accum_steps=1 with task='classify'.")
    return accumulation.make_value_and_grad(model, config, accum_steps)
  task_loss = loss_function(config)

  def value_and_grad(params: Any, batch: dict, dropout_rng: jax.Array):
    def loss_fn(params):
      out = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_rng})
      return task_loss(out, batch, config)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return value_and_grad


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict):
  """(state, batch) -> (state, metrics). A step whose loss, gradient norm or update is
  not finite keeps the previous params and optimizer state (the step counter still
  advances, so the batch is not retried) and reports metrics['nonfinite'] = 1
  (m5p.nonfinite judges it on the host)."""
  base_rng = jax.random.key(config.seed + 7)
  value_and_grad = make_value_and_grad(model, config)
  classify = task(config) == "classify"

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(base_rng, state.step)  # Depends on the step only: resumable.
    (loss, metrics), grads = value_and_grad(state.params, batch, dropout_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if classify:  # Backbone learning-rate multiplier and head-only warm-up.
      updates = classifier.scale_backbone_updates(updates, state.step, config)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # Finite loss, gradients and update imply a finite new state (AdamW's moments follow
    # the gradients). Reductions over these intermediates compile fast; one over every
    # new state array made XLA:CPU compile the tiny step 6x slower (203 s vs 34 s).
    # A state that still goes non-finite is refused at the next save.
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
          & jnp.isfinite(optax.global_norm(updates)))
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = dict(metrics, lr=schedule(state.step), grad_norm=grad_norm,
                   nonfinite=1.0 - ok.astype(jnp.float32))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


_BACKEND_OPTION_PREFIXES = {"cpu": "xla_cpu_", "gpu": "xla_gpu_", "tpu": "xla_tpu_"}


def compiler_options(config: ml_collections.ConfigDict, platform: str | None = None
                     ) -> dict[str, str | bool | int] | None:
  """`config.compiler_options` ('name=value,...') as jax.jit's compiler_options.

  Options for another backend than `platform` (default: the devices') are
  dropped, so a config tuned for one backend still compiles on the others.
  """
  text = str(config.get("compiler_options", "") or "").strip()
  if not text:
    return None
  platform = platform or jax.devices()[0].platform
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  options: dict[str, str | bool | int] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not name.startswith("xla_") or not value:
      raise ValueError(f"config.compiler_options: {item!r} is not 'xla_<option>=<value>' "
                       f"(in {text!r})")
    if any(name.startswith(prefix) for backend, prefix in _BACKEND_OPTION_PREFIXES.items()
           if backend != platform):
      continue
    lowered = value.lower()
    options[name] = (lowered == "true" if lowered in ("true", "false") else
                     int(value) if value.lstrip("-").isdigit() else value)
  return options or None


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   config: ml_collections.ConfigDict, state_shardings: TrainState, mesh,
                   donate: bool = True):
  """The train step jitted as the trainer runs it: state and batch shardings
  pinned, the metrics replicated, the state donated (updated in place) and
  `config.compiler_options` applied."""
  return jax.jit(make_train_step(model, tx, schedule, config),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0 if donate else (),
                 compiler_options=compiler_options(config, mesh.devices.flat[0].platform))


def _to_device(batch: dict, batch_shard) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_shard, v) for k, v in batch.items()}


def make_eval_fn(model: nn.Module, config: ml_collections.ConfigDict, mesh, param_shardings):
  """The jitted (params, batch) -> outputs that `evaluate` runs on each eval batch."""
  if task(config) == "classify":
    return classification_lib.make_logits_fn(model, mesh, param_shardings)
  return embed_lib.make_embed_fn(model, mesh, param_shardings)


def evaluate_classifier(model, state, config, mesh, state_shardings, data_dir: str,
                        workdir: str, logits_fn=None) -> dict:
  """Scores the eval split's `classify.eval_list` items with the classifier and
  writes the classification section (and its floors) to workdir/eval.json."""
  logits_fn = logits_fn or make_eval_fn(model, config, mesh, state_shardings.params)
  emb = embed_lib.embed_split(logits_fn, state.params, config, mesh, data_dir, config.data.eval_split)
  train_labels = pipeline.record_selection(
      config, data_dir, config.data.train_split, str(config.data.train_list),
      bool(config.data.train_complete_only))[1]
  results = classification_lib.evaluate(emb, data_dir, train_labels, seed=config.seed,
                                        list_name=str(config.classify.eval_list))
  if jax.process_index() == 0:
    evaluator.write_eval(workdir, results, int(jax.device_get(state.step)))
  return results


def evaluate(model, state, config, mesh, state_shardings, data_dir: str, workdir: str,
             embed_fn=None, any_modality: bool | None = None, report: bool = False) -> dict:
  """Embeds the eval split and writes workdir/eval.json; with `any_modality`
  (default config.eval.any_modality) also the 31 x 31 any-modality retrieval
  matrix (workdir/any_modality.{json,md,png}: 31 more embedding passes); with
  `report`, workdir/report.md and its plots from the same embeddings.
  For task='classify': `evaluate_classifier`."""
  if task(config) == "classify":
    return evaluate_classifier(model, state, config, mesh, state_shardings, data_dir, workdir,
                               embed_fn)
  embed_fn = embed_fn or embed_lib.make_embed_fn(model, mesh, state_shardings.params)
  emb = embed_lib.embed_split(embed_fn, state.params, config, mesh, data_dir, config.data.eval_split)
  train_emb = None
  manifest = convert.load_manifest(data_dir)
  probe_split = config.eval.probe_train_split
  if (probe_split and probe_split != config.data.eval_split and probe_split in manifest["splits"]
      and manifest.get("splits_files", {}).get("cls_train")):
    train_emb = embed_lib.embed_split(embed_fn, state.params, config, mesh, data_dir, probe_split)
  results = evaluator.evaluate_embeddings(emb, data_dir, tuple(config.eval.ks), seed=config.seed,
                                          train_emb=train_emb)
  if config.eval.any_modality if any_modality is None else any_modality:
    queries, gallery = evaluator.coarse_query_gallery(emb, data_dir)
    matrix = any_modality_lib.retrieval_matrix(
        lambda keep: embed_lib.embed_split(embed_fn, state.params, config, mesh, data_dir,
                                           config.data.eval_split, keep_modalities=keep),
        queries, gallery)
    results.update(any_modality_lib.summary(matrix))
    if jax.process_index() == 0:
      any_modality_lib.write(matrix, workdir)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    evaluator.write_eval(workdir, results, step)
    if report:
      from m5p.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel
      report_lib.write_report(workdir, data_dir, dict(results, meta={"step": float(step)}), emb=emb,
                              split=config.data.eval_split, seed=int(config.seed))
  return results


def _every(interval: int, step: int, total: int) -> bool:
  """Whether `step` is on the interval (0 = off: only the last step)."""
  return step == total or (interval > 0 and step % interval == 0)


def _close_quietly(name: str, close: Callable[[], Any]) -> None:
  try:
    close()
  except Exception as e:  # pylint: disable=broad-except
    log.error("Closing the %s failed: %s: %s", name, type(e).__name__, e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                       stop_after: int | None = None) -> dict:
  """Trains `config.task` on `data_dir`, checkpointing to and resuming from `workdir`.

  `stop_after`: leave after that step (checkpointed), as a preempted job would,
  without the final evaluation; a later call on the same workdir resumes.

  Besides returning the final evaluation, it ends by raising (m5p.failures):
  ConfigError / UserError before any heavy work (a bad config, a dataset whose
  tokenizer outgrows data.vocab_size, a checkpoint of another model shape, a
  workdir another run holds, no usable checkpoint), Preempted after
  checkpointing the step in flight (SIGTERM / SIGINT), or Diverged
  (non-finite steps, config.optim.nonfinite).
  """
  config_check.check(config, num_devices=len(jax.devices()), process_count=jax.process_count())
  config_check.check_dataset(config, data_dir)
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, preemption.StopSignals(grace_s=float(config.get("preempt_grace_s", 120.0))) as stop:
    return _train_and_evaluate(config, workdir, data_dir, stop, stop_after)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                        stop: preemption.StopSignals, stop_after: int | None) -> dict:
  # ---- Mesh ----------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  log.info("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape), mesh.size,
           jax.devices()[0].platform, jax.process_count())

  # ---- Model, optimizer, sharded state --------------------------------------
  model = make_model(config, data_dir)
  tx, schedule = optim.make_optimizer(config)
  state, state_shardings = create_sharded_state(model, tx, config, mesh)
  log.info("Model: %.2fM parameters.", num_params(state.params) / 1e6)

  # ---- Input ---------------------------------------------------------------
  train_iter = iter(pipeline.train_dataset(config, data_dir))
  ckpt = writer = None
  try:
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing, mesh=mesh)
    # ---- Restore (shapes checked against the config first) -----------------------
    restored = ckpt.restore_latest(abstract_state(state_shardings, model, tx, config), train_iter,
                                   config)
    if restored is not None:
      state, _, step = restored
      host_memory.release()  # The fresh state this replaced.
      log.info("Resumed from step %d (%s).", step, ckpt.step_path(step))
    elif config.get("init_from"):
      state = init_from_export(state, state_shardings, config)
    elif task(config) == "classify":
      log.warning("task='classify' without config.init_from: the backbone starts from random init.")
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, start)
    try:
      return _loop(config, workdir, data_dir, stop, stop_after, mesh, model, tx, schedule, state,
                   state_shardings, train_iter, ckpt, writer, start)
    except failures.Diverged as e:
      raise _set_aside_diverged(e, ckpt) from None
  finally:
    _close_quietly("input pipeline", getattr(train_iter, "close", lambda: None))
    if writer is not None:
      _close_quietly("metrics writer", writer.close)
    if ckpt is not None:
      _close_quietly("checkpoint manager", ckpt.close)


def _set_aside_diverged(e: failures.Diverged,
                        ckpt: checkpointing.Checkpointer) -> failures.Diverged:
  """The checkpoints saved at or after the step before the first bad one hold the state
  that went non-finite: moved aside, so a rerun (with a saner config) starts before it."""
  if e.first_bad_step is None:
    return e
  moved = ckpt.set_aside_from(e.first_bad_step - 1)
  latest = ckpt.latest_step()
  where = f"step {latest}" if latest is not None else "the start (no earlier checkpoint)"
  note = (f" Checkpoints {moved} hold the state that went non-finite at step "
          f"{e.first_bad_step}: moved to {ckpt.diverged_dir}." if moved else "")
  return failures.Diverged(f"{e}{note} A rerun resumes from {where}; lower config.optim.lr "
                           "or check the data first.", e.first_bad_step)


def _loop(config, workdir, data_dir, stop, stop_after, mesh, model, tx, schedule, state,
          state_shardings, train_iter, ckpt, writer, start) -> dict:
  """The steps from `start`, then the final evaluation."""
  batch_shard = sharding.batch_sharding(mesh)
  rules = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jit_train_step(model, tx, schedule, config, state_shardings, mesh)

  # ---- Throughput accounting --------------------------------------------------
  peak, peak_source = flops.device_peak(str(config.model.dtype))
  log.info("Peak per device: %.1f GFLOP/s (%s).", peak / 1e9, peak_source)
  compiled_step, step_flops = None, 0.0  # Per-device FLOPs of one step (XLA cost analysis).

  # ---- Loop --------------------------------------------------------------------
  monitor = nonfinite.Monitor(config)
  embed_fn = make_eval_fn(model, config, mesh, state_shardings.params)
  total = int(config.total_steps)
  if stop.requested:  # Signalled while starting up: nothing new to save.
    raise failures.Preempted(start, stop.signal_name or "a signal")
  window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
  results = {}
  for step in range(start + 1, total + 1):
    t0 = time.perf_counter()
    batch = next(train_iter)
    window_wait += time.perf_counter() - t0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      device_batch = _to_device(batch, batch_shard)
      if compiled_step is None:
        t_compile = time.perf_counter()
        compiled_step = step_fn.lower(state, device_batch).compile()
        step_flops = flops.compiled_flops(compiled_step)
        host_memory.release()  # The compiler's freed working memory.
        log.info("Train step compiled in %.1f s: %.3f GFLOP per device per step.",
                 time.perf_counter() - t_compile, step_flops / 1e9)
        distributed.barrier("train_step_compiled")  # Every process compiled: collectives line up.
        window_start += time.perf_counter() - t_compile  # Compiling is not step time.
      state, metrics = compiled_step(state, device_batch)
    window_steps += 1
    monitor.push(step, metrics)  # Judges the steps already computed; no wait.

    stopping = stop.should_stop(step)
    leaving = stopping or (stop_after is not None and step >= stop_after)
    log_now = _every(int(config.log_every), step, total)
    save_now = _every(int(config.ckpt_every), step, total) or leaving
    if log_now or save_now:
      monitor.drain()  # Every step so far judged: raises Diverged before any save.

    if log_now:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - window_start
      step_time = elapsed / window_steps
      metrics.update(examples_per_sec=window_steps * config.batch_size / elapsed,
                     examples_per_sec_per_device=window_steps * config.batch_size / elapsed / mesh.size,
                     step_time=step_time, data_wait_frac=window_wait / elapsed,
                     model_tflops_per_device=step_flops / step_time / 1e12,
                     peak_tflops_per_device=peak / 1e12, mfu=step_flops / step_time / peak,
                     nonfinite_steps=float(monitor.total))
      writer.write(step, metrics)
      term = "accuracy" if "accuracy" in metrics else "contrastive"
      log.info("step %d/%d  loss %.4f  %s %.4f  %.0f ex/s  MFU %.1f%%  (data wait %.0f%%)",
               step, total, metrics["loss"], term, metrics.get(term, float("nan")),
               metrics["examples_per_sec"], 100 * metrics["mfu"], 100 * metrics["data_wait_frac"])
      window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

    if save_now and monitor.consecutive:  # The state that went non-finite: no checkpoint of it.
      log.warning("Not checkpointing step %d: its state is the one the last %d step(s) could not "
                  "update (non-finite).", step, monitor.consecutive)
    elif save_now:
      ckpt.save(step, state, train_iter, {"step": step, "config": config.to_json()}, force=True)

    if leaving:
      ckpt.wait()
      writer.flush()
      if stopping:
        raise failures.Preempted(step, stop.signal_name or "a signal")
      return {}

    if config.eval_every and step % config.eval_every == 0 and step != total:
      results = evaluate(model, state, config, mesh, state_shardings, data_dir, workdir, embed_fn)
      log.info("eval @%d: %s", step, _headline(results))
      window_start = time.perf_counter()

  monitor.drain()
  ckpt.wait()
  if stop.requested:  # Signalled in the last steps: the final checkpoint is saved; evaluate on rerun.
    raise failures.Preempted(total, stop.signal_name or "a signal")
  # ---- Final evaluation ----------------------------------------------------------
  results = evaluate(model, state, config, mesh, state_shardings, data_dir, workdir, embed_fn,
                     report=bool(config.eval.get("report", False)))
  log.info("eval @%d: %s", total, _headline(results))
  return results


def init_from_export(state: TrainState, state_shardings: TrainState,
                     config: ml_collections.ConfigDict) -> TrainState:
  """`state` with the export config.init_from's params in place of the fresh
  ones (the classifier's backbone, or the whole pretraining model), restored
  onto this run's shardings. The optimizer state (AdamW: zero moments) and the
  head stay as initialised."""
  export_dir = str(config.init_from)
  if task(config) == "classify":
    loaded = load_export_params(export_dir, classifier.backbone_params(state.params),
                                classifier.backbone_params(state_shardings.params), config)
    params = {**state.params, classifier.BACKBONE: loaded}
  else:
    loaded = params = load_export_params(export_dir, state.params, state_shardings.params, config)
  log.info("Initialised %s from the export %s (%.2fM params).",
           "the backbone" if task(config) == "classify" else "the model", export_dir,
           num_params(loaded) / 1e6)
  return state.replace(params=params)


def _headline(results: dict) -> str:
  if "classification" in results:
    r, b = results["classification"], results.get("classification_majority", {})
    return (f"classification top-1 {r['top1']:.2f} (majority {b.get('top1', float('nan')):.2f}), "
            f"top-5 {r['top5']:.2f}, macro-F1 {r['macro_f1']:.2f}")
  r, b = results.get("coarse_retrieval", {}), results.get("coarse_retrieval_random", {})
  return (f"coarse mAP@1 {r.get('mAP@1', float('nan')):.2f} (random {b.get('mAP@1', float('nan')):.2f}), "
          f"mAP@5 {r.get('mAP@5', float('nan')):.2f}")
