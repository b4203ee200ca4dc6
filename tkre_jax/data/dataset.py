"""A prepared directory: the featurized splits as a TensorFlow Datasets (TFDS) dataset + `meta.json`.

Layout (written by `PreparedWriter`, read with `tfds.builder_from_directory(dir)`):

    <dir>/tkre_prepared-<split>.tfrecord-00000-of-00002   TFRecord shards, one example per instance
    <dir>/dataset_info.json, features.json                TFDS metadata: features, splits, counts
    <dir>/lengths-<split>.npy                             uint16[n]: real tokens per row (pipeline)
    <dir>/meta.json                                       what TFDS cannot hold (see below)
    <dir>/summary.json                                    the prepare stage's summary

Every example holds `input_ids`, `attention_mask`, `span_ids`: int32[max_seq_len], `subj_pos`,
`obj_pos`, `label`: int32 scalars, `relation` and `source`: text. Rows are written in order into
contiguous shards (at most `ROWS_PER_SHARD` rows each), so reading a split shard by shard gives
the written order back, and `split[a:b]` sub-splits are cheap.

`meta.json` holds `format` (`FORMAT`), the label map, tokenizer dir, special ids, vocab size,
`max_seq_len`, `typed_markers`, dataset, K, the corpus report and, per split, the featurizer
stats (`meta["splits"][split]`). Example counts live in TFDS's split info only.

A directory is written into a temporary sibling and renamed into place, so no half-written
dataset is ever visible. An existing target is replaced only when it is empty or a prepared
directory holding nothing but files prepare writes; anything else is refused
(`ForeignFilesError`) and left untouched.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np

FORMAT = "tkre_jax.prepared/2"
DATASET_NAME = "tkre_prepared"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
META_FILE = "meta.json"
SUMMARY_FILE = "summary.json"
TFDS_FILES = ("dataset_info.json", "features.json")
ROWS_PER_SHARD = 4096  # shards are the unit the pre-training pipeline shuffles (see pipeline.py)
TOKEN_KEYS = ("input_ids", "attention_mask", "span_ids")
SCALAR_KEYS = ("subj_pos", "obj_pos", "label")
TEXT_KEYS = ("relation", "source")
_OURS = re.compile(rf"^{DATASET_NAME}-[\w-]+\.tfrecord-\d{{5}}-of-\d{{5}}$|^lengths-[\w-]+\.npy$")


class ForeignFilesError(FileExistsError):
  """The target of `prepare` holds files prepare did not write; nothing was changed."""


def tf_module():
  """TensorFlow, imported lazily (slow to import) and kept off the accelerators (tf.data only)."""
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  return tf


def tfds_module():
  """`tensorflow_datasets`, imported lazily."""
  tf_module()
  import tensorflow_datasets as tfds
  return tfds


def lengths_file(split: str) -> str:
  return f"lengths-{split}.npy"


def features_spec(max_seq_len: int):
  """The TFDS `FeaturesDict` of one example (see the module docstring)."""
  tfds = tfds_module()
  spec = {k: tfds.features.Tensor(shape=(max_seq_len,), dtype=np.int32) for k in TOKEN_KEYS}
  spec.update({k: tfds.features.Scalar(dtype=np.int32) for k in SCALAR_KEYS})
  spec.update({k: tfds.features.Text() for k in TEXT_KEYS})
  return tfds.features.FeaturesDict(spec)


# ---------------------------------------------------------------------------------------------------
# Which files are ours
# ---------------------------------------------------------------------------------------------------

def _own_files(directory: pathlib.Path) -> set[str] | None:
  """Names prepare may replace in `directory`, or None when it is not a prepared directory.

  Format 2 (this module): the names it writes. Format 1 (`<split>-00000-of-00002.tfrecord` shards
  listed in `meta.json["splits"][s]["files"]`): the listed files.
  """
  try:
    meta = json.loads((directory / META_FILE).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(meta, dict):
    return None
  fixed = {META_FILE, SUMMARY_FILE}
  if meta.get("format") == FORMAT:
    return fixed | set(TFDS_FILES) | {p.name for p in directory.iterdir() if _OURS.match(p.name)}
  splits = meta.get("splits")
  if "format" not in meta and isinstance(splits, dict) and all(
      isinstance(s, dict) and isinstance(s.get("files"), list) for s in splits.values()):
    return fixed | {str(f) for s in splits.values() for f in s["files"]}
  return None


def check_target(out_dir: pathlib.Path) -> bool:
  """Whether `prepare` may write `out_dir`; True when it exists and is not empty (a replace).

  Raises:
    ForeignFilesError: `out_dir` is a file, or a non-empty folder that is not a prepared directory,
      or a prepared directory that also holds other files (named in the message).
  """
  out_dir = pathlib.Path(out_dir)
  if not out_dir.exists():
    return False
  if not out_dir.is_dir():
    raise ForeignFilesError(f"{out_dir} is a file, not a folder: choose another --workdir")
  names = sorted(p.name for p in out_dir.iterdir())
  if not names:
    return False
  ours = _own_files(out_dir)
  foreign = names if ours is None else [n for n in names if n not in ours]
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    what = "is not a prepared directory" if ours is None else "holds files prepare did not write"
    raise ForeignFilesError(f"{out_dir} {what} ({shown}); prepare never deletes what it did not "
                            "write: choose an empty or new --workdir, or move those files away")
  return True


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _check_split(split: str, features: Mapping[str, np.ndarray], relations: Sequence[str],
                 sources: Sequence[str]) -> tuple[int, int]:
  """Returns (n, max_seq_len) of one split's arrays; ValueError naming the split and key if bad."""
  missing = [k for k in TOKEN_KEYS + SCALAR_KEYS if k not in features]
  if missing:
    raise ValueError(f"split {split}: features lack {missing}")
  n, length = np.shape(features["input_ids"])[:2] if np.ndim(features["input_ids"]) == 2 else (-1, -1)
  if n <= 0:
    raise ValueError(f"split {split}: input_ids must be a non-empty [n, max_seq_len] array, got "
                     f"shape {np.shape(features['input_ids'])}")
  for k in TOKEN_KEYS + SCALAR_KEYS:
    want = (n, length) if k in TOKEN_KEYS else (n,)
    if np.shape(features[k]) != want:
      raise ValueError(f"split {split}: {k} has shape {np.shape(features[k])}, expected {want}")
  if len(relations) != n or len(sources) != n:
    raise ValueError(f"split {split}: {n} feature rows but {len(relations)} relations and "
                     f"{len(sources)} sources")
  return n, length


class PreparedWriter:
  """Context manager that builds a prepared directory atomically.

  Usage:
    with PreparedWriter(out_dir, overwrite=True) as w:
      w.add_split("train", features, relations, sources, num_shards=2, stats={...})
      w.meta.update(label_map=..., tokenizer_dir=...)
  On success the TFDS metadata and `meta.json` are written and the temporary sibling replaces
  `out_dir`; on error it is removed and `out_dir` is untouched.

  Raises (on enter, before anything is created):
    ForeignFilesError: `out_dir` holds files prepare did not write (see `check_target`).
    FileExistsError: `out_dir` is a non-empty prepared directory and `overwrite` is False.
  """

  def __init__(self, out_dir: pathlib.Path, overwrite: bool = False):
    self.out_dir = pathlib.Path(out_dir)
    self.overwrite = overwrite
    self.meta: dict = {"splits": {}}
    self._split_infos: list = []
    self._max_seq_len: int | None = None

  def __enter__(self) -> "PreparedWriter":
    if check_target(self.out_dir) and not self.overwrite:
      raise FileExistsError(f"{self.out_dir} is a prepared directory already; pass overwrite to "
                            "replace it")
    self.out_dir.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.prepare-",
                                             dir=self.out_dir.parent))
    return self

  def add_split(self, split: str, features: Mapping[str, np.ndarray], relations: Sequence[str],
                sources: Sequence[str], num_shards: int = 1, **info) -> None:
    """Writes one split: contiguous shards of at most `ROWS_PER_SHARD` rows (`num_shards` at least).

    Args:
      features: token keys int[n, max_seq_len], scalar keys int[n] (`Featurizer.__call__` output).
      relations, sources: per-row strings, length n.
      **info: JSON values kept in `meta["splits"][split]` (e.g. featurizer stats).

    Raises:
      ValueError: an empty split, a split written twice, inconsistent shapes, or a max_seq_len
        that differs from an earlier split's.
    """
    tfds = tfds_module()
    tf = tf_module()
    n, length = _check_split(split, features, relations, sources)
    if split in self.meta["splits"]:
      raise ValueError(f"split {split} added twice")
    if self._max_seq_len not in (None, length):
      raise ValueError(f"split {split}: max_seq_len {length} differs from the earlier splits' "
                       f"{self._max_seq_len}")
    self._max_seq_len = length
    spec = features_spec(length)
    num_shards = min(n, max(1, num_shards, math.ceil(n / ROWS_PER_SHARD)))
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    template = tfds.core.ShardedFileTemplate(data_dir=self.tmp, template=FILENAME_TEMPLATE,
                                             dataset_name=DATASET_NAME, split=split,
                                             filetype_suffix="tfrecord")
    arrays = {k: np.asarray(features[k], dtype=np.int32) for k in TOKEN_KEYS + SCALAR_KEYS}
    num_bytes = 0
    for path, lo, hi in zip(template.sharded_filepaths(num_shards), bounds[:-1], bounds[1:]):
      with tf.io.TFRecordWriter(os.fspath(path)) as w:
        for i in range(lo, hi):
          ex = {k: v[i] for k, v in arrays.items()}
          ex.update(relation=relations[i], source=sources[i])
          w.write(spec.serialize_example(ex))
      num_bytes += os.path.getsize(path)
    np.save(self.tmp / lengths_file(split), arrays["attention_mask"].sum(axis=1).astype(np.uint16))
    self._split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=np.diff(bounds).tolist(),
                                                 num_bytes=num_bytes))
    self.meta["splits"][split] = info

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    try:
      if not self._split_infos:
        raise ValueError(f"{self.out_dir}: no split to write")
      tfds = tfds_module()
      tfds.folder_dataset.write_metadata(
          data_dir=self.tmp, features=features_spec(self._max_seq_len),
          split_infos=self._split_infos, filename_template=FILENAME_TEMPLATE, check_data=False,
          description="Featurized relation-extraction splits written by tkre_jax prepare.")
      with open(self.tmp / META_FILE, "w") as f:
        json.dump({**self.meta, "format": FORMAT}, f, indent=2, sort_keys=True)
      if check_target(self.out_dir):  # ours: replace it (checked again: it may have changed)
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-",
                                            dir=self.out_dir.parent))
        os.replace(self.out_dir, old / "d")
        os.replace(self.tmp, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)
      else:  # absent or empty: rename(2) replaces an empty folder
        os.replace(self.tmp, self.out_dir)
    except BaseException:
      shutil.rmtree(self.tmp, ignore_errors=True)
      raise
    return False


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def read_meta(directory: pathlib.Path) -> dict:
  """Reads `<directory>/meta.json`.

  Raises:
    FileNotFoundError: no meta.json (with a hint to run the prepare stage).
    ValueError: a directory written by an older prepare (rerun prepare).
  """
  path = pathlib.Path(directory) / META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: run `--stage=prepare` first (or point "
                            "--config.data.prepared_dir at a prepared directory)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{directory} was written by an older prepare (format "
                     f"{meta.get('format', 'tkre_jax.prepared/1')!r}, need {FORMAT!r}): rerun "
                     "`--stage=prepare` into it")
  return meta


def builder(directory: pathlib.Path):
  """The read-only TFDS builder of a prepared directory (checks `meta.json` first)."""
  read_meta(directory)
  return tfds_module().builder_from_directory(os.fspath(directory))


def split_sizes(directory: pathlib.Path) -> dict[str, int]:
  """Split name -> number of examples, from TFDS's split info."""
  return {name: int(s.num_examples) for name, s in builder(directory).info.splits.items()}


def _check_split_name(b, directory, split: str) -> None:
  if split not in b.info.splits:
    raise KeyError(f"{directory}: no split {split!r}; available: {sorted(b.info.splits)}")


def load_arrays(directory: pathlib.Path, split: str) -> dict[str, np.ndarray]:
  """Reads a whole (small, K-shot) split into memory through TFDS, in written order.

  Returns:
    `input_ids`, `attention_mask`, `span_ids`: int32[n, max_seq_len]; `subj_pos`, `obj_pos`,
    `label`: int32[n]; `relation`, `source`: object arrays of str.

  Raises:
    FileNotFoundError / ValueError: see `read_meta`. KeyError: no such split.
  """
  tfds = tfds_module()
  b = builder(directory)
  _check_split_name(b, directory, split)
  ds = b.as_dataset(split=split, shuffle_files=False,
                    read_config=tfds.ReadConfig(interleave_cycle_length=1))
  parts: dict[str, list] = {}
  for batch in ds.batch(4096).as_numpy_iterator():
    for k, v in batch.items():
      parts.setdefault(k, []).append(v)
  out = {k: np.concatenate(v) for k, v in parts.items()}
  for k in TEXT_KEYS:
    out[k] = np.asarray([s.decode() for s in out[k]], dtype=object)
  return out


def load_text_column(directory: pathlib.Path, split: str, key: str = "source") -> list[str]:
  """One text feature (`relation` or `source`) of every row of `split`, in written order, without
  decoding the token arrays.

  Raises:
    FileNotFoundError / ValueError: see `read_meta`. KeyError: no such split or text feature.
  """
  if key not in TEXT_KEYS:
    raise KeyError(f"{key!r} is not a text feature of a prepared row; those are {TEXT_KEYS}")
  tfds = tfds_module()
  b = builder(directory)
  _check_split_name(b, directory, split)
  ds = b.as_dataset(split=split, shuffle_files=False,
                    decoders=tfds.decode.PartialDecoding({key: True}),
                    read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return [x.decode() for batch in ds.batch(4096).as_numpy_iterator() for x in batch[key]]


def read_lengths(directory: pathlib.Path, split: str) -> np.ndarray:
  """uint16[n]: real tokens per row of `split`, memory-mapped (the pipeline's bucketing plan).

  Raises:
    FileNotFoundError: the lengths file is missing (rerun prepare).
  """
  path = pathlib.Path(directory) / lengths_file(split)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: rerun `--stage=prepare` into {directory}")
  return np.load(path, mmap_mode="r")
