"""The instance-adapted predicate head (Jiang and Kavuluru, arXiv 2503.17799, class `BEFRE` of
yuhangjiang22/Bi-Encoder-RE), in JAX.

For an instance with sentence states h and a relation r whose template, filled with the
instance's own entities, has predicate-encoder states g (`fill_templates` builds the template
inputs inside the compiled step from the row's tokens and a static `TemplateTable`), the `source`
form (`HEAD_FORMS`; BEFRE's `forward`, the default) is

    x      = Drop(LN(W  [h(subject start); h(object start)]))             (the instance)
    d_r    = Drop(LN(W' [g_r(subject start); g_r(object start); h_CLS]))  (the predicate)
    s_r    = exp(t) cos(x, d_r),   t learnable, initialised to log(1 / 0.07)
    logits = C x                                                          (the linear classifier)

with ONE LayerNorm shared by both sides and dropout 0.1 after it; the classifier's cross-entropy
therefore also trains the projection the cosine scores use. The `split` form (this project's
earlier head) has a LayerNorm per side, no dropout, and leaves the linear term to the model's own
`RelationClassifier` on the raw `[h_s; h_o]`. Prediction is argmax_r s_r; training adds these
scores' cross-entropy to the linear head's (`tasks.classifier`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tkre_jax.model.attention import attention_mask_bias
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


HEAD_FORMS = ("source", "split")  # config.model.predicate_head_form


class PredicateHead(nnx.Module):
  """The predicate head (module docstring): `source` form, BEFRE's (yuhangjiang22/Bi-Encoder-RE,
  `relation/model.py`, class `BEFRE`): x = Drop(LN(W [h_s; h_o])), d_r = Drop(LN(W' [g_s; g_o;
  h_CLS])) with one shared LN, s_r = exp(t) cos(x, d_r), logits = C x; `split` form: x = LN_x(W
  [h_s; h_o]), d_r = LN_d(W' [...]), no dropout, no classifier here.

  Attributes:
    instance: Dense 2H -> H, ("embed", "mlp"); predicate: Dense 3H -> H.
    norm (source) | instance_norm, predicate_norm (split): LayerNorm.
    classifier (source): Dense H -> num_labels, the linear classifier on x.
    log_scale: float32[] t (replicated), initialised to log(1 / temperature).
  """

  def __init__(self, hidden_size: int, *, temperature: float = 0.07, layer_norm_eps: float = 1e-12,
               dtype: str = "float32", form: str = "source", num_labels: int = 0,
               dropout_rate: float = 0.1, rngs: nnx.Rngs):
    """Raises:
      ValueError: temperature <= 0, an unknown form, or the source form without num_labels.
    """
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    if form not in HEAD_FORMS:
      raise ValueError(f"form must be one of {HEAD_FORMS}, got {form!r}")
    if form == "source" and num_labels < 1:
      raise ValueError("the source form's classifier needs num_labels >= 1")
    h = hidden_size
    self.form = form
    self.dropout_rate = float(dropout_rate) if form == "source" else 0.0
    self.instance = Dense(2 * h, h, kernel_axes=("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                          rngs=rngs)
    self.predicate = Dense(3 * h, h, kernel_axes=("embed", "mlp"), bias_axes=("mlp",), dtype=dtype,
                           rngs=rngs)
    if form == "source":
      self.norm = LayerNorm(h, eps=layer_norm_eps, dtype=dtype)
      self.classifier = Dense(h, num_labels, kernel_axes=("embed", None), bias_axes=(None,),
                              dtype=dtype, rngs=rngs)
    else:
      self.instance_norm = LayerNorm(h, eps=layer_norm_eps, dtype=dtype)
      self.predicate_norm = LayerNorm(h, eps=layer_norm_eps, dtype=dtype)
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / temperature), jnp.float32),
                               out_sharding=())

  def _drop(self, x: jax.Array, key) -> jax.Array:
    if key is None or self.dropout_rate == 0.0:
      return x
    keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout_rate), 0.0).astype(x.dtype)

  def outputs(self, pair: jax.Array, template_pair: jax.Array, cls: jax.Array,
              dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Scores and, for the source form, the linear classifier's logits.

    Args:
      pair: float[B, 2H] sentence states at the subject and object start markers.
      template_pair: float[B, R', 2H] predicate-encoder states at each template's markers.
      cls: float[B, H] the sentence's [CLS] state.
      dropout_rng: dropout on x and d_r (source form); None: off.

    Returns:
      `(scores float32[B, R'] s_r, logits float32[B, num_labels] C x or None (split form))`.
    """
    k_x = k_d = None
    if dropout_rng is not None:
      k_x, k_d = jax.random.split(dropout_rng)
    ctx = jnp.broadcast_to(cls[:, None, :], template_pair.shape[:2] + cls.shape[-1:])
    d_in = self.predicate(jnp.concatenate([template_pair, ctx.astype(template_pair.dtype)], -1))
    if self.form == "source":
      x = self._drop(self.norm(self.instance(pair)), k_x)                       # [B, H]
      d = self._drop(self.norm(d_in), k_d)                                      # [B, R', H]
      logits = self.classifier(x).astype(jnp.float32)
    else:
      x, d, logits = self.instance_norm(self.instance(pair)), self.predicate_norm(d_in), None
    x, d = x.astype(jnp.float32), d.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    d = d * jax.lax.rsqrt(jnp.maximum(jnp.sum(d * d, -1, keepdims=True), 1e-12))
    return jnp.exp(self.log_scale[...]) * jnp.einsum("bh,brh->br", x, d), logits

  def __call__(self, pair: jax.Array, template_pair: jax.Array, cls: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """float32[B, R'] s_r (`outputs`' scores)."""
    return self.outputs(pair, template_pair, cls, dropout_rng)[0]


# ---------------------------------------------------------------------------------------------------
# The cached template pass (`config.model.predicate_template_pass=cached`)
#
# A template's literal tokens ([CLS], the three pieces, [SEP]) are the same for every instance.
# In the cached pass they attend only to each other, so their states (and each layer's keys and
# values) are computed once per relation and step; the instance tokens (the four markers and the
# entity slots) attend to everything: the cached keys / values and each other. Entities sit in
# slots of `table.entity_len` tokens (unused slots masked), so every position is static:
#
#     [CLS] piece0 m1 <slot x E> m1 piece1 m2 <slot x E> m2 piece2 [SEP]
#
# The markers' states (what the head reads) still see the whole instance-filled template; only
# the literal tokens no longer see the entities. Per (instance, relation) the encoder processes
# 4 + 2E tokens instead of the whole template.
# ---------------------------------------------------------------------------------------------------

def cached_layout(table: Any) -> dict[str, np.ndarray]:
  """The static layout of every relation's template (numpy constants of the step).

  Returns:
    `static_ids`, `static_pos`, `static_mask`: int32[R, S] (S the longest literal part + 2);
    `inst_pos`: int32[R, 4 + 2E] positions of [m1, slots1, m1, m2, slots2, m2];
    `inst_markers`: int32[R, 2] the first and second entity's marker ids; `subject_first`: bool[R].
  """
  E, R = table.entity_len, table.num_relations
  S = 2 + max(sum(len(p) for p in rel) for rel in table.pieces)
  static_ids = np.full((R, S), table.pad_id, np.int32)
  static_pos = np.zeros((R, S), np.int32)
  static_mask = np.zeros((R, S), np.int32)
  inst_pos = np.zeros((R, 4 + 2 * E), np.int32)
  markers = np.zeros((R, 2), np.int32)
  for r, (p0, p1, p2) in enumerate(table.pieces):
    toks = [table.cls_id, *p0, *p1, *p2, table.sep_id]
    a, m, c = len(p0), len(p1), len(p2)
    m1 = a + 1
    m2 = m1 + E + 2 + m
    pos = [0, *range(1, a + 1), *range(m1 + E + 2, m1 + E + 2 + m),
           *range(m2 + E + 2, m2 + E + 2 + c), m2 + E + 2 + c]
    static_ids[r, :len(toks)] = toks
    static_pos[r, :len(pos)] = pos
    static_mask[r, :len(toks)] = 1
    inst_pos[r] = [*range(m1, m1 + E + 2), *range(m2, m2 + E + 2)]
    first = table.subject_first[r]
    markers[r] = ((table.subj_marker_id, table.obj_marker_id) if first
                  else (table.obj_marker_id, table.subj_marker_id))
  return {"static_ids": static_ids, "static_pos": static_pos, "static_mask": static_mask,
          "inst_pos": inst_pos, "inst_markers": markers,
          "subject_first": np.asarray(table.subject_first, bool)}


def _entity_slots(input_ids: jax.Array, span_ids: jax.Array, slots: int):
  """The subject's and the object's first `slots` tokens: `((ids, valid), (ids, valid))`, int32
  and bool [B, slots] each (positions past the entity repeat a row token and are not valid)."""
  j = jnp.arange(slots, dtype=jnp.int32)
  L = input_ids.shape[1]
  out = []
  for role in (SPAN_SUBJECT, SPAN_OBJECT):
    start, length = _entity(span_ids, role, slots)
    idx = jnp.minimum(start[:, None] + j[None, :], L - 1)
    out.append((jnp.take_along_axis(input_ids, idx, axis=1), j[None, :] < length[:, None]))
  return tuple(out)


def instance_tokens(input_ids: jax.Array, span_ids: jax.Array, relations: jax.Array,
                    table: Any) -> tuple[jax.Array, jax.Array]:
  """The instance tokens of each (row, relation) in the cached layout: `(ids, valid)`, int32 and
  bool [B, R', 4 + 2E]: [m1, first entity's slots, m1, m2, second entity's slots, m2]."""
  lay = cached_layout(table)
  first = jnp.asarray(lay["subject_first"])[relations]                     # [B, R']
  markers = jnp.asarray(lay["inst_markers"])[relations]                    # [B, R', 2]
  (s_ids, s_ok), (o_ids, o_ok) = _entity_slots(input_ids, span_ids, table.entity_len)
  f = first[..., None]
  e1 = jnp.where(f, s_ids[:, None, :], o_ids[:, None, :])
  e2 = jnp.where(f, o_ids[:, None, :], s_ids[:, None, :])
  v1 = jnp.where(f, s_ok[:, None, :], o_ok[:, None, :])
  v2 = jnp.where(f, o_ok[:, None, :], s_ok[:, None, :])
  m1, m2 = markers[..., :1], markers[..., 1:]
  ids = jnp.concatenate([m1, e1, m1, m2, e2, m2], axis=-1).astype(jnp.int32)
  yes = jnp.ones_like(m1, dtype=bool)
  valid = jnp.concatenate([yes, v1, yes, yes, v2, yes], axis=-1)
  return ids, valid


def canonical_instance_tokens(input_ids: jax.Array, span_ids: jax.Array,
                              table: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The instance tokens of each row in the relation-independent order the lower layers of a
  partly fused pass read (`fusion_layers` < the encoder's depth): `(ids, valid, positions)`, int32,
  bool and int32 [B, 4 + 2E]: [@, subject slots, @, #, object slots, #] at positions 1..4 + 2E,
  as if the row were the short sentence "[CLS] @ subject @ # object #"."""
  E = table.entity_len
  (s_ids, s_ok), (o_ids, o_ok) = _entity_slots(input_ids, span_ids, E)
  B = input_ids.shape[0]
  sm = jnp.full((B, 1), table.subj_marker_id, jnp.int32)
  om = jnp.full((B, 1), table.obj_marker_id, jnp.int32)
  ids = jnp.concatenate([sm, s_ids, sm, om, o_ids, om], axis=1).astype(jnp.int32)
  yes = jnp.ones((B, 1), bool)
  valid = jnp.concatenate([yes, s_ok, yes, yes, o_ok, yes], axis=1)
  positions = jnp.broadcast_to(jnp.arange(1, 5 + 2 * E, dtype=jnp.int32), ids.shape)
  return ids, valid, positions


def fused_depth(encoder: Any, fusion_layers: int) -> int:
  """The number of top layers in which instance tokens attend to the template (0 or more than
  the encoder's depth: all of them)."""
  n = len(encoder.layers)
  return n if fusion_layers <= 0 or fusion_layers >= n else int(fusion_layers)


def cached_template_states(encoder: Any, input_ids: jax.Array, span_ids: jax.Array,
                           relations: jax.Array, table: Any,
                           dropout_rng: jax.Array | None = None,
                           fusion_layers: int = 0) -> tuple[jax.Array, jax.Array]:
  """The predicate encoder's states at each filled template's subject and object start markers,
  by the cached pass (see above).

  `fusion_layers` F (0: every layer) makes the pass cheaper still. With F below the encoder's
  depth L, the instance tokens go through the lower L - F layers once per row, on their own and in
  a relation-independent order (`canonical_instance_tokens`), and attend to the template's cached
  keys and values only in the top F layers. In every case the last layer is run for the two start
  markers alone (the only states the head reads): its queries are those two tokens, its keys and
  values all tokens.

  Per (row, relation) the encoder then processes 4 + 2E tokens in F - 1 layers and 2 in the last;
  per row 4 + 2E tokens in L - F layers (F < L).

  Args:
    encoder: a `model.encoder.Encoder`.
    input_ids, span_ids: int32[B, L] the rows; relations: int32[B, R'].
    dropout_rng: enables dropout (the static and the instance pass each get their own key).
    fusion_layers: F above.

  Returns:
    `(g_subj, g_obj)`: float32[B, R', H] each.
  """
  lay = cached_layout(table)
  B, Rp = relations.shape
  N = B * Rp
  E = table.entity_len
  n_layers = len(encoder.layers)
  fused_from = n_layers - fused_depth(encoder, fusion_layers)
  k_static = k_inst = None
  if dropout_rng is not None:
    k_static, k_inst = jax.random.split(dropout_rng)

  def layer_rng(key, i):
    return None if key is None else jax.random.fold_in(key, i + 1)

  # the literal tokens of every relation, once; the keys / values of the fused layers are kept
  static_mask = jnp.asarray(lay["static_mask"])
  x = encoder.embed(jnp.asarray(lay["static_ids"]), jnp.asarray(lay["static_pos"]),
                    dropout_rng=k_static)
  static_bias = attention_mask_bias(static_mask)
  cache = {}
  for i, layer in enumerate(encoder.layers):
    if i >= fused_from:
      cache[i] = layer.attention.keys_values(x)
    if i < n_layers - 1:  # the literal tokens' last-layer states are never read
      x = layer(x, static_bias, layer_rng(k_static, i))
  # the instance tokens
  if fused_from == 0:  # per (row, relation), at the relation's own layout from the embedding on
    ids, valid = instance_tokens(input_ids, span_ids, relations, table)
    Q = ids.shape[-1]
    pos = jnp.asarray(lay["inst_pos"])[relations].reshape(N, Q)
    y = encoder.embed(ids.reshape(N, Q), pos, dropout_rng=k_inst)
    inst_valid = valid.reshape(N, Q)
    first = jnp.asarray(lay["subject_first"])[relations].reshape(N, 1)
  else:  # per row, relation-independent, through the unfused layers
    ids, valid, pos = canonical_instance_tokens(input_ids, span_ids, table)
    Q = ids.shape[-1]
    y = encoder.embed(ids, pos, dropout_rng=k_inst)
    own_bias = attention_mask_bias(valid.astype(jnp.int32))
    for i in range(fused_from):
      y = encoder.layers[i](y, own_bias, layer_rng(k_inst, i))
    inst_valid = valid
    first = jnp.ones((B, 1), bool)

  def per_pair(a):  # [B or N, ...] -> [N, ...]
    if a.shape[0] == N:
      return a
    return jnp.broadcast_to(a[:, None], (B, Rp) + a.shape[1:]).reshape((N,) + a.shape[1:])

  def template_kv(i):
    k, v = cache[i]
    return k[relations].reshape((N,) + k.shape[1:]), v[relations].reshape((N,) + v.shape[1:])

  static_keys = static_mask[relations].reshape(N, -1)
  for i in range(fused_from, n_layers - 1):
    y = per_pair(y)
    inst_valid = per_pair(inst_valid)
    bias = attention_mask_bias(jnp.concatenate([static_keys, inst_valid.astype(jnp.int32)], 1))
    y = encoder.layers[i](y, bias, layer_rng(k_inst, i), kv_prefix=template_kv(i))
  # the last layer, for the two start markers: the other instance tokens enter as keys / values
  last = encoder.layers[n_layers - 1]
  starts = np.array([0, E + 2])
  others = np.array([q for q in range(Q) if q not in (0, E + 2)])
  k_o, v_o = last.attention.keys_values(y[:, others])
  k_t, v_t = template_kv(n_layers - 1)
  prefix = (jnp.concatenate([k_t, per_pair(k_o).astype(k_t.dtype)], axis=1),
            jnp.concatenate([v_t, per_pair(v_o).astype(v_t.dtype)], axis=1))
  keys_mask = jnp.concatenate([static_keys, per_pair(inst_valid[:, others]).astype(jnp.int32),
                               jnp.ones((N, 2), jnp.int32)], axis=1)
  g = last(per_pair(y[:, starts]), attention_mask_bias(keys_mask),
           layer_rng(k_inst, n_layers - 1), kv_prefix=prefix)
  g = g.astype(jnp.float32).reshape(B, Rp, 2, -1)
  first = per_pair(first).reshape(B, Rp, 1)
  g1, g2 = g[:, :, 0], g[:, :, 1]
  return jnp.where(first, g1, g2), jnp.where(first, g2, g1)
