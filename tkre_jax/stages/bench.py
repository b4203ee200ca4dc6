"""The bench stage: throughput and model FLOPs utilisation (MFU) of each stage's step, per device
and mesh, one JSON row per stage.

    python -m tkre_jax.main --stage=bench --mesh=cpu --workdir=runs/bench
    python -m tkre_jax.main --stage=bench --mesh=gpu --workdir=runs/bench-gpu \
        --config.bench.model=bert-base --config.bench.dtype=bfloat16 --config.bench.batch_size=64

What it times (`config.bench.stage`, comma-separated):

  * `mslm`, `scl`, `finetune`: the train step those stages run, built the same way: the stage's
    loss (`tasks.mslm_scl.mslm_loss` / `scl_loss`, `tasks.classifier.make_loss_fn`) through the
    trainer's state set-up and compiled step (`trainer.init_state`, `trainer.compiled_train_step`:
    sharded parameters and AdamW state, the guarded `step.make_train_step`, donated state);
  * `eval`: the classifier's forward pass (`tasks.classifier.compiled_predict_step`, what eval and
    finetune's model selection run).

The model is a published encoder shape with random weights (`config.bench.model`: MiniLM-L6 by
default, BERT-base, RoBERTa-base, RoBERTa-large; `benchmarking.flops.ENCODER_SHAPES`), so no download is
needed, on the current `--mesh` and `config.mesh.rules`. Batches are synthetic (`synthetic_batch`:
every position a real token, span ids as the featurizer makes them) or the first batch of a prepared
split (`config.bench.data=prepared`).

Timing (`benchmarking.timing`): compilation is timed on its own (`runtime.CompiledStep`); then
`warmup_steps` untimed steps; then `steps` steps, each timed across `jax.block_until_ready` of its
outputs (median, p10, p90). Each stage gives one row (`timing_lib.make_row`, whose module docstring
lists the fields): compile and step time, sequences/s and tokens/s, analytic against XLA FLOPs, MFU
against the device's peak (on a CPU the matmul peak measured in the same run), device memory, and
the input pipeline: the tf.data reader `data.pipeline.pretrain_batches` of the prepared split, or of
a synthetic split written to `<workdir>/input_split`, in sequences/s and over the step's rate.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import ml_collections
import numpy as np

from tkre_jax import config as config_lib
from tkre_jax.benchmarking import flops as flops_lib
from tkre_jax.benchmarking import lowering as lowering_lib
from tkre_jax.benchmarking import timing as timing_lib
from tkre_jax.data import dataset, pipeline
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.tasks import mslm_scl
from tkre_jax.train import loading, runtime, trainer

log = logging.getLogger(__name__)

INPUT_SPLIT_DIR = "input_split"


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

def check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """Checks `config.bench.batch_size` against the mesh (the values: `config.validate`).

  Raises:
    ValueError: naming the field and the mesh.
  """
  b = config.bench
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if b.batch_size % n_data:
    raise ValueError(f"config.bench.batch_size ({b.batch_size}) must be a multiple of the "
                     f"data-parallel size data*fsdp = {n_data} of mesh {dict(mesh.shape)}")


def encoder_config(config: ml_collections.ConfigDict) -> tuple[str, EncoderConfig]:
  """`(name, EncoderConfig)` of `config.bench.model` with the bench dtype (`config.bench.dtype`,
  else `config.model.dtype`) and `config.model.attention_impl`.

  Raises:
    ValueError: an unknown model name.
  """
  dtype = config.bench.dtype or config.model.dtype
  name = config.bench.model
  impl = config.model.attention_impl
  if name == "hf":
    return "hf", loading.encoder_config(config).replace(dtype=dtype, attention_impl=impl)
  return name, flops_lib.encoder_shape(name, dtype=dtype, attention_impl=impl)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------

def synthetic_batch(enc: EncoderConfig, batch_size: int, seq_len: int, num_labels: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A batch shaped like the featurizer's, every position a real token.

  Layout of each row (L = seq_len >= 16): [CLS] at 0, the subject marker at L/8 followed by 3
  subject tokens (span 2) and the closing marker, the relation span (span 4) up to the object marker
  at L/2, 3 object tokens (span 3), the closing marker, context (span 1) up to [SEP] at L-1; markers
  and special tokens have span 0. Token ids are uniform in [5, vocab_size) (never the padding id).

  Returns:
    `input_ids`, `attention_mask` (all 1), `span_ids`: int32[batch_size, seq_len]; `subj_pos`,
    `obj_pos`, `label`: int32[batch_size]; `weight`: float32[batch_size] (all 1).

  Raises:
    ValueError: seq_len < 16 or beyond the encoder's positions.
  """
  if seq_len < 16 or seq_len > enc.max_seq_len:
    raise ValueError(f"synthetic batches need 16 <= seq_len <= {enc.max_seq_len}, got {seq_len}")
  rng = np.random.default_rng(seed)
  a, b = seq_len // 8, seq_len // 2
  span = np.ones(seq_len, np.int32)
  span[[0, seq_len - 1, a, a + 4, b, b + 4]] = 0
  span[a + 1:a + 4] = 2
  span[a + 5:b] = 4
  span[b + 1:b + 4] = 3
  return {
      "input_ids": rng.integers(5, enc.vocab_size, (batch_size, seq_len)).astype(np.int32),
      "attention_mask": np.ones((batch_size, seq_len), np.int32),
      "span_ids": np.broadcast_to(span, (batch_size, seq_len)).copy(),
      "subj_pos": np.full(batch_size, a, np.int32),
      "obj_pos": np.full(batch_size, b, np.int32),
      "label": (np.arange(batch_size) % num_labels).astype(np.int32),
      "weight": np.ones(batch_size, np.float32),
  }


def write_input_split(directory: pathlib.Path, enc: EncoderConfig, rows: int, seq_len: int,
                      num_labels: int, seed: int = 0) -> pathlib.Path:
  """A prepared directory with one split `corpus` of `rows` synthetic rows (`synthetic_batch`),
  written by `dataset.PreparedWriter` (replaced when it exists): what the input pipeline is timed
  on when the run has no prepared data."""
  feats = synthetic_batch(enc, rows, seq_len, num_labels, seed)
  feats.pop("weight")
  with dataset.PreparedWriter(directory, overwrite=True) as w:
    w.add_split("corpus", feats, [f"R{i}" for i in feats["label"]], ["synthetic"] * rows,
                num_shards=2)
    w.meta.update(label_map={f"R{i}": i for i in range(num_labels)}, max_seq_len=seq_len)
  return directory


def time_input_pipeline(prepared_dir: pathlib.Path, split: str, batch_size: int, batches: int,
                        seed: int = 0) -> dict:
  """Sequences per second of the pre-training reader (`pipeline.pretrain_batches`: tf.data over the
  TFRecord shards, decoding in windows, window shuffle, batching) of `split`.

  The reader decodes a whole shuffle window before its first batch, so the rate is taken over the
  whole read, opening the dataset included: at least `batches` batches and at least two epochs of
  the split. `startup_seconds` is the time to the first batch.
  """
  rows_in_split = pipeline.pretrain_num_rows(prepared_dir, split)
  batches = max(int(batches), -(-2 * rows_in_split // batch_size))
  t0 = time.perf_counter()
  it = pipeline.pretrain_batches(prepared_dir, split, global_batch_size=batch_size, seed=seed)
  rows = len(next(it)["weight"])
  startup = time.perf_counter() - t0
  for _ in range(batches - 1):
    rows += len(next(it)["weight"])
  seconds = time.perf_counter() - t0
  return {"source": str(prepared_dir), "split": split, "rows_in_split": int(rows_in_split),
          "batches": batches, "rows": rows, "seconds": round(seconds, 4),
          "startup_seconds": round(startup, 3),
          "sequences_per_second": round(rows / max(seconds, 1e-9), 1)}


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mesh, **_) -> dict:
  """Benchmarks every stage of `config.bench.stage`; writes one JSON row per stage to
  `config.bench.output` (default `<workdir>/rows`) and `<workdir>/summary.json`.

  Raises:
    ValueError: a batch that does not divide over the mesh (`stages.run` checked the values).
    FileNotFoundError, KeyError: `data=prepared` without a prepared split.
  """
  del stage
  t_start = time.time()
  check_mesh(config, mesh)
  b = config.bench
  model_name, enc = encoder_config(config)
  rules_name = config.mesh.rules
  rules = sharding_lib.RULES[rules_name]
  workdir = pathlib.Path(workdir)
  out_dir = pathlib.Path(b.output) if b.output else workdir / "rows"
  num_labels = int(b.num_labels)
  mask_id = flops_lib.MASK_TOKEN_IDS.get(model_name, min(103, enc.vocab_size - 1))
  prep_dir = None
  if b.data == "prepared" or config.data.prepared_dir:
    prep_dir, meta = loading.prepared(config)
    if b.split not in meta["splits"]:
      raise KeyError(f"{prep_dir}: no split {b.split!r} (splits: {sorted(meta['splits'])}); set "
                     "--config.bench.split")
  if b.data == "prepared":
    num_labels = len(meta["label_map"])
    mask_id = meta.get("special_ids", {}).get("mask", mask_id)
    host = next(pipeline.pretrain_batches(prep_dir, b.split, global_batch_size=b.batch_size,
                                          seed=config.seed))
    if host["input_ids"].shape[1] > enc.max_seq_len:
      raise ValueError(f"{prep_dir}: sequences of {host['input_ids'].shape[1]} tokens exceed the "
                       f"{enc.max_seq_len} positions of {model_name}")
    batch = sharding_lib.host_local_to_global(host, mesh)
  else:
    batch = runtime.to_global(synthetic_batch(enc, b.batch_size, b.seq_len, num_labels,
                                              config.seed), mesh)
  seq_len = int(batch["input_ids"].shape[1])

  on_cpu = mesh.devices.flat[0].platform == "cpu"
  cpu_peak = timing_lib.cpu_peaks(int(b.peak_matmul_size)) if on_cpu else None
  input_pipeline = None
  if b.input_batches:
    if prep_dir is None:
      prep_dir = write_input_split(workdir / INPUT_SPLIT_DIR, enc, int(b.input_rows), seq_len,
                                   num_labels, config.seed)
      split = "corpus"
    else:
      split = b.split
    input_pipeline = time_input_pipeline(prep_dir, split, b.batch_size, int(b.input_batches),
                                         config.seed)
    log.info("bench: input pipeline (%s, split %s): %.0f sequences/s", prep_dir, split,
             input_pipeline["sequences_per_second"])

  meta_like = {"special_ids": {"mask": int(mask_id)},
               "label_map": {f"R{i}": i for i in range(num_labels)}}
  rows = []
  for kind in config_lib.bench_stages(config):
    kw = dict(max_predictions=int(config.mslm.max_predictions), num_labels=num_labels,
              num_relations=num_labels, proj_dim=int(config.scl.proj_dim),
              span_input=config.scl.span_input)
    predicate = None
    if kind.endswith("_predicate"):
      table = lowering_lib.synthetic_templates(enc, num_labels, config.model, config.seed)
      predicate = classifier_lib.predicate_options({**config.model.to_dict(), "head": "predicate"},
                                                   table)
      n = int(config.model.predicate_train_relations)
      kw.update(template_len=table.max_len, templates=(
          n if kind == "finetune_predicate" and 0 < n < num_labels else num_labels))
      if predicate["template_pass"] == "cached":
        kw.update(template_len=4 + 2 * table.entity_len, cached_relations=num_labels,
                  static_len=2 + max(sum(len(p) for p in rel) for rel in table.pieces),
                  fusion_layers=predicate["fusion_layers"])
    if kind.startswith("eval"):
      build = classifier_lib.classifier_builder(enc, num_labels, config.model.dropout, config.seed,
                                                predicate)
      timing = timing_lib.time_eval_step(build, mesh, rules, batch, int(b.steps),
                                        int(b.warmup_steps))
    else:
      section = ml_collections.ConfigDict(
          config[{"finetune": "train", "finetune_predicate": "train"}.get(kind, kind)].to_dict())
      section.batch_size = int(b.batch_size)
      if kind.startswith("finetune"):
        build = classifier_lib.classifier_builder(enc, num_labels, config.model.dropout, config.seed,
                                                  predicate)
        loss_fn = classifier_lib.make_loss_fn
      else:
        cfg = mslm_scl.step_config(config, meta_like, kind)
        build = mslm_scl.pretrain_builder(enc, num_relations=num_labels if kind == "scl" else 0,
                                          proj_dim=int(config.scl.proj_dim) if kind == "scl" else 0,
                                          seed=config.seed)
        loss_fn = lambda graphdef, k=kind, c=cfg: mslm_scl.LOSSES[k](graphdef, c)  # noqa: E731
      task = trainer.TrainTask(
          stage=kind, section=section, seed=config.seed,
          total_steps=int(b.steps) + int(b.warmup_steps) + 1, build=build, loss_fn=loss_fn,
          batches=lambda start: iter(()), init_weights=lambda model: ("random", []))
      timing = timing_lib.time_train_step(task, mesh, rules, batch, int(b.steps),
                                         int(b.warmup_steps), config.seed)
    if cpu_peak is not None:
      # The host's speed drifts (shared VMs, turbo): re-measure next to each timing and keep the
      # run's best, so an MFU never divides by a peak measured in a slow moment (it read > 100%).
      again = timing_lib.cpu_peaks(int(b.peak_matmul_size))
      cpu_peak = {dt: max(cpu_peak[dt], again[dt]) for dt in cpu_peak}
    flops = flops_lib.step_flops(kind, enc, int(b.batch_size), seq_len, **kw)
    row = timing_lib.make_row(
        stage=kind, model_name=model_name, enc=enc, batch_size=int(b.batch_size),
        seq_len=seq_len, mesh=mesh, rules=rules_name, timing=timing, flops=flops,
        peak=timing_lib.peak_for(mesh.devices.flat[0], enc.dtype, cpu_peak), cpu_peak=cpu_peak,
        input_pipeline=input_pipeline, data=b.data, warmup=int(b.warmup_steps))
    rows.append(row)
    log.info("bench: %s", timing_lib.one_line(row))
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      path = out_dir / timing_lib.row_filename(row)
      tmp = path.with_suffix(".json.tmp")
      tmp.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
      tmp.replace(path)

  summary = {"stage": "bench", "rows_dir": str(out_dir), "rows": rows,
             "bench": [timing_lib.one_line(r) for r in rows],
             "seconds": {"total": round(time.time() - t_start, 1)}}
  runtime.write_summary(workdir, summary)
  return summary
