"""The instance-adapted predicate head (Jiang and Kavuluru, arXiv 2503.17799, class `BEFRE` of
yuhangjiang22/Bi-Encoder-RE), in JAX.

For an instance with sentence states h and a relation r whose template, filled with the
instance's own entities, has predicate-encoder states g (`fill_templates` builds the template
inputs inside the compiled step from the row's tokens and a static `TemplateTable`):

    x   = LN(W  [h(subject start); h(object start)])               (the instance)
    d_r = LN(W' [g_r(subject start); g_r(object start); h_CLS])    (the predicate)
    s_r = exp(t) cos(x, d_r),   t learnable, initialised to log(1 / 0.07)

Prediction is argmax_r s_r; training adds these scores' cross-entropy to the linear head's
(`tasks.classifier`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tkre_jax.model.encoder import Dense, LayerNorm

SPAN_SUBJECT, SPAN_OBJECT = 2, 3  # data.features' span ids (the model layer cannot import data)


def piece_arrays(table: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(pieces int32[R, 3, P], lengths int32[R, 3], subject_first bool[R])` of a `TemplateTable`
  (numpy; constants of the compiled step)."""
  R, P = table.num_relations, table.piece_len
  pieces = np.full((R, 3, P), table.pad_id, np.int32)
  lengths = np.zeros((R, 3), np.int32)
  for r, rel in enumerate(table.pieces):
    for k, ids in enumerate(rel):
      pieces[r, k, :len(ids)] = ids
      lengths[r, k] = len(ids)
  return pieces, lengths, np.asarray(table.subject_first, bool)


def _entity(span_ids: jax.Array, role: int, cap: int) -> tuple[jax.Array, jax.Array]:
  """First position and length (capped) of the tokens with span id `role`: int32[B] each."""
  is_role = span_ids == role
  start = jnp.argmax(is_role, axis=1).astype(jnp.int32)
  length = jnp.minimum(jnp.sum(is_role, axis=1), cap).astype(jnp.int32)
  return start, length


def fill_templates(input_ids: jax.Array, span_ids: jax.Array, relations: jax.Array,
                   table: Any) -> dict[str, jax.Array]:
  """The templates of `relations`, each filled with its row's entities.

  The layout of one filled template (subject first; object-first templates swap the entity
  segments and their markers):

      [CLS] piece0 @ <subject> @ piece1 # <object> # piece2 [SEP] [PAD]...

  Entities are copied from the row (`span_ids` 2 and 3, at most `table.entity_len` tokens each);
  piece2 is cut so that the whole fits `table.max_len`.

  Args:
    input_ids, span_ids: int32[B, L], the prepared rows.
    relations: int32[B, R'] relation ids whose templates to fill, per row.
    table: a `data.templates.TemplateTable`.

  Returns:
    `input_ids`, `attention_mask`: int32[B, R', max_len]; `subj_pos`, `obj_pos`: int32[B, R']
    (the positions of the template's `@` and `#` start markers).
  """
  pieces_np, lengths_np, first_np = piece_arrays(table)
  pieces, lengths = jnp.asarray(pieces_np), jnp.asarray(lengths_np)
  B, Rp = relations.shape
  T = table.max_len
  s_start, s_len = _entity(span_ids, SPAN_SUBJECT, table.entity_len)
  o_start, o_len = _entity(span_ids, SPAN_OBJECT, table.entity_len)
  first = jnp.asarray(first_np)[relations]                       # [B, R'] subject first?
  lit = lengths[relations]                                       # [B, R', 3]
  e1 = jnp.where(first, s_len[:, None], o_len[:, None])          # [B, R']
  e2 = jnp.where(first, o_len[:, None], s_len[:, None])
  room = T - (6 + lit[..., 0] + lit[..., 1] + e1 + e2)  # [CLS], 4 markers, [SEP]
  tail = jnp.clip(jnp.minimum(lit[..., 2], room), 0, None)
  one = jnp.ones_like(e1)
  # segments: CLS, piece0, m1, ent1, m1, piece1, m2, ent2, m2, piece2, SEP
  seg_len = jnp.stack([one, lit[..., 0], one, e1, one, lit[..., 1], one, e2, one, tail, one],
                      axis=-1)                                   # [B, R', 11]
  ends = jnp.cumsum(seg_len, axis=-1)
  starts = ends - seg_len
  p = jnp.arange(T, dtype=jnp.int32)
  seg = jnp.sum(p[None, None, :, None] >= ends[..., None, :], axis=-1)  # [B, R', T] (11: pad)
  seg_c = jnp.minimum(seg, 10)
  off = p[None, None, :] - jnp.take_along_axis(starts, seg_c, axis=-1)
  off = jnp.maximum(off, 0)
  m1 = jnp.where(first, table.subj_marker_id, table.obj_marker_id)[..., None]
  m2 = jnp.where(first, table.obj_marker_id, table.subj_marker_id)[..., None]
  piece_rows = pieces[relations]                                 # [B, R', 3, P]
  P = pieces.shape[-1]

  def piece_tok(k):
    return jnp.take_along_axis(piece_rows[:, :, k], jnp.minimum(off, P - 1), axis=-1)

  L = input_ids.shape[1]
  e1_start = jnp.where(first, s_start[:, None], o_start[:, None])[..., None]
  e2_start = jnp.where(first, o_start[:, None], s_start[:, None])[..., None]
  rows = jnp.broadcast_to(input_ids[:, None, :], (B, Rp, L))
  ent1 = jnp.take_along_axis(rows, jnp.minimum(e1_start + off, L - 1), axis=-1)
  ent2 = jnp.take_along_axis(rows, jnp.minimum(e2_start + off, L - 1), axis=-1)
  choices = [jnp.full_like(off, table.cls_id), piece_tok(0), jnp.broadcast_to(m1, off.shape), ent1,
             jnp.broadcast_to(m1, off.shape), piece_tok(1), jnp.broadcast_to(m2, off.shape), ent2,
             jnp.broadcast_to(m2, off.shape), piece_tok(2), jnp.full_like(off, table.sep_id)]
  tokens = jnp.select([seg == i for i in range(11)], choices, default=table.pad_id)
  mask = (seg < 11).astype(jnp.int32)
  subj_pos = jnp.where(first, starts[..., 2], starts[..., 6]).astype(jnp.int32)
  obj_pos = jnp.where(first, starts[..., 6], starts[..., 2]).astype(jnp.int32)
  return {"input_ids": tokens.astype(jnp.int32), "attention_mask": mask,
          "subj_pos": subj_pos, "obj_pos": obj_pos}


def sample_relations(key: jax.Array, labels: jax.Array, num_relations: int, n: int) -> jax.Array:
  """The templates a training row scores when not all R are: int32[B, n], the gold relation in
  column 0 and n - 1 distinct other relations drawn uniformly from `key`.

  Raises:
    ValueError: n not in [1, num_relations].
  """
  if not 1 <= n <= num_relations:
    raise ValueError(f"n must be in [1, {num_relations}], got {n}")
  draw = jax.random.uniform(key, (labels.shape[0], num_relations))
  draw = jnp.where(jnp.arange(num_relations)[None, :] == labels[:, None], 2.0, draw)
  return jax.lax.top_k(draw, n)[1].astype(jnp.int32)


class PredicateHead(nnx.Module):
  """x = LN(W [h_s; h_o]), d_r = LN(W' [g_s; g_o; h_CLS]), s_r = exp(t) cos(x, d_r).

  Attributes:
    instance: Dense 2H -> H, ("embed", "mlp"); instance_norm: LayerNorm.
    predicate: Dense 3H -> H; predicate_norm: LayerNorm.
    log_scale: float32[] t (replicated), initialised to log(1 / temperature).
  """

  def __init__(self, hidden_size: int, *, temperature: float = 0.07, layer_norm_eps: float = 1e-12,
               dtype: str = "float32", rngs: nnx.Rngs):
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    h = hidden_size
    self.instance = Dense(2 * h, h, kernel_axes=("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                          rngs=rngs)
    self.instance_norm = LayerNorm(h, eps=layer_norm_eps, dtype=dtype)
    self.predicate = Dense(3 * h, h, kernel_axes=("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                           rngs=rngs)
    self.predicate_norm = LayerNorm(h, eps=layer_norm_eps, dtype=dtype)
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / temperature), jnp.float32),
                               out_sharding=())

  def __call__(self, pair: jax.Array, template_pair: jax.Array, cls: jax.Array) -> jax.Array:
    """Scores.

    Args:
      pair: float[B, 2H] sentence states at the subject and object start markers.
      template_pair: float[B, R', 2H] predicate-encoder states at each template's markers.
      cls: float[B, H] the sentence's [CLS] state.

    Returns:
      float32[B, R'] s_r.
    """
    x = self.instance_norm(self.instance(pair)).astype(jnp.float32)              # [B, H]
    ctx = jnp.broadcast_to(cls[:, None, :], template_pair.shape[:2] + cls.shape[-1:])
    d = self.predicate_norm(self.predicate(jnp.concatenate([template_pair, ctx.astype(
        template_pair.dtype)], axis=-1))).astype(jnp.float32)                    # [B, R', H]
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    d = d * jax.lax.rsqrt(jnp.maximum(jnp.sum(d * d, -1, keepdims=True), 1e-12))
    return jnp.exp(self.log_scale[...]) * jnp.einsum("bh,brh->br", x, d)
