"""Prototype classification of episodes from instance representations (numpy, float32).

Prototypical networks (Snell, Swersky and Zemel, 2017, "Prototypical Networks for Few-shot
Learning", Eq. 1-2): the prototype of a class is the mean of its K support representations; a
query's score for a class is the negative squared Euclidean distance to its prototype (`metric=
"euclidean"`) or the dot product (`metric="dot"`, as Proto-BERT variants use). A zero-shot
prototype is the representation of the relation's name and description; a mixed prototype is
`(1 - w) * support mean + w * description` (`description_weight` w).

None of the above (FewRel 2.0): with a `nota_threshold`, a query whose best score is below it gets
label N.

Accuracy per setting is the mean over episodes of the episode accuracy, with a 95% confidence
interval of the mean: mean +- 1.96 * sample std / sqrt(E) (normal approximation).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

METRICS = ("euclidean", "dot")
PROTOTYPE_MODES = ("support", "description", "mixed")


def prototypes(support: Optional[np.ndarray], descriptions: Optional[np.ndarray] = None, *,
               mode: str = "support", description_weight: float = 0.5) -> np.ndarray:
  """Class prototypes.

  Args:
    support: float[..., N, K, D] support representations (None or K = 0 for zero-shot).
    descriptions: float[..., N, D] description representations (modes description / mixed).
    mode: support | description | mixed; with K = 0 every mode uses the descriptions.
    description_weight: w of the mixed mode, in [0, 1].

  Returns:
    float32[..., N, D].

  Raises:
    ValueError: an unknown mode, w outside [0, 1], or a mode that needs an input not given.
  """
  if mode not in PROTOTYPE_MODES:
    raise ValueError(f"prototype mode must be one of {PROTOTYPE_MODES}, got {mode!r}")
  if not 0.0 <= description_weight <= 1.0:
    raise ValueError(f"description_weight must be in [0, 1], got {description_weight}")
  has_support = support is not None and support.shape[-2] > 0
  if mode != "support" or not has_support:
    if descriptions is None:
      raise ValueError("zero-shot and description prototypes need the description "
                       "representations (a relation schema, e.g. pid2name.json)")
    desc = np.asarray(descriptions, np.float32)
    if mode == "description" or not has_support:
      return desc
  mean = np.asarray(support, np.float32).mean(axis=-2)
  if mode == "support":
    return mean
  return ((1.0 - description_weight) * mean + description_weight * desc).astype(np.float32)


def scores(queries: np.ndarray, protos: np.ndarray, metric: str = "euclidean") -> np.ndarray:
  """Query-prototype scores.

  Args:
    queries: float[..., M, D].
    protos: float[..., N, D].
    metric: euclidean (-||q - p||^2) | dot (q . p).

  Returns:
    float32[..., M, N]; higher is more similar.

  Raises:
    ValueError: an unknown metric.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  q = np.asarray(queries, np.float32)
  p = np.asarray(protos, np.float32)
  dot = np.einsum("...md,...nd->...mn", q, p)
  if metric == "dot":
    return dot
  q2 = np.einsum("...md,...md->...m", q, q)[..., :, None]
  p2 = np.einsum("...nd,...nd->...n", p, p)[..., None, :]
  return (2.0 * dot - q2 - p2).astype(np.float32)


def predict(score: np.ndarray, nota_threshold: Optional[float] = None) -> np.ndarray:
  """Argmax of `score` (float[..., M, N]) -> int32[..., M]; with `nota_threshold`, label N where the
  best score is below it."""
  pred = score.argmax(-1).astype(np.int32)
  if nota_threshold is not None:
    pred = np.where(score.max(-1) < nota_threshold, np.int32(score.shape[-1]), pred)
  return pred


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
  """`(mean, half-width of the 95% confidence interval)` of per-episode values: 1.96 * sample
  std / sqrt(E) (0 for a single value)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  half = 1.96 * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
  return float(v.mean()), float(half)


def episode_accuracy(emb: np.ndarray, support: np.ndarray, query: np.ndarray,
                     query_labels: np.ndarray, *, descriptions: Optional[np.ndarray] = None,
                     metric: str = "euclidean", mode: str = "support",
                     description_weight: float = 0.5, nota_threshold: Optional[float] = None,
                     chunk: int = 250) -> np.ndarray:
  """Accuracy of each episode, from one representation matrix.

  Args:
    emb: float[num_instances, D] representations of the pool (rows = pool positions).
    support: int[E, N, K] pool positions (K may be 0).
    query: int[E, M] pool positions.
    query_labels: int[E, M] labels in [0, N] (N: none of the above).
    descriptions: float[E, N, D] description representations of each episode's relations, for
      the description / mixed modes and K = 0.
    metric, mode, description_weight, nota_threshold: see `prototypes`, `scores`, `predict`.
    chunk: episodes scored at once (memory).

  Returns:
    float64[E] fraction of correct queries per episode.
  """
  out = np.zeros(len(query), np.float64)
  for s in range(0, len(query), chunk):
    sl = slice(s, s + chunk)
    sup = emb[support[sl]] if support.shape[-1] else None
    protos = prototypes(sup, None if descriptions is None else descriptions[sl], mode=mode,
                        description_weight=description_weight)
    pred = predict(scores(emb[query[sl]], protos, metric), nota_threshold)
    out[sl] = (pred == query_labels[sl]).mean(-1)
  return out
