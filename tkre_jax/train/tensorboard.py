"""TensorBoard event files of a training workdir, written next to `metrics.jsonl`.

    <workdir>/tensorboard/events.out.tfevents.*     (`tensorboard --logdir runs/`)

Every record the trainer appends to `metrics.jsonl` is also written here, each numeric field as a
scalar named `<stage>/<field>` at the record's step: `loss`, `grad_norm`, `learning_rate`,
`steps_per_second`, the stage's own terms (`mslm_loss`, `scl_loss`, ...) and finetune's dev
metrics (`dev_accuracy`, `dev_micro_f1`, ...). Files are written with `tf.summary.write` and the
scalars plugin's metadata, which is what `tf.summary.scalar` writes, without needing the
`tensorboard` package itself (TensorFlow is already a dependency for tf.data; view the files with
`pip install tensorboard; tensorboard --logdir runs/`). They are flushed after every record, so a
killed run loses nothing that `metrics.jsonl` kept.

Resume: like `metrics.jsonl`, the event files hold each step once. Before a resumed run writes,
`truncate_after(step)` rewrites every event file without the events of later steps (written after
the checkpoint the run resumes from, and about to be written again) and without a record torn by a
kill in the middle of a write; the events kept keep their wall times. TensorBoard then reads the old file and the new run's file as one history.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping

from tkre_jax.data import dataset
from tkre_jax.parallel.mesh import is_primary

TB_DIR = "tensorboard"
# Record fields that are not curves.
_SKIP = {"step", "steps_in_window", "selected"}


def _event_file_order(path: pathlib.Path) -> tuple:
  """Sort key of `events.out.tfevents.<seconds>.<host>.<pid>.<n>.v2`: the time, then the writer's
  number within its process (numerically: a process's 10th writer of a second comes after its 9th,
  which a sort by name gets wrong)."""
  parts = path.name.split(".")
  try:
    return (int(parts[3]), ".".join(parts[4:-3]), int(parts[-3]), int(parts[-2]), path.name)
  except (IndexError, ValueError):
    return (float("inf"), "", 0, 0, path.name)


def _event_files(directory: pathlib.Path) -> list[pathlib.Path]:
  return (sorted(directory.glob("events.out.tfevents.*"), key=_event_file_order)
          if directory.is_dir() else [])


class EventWriter:
  """Writes `metrics.jsonl`-style records as TensorBoard scalars (process 0 only).

  Args:
    workdir: the stage's workdir; files go to `<workdir>/tensorboard/`.
  """

  def __init__(self, workdir: pathlib.Path):
    self.dir = pathlib.Path(workdir) / TB_DIR
    self.enabled = is_primary()
    self._writer = None

  def files(self) -> list[pathlib.Path]:
    """The event files, oldest first (see `_event_file_order`)."""
    return _event_files(self.dir)

  def truncate_after(self, step: int) -> int:
    """Rewrites every event file without the events of steps after `step`, atomically per file.

    Returns:
      the number of events dropped.
    """
    if not self.enabled:
      return 0
    tf = dataset.tf_module()
    dropped = 0
    for path in self.files():
      records, torn = [], False
      try:
        for r in tf.data.TFRecordDataset(str(path)):
          records.append(bytes(r.numpy()))
      except tf.errors.DataLossError:  # a kill in the middle of a write: drop the torn tail
        torn = True
      keep = [r for r in records if tf.compat.v1.Event.FromString(r).step <= step]
      if len(keep) == len(records) and not torn:
        continue
      dropped += len(records) - len(keep)
      tmp = path.with_name(".tmp." + path.name)
      with tf.io.TFRecordWriter(str(tmp)) as w:
        for r in keep:
          w.write(r)
      tmp.replace(path)
    return dropped

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes the numeric fields of `record` (it needs `stage` and `step`) and flushes."""
    if not self.enabled:
      return
    tf = dataset.tf_module()
    if self._writer is None:
      self.dir.mkdir(parents=True, exist_ok=True)
      self._writer = tf.summary.create_file_writer(str(self.dir))
    stage, step = record.get("stage", "train"), int(record["step"])
    metadata = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
    with self._writer.as_default():
      for key, value in record.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        if math.isfinite(float(value)):
          tf.summary.write(f"{stage}/{key}", tf.constant(float(value), tf.float32), step=step,
                           metadata=metadata)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files under `directory`: tag -> [(step, value), ...] in file order
  (read with `tf.compat.v1.train.summary_iterator`; for tests and quick checks)."""
  tf = dataset.tf_module()
  out: dict[str, list[tuple[int, float]]] = {}
  for path in _event_files(pathlib.Path(directory)):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else float(v.simple_value)
        out.setdefault(v.tag, []).append((int(event.step), value))
  return out
