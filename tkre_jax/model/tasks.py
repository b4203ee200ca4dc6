"""The task models every stage builds: the encoder with its heads.

* `RelationModel`: encoder + entity-marker relation classifier (finetune, eval, predict).
* `PretrainModel`: encoder + tied MLM head (+ SCL span projection and relation anchors) (mslm, scl).
* `MarkerEncoder`: the encoder alone, returning the entity-marker representation (episodic, episodes).

Both are plain `nnx.Module`s with random initialisation; weights are loaded into them afterwards
(`tkre_jax.train.loading`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from tkre_jax.model import heads
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
