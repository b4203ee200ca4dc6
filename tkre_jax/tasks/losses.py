"""Losses for the three TKRE training stages, as `(sum, weight)` pairs.

* MSLM (TKRE paper, arXiv 2505.12236, Masked Span Language Modeling): `masked_lm_loss`,
  cross-entropy over the masked positions chosen by `tkre_jax.tasks.masking.mask_span_tokens`.
* SCL (TKRE paper, Span-level Contrastive Learning): `relation_span_mask`, `span_mean_pool`,
  `sample_negative_spans`, and two objectives: `scl_reference_loss`, the authors' per-row 2-way
  cross-entropy (own span against own negative span; `config.scl.objective="reference"`, the
  default), and `scl_loss`, this project's bidirectional InfoNCE between relation anchors and
  relation-span representations with in-batch negatives (`"infonce"`).
* Fine-tuning / evaluation: `classification_loss`.
* Episodic training: `prototypical_loss` (Snell et al. 2017).

Every loss returns `(loss_sum, weight_sum)` rather than a mean, so that the caller can
normalise over the GLOBAL batch (sum of the sums / sum of the weights, across micro-batches
and devices). All computations are in float32 and jit-able with static shapes; rows with
weight 0 (padding examples) contribute nothing, not even as negatives.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from tkre_jax.data.features import SPAN_CONTEXT, SPAN_OBJECT, SPAN_RELATION, SPAN_SUBJECT


def _weighted_ce(logits: jax.Array, labels: jax.Array,
                 weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Shared body of the cross-entropy losses; labels of weight-0 entries are replaced by 0."""
  weights = weights.astype(jnp.float32)
  valid = weights != 0.0
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  loss_sum = jnp.sum(jnp.where(valid, ce * weights, 0.0))
  return loss_sum, jnp.sum(weights)


def masked_lm_loss(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MSLM cross-entropy over the prediction slots (TKRE MSLM).

  `sum = sum_{b,j} w[b,j] * (-log softmax(logits[b,j])[labels[b,j]])`, `weight = sum w`.

  Args:
    logits: float[batch, P, vocab] MLM-head logits at the `mlm_positions` (cast to float32).
    labels: int32[batch, P] original token ids (`mlm_labels`).
    weights: float32[batch, P], 1 for a real prediction, 0 for a padding slot (`mlm_weights`).

  Returns:
    `(loss_sum, weight_sum)`, float32 scalars.

  Raises:
    ValueError: shapes that do not match.
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
    raise ValueError(f"expected logits [batch, P, vocab], labels and weights [batch, P]; got "
                     f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}")
  return _weighted_ce(logits, labels, weights)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether each label's logit is the largest: bool[...] for logits float[..., classes] and
  labels int[...].

  `logits[..., label] >= max(logits, -1)`: the same as `argmax(logits, -1) == label` except that a
  label tied with the maximum counts as right (argmax takes the first). On XLA's CPU backend an
  argmax over a 30k vocabulary is a variadic (value, index) reduce that ran ~40x slower than this
  max and gather (128 ms against 3 ms for the MSLM step's [512, 30522] logits).
  """
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked >= jnp.max(logits, axis=-1)


def classification_loss(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Relation classification cross-entropy (fine-tuning stage).

  `sum = sum_b w[b] * (-log softmax(logits[b])[labels[b]])`, `weight = sum_b w[b]`.

  Args:
    logits: float[batch, num_classes] (cast to float32).
    labels: int32[batch] class ids.
    weights: float32[batch], 1 for a real example, 0 for padding (the batch `weight`).

  Returns:
    `(loss_sum, weight_sum)`, float32 scalars.

  Raises:
    ValueError: shapes that do not match.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1] or weights.shape != labels.shape:
    raise ValueError(f"expected logits [batch, classes], labels and weights [batch]; got "
                     f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}")
  return _weighted_ce(logits, labels, weights)


def span_mean_pool(hidden: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean of the hidden states over a span (TKRE SCL, span representation).

  `pooled[b] = sum_t mask[b,t] * hidden[b,t] / sum_t mask[b,t]`, and 0 where the mask is empty.

  Args:
    hidden: float[batch, seq_len, hidden] encoder output.
    mask: float32 or bool [batch, seq_len], 1 on the span's tokens, 0 elsewhere.

  Returns:
    `(pooled float32[batch, hidden], has_span bool[batch])`; `has_span[b]` is False where the
    mask row is empty (then `pooled[b] == 0`); give such rows weight 0 in `scl_loss`.

  Raises:
    ValueError: shapes that do not match.
  """
  if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
    raise ValueError(f"expected hidden [batch, seq_len, hidden] and mask [batch, seq_len]; got "
                     f"{tuple(hidden.shape)}, {tuple(mask.shape)}")
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask, axis=1)
  total = jnp.einsum("bl,blh->bh", mask, hidden.astype(jnp.float32))
  has_span = count > 0
  pooled = total / jnp.where(has_span, count, 1.0)[:, None]
  return pooled, has_span


def relation_span_mask(span_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Tokens representing the relation of each row (TKRE SCL).

  The relation span is `span_ids == 4` (the tokens strictly between the two entities). Where
  it is empty (adjacent entities, or truncation) the row falls back to the entity tokens
  (`span_ids` 2 or 3).

  Args:
    span_ids: int32[batch, seq_len].

  Returns:
    `(mask float32[batch, seq_len], used_fallback bool[batch])`. `used_fallback[b]` is True
    where row b has no relation span but has entity tokens (the fallback was used). Rows with
    neither (e.g. padding rows) get an all-zero mask and `used_fallback == False`;
    `span_mean_pool` then reports `has_span == False` for them.

  Raises:
    ValueError: `span_ids` not 2-D.
  """
  if span_ids.ndim != 2:
    raise ValueError(f"`span_ids` must be [batch, seq_len], got {tuple(span_ids.shape)}")
  relation = span_ids == SPAN_RELATION
  entity = (span_ids == SPAN_SUBJECT) | (span_ids == SPAN_OBJECT)
  has_relation = jnp.any(relation, axis=1)
  used_fallback = jnp.logical_not(has_relation) & jnp.any(entity, axis=1)
  mask = jnp.where(has_relation[:, None], relation, entity)
  return mask.astype(jnp.float32), used_fallback


def sample_negative_spans(rng: jax.Array, span_ids: jax.Array, *, min_len: int = 1,
                          max_len: int = 3) -> tuple[jax.Array, jax.Array]:
  """Samples one random context span per row as an SCL negative (TKRE SCL).

  A candidate is a pair `(start, length)` with `min_len <= length <= max_len` whose tokens
  `start .. start + length - 1` all have `span_ids == 1` (context: outside both entities, the
  relation span, markers, special tokens and padding). One candidate is drawn uniformly from
  all candidates of the row (iid uniform scores, argmax over the valid candidates).

  Args:
    rng: a PRNG key.
    span_ids: int32[batch, seq_len].
    min_len: static shortest span length, >= 1.
    max_len: static longest span length, >= min_len.

  Returns:
    `(mask float32[batch, seq_len], valid bool[batch])`; `mask[b]` is 1 on the sampled span;
    `valid[b]` is False (and `mask[b]` all zero) where the row has no candidate.

  Raises:
    ValueError: bad lengths or `span_ids` not 2-D.
  """
  for name, value in (("min_len", min_len), ("max_len", max_len)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f"`{name}` must be a static int, got {value!r}")
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
  if span_ids.ndim != 2:
    raise ValueError(f"`span_ids` must be [batch, seq_len], got {tuple(span_ids.shape)}")
  batch, seq_len = span_ids.shape
  context = span_ids == SPAN_CONTEXT
  lengths = list(range(int(min_len), int(max_len) + 1))

  # ok[b, s] for length l: context[b, s + k] for all k < l (False past the end).
  candidates = []
  run = jnp.ones_like(context)
  for length in range(1, lengths[-1] + 1):
    shifted = jnp.pad(context[:, length - 1:], ((0, 0), (0, length - 1)), constant_values=False)
    run = run & shifted
    if length >= lengths[0]:
      candidates.append(run)
  candidates = jnp.stack(candidates, axis=1)  # bool[batch, num_lengths, seq_len]

  scores = jnp.where(candidates, jax.random.uniform(rng, candidates.shape, jnp.float32), -1.0)
  flat = jnp.argmax(scores.reshape(batch, -1), axis=1)
  valid = jnp.any(candidates, axis=(1, 2))
  length = jnp.asarray(lengths, jnp.int32)[flat // seq_len]
  start = (flat % seq_len).astype(jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
  mask = (pos >= start[:, None]) & (pos < (start + length)[:, None]) & valid[:, None]
  return mask.astype(jnp.float32), valid


def _check_scl_args(anchors, positives, negatives, labels, weights, tau, negative_valid):
  """The shared argument checks of the SCL losses; returns `(batch, negative_valid)` with the
  default all-True mask filled in.

  Raises:
    ValueError: shapes that do not match or `tau` <= 0.
  """
  if isinstance(tau, numbers.Real) and not tau > 0:
    raise ValueError(f"`tau` must be > 0, got {tau}")
  if anchors.ndim != 2 or positives.ndim != 2 or positives.shape[1] != anchors.shape[1] \
      or negatives.shape != positives.shape:
    raise ValueError(f"expected anchors [R, D], positives and negatives [B, D]; got "
                     f"{tuple(anchors.shape)}, {tuple(positives.shape)}, "
                     f"{tuple(negatives.shape)}")
  batch = positives.shape[0]
  if labels.shape != (batch,) or weights.shape != (batch,):
    raise ValueError(f"labels and weights must be [{batch}], got {tuple(labels.shape)}, "
                     f"{tuple(weights.shape)}")
  if negative_valid is None:
    negative_valid = jnp.ones((batch,), jnp.bool_)
  elif negative_valid.shape != (batch,):
    raise ValueError(f"negative_valid must be [{batch}], got {tuple(negative_valid.shape)}")
  return batch, negative_valid


def scl_loss(anchors: jax.Array,
             positives: jax.Array,
             negatives: jax.Array,
             labels: jax.Array,
             weights: jax.Array,
             *,
             tau: float = 0.1,
             negative_valid: Optional[jax.Array] = None,
             negative_weights: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Span-level Contrastive Learning loss, bidirectional InfoNCE (this project's form; the
  authors' is `scl_reference_loss`; `config.scl.objective="infonce"`).

  All vectors are already L2-normalised by the shared projection; `s(u, v) = u . v / tau`.
  Let V = {j : w_j != 0} (real rows) and N = {j in V : negative_valid_j}.

  (a) anchor-centric, query `a_{y_i}`, positive `p_i`:

      l_a(i) = -s(a_{y_i}, p_i) + log( exp s(a_{y_i}, p_i)
                                       + sum_{j in N} exp s(a_{y_i}, n_j)
                                       + sum_{j in V, y_j != y_i} exp s(a_{y_i}, p_j) )

      Spans of the same relation (j != i, y_j == y_i) are not in the denominator.

  (b) span-centric, query `p_i`, positive `a_{y_i}`, negatives all other anchors:

      l_b(i) = -s(p_i, a_{y_i}) + log( sum_{r = 0}^{R - 1} exp s(p_i, a_r) )

  loss_i = (l_a(i) + l_b(i)) / 2;  sum = sum_{i in V} w_i * loss_i;  weight = sum_i w_i.

  FineCL weighting (arXiv 2205.12491; its code's weighted NT-Xent; `negative_weights` = u): in (a) the exp-term of each
  other relation's span p_j is multiplied by u_j, i.e. `exp s(a_{y_i}, p_j)` becomes
  `u_j exp s(a_{y_i}, p_j)` (u_j = 0 removes it); with `weights` = w * u the anchor's own term is
  weighted too, as FineCL does. Context-span negatives n_j and the anchors of (b) are not
  relation instances and keep weight 1.

  Rows outside V (and negatives outside N) are zeroed before use, so a NaN in a padding row's
  vectors reaches neither the loss nor the gradients. Labels must lie in [0, R) on real rows
  (not checked under jit).

  Args:
    anchors: float[R, D] relation anchors (L2-normalised).
    positives: float[B, D] relation-span representations (L2-normalised).
    negatives: float[B, D] negative context-span representations (L2-normalised).
    labels: int32[B] relation ids in [0, R).
    weights: float32[B] example weights; 0 for padding rows and rows without a span.
    tau: temperature > 0.
    negative_valid: optional bool[B]; False where row j has no negative span (from
      `sample_negative_spans`). Defaults to all True.
    negative_weights: optional float32[B] >= 0, u_j above (learning-order weights). Default 1.

  Returns:
    `(loss_sum, weight_sum, aux)` with float32 scalars and `aux`, a dict of float32 sums to be
    divided by the same global `weight_sum`:
      `loss_anchor_sum`: sum_i w_i l_a(i);  `loss_span_sum`: sum_i w_i l_b(i);
      `anchor_to_span_correct`: sum_i w_i [p_i scores strictly above every negative of (a)];
      `span_to_anchor_correct`: sum_i w_i [argmax_r s(p_i, a_r) == y_i];
    plus `per_example_loss`, float32[B] loss_i (0 outside V).

  Raises:
    ValueError: shapes that do not match or `tau` <= 0.
  """
  batch, negative_valid = _check_scl_args(anchors, positives, negatives, labels, weights, tau,
                                          negative_valid)

  f32 = jnp.float32
  weights = weights.astype(f32)
  real = weights != 0.0
  neg_ok = real & negative_valid.astype(jnp.bool_)
  anchors = anchors.astype(f32)
  positives = jnp.where(real[:, None], positives.astype(f32), 0.0)
  negatives = jnp.where(neg_ok[:, None], negatives.astype(f32), 0.0)
  labels = jnp.where(real, labels, 0).astype(jnp.int32)
  inv_tau = 1.0 / jnp.asarray(tau, f32)
  neg_inf = jnp.asarray(-jnp.inf, f32)

  # (a) anchor-centric: row i queries a_{y_i} against [p_0..p_{B-1}, n_0..n_{B-1}].
  query = anchors[labels]                                    # [B, D]
  sim_ap = (query @ positives.T) * inv_tau                   # [B, B]
  sim_an = (query @ negatives.T) * inv_tau                   # [B, B]
  eye = jnp.eye(batch, dtype=jnp.bool_)
  other_relation = labels[:, None] != labels[None, :]
  cand_p = eye | (other_relation & real[None, :])
  cand_n = jnp.broadcast_to(neg_ok[None, :], (batch, batch))
  if negative_weights is not None:
    if negative_weights.shape != (batch,):
      raise ValueError(f"negative_weights must be [{batch}], got {tuple(negative_weights.shape)}")
    u = negative_weights.astype(f32)
    log_u = jnp.where(u > 0, jnp.log(jnp.where(u > 0, u, 1.0)), neg_inf)
    # log(u_j exp s) = s + log u_j on the other relations' spans; the own positive is unweighted
    sim_ap = jnp.where(eye, sim_ap, sim_ap + log_u[None, :])
  pos_a = jnp.diagonal(sim_ap)
  logits_a = jnp.concatenate([jnp.where(cand_p, sim_ap, neg_inf),
                              jnp.where(cand_n, sim_an, neg_inf)], axis=1)
  loss_a = jax.nn.logsumexp(logits_a, axis=1) - pos_a
  others_a = jnp.concatenate([jnp.where(cand_p & ~eye, sim_ap, neg_inf),
                              jnp.where(cand_n, sim_an, neg_inf)], axis=1)
  correct_a = pos_a > jnp.max(others_a, axis=1)

  # (b) span-centric: p_i queries every anchor.
  sim_pa = (positives @ anchors.T) * inv_tau                 # [B, R]
  pos_b = jnp.take_along_axis(sim_pa, labels[:, None], axis=1)[:, 0]
  loss_b = jax.nn.logsumexp(sim_pa, axis=1) - pos_b
  correct_b = jnp.argmax(sim_pa, axis=1) == labels

  per_example = jnp.where(real, 0.5 * (loss_a + loss_b), 0.0)

  def wsum(x):
    return jnp.sum(jnp.where(real, weights * x.astype(f32), 0.0))

  aux = {
      "loss_anchor_sum": wsum(loss_a),
      "loss_span_sum": wsum(loss_b),
      "anchor_to_span_correct": wsum(correct_a),
      "span_to_anchor_correct": wsum(correct_b),
      "per_example_loss": per_example,
  }
  return wsum(per_example), jnp.sum(weights), aux


def scl_reference_loss(anchors: jax.Array,
                       positives: jax.Array,
                       negatives: jax.Array,
                       labels: jax.Array,
                       weights: jax.Array,
                       *,
                       tau: float = 0.1,
                       negative_valid: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Span-level Contrastive Learning loss as the TKRE authors compute it: per row, a 2-way
  cross-entropy between its own relation span and its own negative span.

  Source: UESTC-GQJ/TKRE, `codes/traditional_re/cl_model.py`, `TKREModel.forward`: with
  `s(u, v) = u . v / tau` on L2-normalised projections,

      logits_i = [s(a_{y_i}, p_i), s(a_{y_i}, n_i)],   l_i = CE(logits_i, target 0)
              = log(exp s(a_{y_i}, p_i) + exp s(a_{y_i}, n_i)) - s(a_{y_i}, p_i)

  There are no in-batch negatives: another row's span (of the same or another relation) and the
  other anchors do not enter row i's term, so duplicate relations in a batch change nothing.
  `sum = sum_i w_i l_i` over the rows with `w_i != 0` and a valid negative (the authors' mean over
  the batch is `sum / weight`); a row without a negative span contributes nothing and is not
  counted (the authors' code pools an empty mask to the zero vector and contrasts with its
  projection; `sample_negative_spans` reports such rows, rare in practice).

  Args:
    anchors: float[R, D] relation anchors (L2-normalised).
    positives: float[B, D] relation-span representations (L2-normalised).
    negatives: float[B, D] each row's negative context-span representation (L2-normalised).
    labels: int32[B] relation ids in [0, R).
    weights: float32[B] example weights; 0 for padding rows and rows without a span.
    tau: temperature > 0 (the authors' 0.1).
    negative_valid: optional bool[B]; False where row i has no negative span. Default all True.

  Returns:
    `(loss_sum, weight_sum, aux)`: float32 scalars, with `weight_sum = sum_i w_i [negative_i]`,
    and `aux` with `anchor_to_span_correct` (sum_i w_i [s(a_{y_i}, p_i) > s(a_{y_i}, n_i)]),
    `span_to_anchor_correct` (sum_i w_i [argmax_r s(p_i, a_r) == y_i], a diagnostic: not in the
    loss), `loss_anchor_sum` (= loss_sum), `loss_span_sum` (0) and `per_example_loss` float32[B].

  Raises:
    ValueError: shapes that do not match or `tau` <= 0.
  """
  batch, negative_valid = _check_scl_args(anchors, positives, negatives, labels, weights, tau,
                                          negative_valid)
  f32 = jnp.float32
  weights = weights.astype(f32)
  ok = (weights != 0.0) & negative_valid.astype(jnp.bool_)
  w = jnp.where(ok, weights, 0.0)
  # rows outside `ok` are zeroed before use: a NaN there reaches neither the loss nor the gradients
  positives = jnp.where(ok[:, None], positives.astype(f32), 0.0)
  negatives = jnp.where(ok[:, None], negatives.astype(f32), 0.0)
  labels = jnp.where(ok, labels, 0).astype(jnp.int32)
  anchors = anchors.astype(f32)
  inv_tau = 1.0 / jnp.asarray(tau, f32)
  query = anchors[labels]                                        # [B, D]
  s_pos = jnp.sum(query * positives, axis=1) * inv_tau
  s_neg = jnp.sum(query * negatives, axis=1) * inv_tau
  per_example = jnp.where(ok, jnp.logaddexp(s_pos, s_neg) - s_pos, 0.0)
  correct_b = jnp.argmax((positives @ anchors.T) * inv_tau, axis=1) == labels
  loss_sum = jnp.sum(w * per_example)
  aux = {"loss_anchor_sum": loss_sum, "loss_span_sum": jnp.zeros((), f32),
         "anchor_to_span_correct": jnp.sum(jnp.where(s_pos > s_neg, w, 0.0)),
         "span_to_anchor_correct": jnp.sum(jnp.where(correct_b, w, 0.0)),
         "per_example_loss": per_example}
  return loss_sum, jnp.sum(w), aux


def prototypical_loss(emb: jax.Array, labels: jax.Array, is_query: jax.Array, weight: jax.Array,
                      n_way: int, metric: str = "euclidean"
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prototypical-network loss of one episode (Snell et al. 2017, "Prototypical Networks for
  Few-shot Learning", Eq. 1-2): prototypes are the means of the support representations per class;
  each query's logits are -||q - p_c||^2 (`euclidean`) or q . p_c (`dot`); cross-entropy on them.

  Args:
    emb: float[batch, D] representations of the episode's rows (support and query).
    labels: int32[batch] episode labels in [0, n_way).
    is_query: int32[batch] 1 for a query row, 0 for a support row.
    weight: float32[batch] 1 for a real row, 0 for padding.
    n_way: N (static).
    metric: euclidean | dot.

  Returns:
    `(loss_sum, query_weight, correct)`: float32 scalars: the query cross-entropy summed (weighted),
    the number (weight) of queries, and the weighted count of queries whose argmax is right.

  Raises:
    ValueError: an unknown metric.
  """
  if metric not in ("euclidean", "dot"):
    raise ValueError(f"metric must be euclidean or dot, got {metric!r}")
  emb = emb.astype(jnp.float32)
  q_w = weight * is_query.astype(jnp.float32)
  s_w = weight * (1.0 - is_query.astype(jnp.float32))
  onehot = jax.nn.one_hot(labels, n_way, dtype=jnp.float32)             # [B, N]
  sums = jnp.einsum("bn,bd->nd", onehot * s_w[:, None], emb)            # [N, D]
  counts = jnp.einsum("bn,b->n", onehot, s_w)                           # [N]
  protos = sums / jnp.maximum(counts, 1.0)[:, None]
  dot = emb @ protos.T                                                  # [B, N]
  if metric == "dot":
    logits = dot
  else:
    logits = 2.0 * dot - jnp.sum(emb * emb, -1, keepdims=True) - jnp.sum(protos * protos, -1)[None]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.sum(logp * onehot, axis=-1)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(ce * q_w), jnp.sum(q_w), jnp.sum(correct * q_w)


def symmetric_anchored_loss(sentence_emb: jax.Array, label_emb: jax.Array, labels: jax.Array,
                            weight: jax.Array, label_weight: jax.Array,
                            scale: jax.Array) -> dict[str, jax.Array]:
  """SaCon's symmetric anchored contrastive loss (arXiv 2312.12021, Sec. 3.3), as `(sum, weight)`
  pairs of its two directions.

  Logits `Z = scale * S L^T` over the batch's U labels. Sentence-anchored: each sentence's
  cross-entropy over the (valid) labels, its own label the target. Label-anchored: each label
  against every (valid) sentence of the batch, every sentence of that label a positive; as in the
  authors' code (one-hot cross-entropy on the transposed logits) the per-positive terms of a label
  are summed, then the labels averaged:

    L_sent  = sum_i w_i * -log softmax_j(Z_i.)[y_i]                   / sum_i w_i
    L_label = sum_j v_j * sum_{i: y_i = j} w_i * -log softmax_i(Z_.j)[i] / sum_j v_j

  and the stage uses `(L_sent + L_label) / 2`.

  Args:
    sentence_emb: float[batch, D] unit-norm sentence representations S.
    label_emb: float[U, D] unit-norm label representations L.
    labels: int32[batch], each sentence's label row in [0, U).
    weight: float32[batch] sentence weights (0: padding, neither anchor nor negative).
    label_weight: float32[U] label weights (0: padding label).
    scale: float32[] the logit scale exp(t).

  Returns:
    float32 scalars `sent_sum`, `sent_weight`, `label_sum`, `label_weight`, and the top-1 counts
    `sent_correct` (sentences whose best label is theirs) and `label_correct` (labels whose best
    sentence is one of theirs).
  """
  s = sentence_emb.astype(jnp.float32)
  lab = label_emb.astype(jnp.float32)
  w = weight.astype(jnp.float32)
  v = label_weight.astype(jnp.float32)
  z = scale.astype(jnp.float32) * (s @ lab.T)                                # [B, U]
  neg_inf = jnp.finfo(jnp.float32).min
  valid_s, valid_l = w != 0.0, v != 0.0
  pos = (labels[:, None] == jnp.arange(lab.shape[0])[None, :]) & valid_s[:, None] & valid_l[None, :]
  z_rows = jnp.where(valid_l[None, :], z, neg_inf)
  logp_rows = jax.nn.log_softmax(z_rows, axis=1)
  sent_ce = -jnp.sum(jnp.where(pos, logp_rows, 0.0), axis=1)
  sent_sum = jnp.sum(jnp.where(valid_s, w * sent_ce, 0.0))
  z_cols = jnp.where(valid_s[:, None], z, neg_inf)
  logp_cols = jax.nn.log_softmax(z_cols, axis=0)
  label_ce = -jnp.sum(jnp.where(pos, w[:, None] * logp_cols, 0.0), axis=0)  # [U]
  label_sum = jnp.sum(jnp.where(valid_l, v * label_ce, 0.0))
  sent_correct = jnp.sum(jnp.where(valid_s & jnp.any(pos & (z_rows == jnp.max(z_rows, axis=1,
                                                                               keepdims=True)),
                                                     axis=1), w, 0.0))
  best_sentence = jnp.argmax(z_cols, axis=0)                                 # [U]
  label_correct = jnp.sum(jnp.where(valid_l & pos[best_sentence, jnp.arange(lab.shape[0])], v, 0.0))
  return {"sent_sum": sent_sum, "sent_weight": jnp.sum(w), "label_sum": label_sum,
          "label_weight": jnp.sum(v), "sent_correct": sent_correct,
          "label_correct": label_correct}
