"""Batches: in-memory batches of the small K-shot splits, and the streaming pre-training pipeline.

`iterate_batches` cuts numpy arrays (from `dataset.load_arrays`) into fixed-size batches.

`pretrain_batches` streams a prepared split (the pre-training corpus) through `tf.data` (TFDS's
reader) and never holds the whole split. How an epoch is laid out, for host h of P:

1. Host shard: `tfds.split_for_jax_process(split)`: a contiguous, disjoint slice of the split
   (sizes differ by at most one row when P does not divide n).
2. Segment shuffle: the shard's file segments (shards hold at most `dataset.ROWS_PER_SHARD` rows)
   are read in an order drawn from (seed, epoch, h), one after the other.
3. Windows: the stream is cut into windows of `window_rows` rows (default `SHUFFLE_WINDOW`); each
   window is shuffled in memory by (seed, epoch, h, window). This is the shuffle buffer: rows mix
   within a window and segments mix across the epoch, so with fewer rows than the split in a window
   the shuffle is approximate.
4. Length buckets: a row of t real tokens is in bucket ceil(t / length_multiple); a bucket's batches
   are cut to L = bucket * length_multiple (capped at max_seq_len). Every host computes, from the
   per-row lengths file and the segment orders of all hosts (numpy on index arithmetic, no data
   read), how many rows of each bucket every host has in each window; a window then runs, on every
   host, max over hosts of ceil(count / local_batch) batches of each bucket, in a bucket order drawn
   from (seed, epoch, window). So all hosts take the same number of steps per epoch and agree on L at
   every step; a host short of rows for a batch pads it with weight-0 rows (whole padding batches
   included).

Each epoch every row of a host's shard appears exactly once, and a host decodes only its own shard:
`ReadStats` (the `stats` argument) counts the rows it decoded (the mslm / scl summaries report them
per process). The batch at step s is a pure function
of (data, seed, s, process_index, process_count, window_rows); `start_step` finds step s by
planning epochs (index arithmetic over the lengths file) and skipping whole windows inside TFDS's
file instructions before any decoding.

Memory: about three windows of rows (the one being cut and two prefetched; 8192 rows of 128 tokens
are 12.6 MB) and the epoch plan (row counts per host, window and bucket); the lengths file (2 bytes
a row) is memory-mapped and read one segment at a time. Planning an epoch reads the whole lengths
file (every host plans every host's windows), which is also what a resume costs per skipped epoch.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from tkre_jax.data import dataset, row_weights
from tkre_jax.data.features import FEATURE_KEYS

MODEL_KEYS = FEATURE_KEYS
INSTANCE_WEIGHT_KEY = row_weights.WEIGHT_KEY
SHUFFLE_WINDOW = 8192  # rows shuffled together in memory (the shuffle buffer)
_TAG_SEGMENTS, _TAG_BUCKETS, _TAG_ROWS = 0, 1, 2  # rng streams of one (seed, epoch)


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
    batch = _gather(arrays, idx, batch_size, max_len)
    batch["index"] = np.concatenate([idx, -np.ones(batch_size - len(idx), np.int64)]).astype(np.int32)
    if length_multiple:
      L = bucket_length(batch["attention_mask"], length_multiple, max_len)
      for k in dataset.TOKEN_KEYS:
        batch[k] = batch[k][:, :L]
    yield batch


def _gather(arrays: Mapping[str, np.ndarray], idx: np.ndarray, batch_size: int,
            length: int) -> dict[str, np.ndarray]:
  """Rows `idx` of `arrays` (token keys cut to `length`), padded to `batch_size` with weight-0 rows
  that look like a valid [CLS]-only row (attention_mask[:, 0] = 1: attention never sees an all-masked
  row). Adds `weight: float32[batch_size]`, and `instance_weight: float32[batch_size]` (0 on
  padding rows) when `arrays` has learning-order weights (`row_weights.WEIGHT_KEY`)."""
  k = len(idx)
  out = {}
  for key in MODEL_KEYS:
    src = arrays[key][idx, :length] if key in dataset.TOKEN_KEYS else arrays[key][idx]
    v = np.zeros((batch_size,) + src.shape[1:], np.int32)
    v[:k] = src
    out[key] = v
  out["attention_mask"][k:, 0] = 1
  out["weight"] = (np.arange(batch_size) < k).astype(np.float32)
  if INSTANCE_WEIGHT_KEY in arrays:  # learning-order weights ride along (0 on padding rows)
    w = np.zeros(batch_size, np.float32)
    w[:k] = arrays[INSTANCE_WEIGHT_KEY][idx]
    out[INSTANCE_WEIGHT_KEY] = w
  return out


# ---------------------------------------------------------------------------------------------------
# Streaming pre-training pipeline
# ---------------------------------------------------------------------------------------------------

def pretrain_num_rows(prepared_dir: pathlib.Path, split: str) -> int:
  """Rows of `split` in a prepared directory (TFDS split info).

  Raises:
    KeyError: no such split (the message lists the available ones).
  """
  sizes = dataset.split_sizes(prepared_dir)
  if split not in sizes:
    raise KeyError(f"{prepared_dir}: no split {split!r}; available: {sorted(sizes)}")
  return sizes[split]


@dataclasses.dataclass
class ReadStats:
  """What one process's `pretrain_batches` decoded from disk (pass one as `stats=`; it is added to).

  Attributes:
    rows: rows of the split decoded by this process: its own shard only (`tfds.split_for_jax_process`),
      each window once per epoch; a resumed run decodes the window it resumes in whole.
    windows: windows decoded.
  """
  rows: int = 0
  windows: int = 0


@dataclasses.dataclass(frozen=True)
class _Segment:
  start: int  # first row, in split order
  instruction: object  # tfds FileInstruction


@dataclasses.dataclass
class _EpochPlan:
  orders: list[np.ndarray]   # per host: segment indices in reading order
  counts: np.ndarray         # int64[hosts, windows, buckets]: rows per host, window and bucket
  steps: list[np.ndarray]    # per window: bucket of each step

  @property
  def num_steps(self) -> int:
    return int(sum(len(s) for s in self.steps))


class _Source:
  """One prepared split seen by one host of `process_count` (static facts for epoch planning)."""

  def __init__(self, prepared_dir, split: str, local_batch: int, length_multiple: int,
               process_index: int, process_count: int, window_rows: int,
               stats: Optional[ReadStats] = None,
               row_weights: Optional[Callable[[Sequence[str]], np.ndarray]] = None):
    self.stats = ReadStats() if stats is None else stats
    self.row_weights = row_weights
    self.tfds = dataset.tfds_module()
    self.builder = dataset.builder(prepared_dir)
    info = self.builder.info
    if split not in info.splits:
      raise KeyError(f"{prepared_dir}: no split {split!r}; available: {sorted(info.splits)}")
    n = int(info.splits[split].num_examples)
    if n < process_count:
      raise ValueError(f"{prepared_dir}: split {split!r} has {n} rows, fewer than the "
                       f"{process_count} processes reading it")
    self.max_len = int(info.features["input_ids"].shape[0])
    self.lengths = dataset.read_lengths(prepared_dir, split)
    if len(self.lengths) != n:
      raise ValueError(f"{prepared_dir}: {dataset.lengths_file(split)} has {len(self.lengths)} rows, "
                       f"the split {n}: rerun prepare")
    self.batch, self.multiple, self.window = local_batch, length_multiple, window_rows
    self.index = process_index
    self.num_buckets = -(-self.max_len // length_multiple) if length_multiple else 1
    offsets, row = {}, 0
    for fi in info.splits[split].file_instructions:
      offsets[pathlib.Path(fi.filename).name] = row
      row += fi.examples_in_shard
    self.host_splits, self.segments = [], []
    for h in range(process_count):
      sub = self.tfds.split_for_jax_process(split, process_index=h, process_count=process_count)
      segs = [_Segment(offsets[pathlib.Path(fi.filename).name] + fi.skip, fi)
              for fi in info.splits[sub].file_instructions if fi.take > 0]
      self.host_splits.append(sub)
      self.segments.append(sorted(segs, key=lambda s: s.start))

  def buckets(self, lengths: np.ndarray) -> np.ndarray:
    """int64 bucket of each row of `lengths` real tokens (0 when not bucketing)."""
    if not self.multiple:
      return np.zeros(len(lengths), np.int64)
    return np.clip(-(-np.asarray(lengths, np.int64) // self.multiple), 1, self.num_buckets) - 1

  def seq_len(self, bucket: int) -> int:
    return min(self.max_len, (bucket + 1) * self.multiple) if self.multiple else self.max_len

  def plan(self, seed: int, epoch: int) -> _EpochPlan:
    """The layout of one epoch for all hosts (index arithmetic over the lengths file)."""
    orders, per_host = [], []
    for h, segs in enumerate(self.segments):
      order = np.random.default_rng([seed, epoch, _TAG_SEGMENTS, h]).permutation(len(segs))
      rows = sum(s.instruction.take for s in segs)
      counts = np.zeros((-(-rows // self.window), self.num_buckets), np.int64)
      pos = 0
      for i in order:  # one segment (<= ROWS_PER_SHARD rows) at a time: memory stays small
        take = segs[i].instruction.take
        b = self.buckets(self.lengths[segs[i].start:segs[i].start + take])
        w = (pos + np.arange(take)) // self.window
        lo = w[0]
        span = np.bincount((w - lo) * self.num_buckets + b,
                           minlength=(w[-1] - lo + 1) * self.num_buckets)
        counts[lo:w[-1] + 1] += span.reshape(-1, self.num_buckets)
        pos += take
      per_host.append(counts)
      orders.append(order)
    nw = max(len(c) for c in per_host)
    counts = np.stack([np.pad(c, ((0, nw - len(c)), (0, 0))) for c in per_host])
    per_window = (-(-counts // self.batch)).max(axis=0)  # [windows, buckets]
    steps = [np.random.default_rng([seed, epoch, _TAG_BUCKETS, w]).permutation(
        np.repeat(np.arange(self.num_buckets), per_window[w])) for w in range(nw)]
    return _EpochPlan(orders, counts, steps)

  def windows(self, plan: _EpochPlan, first_window: int) -> Iterator[Optional[dict]]:
    """This host's windows from `first_window` on (numpy dicts of the model keys); None for windows
    past the end of its shard (a shorter shard than another host's)."""
    tf = dataset.tf_module()
    segs = [self.segments[self.index][i].instruction for i in plan.orders[self.index]]
    skip, insts = first_window * self.window, []
    for fi in segs:  # skip whole windows inside the file instructions: nothing is decoded
      if skip >= fi.take:
        skip -= fi.take
        continue
      insts.append(dataclasses.replace(fi, skip=fi.skip + skip, take=fi.take - skip))
      skip = 0
    n_own = -(-sum(s.instruction.take for s in self.segments[self.index]) // self.window)
    if insts:
      opts = tf.data.Options()
      opts.deterministic = True
      # No autotuning (one interleave and a fixed prefetch; little to tune): its model thread
      # made deleting the iterator at the end of a run wait for seconds (seen with 2 processes).
      opts.autotune.enabled = False
      ds = self.builder.as_dataset(
          split=self.host_splits[self.index], shuffle_files=False,
          decoders=self.tfds.decode.PartialDecoding(
              {k: True for k in MODEL_KEYS + (("source",) if self.row_weights else ())}),
          read_config=self.tfds.ReadConfig(
              interleave_cycle_length=1, options=opts, try_autocache=False,
              experimental_interleave_sort_fn=lambda _: insts))
      it = ds.batch(self.window).prefetch(2).as_numpy_iterator()
      for _ in range(first_window, n_own):
        rows = next(it)
        if self.row_weights is not None:
          sources = [x.decode() for x in rows.pop("source")]
          rows[INSTANCE_WEIGHT_KEY] = np.asarray(self.row_weights(sources), np.float32)
        self.stats.rows += len(rows["input_ids"])
        self.stats.windows += 1
        yield rows
    for _ in range(max(n_own, first_window), len(plan.steps)):
      yield None


def _check_args(global_batch_size: int, seed: int, start_step: int, length_multiple: int,
                process_index: int | None, process_count: int | None,
                window_rows: int) -> tuple[int, int]:
  """Returns (process_index, process_count), JAX's where None; ValueError on a bad argument."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  if start_step < 0 or length_multiple < 0 or window_rows < 1 or seed < 0:
    raise ValueError(f"start_step ({start_step}), length_multiple ({length_multiple}) and seed "
                     f"({seed}) must be >= 0 and window_rows ({window_rows}) >= 1")
  return process_index, process_count


def pretrain_steps_per_epoch(prepared_dir, split: str, *, global_batch_size: int, seed: int,
                             epoch: int, length_multiple: int = 0, process_count: int | None = None,
                             window_rows: int = SHUFFLE_WINDOW) -> int:
  """Steps of epoch `epoch` of `pretrain_batches` (the same on every host; it varies a little from
  epoch to epoch with the padding of length buckets). Raises as `pretrain_batches`."""
  _, process_count = _check_args(global_batch_size, seed, 0, length_multiple, 0, process_count,
                                 window_rows)
  src = _Source(prepared_dir, split, global_batch_size // process_count, length_multiple, 0,
                process_count, window_rows)
  return src.plan(seed, epoch).num_steps


def pretrain_batches(prepared_dir, split: str, *, global_batch_size: int, seed: int,
                     start_step: int = 0, length_multiple: int = 0,
                     process_index: int | None = None, process_count: int | None = None,
                     window_rows: int = SHUFFLE_WINDOW,
                     stats: Optional[ReadStats] = None,
                     row_weights: Optional[Callable[[Sequence[str]], np.ndarray]] = None
                     ) -> Iterator[dict[str, np.ndarray]]:
  """Endless host-local batches of a prepared split, epoch after epoch (see the module docstring).

  Args:
    prepared_dir: a directory written by `--stage=prepare`.
    split: the split to stream (e.g. `corpus`).
    global_batch_size: rows per step over all hosts; each host yields `global_batch_size //
      process_count` of them.
    seed: data order seed (segment order, window shuffles, bucket order; with the epoch).
    start_step: the first step to yield; the batches equal those an uninterrupted run yields from
      this step on.
    length_multiple: > 0 buckets rows by length and cuts a batch's sequence axis to its bucket's
      multiple of this (capped at max_seq_len); 0 keeps max_seq_len.
    process_index, process_count: this host and the number of hosts (default: JAX's).
    window_rows: rows shuffled together in memory (the shuffle buffer).
    stats: a `ReadStats` this process's decoded rows are added to (e.g. to check that a host read
      only its shard).
    row_weights: optional `sources -> float32[n]` (e.g. learning-order weights by row source); the
      batches then also hold `instance_weight: float32[local_batch]` (0 on padding rows).

  Yields:
    `input_ids`, `attention_mask`, `span_ids`: int32[local_batch, L]; `subj_pos`, `obj_pos`,
    `label`: int32[local_batch]; `weight`: float32[local_batch] (1 real row, 0 padding row; a
    padding row is a lone attended [CLS]: attention_mask[:, 0] = 1).

  Raises:
    ValueError: a global batch not divisible by the process count, a bad argument, or a split with
      fewer rows than processes. KeyError: no such split. FileNotFoundError: not a prepared dir.
    RuntimeError: the decoded rows disagree with the lengths file (a corrupt prepared directory).
  """
  process_index, process_count = _check_args(global_batch_size, seed, start_step, length_multiple,
                                             process_index, process_count, window_rows)
  src = _Source(prepared_dir, split, global_batch_size // process_count, length_multiple,
                process_index, process_count, window_rows, stats, row_weights)
  epoch, skip = 0, start_step
  while True:
    plan = src.plan(seed, epoch)
    if skip >= plan.num_steps:
      skip -= plan.num_steps
      epoch += 1
      continue
    yield from _epoch_batches(src, plan, seed, epoch, skip)
    epoch, skip = epoch + 1, 0


def _epoch_batches(src: _Source, plan: _EpochPlan, seed: int, epoch: int,
                   skip: int) -> Iterator[dict[str, np.ndarray]]:
  """One epoch's batches of host `src.index` from step `skip` of the epoch on."""
  first = 0
  while skip >= len(plan.steps[first]):
    skip -= len(plan.steps[first])
    first += 1
  empty = {k: np.zeros((0, src.max_len) if k in dataset.TOKEN_KEYS else (0,), np.int32)
           for k in MODEL_KEYS}
  if src.row_weights is not None:
    empty[INSTANCE_WEIGHT_KEY] = np.zeros((0,), np.float32)
  for w, rows in enumerate(src.windows(plan, first), start=first):
    rows = empty if rows is None else rows
    buckets = src.buckets(rows["attention_mask"].sum(axis=1))
    got = np.bincount(buckets, minlength=src.num_buckets)
    if not np.array_equal(got, plan.counts[src.index, w]):
      raise RuntimeError(f"window {w} of epoch {epoch}: rows per length bucket {got.tolist()} "
                         f"differ from the lengths file's {plan.counts[src.index, w].tolist()}: "
                         "the prepared directory is corrupt; rerun prepare")
    perm = np.random.default_rng([seed, epoch, _TAG_ROWS, src.index, w]).permutation(len(buckets))
    by_bucket = [perm[buckets[perm] == b] for b in range(src.num_buckets)]
    cursor = np.zeros(src.num_buckets, np.int64)
    for t, b in enumerate(plan.steps[w]):
      idx = by_bucket[b][cursor[b]:cursor[b] + src.batch]
      cursor[b] += src.batch
      if w == first and t < skip:
        continue
      yield _gather(rows, idx, src.batch, src.seq_len(b))
