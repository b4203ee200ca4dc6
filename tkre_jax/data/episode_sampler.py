"""N-way K-shot episodes as index lists (the FewRel protocol), their JSON file, and the
pseudo-instances that carry a relation's name and description for zero-shot prototypes.

An episode refers to instances by their position in a FLAT pool: the instances of a relation-keyed
dict (`readers.read_fewrel`) concatenated relation after relation, in dict order (`flatten`). So
an evaluation embeds every pooled instance once and scores any number of episodes from that matrix.

Sampling (`sample_episodes`): all randomness comes from `numpy.random.default_rng(seed)` (PCG64,
the same stream on every platform and numpy version that keeps the generator), so the same pool
and seed give the same episodes on any machine. Per episode: N relations without replacement; per
relation K + Q instances without replacement, the first K the support, the rest the queries (so
a query is never in its own episode's support); with `nota_rate` > 0, `M = round(nota_rate * N * Q
/ (1 - nota_rate))` more queries from relations OUTSIDE the N (one relation drawn per query, then
one instance), labelled N ("none of the above"), so that a fraction `nota_rate` of the episode's
queries are NOTA (FewRel 2.0, Gao et al. 2019, "FewRel 2.0: Towards More Challenging Few-Shot
Relation Classification", Sec. 3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from tkre_jax.data.json_records import read_json
from tkre_jax.data.schema import DataError, RelationInstance

EPISODES_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Pool:
  """A relation-keyed data set flattened into one instance list.

  Attributes:
    relations: relation names, in the data's order.
    instances: every instance, relation after relation.
    offsets: int64[num_relations + 1]; relation r holds `instances[offsets[r]:offsets[r+1]]`.
  """
  relations: tuple[str, ...]
  instances: tuple[RelationInstance, ...]
  offsets: np.ndarray

  def indices(self, relation: str) -> range:
    """Positions of `relation`'s instances in `instances`."""
    r = self.relations.index(relation)
    return range(int(self.offsets[r]), int(self.offsets[r + 1]))


def flatten(data_by_relation: Mapping[str, Sequence[RelationInstance]]) -> Pool:
  """The `Pool` of a relation -> instances dict (e.g. `readers.read_fewrel`)."""
  relations = tuple(data_by_relation)
  sizes = [len(data_by_relation[r]) for r in relations]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  instances = tuple(inst for r in relations for inst in data_by_relation[r])
  return Pool(relations, instances, offsets)


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  """The shape of one evaluation setting.

  Attributes:
    n_way: relations per episode (>= 1).
    k_shot: support instances per relation (>= 0; 0: zero-shot, prototypes from descriptions).
    q_query: query instances per relation (>= 1).
    nota_rate: fraction of the queries that are none-of-the-above, in [0, 1).
  """
  n_way: int
  k_shot: int
  q_query: int = 5
  nota_rate: float = 0.0

  def __post_init__(self):
    for name, v, lo in (("n_way", self.n_way, 1), ("k_shot", self.k_shot, 0),
                        ("q_query", self.q_query, 1)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not 0.0 <= float(self.nota_rate) < 1.0:
      raise ValueError(f"nota_rate must be in [0, 1), got {self.nota_rate!r}")

  @property
  def name(self) -> str:
    """`5-way 1-shot`, with `, NOTA 0.5` when it has none-of-the-above queries."""
    nota = f", NOTA {self.nota_rate:g}" if self.nota_rate else ""
    return f"{self.n_way}-way {self.k_shot}-shot{nota}"

  @property
  def num_nota(self) -> int:
    """NOTA queries per episode: round(nota_rate * N * Q / (1 - nota_rate))."""
    r = float(self.nota_rate)
    return int(round(r * self.n_way * self.q_query / (1.0 - r))) if r else 0


def parse_settings(text: str, q_query: int, nota_rate: float = 0.0) -> list[EpisodeSpec]:
  """`"5-1,5-5,10-1"` (N-K pairs) -> `EpisodeSpec`s.

  Raises:
    ValueError: a part that is not `N-K` with integers.
  """
  out = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    n, sep, k = part.partition("-")
    if not sep or not n.isdigit() or not k.isdigit():
      raise ValueError(f"episode setting {part!r} is not N-K (e.g. 5-1 for 5-way 1-shot)")
    out.append(EpisodeSpec(int(n), int(k), q_query, nota_rate))
  if not out:
    raise ValueError(f"no episode setting in {text!r}")
  return out


@dataclasses.dataclass(frozen=True)
class Episodes:
  """Episodes of one setting, as positions in a `Pool`.

  Attributes:
    spec: the setting.
    relations: int32[E, N] relation ids (positions in `Pool.relations`) of each episode, label
      order (episode label i = relations[e, i]).
    support: int64[E, N, K] pool positions of the support instances.
    query: int64[E, M] pool positions of the queries, M = N * Q + num_nota.
    query_labels: int32[E, M] episode labels of the queries in [0, N]; N means none-of-the-above.
  """
  spec: EpisodeSpec
  relations: np.ndarray
  support: np.ndarray
  query: np.ndarray
  query_labels: np.ndarray

  def __len__(self) -> int:
    return int(self.relations.shape[0])

  def used(self) -> np.ndarray:
    """Sorted unique pool positions any episode uses: int64[n]."""
    return np.unique(np.concatenate([self.support.ravel(), self.query.ravel()]))

  def to_json(self) -> dict:
    return {"n_way": self.spec.n_way, "k_shot": self.spec.k_shot, "q_query": self.spec.q_query,
            "nota_rate": self.spec.nota_rate, "relations": self.relations.tolist(),
            "support": self.support.tolist(), "query": self.query.tolist(),
            "query_labels": self.query_labels.tolist()}

  @classmethod
  def from_json(cls, doc: Mapping, where: str) -> "Episodes":
    """Raises DataError: missing keys or arrays whose shapes disagree with the setting."""
    try:
      spec = EpisodeSpec(doc["n_way"], doc["k_shot"], doc["q_query"], doc["nota_rate"])
      e = len(doc["relations"])
      m = spec.n_way * spec.q_query + spec.num_nota
      eps = cls(spec, np.asarray(doc["relations"], np.int32).reshape(e, spec.n_way),
                np.asarray(doc["support"], np.int64).reshape(e, spec.n_way, spec.k_shot),
                np.asarray(doc["query"], np.int64).reshape(e, m),
                np.asarray(doc["query_labels"], np.int32).reshape(e, m))
    except (KeyError, TypeError, ValueError) as err:
      raise DataError(f"{where}: not an episode list of this version ({err})") from None
    return eps


def sample_episodes(pool: Pool, spec: EpisodeSpec, num_episodes: int, seed: int) -> Episodes:
  """Samples `num_episodes` episodes of `spec` from `pool` (see the module docstring).

  Args:
    pool: the instances (`flatten`).
    spec: N, K, Q and the NOTA rate.
    num_episodes: how many, >= 0.
    seed: the sampling seed.

  Returns:
    `Episodes` with `E = num_episodes`.

  Raises:
    ValueError: `num_episodes` < 0.
    DataError: fewer than N relations (N + 1 with NOTA queries), or a relation with fewer than
      K + Q instances (named).
  """
  if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 0:
    raise ValueError(f"num_episodes must be an integer >= 0, got {num_episodes!r}")
  n, k, q, n_nota = spec.n_way, spec.k_shot, spec.q_query, spec.num_nota
  num_rel = len(pool.relations)
  need_rel = n + (1 if n_nota else 0)
  if num_rel < need_rel:
    raise DataError(f"{spec.name} episodes need {need_rel} relations, the data has {num_rel}")
  sizes = np.diff(pool.offsets)
  short = [(pool.relations[r], int(sizes[r])) for r in range(num_rel) if sizes[r] < k + q]
  if short:
    raise DataError(f"{spec.name} episodes with {q} queries need {k + q} instances per relation; "
                    "too few in " + ", ".join(f"{r!r} ({c})" for r, c in short))
  rng = np.random.default_rng(seed)
  m = n * q + n_nota
  rels = np.zeros((num_episodes, n), np.int32)
  support = np.zeros((num_episodes, n, k), np.int64)
  query = np.zeros((num_episodes, m), np.int64)
  labels = np.zeros((num_episodes, m), np.int32)
  for e in range(num_episodes):
    chosen = rng.choice(num_rel, n, replace=False)
    rels[e] = chosen
    for i, r in enumerate(chosen):
      picked = pool.offsets[r] + rng.choice(int(sizes[r]), k + q, replace=False)
      support[e, i] = picked[:k]
      query[e, i * q:(i + 1) * q] = picked[k:]
      labels[e, i * q:(i + 1) * q] = i
    if n_nota:
      others = np.setdiff1d(np.arange(num_rel), chosen)
      for j in range(n_nota):
        r = int(others[rng.integers(len(others))])
        query[e, n * q + j] = pool.offsets[r] + rng.integers(int(sizes[r]))
        labels[e, n * q + j] = n
  return Episodes(spec, rels, support, query, labels)


def write_episodes(path: Union[str, "os.PathLike[str]"], pool_name: str,
                   relations: Sequence[str], episodes: Sequence[Episodes], seed: int) -> None:
  """Writes the episode lists of several settings to one JSON file (atomically).

  The file holds the pool's file name, its relation names (the ids in `relations` arrays index
  them), the seed and, per setting, `Episodes.to_json()`.
  """
  path = pathlib.Path(path)
  doc = {"format": EPISODES_FORMAT, "pool": str(pool_name), "relations": list(relations),
         "seed": int(seed), "settings": [e.to_json() for e in episodes]}
  tmp = path.with_suffix(path.suffix + ".tmp")
  with open(tmp, "w") as f:
    json.dump(doc, f, separators=(",", ":"))
  os.replace(tmp, path)


def read_episodes(path: Union[str, "os.PathLike[str]"]) -> tuple[dict, list[Episodes]]:
  """Reads `write_episodes` output: `(header, episodes)`, header without the settings.

  Raises:
    DataError: unreadable JSON or not an episode file of this version.
  """
  path = os.fspath(path)
  doc = read_json(path)
  if not isinstance(doc, dict) or doc.get("format") != EPISODES_FORMAT:
    raise DataError(f"{path}: not an episode file of format {EPISODES_FORMAT}")
  eps = [Episodes.from_json(s, f"{path}, setting {i}") for i, s in enumerate(doc["settings"])]
  return {k: v for k, v in doc.items() if k != "settings"}, eps


def check_disjoint(train_relations: Sequence[str], eval_relations: Sequence[str], *,
                   train_name: str = "training data", eval_name: str = "evaluation data") -> None:
  """Raises DataError when a relation is in both sets (the episodic protocol evaluates relations
  never seen in training), naming the shared relations."""
  shared = sorted(set(train_relations) & set(eval_relations))
  if shared:
    raise DataError(f"{train_name} and {eval_name} share {len(shared)} relation(s): "
                    + ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else "")
                    + "; the episodic protocol evaluates relations never trained on")


def description_instance(relation: str, name: str, description: str = "") -> RelationInstance:
  """A pseudo-instance whose marker states describe a relation (zero-shot prototypes).

  Words: `subject <name words> object : <description words>`, with the subject and object entity
  spans on the words `subject` and `object`, so that it is marked (`@ subject @ <name> # object #
  : <description>`) and embedded exactly like a sentence of the data.

  Raises:
    DataError: an empty name.
  """
  name_words = name.split()
  if not name_words:
    raise DataError(f"relation {relation!r}: empty name; a description prototype needs one")
  tokens = ("subject", *name_words, "object", ":", *description.split())
  j = 1 + len(name_words)
  return RelationInstance(tokens=tokens, subj=(0, 1), obj=(j, j + 1), relation=relation,
                          source=f"description of {relation}", kind="description")


def description_instances(relations: Sequence[str],
                          schema: Optional[Mapping[str, tuple[str, str]]]) -> list[RelationInstance]:
  """`description_instance` of each relation from `schema` (relation -> (name, description),
  `readers.read_pid2name`); a relation missing from it is described by its own label words.

  Raises:
    DataError: a relation whose name is empty.
  """
  out = []
  for r in relations:
    name, desc = (schema or {}).get(r, (r.replace("_", " ").replace(":", " "), ""))
    out.append(description_instance(r, name, desc))
  return out
