"""TKRE pre-training, the library part: the `mslm` and `scl` models, losses and steps.

TKRE paper (arXiv 2505.12236), stage 1 (MSLM): tokens are masked with a probability that depends on
their span (`masking.mask_span_tokens`: 0.8 relation span, 0.5 entities, 0.2 context, 0 special
tokens and entity markers), every selected token becomes the mask token, and the loss is the
cross-entropy of the MLM head (`heads.MLMHead`, decoder tied to `encoder.word_embeddings`) at the
masked positions only (`losses.masked_lm_loss`), normalised over the GLOBAL batch (sum / number of
predictions).

Stage 2 (SCL): `L = lambda1 * L_mslm + lambda2 * L_scl` (reference lambda1 = lambda2 = 1, tau =
0.1): a learned relation anchor (`heads.RelationAnchors`), the mean-pooled relation span as its
positive (`losses.relation_span_mask`; the entity spans when the relation span is empty, counted as
`scl_fallback_rows`), a random 1-3 token context span as negative
(`losses.sample_negative_spans`), all through one shared `heads.SpanProjection` (Linear-ReLU-Linear,
L2-normalised). `PretrainStepConfig.objective` picks the loss: "reference" (default), the authors'
per-row 2-way cross-entropy `losses.scl_reference_loss` (UESTC-GQJ/TKRE `cl_model.py`), or
"infonce", this project's bidirectional InfoNCE with in-batch negatives `losses.scl_loss`. By default the spans are pooled
from the same (masked) forward pass as the MSLM loss, as in the reference; `scl.span_input="clean"`
pools them from a second pass over the unmasked input.

Masking and negative sampling run ON DEVICE inside the jitted step from the step key, so a step is a
pure function `(params, opt_state, batch, rng) -> (params, opt_state, metrics)` built by
`tkre_jax.train.step.make_train_step` from the losses here. The stages themselves (data, start,
anchors, summary) are `tkre_jax/stages/pretrain.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tkre_jax import config as config_lib
from tkre_jax.data import pipeline
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.model.tasks import PretrainModel
from tkre_jax.parallel.sharding import global_to_host
from tkre_jax.tasks import losses, masking
from tkre_jax.train import runtime
from tkre_jax.train.step import make_train_step

STAGE_SALT = {"mslm": 1, "scl": 2}  # keeps the two stages' masks apart for the same seed
SPAN_INPUTS = config_lib.SPAN_INPUTS
ANCHOR_INITS = config_lib.ANCHOR_INITS
SCL_OBJECTIVES = config_lib.SCL_OBJECTIVES
_PID = re.compile(r"P\d+")


def build_pretrain_model(enc_config: EncoderConfig, *, num_relations: int = 0, proj_dim: int = 0,
                         seed: int = 0, mesh=None, rules: Any = "dp") -> runtime.ShardedModel:
  """Builds a `PretrainModel` with random initialisation from `seed`.

  Args:
    enc_config: the encoder config (e.g. `EncoderConfig.tiny()` in tests, or from an HF dir).
    num_relations: R > 0 adds the SCL projection and R relation anchors (the `scl` stage); 0 builds
      the MSLM model (encoder + MLM head).
    proj_dim: SCL projection size; 0 means the hidden size.
    seed: the parameter initialisation seed (`nnx.Rngs(seed)`).
    mesh: a `jax.sharding.Mesh`: parameters are created directly in their sharded layout
      (`runtime.create_sharded`); None: a single-device model with `shardings=None`.
    rules: logical-axis rules (a `sharding.RULES` name or pairs), used with `mesh`.

  Returns:
    `runtime.ShardedModel(graphdef, params, shardings)`.

  Raises:
    ValueError: negative `num_relations` or `proj_dim`.
  """
  build = pretrain_builder(enc_config, num_relations=num_relations, proj_dim=proj_dim, seed=seed)
  if mesh is not None:
    return runtime.create_sharded(build, mesh, rules)
  graphdef, params = nnx.split(build(), nnx.Param)
  return runtime.ShardedModel(graphdef, params, None)


def pretrain_builder(enc_config: EncoderConfig, *, num_relations: int = 0, proj_dim: int = 0,
                     seed: int = 0) -> Callable[[], PretrainModel]:
  """`() -> PretrainModel` with random initialisation from `seed` (for `runtime.create_sharded`)."""
  if num_relations < 0 or proj_dim < 0:
    raise ValueError(f"num_relations and proj_dim must be >= 0, got {num_relations}, {proj_dim}")
  return lambda: PretrainModel(enc_config, num_relations=num_relations, proj_dim=proj_dim,
                               rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------------
# Losses and steps
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PretrainStepConfig:
  """Static settings of the pre-training steps.

  Attributes:
    mask_token_id: the tokenizer's mask token id.
    max_predictions: static prediction slots per sequence P (`masking.mask_span_tokens`).
    probs: masking probabilities `(never, context, entity, relation)`.
    lambda_mslm, lambda_scl: SCL-stage loss weights (lambda1, lambda2).
    tau: InfoNCE temperature (> 0).
    neg_min_len, neg_max_len: negative span length range in tokens.
    span_input: "masked" (spans from the MSLM pass) or "clean" (a second, unmasked pass).
    no_relation_id: label id without a contrastive term (-1: none).
    objective: "reference" (`losses.scl_reference_loss`, the authors' 2-way cross-entropy) or
      "infonce" (`losses.scl_loss`, this project's bidirectional InfoNCE).
    freeze_encoder: the MLM head warm-up: the encoder runs without dropout under
      `stop_gradient` (no backward pass through it; the optimizer freezes it as well).
  """
  mask_token_id: int
  max_predictions: int = 32
  probs: masking.MaskingProbs = masking.DEFAULT_MASKING_PROBS
  lambda_mslm: float = 1.0
  lambda_scl: float = 1.0
  tau: float = 0.1
  neg_min_len: int = 1
  neg_max_len: int = 3
  span_input: str = "masked"
  no_relation_id: int = -1
  objective: str = "reference"
  freeze_encoder: bool = False

  def __post_init__(self):
    if self.max_predictions < 1:
      raise ValueError(f"max_predictions must be >= 1, got {self.max_predictions}")
    if not self.tau > 0:
      raise ValueError(f"tau must be > 0, got {self.tau}")
    if not 1 <= self.neg_min_len <= self.neg_max_len:
      raise ValueError(f"need 1 <= neg_min_len <= neg_max_len, got {self.neg_min_len}, "
                       f"{self.neg_max_len}")
    if self.objective not in SCL_OBJECTIVES:
      raise ValueError(f"objective must be one of {SCL_OBJECTIVES}, got {self.objective!r}")
    if self.span_input not in SPAN_INPUTS:
      raise ValueError(f"span_input must be one of {SPAN_INPUTS}, got {self.span_input!r}")
    if self.lambda_mslm < 0 or self.lambda_scl < 0:
      raise ValueError("lambda_mslm and lambda_scl must be >= 0")
    masking._as_probs(self.probs)  # pylint: disable=protected-access


def _mask(batch: Mapping[str, jax.Array], rng: jax.Array, cfg: PretrainStepConfig) -> dict:
  return masking.mask_span_tokens(rng, batch["input_ids"], batch["span_ids"],
                                  mask_token_id=cfg.mask_token_id,
                                  max_predictions=cfg.max_predictions, probs=cfg.probs)


def _cap_metrics(masked: dict, weight: jax.Array) -> dict:
  """Selected and dropped token counts of the `max_predictions` cap (weighted rows only) and the
  dropped share of the selected tokens: the effective masking rate is `1 - dropped_share` of the
  configured one."""
  selected = jnp.sum(masked["num_selected"] * weight)
  dropped = jnp.sum(masked["num_dropped"] * weight)
  return {"num_selected": selected, "num_dropped": dropped,
          "dropped_share": dropped / jnp.maximum(selected, 1.0)}


def _mslm_terms(model: PretrainModel, hidden: jax.Array, masked: dict,
                weights: jax.Array, frozen_encoder: bool = False) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, num_correct) of the MSLM head over this batch's prediction slots; with
  `frozen_encoder` the tied decoder's embedding gets no gradient either."""
  logits = model.mlm_logits(hidden, masked["mlm_positions"], frozen_embedding=frozen_encoder)
  loss_sum, _ = losses.masked_lm_loss(logits, masked["mlm_labels"], weights)
  correct = jnp.sum(jnp.where(losses.top1_correct(logits, masked["mlm_labels"]), weights, 0.0))
  return loss_sum, correct


def mslm_loss(graphdef, cfg: PretrainStepConfig):
  """The MSLM loss (`tkre_jax.train.step.LossFn`) of a `PretrainModel` graph.

  `L_mslm = sum_{b,j} w[b,j] * CE(logits[b,j], labels[b,j]) / sum_{b,j} w[b,j]` over all prediction
  slots of the GLOBAL batch (`losses.masked_lm_loss`), `w` = slot weight x row weight. The batch
  holds `input_ids`, `attention_mask`, `span_ids`: int32[batch, seq_len] and `weight`:
  float32[batch] (0 on padding rows); the key is split into masking and dropout keys. Metrics
  (float32 scalars): `mslm_loss`, `mlm_accuracy`, `num_predictions`, `num_selected`, `num_dropped`
  (selected tokens beyond `max_predictions`), `dropped_share`. With `cfg.freeze_encoder` the
  encoder output is a constant of the loss (MLM head warm-up).
  """

  def loss_fn(params, batch, rng, psum):
    mask_rng, drop_rng = jax.random.split(rng)
    masked = _mask(batch, mask_rng, cfg)
    weight = batch["weight"].astype(jnp.float32)
    mlm_weights = masked["mlm_weights"] * weight[:, None]
    norm = jnp.maximum(psum(jnp.sum(mlm_weights)), 1.0)
    model = nnx.merge(graphdef, params)
    if cfg.freeze_encoder:
      hidden = jax.lax.stop_gradient(model.encoder(masked["masked_input_ids"],
                                                   batch["attention_mask"]))
    else:
      hidden = model.encoder(masked["masked_input_ids"], batch["attention_mask"],
                             dropout_rng=drop_rng)
    s, correct = _mslm_terms(model, hidden, masked, mlm_weights, cfg.freeze_encoder)
    loss = s / norm
    return loss, {"mslm_loss": loss, "mlm_accuracy": correct / norm,
                  "num_predictions": jnp.sum(mlm_weights), **_cap_metrics(masked, weight)}

  return loss_fn


def _project(model: PretrainModel, x: jax.Array, valid: jax.Array) -> jax.Array:
  """`model.projection(x)` with rows that hold no span (`valid` False: pooled zeros) replaced by
  ones first. The projection L2-normalises with `g / max(||g||, eps)`, whose gradient is NaN at
  g == 0, which a zero input gives while the output bias is still 0 (the first step); those rows
  are masked out of the loss, but a NaN partial times a zero cotangent is still NaN."""
  return model.projection(jnp.where(valid[:, None], x, jnp.ones_like(x)))


def scl_loss(graphdef, cfg: PretrainStepConfig):
  """The SCL-stage loss (MSLM kept on): `lambda_mslm * L_mslm + lambda_scl * L_scl`.

  Each loss is normalised over the global batch: `L_mslm` as in `mslm_loss`, `L_scl` =
  `losses.scl_loss` sum / number of rows with a positive span (rows with weight 0, no span, or the
  no-relation label are out). A batch with `instance_weight` (learning-order weights,
  `config.scl.learning_order_from`) weights each row's term and its exp-term as a negative by it
  (FineCL); the normaliser stays the row count, as FineCL's mean over anchors. Anchors and spans go through the shared projection; the in-batch
  negatives of `scl_loss` are the other rows of the batch (under `pmap`: of the device's rows). The
  batch also needs `label`: int32[batch] relation ids in [0, num_relations). Metrics (float32
  scalars): `mslm_loss`, `scl_loss`, `mlm_accuracy`, `num_predictions`, `num_selected`,
  `num_dropped`, `dropped_share`,
  `anchor_to_span_acc`, `span_to_anchor_acc`, `scl_rows`, `scl_fallback_rows` (relation span
  empty, entity spans used), `scl_no_span_rows`, `scl_no_negative_rows`.
  """

  def loss_fn(params, batch, rng, psum):
    mask_rng, neg_rng, drop_rng, clean_rng = jax.random.split(rng, 4)
    masked = _mask(batch, mask_rng, cfg)
    weight = batch["weight"].astype(jnp.float32)
    mlm_weights = masked["mlm_weights"] * weight[:, None]
    pos_mask, fallback = losses.relation_span_mask(batch["span_ids"])
    has_span = jnp.sum(pos_mask, axis=1) > 0
    neg_mask, neg_valid = losses.sample_negative_spans(neg_rng, batch["span_ids"],
                                                       min_len=cfg.neg_min_len,
                                                       max_len=cfg.neg_max_len)
    labels = batch["label"]
    scl_weight = jnp.where(labels == cfg.no_relation_id, 0.0, weight)
    row_weight = scl_weight * has_span.astype(jnp.float32)
    norm_mlm = jnp.maximum(psum(jnp.sum(mlm_weights)), 1.0)
    norm_scl = jnp.maximum(psum(jnp.sum(row_weight)), 1.0)

    model = nnx.merge(graphdef, params)
    hidden = model.encoder(masked["masked_input_ids"], batch["attention_mask"], dropout_rng=drop_rng)
    s_mlm, correct = _mslm_terms(model, hidden, masked, mlm_weights)
    if cfg.span_input == "clean":
      span_hidden = model.encoder(batch["input_ids"], batch["attention_mask"], dropout_rng=clean_rng)
    else:
      span_hidden = hidden
    pos, _ = losses.span_mean_pool(span_hidden, pos_mask)
    neg, _ = losses.span_mean_pool(span_hidden, neg_mask)
    z_anchor = model.projection(model.anchors())
    z_pos = _project(model, pos, has_span)
    z_neg = _project(model, neg, neg_valid)
    order_w = batch.get(pipeline.INSTANCE_WEIGHT_KEY)  # FineCL learning-order weights, if any
    if cfg.objective == "reference":
      # the authors' per-row term needs the row's own negative: rows without one are out
      row_weight = row_weight * neg_valid.astype(jnp.float32)
      norm_scl = jnp.maximum(psum(jnp.sum(row_weight)), 1.0)
    term_weight = row_weight if order_w is None else row_weight * order_w.astype(jnp.float32)
    if cfg.objective == "reference":
      s_scl, _, aux = losses.scl_reference_loss(z_anchor, z_pos, z_neg, labels, term_weight,
                                                tau=cfg.tau, negative_valid=neg_valid)
    else:
      s_scl, _, aux = losses.scl_loss(z_anchor, z_pos, z_neg, labels, term_weight, tau=cfg.tau,
                                      negative_valid=neg_valid, negative_weights=order_w)
    # the accuracies are weighted like the terms: divide by the weighted row count
    norm_acc = norm_scl if order_w is None else jnp.maximum(psum(jnp.sum(term_weight)), 1e-6)
    l_mslm, l_scl = s_mlm / norm_mlm, s_scl / norm_scl
    total = cfg.lambda_mslm * l_mslm + cfg.lambda_scl * l_scl
    return total, {
        "mslm_loss": l_mslm, "scl_loss": l_scl, "mlm_accuracy": correct / norm_mlm,
        "num_predictions": jnp.sum(mlm_weights),
        "anchor_to_span_acc": aux["anchor_to_span_correct"] / norm_acc,
        "span_to_anchor_acc": aux["span_to_anchor_correct"] / norm_acc,
        "scl_rows": jnp.sum(row_weight),
        **_cap_metrics(masked, weight),
        "scl_fallback_rows": jnp.sum(jnp.where(fallback, scl_weight, 0.0)),
        "scl_no_span_rows": jnp.sum(jnp.where(has_span, 0.0, scl_weight)),
        "scl_no_negative_rows": jnp.sum(jnp.where(neg_valid, 0.0, scl_weight)),
    }

  return loss_fn


LOSSES = {"mslm": mslm_loss, "scl": scl_loss}


def evaluate_mlm(graphdef, params, arrays: Mapping[str, np.ndarray], cfg: PretrainStepConfig, *,
                 seed: int = 0, batch_size: int = 32) -> dict[str, float]:
  """Masked-token loss and accuracy on a split, with the same masks for every call (the key of
  batch i is `fold_in(key(seed), i)`), so before / after numbers compare the model only.

  Args:
    arrays: an in-memory split (`dataset.load_arrays`): `input_ids`, `attention_mask`, `span_ids`.

  Returns:
    `{"mlm_loss": mean cross-entropy per masked token, "mlm_accuracy": top-1 share,
    "num_predictions": masked tokens}` (floats; the no-dropout forward pass).
  """
  @jax.jit
  def sums(p, batch, rng):
    masked = _mask(batch, rng, cfg)
    weights = masked["mlm_weights"] * batch["weight"][:, None]
    model = nnx.merge(graphdef, p)
    hidden = model.encoder(masked["masked_input_ids"], batch["attention_mask"])
    s, correct = _mslm_terms(model, hidden, masked, weights)
    return jnp.stack([s, correct, jnp.sum(weights)])

  key = jax.random.key(seed)
  total = np.zeros(3)
  for i, batch in enumerate(pipeline.iterate_batches(arrays, batch_size)):
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "span_ids", "weight")}
    total += global_to_host(sums(params, batch, jax.random.fold_in(key, i)))
  n = max(total[2], 1.0)
  return {"mlm_loss": float(total[0] / n), "mlm_accuracy": float(total[1] / n),
          "num_predictions": float(total[2])}


def make_mslm_step(graphdef, tx: optax.GradientTransformation, cfg: PretrainStepConfig, *,
                   axis_name: Optional[str] = None) -> Callable:
  """The pure, guarded MSLM train step `(params, opt_state, batch, rng) -> (params, opt_state,
  metrics)` (`mslm_loss` through `step.make_train_step`; `axis_name` for `jax.pmap`)."""
  return make_train_step(mslm_loss(graphdef, cfg), tx, axis_name=axis_name)


def make_scl_step(graphdef, tx: optax.GradientTransformation, cfg: PretrainStepConfig, *,
                  axis_name: Optional[str] = None) -> Callable:
  """The pure, guarded SCL train step (`scl_loss` through `step.make_train_step`)."""
  return make_train_step(scl_loss(graphdef, cfg), tx, axis_name=axis_name)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

def step_config(config: ml_collections.ConfigDict, meta: Mapping[str, Any],
                stage: str = "scl") -> PretrainStepConfig:
  """The `PretrainStepConfig` of a stage from the config and the prepared `meta.json`.

  Raises:
    ValueError: the tokenizer of the prepared data has no mask token.
  """
  mask_id = meta.get("special_ids", {}).get("mask")
  if mask_id is None:
    raise ValueError(f"the tokenizer of the prepared data ({meta.get('tokenizer_dir')}) has no mask "
                     "token; MSLM needs one")
  m = config.mslm
  kw = dict(mask_token_id=int(mask_id), max_predictions=int(m.max_predictions),
            probs=masking.MaskingProbs(0.0, float(m.prob_context), float(m.prob_entity),
                                       float(m.prob_relation)))
  if stage == "scl":
    s = config.scl
    no_rel = metrics_lib.find_no_relation_id(meta["label_map"]) if s.skip_no_relation else None
    kw.update(lambda_mslm=float(s.lambda_mslm), lambda_scl=float(s.lambda_scl), tau=float(s.tau),
              neg_min_len=int(s.neg_min_len), neg_max_len=int(s.neg_max_len),
              span_input=s.span_input, no_relation_id=-1 if no_rel is None else int(no_rel),
              objective=s.objective)
  return PretrainStepConfig(**kw)


# ---------------------------------------------------------------------------------------------------
# Relation anchors
# ---------------------------------------------------------------------------------------------------

def relation_texts(label_map: Mapping[str, int],
                   schema: Optional[Mapping[str, tuple[str, str]]]) -> tuple[list[Optional[str]], dict]:
  """The text that describes each relation, in label-id order.

  `"name: description"` from the schema (FewRel pid2name); else the label's words when the label is
  not an opaque Wikidata id (`org:founded_by` -> "org founded by", Wiki80 names as they are); else
  None (the anchor keeps its random initialisation).

  Returns:
    `(texts, counts)` with `counts = {"schema": n, "label_words": n, "random": n}`.
  """
  texts: list[Optional[str]] = [None] * len(label_map)
  counts = {"schema": 0, "label_words": 0, "random": 0}
  for rel, idx in label_map.items():
    if schema and rel in schema:
      name, desc = schema[rel]
      texts[idx] = f"{name}: {desc}" if desc.strip() else name
      counts["schema"] += 1
    elif not _PID.fullmatch(rel):
      texts[idx] = " ".join(re.split(r"[_:/\s]+", rel)).strip()
      counts["label_words"] += 1
    else:
      counts["random"] += 1
  return texts, counts


def encode_texts(graphdef, params, tokenizer, texts: Sequence[str],
                 max_len: int = 64) -> np.ndarray:
  """Mean-pooled (over real tokens, [CLS]/[SEP] included) encoder output of each text.

  Returns:
    float32[len(texts), hidden_size].
  """
  enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len,
                  return_tensors="np", return_token_type_ids=False)
  ids = np.asarray(enc["input_ids"], np.int32)
  mask = np.asarray(enc["attention_mask"], np.int32)

  @jax.jit
  def pooled(p, ids, mask):
    hidden = nnx.merge(graphdef, p).encoder(ids, mask)
    return losses.span_mean_pool(hidden, mask)[0]

  # with the fsdp rules on several processes the output may be split over their devices
  return global_to_host(pooled(params, ids, mask)).astype(np.float32)
