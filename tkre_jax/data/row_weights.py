"""Learning-order weights (FineCL "learning order denoising"): the table the `learning_order`
stage writes and the stages that use it read.

FineCL (Hogan, Li and Shang, EMNLP 2022, arXiv 2205.12491, Sec. 3.1) trains a classifier on the
silver data and records the first epoch k in which each instance is predicted right. Its weight is
w = exp(f(k)) in [1, e], early-learned (likely correct) rows weighing most; rows never predicted
right get weight 0 (they are dropped as positives). Two schedules f (`SCHEDULES`):

* `source` (the default), FineCL's code (wphogan/finecl, `src/stage_2/dataset.py`, `Scheduler`,
  `K = 5`): with v = k - 1 the 0-based epoch of the source's loop, v_min and v_max the smallest
  and largest UNCAPPED v over the learned rows, and v >= c (c = `cap_epoch` = K) replaced by v_max,

      f = 1 - (v - v_min) / (v_max - v_min),

  so rows learned in the first c epochs keep their place on the whole range (v = 4 of 15 epochs:
  f = 0.71) and every later row has f = 0 (w = 1). Where v_max == v_min the source divides by zero;
  here f = 1.
* `capped`, this project's earlier reading of the paper: k' = min(k, c) first, then
  f = 1 - (k' - k_min) / (k_max - k_min) over the capped range (c = 5: f = 1, .75, .5, .25, 0).

The table (`<learning_order workdir>/learning_order.json`) has one record per row of the prepared
split it was made from, keyed by `row_key(source)`: the row's `source` (`dataset.TEXT_KEYS`) with
directories stripped, e.g. `scdg:scdg_val_wiki_16x16.jsonl:17`. SCDG rows keep their key wherever
they are prepared (the augmented `train` split, the pre-training `corpus`), so both find theirs.
Rows a table has no record for (EDKG explanations in the corpus, say) get `UNSCORED_WEIGHT`, the
top weight e: the learning order only ever lowers the weight of rows it has judged; how many
rows that was is returned and reported by the stages.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

FILE = "learning_order.json"
FORMAT = "tkre_jax.learning_order/1"
UNSCORED_WEIGHT = math.e
SCHEDULES = ("source", "capped")  # config.learning_order.schedule
NEVER = 0  # first_epoch of a row never predicted right (epochs count from 1)
_DIRS = re.compile(r"[^:]*/")


def row_key(source: str) -> str:
  """The key of a prepared row in a learning-order table: its `source` without directories.

  `scdg:/data/fewrel_llm/scdg.jsonl:17` -> `scdg:scdg.jsonl:17`; `/data/fewrel/val_wiki.json:P26[3]`
  -> `val_wiki.json:P26[3]`.
  """
  return _DIRS.sub("", str(source))


def kind_of(source: str) -> str:
  """`gold`, or the kind prefix of a prepared row's source (`scdg`, `edkg`, `unlabelled`)."""
  head = str(source).split(":", 1)[0]
  return head if head in ("scdg", "edkg", "unlabelled") else "gold"


def update_first_epochs(first: np.ndarray, correct: np.ndarray, epoch: int) -> np.ndarray:
  """Records `epoch` (>= 1) for the rows first predicted right now.

  Args:
    first: int[n] first epoch each row was predicted right so far (`NEVER` = not yet).
    correct: bool[n] whether each row is predicted right after `epoch`.

  Returns:
    int64[n], a new array (a row keeps the earliest epoch).

  Raises:
    ValueError: shapes differ or `epoch` < 1.
  """
  first = np.asarray(first, np.int64)
  correct = np.asarray(correct, bool)
  if first.shape != correct.shape or epoch < 1:
    raise ValueError(f"first {first.shape} and correct {correct.shape} must match and epoch "
                     f"({epoch}) be >= 1")
  return np.where((first == NEVER) & correct, epoch, first)


def finecl_weights(first: np.ndarray, cap_epoch: int = 5,
                   schedule: str = "source") -> tuple[np.ndarray, np.ndarray]:
  """FineCL's f and w = exp(f) of each row (the module docstring's two schedules).

  Args:
    first: int[n] first epoch each row was predicted right (1-based; `NEVER` for never).
    cap_epoch: c >= 1 (FineCL's K = 5).
    schedule: `source` (FineCL's `Scheduler`) | `capped`.

  Returns:
    `(f, w)`: float64[n] each; f in [0, 1] and w in [1, e] on learned rows; f = nan and w = 0 on
    never-learned rows.

  Raises:
    ValueError: `cap_epoch` < 1, a negative epoch, or an unknown schedule.
  """
  first = np.asarray(first, np.int64)
  if cap_epoch < 1 or (first < 0).any():
    raise ValueError(f"cap_epoch ({cap_epoch}) must be >= 1 and epochs >= 0")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  learned = first != NEVER
  f = np.full(first.shape, np.nan)
  if learned.any():
    if schedule == "source":
      v = (first - 1).astype(np.float64)          # the source's 0-based epochs
      v_min, v_max = v[learned].min(), v[learned].max()
      v = np.where(v >= cap_epoch, v_max, v)      # `if value >= K: value = self.max_v`
    else:
      v = np.minimum(first, cap_epoch).astype(np.float64)
      v_min, v_max = v[learned].min(), v[learned].max()
    f[learned] = 1.0 if v_max == v_min else 1.0 - (v[learned] - v_min) / (v_max - v_min)
  w = np.where(learned, np.exp(np.nan_to_num(f)), 0.0)
  return f, w


def write_table(workdir: pathlib.Path, sources: Sequence[str], relations: Sequence[str],
                first: np.ndarray, *, epochs: int, cap_epoch: int, schedule: str = "source",
                texts: Sequence[str] = (), extra: Optional[Mapping[str, Any]] = None) -> dict:
  """Writes `<workdir>/learning_order.json` atomically (temporary file, then rename).

  Args:
    sources, relations: the prepared rows' `source` and relation id, in split order.
    first: int[n] first-learned epochs (`NEVER` = never).
    epochs, cap_epoch: the run's epochs E and FineCL's cap c.
    schedule: `finecl_weights`'s schedule.
    texts: optional readable text of each row (the report's latest-learned rows).
    extra: more JSON-able fields for the file (e.g. the prepared dir).

  Returns:
    The table written (`format`, `epochs`, `cap_epoch`, `rows`: one dict per row with `key`,
    `source`, `kind`, `relation`, `first_epoch` (None: never), `f`, `weight`).

  Raises:
    ValueError: lengths differ, or two rows share a key.
  """
  n = len(sources)
  if len(relations) != n or len(first) != n or (texts and len(texts) != n):
    raise ValueError(f"sources ({n}), relations ({len(relations)}), first ({len(first)}) and texts "
                     f"({len(texts)}) must have one entry per row")
  keys = [row_key(s) for s in sources]
  if len(set(keys)) != n:
    dup = next(k for k in keys if keys.count(k) > 1)
    raise ValueError(f"two prepared rows share the learning-order key {dup!r}")
  f, w = finecl_weights(first, cap_epoch, schedule)
  rows = []
  for i in range(n):
    rec = {"key": keys[i], "source": str(sources[i]), "kind": kind_of(sources[i]),
           "relation": str(relations[i]),
           "first_epoch": int(first[i]) if first[i] != NEVER else None,
           "f": None if np.isnan(f[i]) else round(float(f[i]), 6), "weight": round(float(w[i]), 6)}
    if texts:
      rec["text"] = texts[i]
    rows.append(rec)
  table = {"format": FORMAT, "epochs": int(epochs), "cap_epoch": int(cap_epoch),
           "schedule": schedule, **(extra or {}),
           "rows": rows}
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".learning_order.", suffix=".tmp")
  with os.fdopen(fd, "w") as fh:
    json.dump(table, fh, indent=1)
  os.replace(tmp, workdir / FILE)
  return table


def read_table(workdir_or_file: str | pathlib.Path) -> dict[str, dict]:
  """Row key -> record of a learning-order table (a workdir or the file itself).

  Raises:
    FileNotFoundError: no table there (run `--stage=learning_order` first).
    ValueError: not a learning-order table (the message names the file).
  """
  path = pathlib.Path(workdir_or_file)
  if path.is_dir():
    path = path / FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: run --stage=learning_order into that workdir first")
  try:
    table = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON ({e})") from e
  if not isinstance(table, dict) or table.get("format") != FORMAT:
    raise ValueError(f"{path}: not a learning-order table (format {FORMAT!r} expected)")
  return {r["key"]: r for r in table["rows"]}


def lookup(table: Mapping[str, dict], sources: Sequence[str]) -> tuple[np.ndarray, dict]:
  """Each row's weight from a table (`UNSCORED_WEIGHT` for rows it lacks).

  Args:
    table: `read_table`'s mapping.
    sources: the rows' `source` strings.

  Returns:
    `(weights, counts)`: float32[n], and `{"rows", "scored", "unscored", "never_learned"}`.
  """
  w = np.empty(len(sources), np.float32)
  scored = never = 0
  for i, s in enumerate(sources):
    rec = table.get(row_key(s))
    if rec is None:
      w[i] = UNSCORED_WEIGHT
      continue
    scored += 1
    never += rec["first_epoch"] is None
    w[i] = rec["weight"]
  return w, {"rows": len(sources), "scored": scored, "unscored": len(sources) - scored,
             "never_learned": never}


def weights_of(table: Mapping[str, dict], sources: Sequence[str]) -> np.ndarray:
  """float32[n]: `lookup`'s weights alone (the pre-training pipeline's `row_weights`)."""
  return lookup(table, sources)[0]


def distribution(table_rows: Sequence[Mapping[str, Any]], epochs: int) -> dict:
  """First-learned epoch counts per kind and per relation and kind.

  Returns:
    `{"by_kind": {kind: {"1": n1, ..., "E": nE, "never": n, "mean_epoch": m}},
      "by_relation": {relation: {kind: same}}}`; `mean_epoch` over learned rows (None if none).
  """
  def hist(rows):
    out = {str(e): 0 for e in range(1, epochs + 1)}
    out["never"] = 0
    learned = []
    for r in rows:
      if r["first_epoch"] is None:
        out["never"] += 1
      else:
        out[str(r["first_epoch"])] += 1
        learned.append(r["first_epoch"])
    out["mean_epoch"] = round(float(np.mean(learned)), 3) if learned else None
    return out

  kinds = sorted({r["kind"] for r in table_rows})
  by_kind = {k: hist([r for r in table_rows if r["kind"] == k]) for k in kinds}
  by_relation = {}
  for rel in sorted({r["relation"] for r in table_rows}):
    mine = [r for r in table_rows if r["relation"] == rel]
    by_relation[rel] = {k: hist([r for r in mine if r["kind"] == k]) for k in kinds}
  return {"by_kind": by_kind, "by_relation": by_relation}


def latest_learned(table_rows: Sequence[Mapping[str, Any]], kind: str = "scdg",
                   n: int = 20) -> list[Mapping[str, Any]]:
  """The `n` rows of `kind` learned last: never-learned first, then by first epoch, latest first
  (ties in table order)."""
  mine = [r for r in table_rows if r["kind"] == kind]
  order = sorted(range(len(mine)), key=lambda i: (-(mine[i]["first_epoch"] or 10 ** 9), i))
  return [mine[i] for i in order[:n]]


USES = ("weight", "drop_unlearned")
WEIGHT_KEY = "instance_weight"  # float32[batch] in a batch: a row's learning-order weight


def apply(arrays: Mapping[str, np.ndarray], table: Mapping[str, dict],
          use: str) -> tuple[dict[str, np.ndarray], dict]:
  """A training split with its learning-order weights attached, or its never-learned SCDG rows
  dropped.

  Args:
    arrays: a split from `dataset.load_arrays` (with `source`).
    table: `read_table`'s mapping.
    use: `weight`: adds `WEIGHT_KEY`: float32[n] (`lookup`; the losses multiply each row's term by
      it) | `drop_unlearned`: removes the SCDG rows the table records as never learned.

  Returns:
    `(arrays, report)`; the report has `use`, `rows`, `scored`, `unscored`, `never_learned` and
    `dropped` (rows removed), and for `weight` the mean weight.

  Raises:
    ValueError: an unknown `use`, or nothing left to train on.
  """
  if use not in USES:
    raise ValueError(f"learning-order use must be one of {USES}, got {use!r}")
  weights, counts = lookup(table, list(arrays["source"]))
  out = dict(arrays)
  report = {"use": use, **counts, "dropped": 0}
  if use == "weight":
    out[WEIGHT_KEY] = weights
    report["mean_weight"] = round(float(weights.mean()), 4) if len(weights) else None
    return out, report
  keep = np.asarray([not (kind_of(s) == "scdg" and weights[i] == 0.0)
                     for i, s in enumerate(arrays["source"])], bool)
  if not keep.any():
    raise ValueError("dropping the never-learned SCDG rows leaves no training row")
  out = {k: v[keep] for k, v in arrays.items()}
  report["dropped"] = int((~keep).sum())
  return out, report
