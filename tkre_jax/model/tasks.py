"""The task models every stage builds: the encoder with its heads.

* `RelationModel`: encoder + entity-marker relation classifier (finetune, eval, predict).
* `PredicateRelationModel`: `RelationModel` + the instance-adapted predicate head
  (`config.model.head=predicate`).
* `PretrainModel`: encoder + tied MLM head (+ SCL span projection and relation anchors) (mslm, scl).
* `MarkerEncoder`: the encoder alone, returning the entity-marker representation (episodic, episodes).
* `SaconModel`: sentence encoder + label encoder (own or shared weights), their tied MLM heads and a
  learnable logit scale (sacon: SaCon relation-aware pre-training).

Both are plain `nnx.Module`s with random initialisation; weights are loaded into them afterwards
(`tkre_jax.train.loading`).
"""

from __future__ import annotations

from typing import Optional

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tkre_jax.model import heads, predicate
from tkre_jax.model.encoder import Encoder, EncoderConfig


class RelationModel(nnx.Module):
  """Encoder + entity-marker relation classifier (the TKRE reference classifier).

  `__call__(batch, *, dropout_rng=None) -> float32[batch, num_labels]` reads `input_ids`,
  `attention_mask` (int32[batch, seq_len]), `subj_pos`, `obj_pos` (int32[batch]): the hidden states
  at the subject-start and object-start markers, concatenated -> Linear(2H->H) -> ReLU -> dropout
  -> Linear(H->C).
  """

  def __init__(self, enc_config: EncoderConfig, num_labels: int, dropout: float, *, rngs: nnx.Rngs):
    self.encoder = Encoder(enc_config, rngs=rngs)
    self.classifier = heads.RelationClassifier(enc_config.hidden_size, num_labels,
                                               dropout_rate=dropout, dtype=enc_config.dtype,
                                               rngs=rngs)

  def __call__(self, batch, *, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    k_enc = k_cls = None
    if dropout_rng is not None:
      k_enc, k_cls = jax.random.split(dropout_rng)
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"], dropout_rng=k_enc)
    return self.classifier(hidden, batch["subj_pos"], batch["obj_pos"], dropout_rng=k_cls)


class PredicateRelationModel(nnx.Module):
  """`RelationModel` plus the instance-adapted predicate head (`model.predicate`, arXiv
  2503.17799): a predicate encoder (its own weights, or the sentence encoder's when
  `shared_encoder`) reads each relation's template filled with the row's entities.

  `__call__(batch) -> float32[batch, R]` are the predicate scores s_r of every relation (what
  eval and predict rank); `outputs` gives the training terms.

  Attributes:
    encoder, classifier: as `RelationModel` (the linear head is trained alongside).
    predicate_encoder: the template encoder (absent when shared).
    predicate_head: `predicate.PredicateHead`.
    table: the static `data.templates.TemplateTable`.
    train_relations: templates scored per row in training (0 or >= R: all; else the gold
      relation and `train_relations - 1` others drawn at random).
    alpha: the training loss is alpha * CE(linear head) + (1 - alpha) * CE(predicate scores).
    head_form: `source` (BEFRE's head: the linear head is `predicate_head.classifier` on the
      shared projection; `classifier` is kept for the export layout but not trained) | `split`
      (the linear head is `classifier` on the raw marker states); see `predicate.PredicateHead`.
    template_pass: `full` (each filled template encoded whole, `predicate.fill_templates`) |
      `cached` (the literal tokens encoded once per relation, `predicate.cached_template_states`).
    fusion_layers: with the cached pass, the top layers in which the instance tokens attend to
      the template (0: all; `predicate.cached_template_states`); the full pass fuses all layers
      and keeps 0 here whatever is given.
  """

  def __init__(self, enc_config: EncoderConfig, num_labels: int, dropout: float, table, *,
               shared_encoder: bool = False, temperature: float = 0.07, train_relations: int = 0,
               alpha: float = 0.5, template_pass: str = "full", fusion_layers: int = 0,
               head_form: str = "source", rngs: nnx.Rngs):
    if template_pass not in ("full", "cached"):
      raise ValueError(f"template_pass must be 'full' or 'cached', got {template_pass!r}")
    if not 0 <= fusion_layers <= enc_config.num_layers:
      raise ValueError(f"fusion_layers must be in [0, {enc_config.num_layers}] (the encoder's "
                       f"depth; 0: all), got {fusion_layers}")
    if table.num_relations != num_labels:
      raise ValueError(f"the template table has {table.num_relations} relations, the classifier "
                       f"{num_labels}")
    self.encoder = Encoder(enc_config, rngs=rngs)
    self.classifier = heads.RelationClassifier(enc_config.hidden_size, num_labels,
                                               dropout_rate=dropout, dtype=enc_config.dtype,
                                               rngs=rngs)
    self.shared_encoder = bool(shared_encoder)
    if not shared_encoder:
      self.predicate_encoder = Encoder(enc_config, rngs=rngs)
    self.predicate_head = predicate.PredicateHead(enc_config.hidden_size, temperature=temperature,
                                                  layer_norm_eps=enc_config.layer_norm_eps,
                                                  dtype=enc_config.dtype, form=head_form,
                                                  num_labels=num_labels, dropout_rate=dropout,
                                                  rngs=rngs)
    self.head_form = head_form
    self.table = table
    self.num_labels = int(num_labels)
    self.train_relations = int(train_relations)
    self.alpha = float(alpha)
    self.template_pass = template_pass
    self.fusion_layers = int(fusion_layers) if template_pass == "cached" else 0

  def template_encoder(self) -> Encoder:
    return self.encoder if self.shared_encoder else self.predicate_encoder

  def scores(self, batch, hidden: jax.Array, relations: jax.Array,
             dropout_rng: Optional[jax.Array] = None, head_rng: Optional[jax.Array] = None,
             with_logits: bool = False):
    """float32[B, R'] s_r of the templates `relations` (int32[B, R']) given the sentence states
    `hidden` (float[B, L, H]); `dropout_rng` is the template pass's dropout, `head_rng` the head's
    (source form). With `with_logits`: `(scores, logits of the head's classifier or None)`."""
    b, rp = relations.shape
    if self.template_pass == "cached":
      g_subj, g_obj = predicate.cached_template_states(
          self.template_encoder(), batch["input_ids"], batch["span_ids"], relations, self.table,
          dropout_rng=dropout_rng, fusion_layers=self.fusion_layers)
      g_pair = jnp.concatenate([g_subj, g_obj], axis=-1)
    else:
      tpl = predicate.fill_templates(batch["input_ids"], batch["span_ids"], relations, self.table)
      flat = {k: v.reshape((b * rp,) + v.shape[2:]) for k, v in tpl.items()}
      g = self.template_encoder()(flat["input_ids"], flat["attention_mask"],
                                  dropout_rng=dropout_rng)
      g_pair = heads.gather_positions(g, jnp.stack([flat["subj_pos"], flat["obj_pos"]], axis=1))
      g_pair = g_pair.reshape(b, rp, 2 * g.shape[-1])
    pair = heads.gather_positions(hidden, jnp.stack([batch["subj_pos"], batch["obj_pos"]], axis=1))
    out = self.predicate_head.outputs(pair.reshape(b, -1), g_pair, hidden[:, 0], head_rng)
    return out if with_logits else out[0]

  def all_relations(self, batch_size: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(self.num_labels, dtype=jnp.int32),
                            (batch_size, self.num_labels))

  def __call__(self, batch, *, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"])
    return self.scores(batch, hidden, self.all_relations(hidden.shape[0]))

  def outputs(self, batch, *, dropout_rng: Optional[jax.Array] = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training terms: `(logits float32[B, R] of the linear head, scores float32[B, R'],
    target int32[B])`, `target` the column of the gold relation in `scores`. With a key, dropout
    is on and (when `train_relations` < R) the negatives are drawn from it."""
    k_enc = k_cls = k_tpl = k_neg = None
    if dropout_rng is not None:
      k_enc, k_cls, k_tpl, k_neg = jax.random.split(dropout_rng, 4)
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"], dropout_rng=k_enc)
    b, labels = hidden.shape[0], batch["label"].astype(jnp.int32)
    n = self.train_relations
    if k_neg is not None and 0 < n < self.num_labels:
      relations = predicate.sample_relations(k_neg, labels, self.num_labels, n)
      target = jnp.zeros((b,), jnp.int32)
    else:
      relations, target = self.all_relations(b), labels
    scores, logits = self.scores(batch, hidden, relations, dropout_rng=k_tpl, head_rng=k_cls,
                                 with_logits=True)
    if logits is None:  # split form: the linear head on the raw marker states
      logits = self.classifier(hidden, batch["subj_pos"], batch["obj_pos"], dropout_rng=k_cls)
    return logits, scores, target


class MarkerEncoder(nnx.Module):
  """The encoder alone; an instance is represented by its subject-start (`@`) and object-start (`#`)
  marker states, concatenated (Baldini Soares et al. 2019, "entity start"): the input of
  `RelationModel`'s classifier, without the classifier.

  `__call__(batch, *, dropout_rng=None) -> float32[batch, 2 * hidden]` reads `input_ids`,
  `attention_mask` (int32[batch, seq_len]), `subj_pos`, `obj_pos` (int32[batch]).
  """

  def __init__(self, enc_config: EncoderConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(enc_config, rngs=rngs)

  def __call__(self, batch, *, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    hidden = self.encoder(batch["input_ids"], batch["attention_mask"], dropout_rng=dropout_rng)
    pair = heads.gather_positions(hidden, jnp.stack([batch["subj_pos"], batch["obj_pos"]], axis=1))
    return pair.reshape(hidden.shape[0], 2 * hidden.shape[-1]).astype(jnp.float32)


class PretrainModel(nnx.Module):
  """Encoder + tied MLM head (+ SCL span projection and relation anchors when `num_relations`).

  Attributes:
    encoder: `encoder.Encoder`.
    mlm_head: `heads.MLMHead` (decoder tied to `encoder.word_embeddings`).
    projection: `heads.SpanProjection` H -> proj_dim (SCL only; `proj_dim` 0 means H).
    anchors: `heads.RelationAnchors` float32[num_relations, H] (SCL only).
  """

  def __init__(self, enc_config: EncoderConfig, *, num_relations: int = 0, proj_dim: int = 0,
               rngs: nnx.Rngs):
    if num_relations < 0 or proj_dim < 0:
      raise ValueError(f"num_relations and proj_dim must be >= 0, got {num_relations}, {proj_dim}")
    h = enc_config.hidden_size
    self.encoder = Encoder(enc_config, rngs=rngs)
    self.mlm_head = heads.MLMHead(h, enc_config.vocab_size, layer_norm_eps=enc_config.layer_norm_eps,
                                  dtype=enc_config.dtype, rngs=rngs)
    self.num_relations = int(num_relations)
    if num_relations:
      self.projection = heads.SpanProjection(h, proj_dim or h, dtype=enc_config.dtype, rngs=rngs)
      self.anchors = heads.RelationAnchors(num_relations, h, rngs=rngs)

  def mlm_logits(self, hidden: jax.Array, positions: jax.Array, *,
                 frozen_embedding: bool = False) -> jax.Array:
    """float[batch, seq_len, H], int32[batch, P] -> float32[batch, P, vocab] at `positions`.

    The decoder is tied to the encoder's word embeddings; `frozen_embedding=True` makes them a
    constant of the logits (`stop_gradient`), so a frozen encoder's [vocab, H] weight gradient,
    which the optimizer would zero anyway, is never computed (the MLM-head warm-up).
    """
    embedding = self.encoder.word_embeddings[...]
    if frozen_embedding:
      embedding = jax.lax.stop_gradient(embedding)
    return self.mlm_head(heads.gather_positions(hidden, positions), embedding)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """float[..., D] -> float32[..., D] with unit L2 norm (`x * rsqrt(max(|x|^2, eps^2))`: a finite,
  zero gradient at x == 0, e.g. a padding row)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def label_representation(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """SaCon's label vector before normalisation: `[h_CLS; masked mean of the states]`.

  Args:
    hidden: float[labels, seq_len, H] label-encoder states.
    attention_mask: int32[labels, seq_len].

  Returns:
    float32[labels, 2H] (SaCon, arXiv 2312.12021, Sec. 3.2; the authors' code averages over padding
    as well, here padding is left out of the mean).
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  mean = jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return jnp.concatenate([hidden[:, 0].astype(jnp.float32), mean], axis=-1)


class LogitScale(nnx.Module):
  """A learnable scalar `t`; logits are multiplied by `exp(t)` (CLIP, SaCon: t = log(1 / 0.07)).

  Attributes:
    log_scale: float32[] Param (replicated).
  """

  def __init__(self, temperature: float):
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / temperature), jnp.float32),
                               out_sharding=())

  def __call__(self) -> jax.Array:
    """-> float32[], exp(t)."""
    return jnp.exp(self.log_scale[...])


class SaconModel(nnx.Module):
  """The two towers of SaCon pre-training (arXiv 2312.12021).

  Attributes:
    encoder: the sentence encoder E_s (what later stages take through `--init_from`).
    mlm_head: its tied MLM head.
    label_encoder, label_mlm_head: E_l and its MLM head; absent when `shared_label_encoder`
      (the label text then goes through `encoder` and `mlm_head`).
    logit_scale: `LogitScale`.

  `sentence_embedding(hidden, subj_pos, obj_pos) -> float32[batch, 2H]` is
  `normalize([h(subject start); h(object start)])`; `label_embedding(hidden, mask)` is
  `normalize(label_representation(...))`.
  """

  def __init__(self, enc_config: EncoderConfig, *, shared_label_encoder: bool = False,
               temperature: float = 0.07, rngs: nnx.Rngs):
    h = enc_config.hidden_size
    self.encoder = Encoder(enc_config, rngs=rngs)
    self.mlm_head = heads.MLMHead(h, enc_config.vocab_size, layer_norm_eps=enc_config.layer_norm_eps,
                                  dtype=enc_config.dtype, rngs=rngs)
    self.shared_label_encoder = bool(shared_label_encoder)
    if not shared_label_encoder:
      self.label_encoder = Encoder(enc_config, rngs=rngs)
      self.label_mlm_head = heads.MLMHead(h, enc_config.vocab_size,
                                          layer_norm_eps=enc_config.layer_norm_eps,
                                          dtype=enc_config.dtype, rngs=rngs)
    self.logit_scale = LogitScale(temperature)

  def label_tower(self) -> tuple[Encoder, heads.MLMHead]:
    """(E_l, its MLM head): the label encoder, or the sentence encoder when shared."""
    if self.shared_label_encoder:
      return self.encoder, self.mlm_head
    return self.label_encoder, self.label_mlm_head

  @staticmethod
  def sentence_embedding(hidden: jax.Array, subj_pos: jax.Array, obj_pos: jax.Array) -> jax.Array:
    """float[batch, seq_len, H], int32[batch] x 2 -> float32[batch, 2H], unit norm."""
    pair = heads.gather_positions(hidden, jnp.stack([subj_pos, obj_pos], axis=1))
    return l2_normalize(pair.reshape(hidden.shape[0], 2 * hidden.shape[-1]))

  @staticmethod
  def label_embedding(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """float[labels, seq_len, H], int32[labels, seq_len] -> float32[labels, 2H], unit norm."""
    return l2_normalize(label_representation(hidden, attention_mask))

  @staticmethod
  def mlm_logits(encoder: Encoder, head: heads.MLMHead, hidden: jax.Array,
                 positions: jax.Array) -> jax.Array:
    """float[batch, seq_len, H], int32[batch, P] -> float32[batch, P, vocab], the decoder tied to
    `encoder`'s word embeddings."""
    return head(heads.gather_positions(hidden, positions), encoder.word_embeddings[...])
