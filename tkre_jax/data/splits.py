"""Data splits: the canonical FewRel K-shot split, seeded K-shot sampling, N-way K-shot
episodes and label maps. (Leakage checks: `tkre_jax.text.LeakageIndex` and `data.corpus`.)

All randomness comes from an explicit seed through `numpy.random.default_rng(seed)`, so the
same inputs and seed always give the same output.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

from tkre_jax.data.json_records import read_json
from tkre_jax.data.schema import DataError, RelationInstance

SPLIT_NAMES = ("train_pool", "dev", "test")


# ------------------------------------------------------------------------------------------
# Canonical FewRel split


def _read_split_file(split_file: str) -> dict:
  doc = read_json(split_file)
  if not isinstance(doc, dict):
    raise DataError(f"{split_file}: expected a JSON object with keys "
                    f"{', '.join(SPLIT_NAMES)}, got {type(doc).__name__}")
  missing = [k for k in SPLIT_NAMES if k not in doc]
  if missing:
    raise DataError(f"{split_file}: missing key(s) {', '.join(repr(k) for k in missing)}")
  return doc


def _as_range(v: object, split_file: str, where: str) -> tuple[int, int]:
  if not (isinstance(v, list) and len(v) == 2 and all(
      isinstance(x, int) and not isinstance(x, bool) for x in v) and 0 <= v[0] <= v[1]):
    raise DataError(f"{split_file}, {where}: expected a [start, end) pair of integers with "
                    f"0 <= start <= end, got {v!r}")
  return v[0], v[1]


def _ranges_for(doc: dict, relation: str, split_file: str) -> dict[str, tuple[int, int]]:
  """The three ranges for one relation; a value is one range for all relations, or a
  relation -> range object."""
  out = {}
  for name in SPLIT_NAMES:
    v = doc[name]
    if isinstance(v, dict):
      if relation not in v:
        raise DataError(f"{split_file}, {name!r}: no range for relation {relation!r}")
      out[name] = _as_range(v[relation], split_file, f"{name!r}[{relation!r}]")
    else:
      out[name] = _as_range(v, split_file, repr(name))
  ordered = sorted(out.items(), key=lambda kv: kv[1])
  for (n1, (_, e1)), (n2, (s2, _)) in zip(ordered, ordered[1:]):
    if s2 < e1:
      raise DataError(f"{split_file}, relation {relation!r}: ranges {n1!r} {list(out[n1])} "
                      f"and {n2!r} {list(out[n2])} overlap")
  return out


def fewrel_canonical_split(data: Mapping[str, Sequence[RelationInstance]],
                           split_file: Union[str, "os.PathLike[str]"],
                           k: int) -> dict[str, list[RelationInstance]]:
  """Applies the canonical K-shot split (e.g. `fewrel/val_wiki_split.json`) to FewRel data.

  The split file holds `train_pool`, `dev` and `test`, each a `[start, end)` range of positions
  in every relation's instance list (or an object relation -> range, for per-relation ranges).
  Training takes the first `k` of each relation's train pool; dev and test are the full ranges.

  Args:
    data: relation -> instances, as returned by `readers.read_fewrel`.
    split_file: the split JSON file.
    k: shots per relation, 1 <= k <= train pool size.

  Returns:
    `{"train": ..., "dev": ..., "test": ...}`, each a list of instances grouped by relation in
    `data`'s order, instances in file order. For `val_wiki.json` (16 x 700) and K = 8: 128
    train, 1,088 dev, 9,600 test.

  Raises:
    DataError: unreadable / invalid split file, missing keys, malformed or overlapping ranges,
      `k` larger than the train pool (or < 1), or a relation with fewer instances than a range
      needs.
  """
  split_file = os.fspath(split_file)
  doc = _read_split_file(split_file)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise DataError(f"{split_file}: K must be a positive integer, got {k!r}")
  out: dict[str, list[RelationInstance]] = {"train": [], "dev": [], "test": []}
  for relation, items in data.items():
    ranges = _ranges_for(doc, relation, split_file)
    ps, pe = ranges["train_pool"]
    if k > pe - ps:
      raise DataError(f"{split_file}, relation {relation!r}: K={k} exceeds the train pool "
                      f"[{ps}, {pe}) of {pe - ps} instances")
    need = max(e for _, e in ranges.values())
    if len(items) < need:
      raise DataError(f"{split_file}, relation {relation!r}: the split needs {need} instances "
                      f"but the data has {len(items)}")
    out["train"].extend(items[ps:ps + k])
    out["dev"].extend(items[slice(*ranges["dev"])])
    out["test"].extend(items[slice(*ranges["test"])])
  return out


# ------------------------------------------------------------------------------------------
# K-shot sampling and label maps


def group_by_relation(instances: Iterable[RelationInstance]) -> dict[str, list[RelationInstance]]:
  """Groups instances by relation.

  Returns:
    relation -> instances, relations in first-appearance order, instances in input order.
  """
  out: dict[str, list[RelationInstance]] = {}
  for inst in instances:
    out.setdefault(inst.relation, []).append(inst)
  return out


def sample_k_shot(instances: Sequence[RelationInstance], k: int, seed: int, *,
                  min_ok: bool = False) -> list[RelationInstance]:
  """Samples K instances per relation, deterministically from `seed`.

  The instances are shuffled with `numpy.random.default_rng(seed).permutation` and the first
  `k` of each relation in that shuffled order are kept.

  Args:
    instances: the pool (any order; several relations).
    k: instances per relation, >= 1.
    seed: the sampling seed.
    min_ok: what to do with a relation that has fewer than `k` instances: False (default)
      raises `DataError`; True keeps all of its instances (fewer than `k`).

  Returns:
    The sample, grouped by relation in first-appearance order of `instances`; within a
    relation, in shuffled order. Length `k * num_relations` unless `min_ok` kept a short one.

  Raises:
    ValueError: `k` < 1.
    DataError: a relation has fewer than `k` instances and `min_ok` is False (names it).
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  groups = group_by_relation(instances)
  if not min_ok:
    short = {r: len(v) for r, v in groups.items() if len(v) < k}
    if short:
      raise DataError(f"K={k}-shot sampling: relation(s) with fewer than {k} instances: "
                      + ", ".join(f"{r!r} ({n})" for r, n in short.items()))
  order = np.random.default_rng(seed).permutation(len(instances))
  picked: dict[str, list[RelationInstance]] = {r: [] for r in groups}
  for i in order:
    inst = instances[int(i)]
    if len(picked[inst.relation]) < k:
      picked[inst.relation].append(inst)
  return [inst for r in groups for inst in picked[r]]


def label_map(instances_or_relations: Iterable[Union[RelationInstance, str]], *,
              sort: bool = False) -> dict[str, int]:
  """Builds a relation -> id map.

  Args:
    instances_or_relations: instances, relation names, or a relation-keyed dict (its keys).
    sort: False (default): ids in first-appearance order; True: ids in sorted name order.

  Returns:
    `{relation: id}` with ids 0 .. num_relations - 1, deterministic for the same input.

  Raises:
    TypeError: an element is neither a `RelationInstance` nor a string.
  """
  names: dict[str, None] = {}
  for x in instances_or_relations:
    if isinstance(x, RelationInstance):
      names.setdefault(x.relation)
    elif isinstance(x, str):
      names.setdefault(x)
    else:
      raise TypeError(f"label_map takes RelationInstance or str, got {type(x).__name__}")
  order = sorted(names) if sort else list(names)
  return {r: i for i, r in enumerate(order)}


# ------------------------------------------------------------------------------------------
# Episodes


@dataclasses.dataclass(frozen=True)
class Episode:
  """One N-way K-shot episode.

  Attributes:
    relations: the N relations, in the episode's label order (label i = relations[i]).
    support: N tuples of K instances, `support[i]` of relation `relations[i]`.
    query: N tuples of Q instances, disjoint from the support.
  """

  relations: tuple[str, ...]
  support: tuple[tuple[RelationInstance, ...], ...]
  query: tuple[tuple[RelationInstance, ...], ...]

  @property
  def query_labels(self) -> list[int]:
    """Episode-local label of each query instance, flattened relation by relation; length N*Q."""
    return [i for i, q in enumerate(self.query) for _ in q]


def sample_episodes(data_by_relation: Mapping[str, Sequence[RelationInstance]], n_way: int,
                    k_shot: int, q_query: int, num_episodes: int, seed: int) -> list[Episode]:
  """Samples FewRel-style N-way K-shot episodes, as instances.

  The episodic stages use `data.episodes.sample_episodes` instead (episodes as positions in a
  flattened pool, none-of-the-above queries, a file format), so that an evaluation embeds each
  instance once.

  For each episode: `n_way` distinct relations drawn without replacement, then for each of them
  `k_shot + q_query` distinct instances without replacement, the first `k_shot` for support and
  the rest for query. One `numpy.random.default_rng(seed)` drives all episodes.

  Args:
    data_by_relation: relation -> instances (e.g. `readers.read_fewrel` output).
    n_way, k_shot, q_query: episode shape; n_way, k_shot >= 1, q_query >= 0.
    num_episodes: how many episodes, >= 0.
    seed: the sampling seed.

  Returns:
    `num_episodes` `Episode`s: relations length N, support N x K, query N x Q.

  Raises:
    ValueError: a non-positive shape argument.
    DataError: fewer than `n_way` relations, or a relation with fewer than `k_shot + q_query`
      instances (named).
  """
  for name, v, lo in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("q_query", q_query, 0),
                      ("num_episodes", num_episodes, 0)):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
  relations = list(data_by_relation)
  if len(relations) < n_way:
    raise DataError(f"{n_way}-way episodes need {n_way} relations, the data has "
                    f"{len(relations)}")
  need = k_shot + q_query
  short = {r: len(data_by_relation[r]) for r in relations if len(data_by_relation[r]) < need}
  if short:
    raise DataError(f"{k_shot}-shot {q_query}-query episodes need {need} instances per "
                    "relation; too few in " + ", ".join(f"{r!r} ({n})" for r, n in short.items()))
  rng = np.random.default_rng(seed)
  episodes = []
  for _ in range(num_episodes):
    chosen = [relations[int(i)] for i in rng.choice(len(relations), n_way, replace=False)]
    support, query = [], []
    for r in chosen:
      items = data_by_relation[r]
      idx = rng.choice(len(items), need, replace=False)
      picked = [items[int(i)] for i in idx]
      support.append(tuple(picked[:k_shot]))
      query.append(tuple(picked[k_shot:]))
    episodes.append(Episode(tuple(chosen), tuple(support), tuple(query)))
  return episodes
