"""TFRecord shards of featurized splits, their `meta.json`, and the `tf.data` reader.

Layout of a prepared directory:

    <dir>/meta.json                          label map, tokenizer, max_seq_len, special ids, counts
    <dir>/<split>-00000-of-00004.tfrecord    one `tf.train.Example` per instance

Every example holds the `FEATURE_KEYS` of `tkre_jax.data.features` as int64 features of fixed length
(`max_seq_len` for token-level keys, 1 for `subj_pos`, `obj_pos`, `label`) plus `relation` and
`source` as bytes. A directory is written into a temporary sibling and renamed into place, so a
failed or interrupted `prepare` never leaves a half-written directory behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from tkre_jax.data.features import FEATURE_KEYS

TOKEN_KEYS = ("input_ids", "attention_mask", "span_ids")
SCALAR_KEYS = ("subj_pos", "obj_pos", "label")
META_FILE = "meta.json"


def _tf():
  import tensorflow as tf  # imported lazily: TensorFlow is slow to import
  tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX
  return tf


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def write_split(directory: pathlib.Path, split: str, features: Mapping[str, np.ndarray],
                relations: Sequence[str], sources: Sequence[str], num_shards: int = 1) -> list[str]:
  """Writes one split as `num_shards` TFRecord files (round-robin) into `directory`.

  Args:
    features: the dict from `Featurizer.__call__` (arrays with a leading [n] axis).
    relations, sources: per-instance strings, length n.

  Returns:
    The shard file names (relative to `directory`).
  """
  tf = _tf()
  n = len(features["label"])
  if len(relations) != n or len(sources) != n:
    raise ValueError(f"split {split}: {n} feature rows but {len(relations)} relations and "
                     f"{len(sources)} sources")
  num_shards = max(1, min(num_shards, n)) if n else 1
  names = [shard_name(split, i, num_shards) for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(str(directory / name)) for name in names]
  try:
    for i in range(n):
      feat = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=np.ravel(features[k][i])))
              for k in FEATURE_KEYS}
      feat["relation"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[relations[i].encode()]))
      feat["source"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[sources[i].encode()]))
      example = tf.train.Example(features=tf.train.Features(feature=feat))
      writers[i % num_shards].write(example.SerializeToString())
  finally:
    for w in writers:
      w.close()
  return names


class PreparedWriter:
  """Context manager that builds a prepared directory atomically.

  Usage:
    with PreparedWriter(out_dir, overwrite=True) as w:
      w.add_split("train", features, relations, sources, num_shards=4)
      w.meta.update(label_map=..., max_seq_len=...)
  On success the temporary directory is renamed to `out_dir`; on error it is removed.

  Raises:
    FileExistsError: `out_dir` exists and `overwrite` is False.
  """

  def __init__(self, out_dir: pathlib.Path, overwrite: bool = False):
    self.out_dir = pathlib.Path(out_dir)
    self.overwrite = overwrite
    self.meta: dict = {"splits": {}}

  def __enter__(self) -> "PreparedWriter":
    if self.out_dir.exists() and not self.overwrite:
      raise FileExistsError(f"{self.out_dir} exists; pass overwrite to replace it")
    self.out_dir.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent))
    return self

  def add_split(self, split: str, features: Mapping[str, np.ndarray], relations: Sequence[str],
                sources: Sequence[str], num_shards: int = 1, **info) -> None:
    files = write_split(self.tmp, split, features, relations, sources, num_shards)
    self.meta["splits"][split] = {"files": files, "num_examples": int(len(features["label"])), **info}

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    with open(self.tmp / META_FILE, "w") as f:
      json.dump(self.meta, f, indent=2, sort_keys=True)
    if self.out_dir.exists():
      old = self.out_dir.with_name(self.out_dir.name + ".old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(self.out_dir, old)
      os.replace(self.tmp, self.out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(self.tmp, self.out_dir)
    return False


def read_meta(directory: pathlib.Path) -> dict:
  """Reads `<directory>/meta.json`.

  Raises:
    FileNotFoundError: with a hint to run the prepare stage.
  """
  path = pathlib.Path(directory) / META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: run `--stage=prepare` first (or point "
                            "--config.data.prepared_dir at a prepared directory)")
  with open(path) as f:
    return json.load(f)


def split_files(directory: pathlib.Path, split: str, meta: Optional[dict] = None) -> list[str]:
  meta = meta or read_meta(directory)
  if split not in meta["splits"]:
    raise KeyError(f"{directory}: no split {split!r}; available: {sorted(meta['splits'])}")
  return [str(pathlib.Path(directory) / f) for f in meta["splits"][split]["files"]]


def make_dataset(files: Sequence[str], max_seq_len: int):
  """A `tf.data.Dataset` of parsed examples (dicts of int32 tensors; `relation`, `source` strings)."""
  tf = _tf()
  spec = {k: tf.io.FixedLenFeature([max_seq_len], tf.int64) for k in TOKEN_KEYS}
  spec.update({k: tf.io.FixedLenFeature([1], tf.int64) for k in SCALAR_KEYS})
  spec["relation"] = tf.io.FixedLenFeature([], tf.string)
  spec["source"] = tf.io.FixedLenFeature([], tf.string)

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    out = {k: tf.cast(ex[k], tf.int32) for k in TOKEN_KEYS}
    out.update({k: tf.cast(ex[k][0], tf.int32) for k in SCALAR_KEYS})
    out["relation"] = ex["relation"]
    out["source"] = ex["source"]
    return out

  ds = tf.data.TFRecordDataset(list(files))
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def load_arrays(directory: pathlib.Path, split: str, files: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """Reads a whole split into memory with `tf.data`.

  Returns:
    dict of numpy arrays: token-level keys int32[n, max_seq_len], scalar keys int32[n],
    `relation` and `source` as object arrays of str. Order is file order (round-robin shards are
    interleaved back into the written order when the split is read whole).
  """
  tf = _tf()
  meta = read_meta(directory)
  files = list(files) if files is not None else split_files(directory, split, meta)
  ds = make_dataset(files, meta["max_seq_len"]).batch(4096)
  parts: dict[str, list] = {}
  for batch in ds.as_numpy_iterator():
    for k, v in batch.items():
      parts.setdefault(k, []).append(v)
  if not parts:
    raise ValueError(f"{directory}: split {split!r} is empty")
  out = {k: np.concatenate(v) for k, v in parts.items()}
  out["relation"] = np.asarray([r.decode() for r in out["relation"]], dtype=object)
  out["source"] = np.asarray([s.decode() for s in out["source"]], dtype=object)
  if len(files) > 1 and files == split_files(directory, split, meta):
    # Undo the round-robin sharding so rows come back in written order.
    counts = [sum(1 for _ in tf.data.TFRecordDataset([f])) for f in files]
    order = np.concatenate([np.arange(c) * len(files) + i for i, c in enumerate(counts)])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    out = {k: v[inverse] for k, v in out.items()}
  del tf
  return out


MODEL_KEYS = FEATURE_KEYS


def bucket_length(attention_mask: np.ndarray, multiple: int, max_len: int) -> int:
  """Smallest multiple of `multiple` (capped at `max_len`) that holds every real token of the batch."""
  longest = int(attention_mask.sum(axis=1).max()) if attention_mask.size else 1
  return int(min(max_len, max(multiple, -(-longest // multiple) * multiple)))


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = False,
                    seed: int = 0, drop_remainder: bool = False, length_multiple: int = 0,
                    sort_by_length: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields fixed-size numpy batches from in-memory arrays (one pass).

  Each batch has the model keys plus `weight: float32[batch]` (0 on rows that pad the last batch
  to `batch_size`, which keeps a single compiled shape) and `index: int32[batch]` (row in `arrays`,
  -1 for padding rows). With `length_multiple` > 0, the sequence axis is cut to the smallest
  multiple of it that holds the batch's longest row (a handful of compiled shapes instead of one
  padded to `max_seq_len`). `sort_by_length` orders rows by length first (for evaluation, where
  order does not matter).

  Args:
    shuffle: permute rows with `numpy.random.default_rng(seed)` (pass a new seed per epoch).
  """
  n = len(arrays["label"])
  order = np.arange(n)
  if shuffle:
    order = np.random.default_rng(seed).permutation(n)
  elif sort_by_length:
    order = np.argsort(arrays["attention_mask"].sum(axis=1), kind="stable")
  max_len = arrays["input_ids"].shape[1]
  for b in range(0, n, batch_size):
    idx = order[b:b + batch_size]
    if len(idx) < batch_size and drop_remainder:
      return
    pad = batch_size - len(idx)
    batch = {}
    for k in MODEL_KEYS:
      v = arrays[k][idx]
      if pad:
        v = np.concatenate([v, np.repeat(v[:1] * 0, pad, axis=0)])
      batch[k] = v
    if pad:  # padding rows: a valid-looking [CLS] so attention never sees an all-masked row
      batch["attention_mask"][len(idx):, 0] = 1
    batch["weight"] = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    batch["index"] = np.concatenate([idx, -np.ones(pad, np.int64)]).astype(np.int32)
    if length_multiple:
      L = bucket_length(batch["attention_mask"], length_multiple, max_len)
      for k in ("input_ids", "attention_mask", "span_ids"):
        batch[k] = batch[k][:, :L]
    yield batch


def stream_batches(files: Sequence[str], max_seq_len: int, batch_size: int, *, seed: int,
                   shuffle_buffer: int = 10_000, repeat: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """A streaming `tf.data` pipeline for step-based training (pre-training corpora).

  Files are interleaved, examples shuffled with a seeded buffer (reshuffled every pass), batched
  with `drop_remainder=True` (one compiled shape) and prefetched. On several hosts pass each host its
  own file subset (`tkre_jax.parallel.sharding.process_shard_files`) and the per-host batch size.

  Yields:
    dicts of numpy arrays with the model keys (`int32[batch, max_seq_len]` / `int32[batch]`) and
    `weight: float32[batch]` (all ones).
  """
  tf = _tf()
  ds = make_dataset(files, max_seq_len)
  ds = ds.map(lambda ex: {k: ex[k] for k in MODEL_KEYS})
  if repeat:
    ds = ds.repeat()
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: {**b, "weight": tf.ones([batch_size], tf.float32)})
  ds = ds.prefetch(tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.with_options(opts)
  return ds.as_numpy_iterator()
