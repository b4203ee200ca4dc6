"""The TKRE pre-training stages: `mslm` (Masked Span Language Modeling) and `scl` (Span-level
Contrastive Learning with MSLM kept on), on the knowledge-guided `corpus` split written by `prepare`.

TKRE paper (arXiv 2505.12236), stage 1: tokens are masked with a probability that depends on their
span (`masking.mask_span_tokens`: 0.8 relation span, 0.5 entities, 0.2 context, 0 special tokens and
entity markers), every selected token becomes the mask token, and the loss is the cross-entropy of
the MLM head (`heads.MLMHead`, decoder tied to `encoder.word_embeddings`) at the masked positions
only (`losses.masked_lm_loss`), normalised over the GLOBAL batch (sum / number of predictions).

Stage 2: `L = lambda1 * L_mslm + lambda2 * L_scl` (reference lambda1 = lambda2 = 1, tau = 0.1), with
`losses.scl_loss`: a learned relation anchor (`heads.RelationAnchors`), the mean-pooled relation
span as its positive (`losses.relation_span_mask`; the entity spans when the relation span is empty,
counted as `scl_fallback_rows`), a random 1-3 token context span as negative
(`losses.sample_negative_spans`) plus the in-batch negatives `scl_loss` builds, all through one
shared `heads.SpanProjection` (Linear-ReLU-Linear, L2-normalised). By default the spans are pooled
from the same (masked) forward pass as the MSLM loss, as in the reference; `scl.span_input="clean"`
pools them from a second pass over the unmasked input. Anchors start from the encoder's mean-pooled
embedding of "name: description" (the relation schema, e.g. FewRel's pid2name) tokenized with the
corpus tokenizer, or of the label's words when there is no schema entry (`scl.anchor_init="text"`).

Masking and negative sampling run ON DEVICE inside the jitted step from the step key
`fold_in(fold_in(key(seed), STAGE_SALT[stage]), step)` (the salt keeps the two stages' masks apart),
so a step is a pure function `(params, opt_state, batch, rng) -> (params, opt_state, metrics)`.

Workdir (as for `finetune`): `checkpoints/` (latest params + optimizer state, every
`checkpoint_every_steps` and at the end: a rerun resumes from it), `best/` (the final parameters,
tree `{"encoder", "mlm_head"[, "projection", "anchors"]}`, which `--init_from` of the next stage
restores: `scl` takes the encoder and the MLM head, `finetune` the encoder), `metrics.jsonl`,
`summary.json`. Start order: this workdir's checkpoint -> `init_from` -> the HF checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tkre_jax.data import tfrecord
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.model import encoder as encoder_lib
from tkre_jax.model import heads
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import losses, masking, optim, runtime

log = logging.getLogger(__name__)

STAGES = ("mslm", "scl")
STAGE_SALT = {"mslm": 1, "scl": 2}
SPAN_INPUTS = ("masked", "clean")
ANCHOR_INITS = ("text", "random")
_PID = re.compile(r"P\d+")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

class PretrainModel(nnx.Module):
  """Encoder + tied MLM head (+ SCL span projection and relation anchors when `num_relations`).

  Attributes:
    encoder: `encoder.Encoder`.
    mlm_head: `heads.MLMHead` (decoder tied to `encoder.word_embeddings`).
    projection: `heads.SpanProjection` H -> proj_dim (SCL only).
    anchors: `heads.RelationAnchors` float32[num_relations, H] (SCL only).
  """

  def __init__(self, enc_config: encoder_lib.EncoderConfig, *, num_relations: int = 0,
               proj_dim: int = 0, rngs: nnx.Rngs):
    h = enc_config.hidden_size
    self.encoder = encoder_lib.Encoder(enc_config, rngs=rngs)
    self.mlm_head = heads.MLMHead(h, enc_config.vocab_size, layer_norm_eps=enc_config.layer_norm_eps,
                                  dtype=enc_config.dtype, rngs=rngs)
    self.num_relations = int(num_relations)
    if num_relations:
      self.projection = heads.SpanProjection(h, proj_dim or h, dtype=enc_config.dtype, rngs=rngs)
      self.anchors = heads.RelationAnchors(num_relations, h, rngs=rngs)

  def mlm_logits(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """float[batch, seq_len, H], int32[batch, P] -> float32[batch, P, vocab] at `positions`."""
    return self.mlm_head(heads.gather_positions(hidden, positions),
                         self.encoder.word_embeddings[...])


def build_pretrain_model(enc_config: encoder_lib.EncoderConfig, *, num_relations: int = 0,
                         proj_dim: int = 0, seed: int = 0, mesh=None,
                         rules: Any = "dp") -> runtime.ShardedModel:
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
  """
  if num_relations < 0 or proj_dim < 0:
    raise ValueError(f"num_relations and proj_dim must be >= 0, got {num_relations}, {proj_dim}")

  def build():
    return PretrainModel(enc_config, num_relations=num_relations, proj_dim=proj_dim,
                         rngs=nnx.Rngs(seed))

  if mesh is not None:
    return runtime.create_sharded(build, mesh, rules)
  graphdef, params = nnx.split(build(), nnx.Param)
  return runtime.ShardedModel(graphdef, params, None)


# ---------------------------------------------------------------------------------------------------
# Steps
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

  def __post_init__(self):
    if self.max_predictions < 1:
      raise ValueError(f"max_predictions must be >= 1, got {self.max_predictions}")
    if not self.tau > 0:
      raise ValueError(f"tau must be > 0, got {self.tau}")
    if not 1 <= self.neg_min_len <= self.neg_max_len:
      raise ValueError(f"need 1 <= neg_min_len <= neg_max_len, got {self.neg_min_len}, "
                       f"{self.neg_max_len}")
    if self.span_input not in SPAN_INPUTS:
      raise ValueError(f"span_input must be one of {SPAN_INPUTS}, got {self.span_input!r}")
    if self.lambda_mslm < 0 or self.lambda_scl < 0:
      raise ValueError("lambda_mslm and lambda_scl must be >= 0")
    masking._as_probs(self.probs)  # pylint: disable=protected-access


def _mask(batch: Mapping[str, jax.Array], rng: jax.Array, cfg: PretrainStepConfig) -> dict:
  return masking.mask_span_tokens(rng, batch["input_ids"], batch["span_ids"],
                                  mask_token_id=cfg.mask_token_id,
                                  max_predictions=cfg.max_predictions, probs=cfg.probs)


def _mslm_terms(model: PretrainModel, hidden: jax.Array, masked: dict,
                weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, num_correct) of the MSLM head over this batch's prediction slots."""
  logits = model.mlm_logits(hidden, masked["mlm_positions"])
  loss_sum, _ = losses.masked_lm_loss(logits, masked["mlm_labels"], weights)
  correct = jnp.sum(jnp.where(jnp.argmax(logits, -1) == masked["mlm_labels"], weights, 0.0))
  return loss_sum, correct


def _apply(tx, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _collectives(rng: jax.Array, axis_name: Optional[str]):
  """`(psum, rng)`: identity and `rng` under jit (the batch is global); under `pmap` a psum over
  `axis_name` and a per-device key `fold_in(rng, axis_index)`."""
  if axis_name is None:
    return (lambda x: x), rng
  return ((lambda x: jax.lax.psum(x, axis_name)),
          jax.random.fold_in(rng, jax.lax.axis_index(axis_name)))


def make_mslm_step(graphdef, tx: optax.GradientTransformation, cfg: PretrainStepConfig, *,
                   axis_name: Optional[str] = None) -> Callable:
  """The pure MSLM train step.

  `L_mslm = sum_{b,j} w[b,j] * CE(logits[b,j], labels[b,j]) / sum_{b,j} w[b,j]` over all prediction
  slots of the GLOBAL batch (TKRE MSLM; `losses.masked_lm_loss`), `w` = slot weight x row weight.

  Args:
    graphdef: the `PretrainModel` graph (`build_pretrain_model(...).graphdef`).
    tx: the optax transformation.
    cfg: `PretrainStepConfig`.
    axis_name: None for `jax.jit` on global (sharded) arrays. Under `jax.pmap(..., axis_name=...)`
      the normaliser, gradients and metrics are summed over that axis (so the loss is still the
      global-batch mean) and each device masks with `fold_in(rng, axis_index)`.

  Returns:
    `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)` where `batch` holds
    `input_ids`, `attention_mask`, `span_ids`: int32[batch, seq_len] and `weight`: float32[batch]
    (0 on padding rows), `rng` is a PRNG key (split into masking and dropout keys), and `metrics`
    are float32 scalars: `loss` (= `mslm_loss`), `mlm_accuracy`, `num_predictions`, `num_dropped`
    (selected tokens beyond `max_predictions`), `grad_norm`.
  """

  def step(params, opt_state, batch, rng):
    psum, rng = _collectives(rng, axis_name)
    mask_rng, drop_rng = jax.random.split(rng)
    masked = _mask(batch, mask_rng, cfg)
    weight = batch["weight"].astype(jnp.float32)
    mlm_weights = masked["mlm_weights"] * weight[:, None]
    n_pred = psum(jnp.sum(mlm_weights))
    norm = jnp.maximum(n_pred, 1.0)

    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      hidden = model.encoder(masked["masked_input_ids"], batch["attention_mask"],
                             dropout_rng=drop_rng)
      s, correct = _mslm_terms(model, hidden, masked, mlm_weights)
      return s / norm, correct

    (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss, correct, grads = psum(loss), psum(correct), psum(grads)
    params, opt_state = _apply(tx, params, opt_state, grads)
    metrics = {"loss": loss, "mslm_loss": loss, "mlm_accuracy": correct / norm,
               "num_predictions": n_pred, "grad_norm": optax.tree.norm(grads),
               "num_dropped": psum(jnp.sum(masked["num_dropped"] * weight))}
    return params, opt_state, metrics

  return step


def _project(model: PretrainModel, x: jax.Array, valid: jax.Array) -> jax.Array:
  """`model.projection(x)` with rows that hold no span (`valid` False: pooled zeros) replaced by
  ones first. The projection L2-normalises with `g / max(||g||, eps)`, whose gradient is NaN at
  g == 0, which a zero input gives while the output bias is still 0 (the first step); those rows
  are masked out of the loss, but a NaN partial times a zero cotangent is still NaN."""
  return model.projection(jnp.where(valid[:, None], x, jnp.ones_like(x)))


def make_scl_step(graphdef, tx: optax.GradientTransformation, cfg: PretrainStepConfig, *,
                  axis_name: Optional[str] = None) -> Callable:
  """The pure SCL train step (MSLM kept on): `lambda_mslm * L_mslm + lambda_scl * L_scl`.

  Each loss is normalised over the global batch: `L_mslm` as in `make_mslm_step`, `L_scl` =
  `losses.scl_loss` sum / number of rows with a positive span (rows with weight 0, no span, or the
  no-relation label are out). Anchors and spans go through the shared projection; the in-batch
  negatives of `scl_loss` are the other rows of the batch (under `pmap`: of the device's rows).

  Args:
    graphdef: the graph of a `PretrainModel` built with `num_relations > 0`.
    tx, cfg, axis_name: as for `make_mslm_step`.

  Returns:
    `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`; the batch also needs
    `label`: int32[batch] relation ids in [0, num_relations). Metrics (float32 scalars): `loss`,
    `mslm_loss`, `scl_loss`, `mlm_accuracy`, `num_predictions`, `num_dropped`,
    `anchor_to_span_acc`, `span_to_anchor_acc`, `scl_rows`, `scl_fallback_rows` (relation span
    empty, entity spans used), `scl_no_span_rows`, `scl_no_negative_rows`, `grad_norm`.
  """

  def step(params, opt_state, batch, rng):
    psum, rng = _collectives(rng, axis_name)
    mask_rng, neg_rng, drop_rng, clean_rng = jax.random.split(rng, 4)
    masked = _mask(batch, mask_rng, cfg)
    weight = batch["weight"].astype(jnp.float32)
    mlm_weights = masked["mlm_weights"] * weight[:, None]
    n_pred = psum(jnp.sum(mlm_weights))
    pos_mask, fallback = losses.relation_span_mask(batch["span_ids"])
    has_span = jnp.sum(pos_mask, axis=1) > 0
    neg_mask, neg_valid = losses.sample_negative_spans(neg_rng, batch["span_ids"],
                                                       min_len=cfg.neg_min_len,
                                                       max_len=cfg.neg_max_len)
    labels = batch["label"]
    scl_weight = jnp.where(labels == cfg.no_relation_id, 0.0, weight)
    row_weight = scl_weight * has_span.astype(jnp.float32)
    n_rows = psum(jnp.sum(row_weight))
    norm_mlm, norm_scl = jnp.maximum(n_pred, 1.0), jnp.maximum(n_rows, 1.0)

    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      hidden = model.encoder(masked["masked_input_ids"], batch["attention_mask"],
                             dropout_rng=drop_rng)
      s_mlm, correct = _mslm_terms(model, hidden, masked, mlm_weights)
      if cfg.span_input == "clean":
        span_hidden = model.encoder(batch["input_ids"], batch["attention_mask"],
                                    dropout_rng=clean_rng)
      else:
        span_hidden = hidden
      pos, _ = losses.span_mean_pool(span_hidden, pos_mask)
      neg, _ = losses.span_mean_pool(span_hidden, neg_mask)
      z_anchor = model.projection(model.anchors())
      z_pos = _project(model, pos, has_span)
      z_neg = _project(model, neg, neg_valid)
      s_scl, _, aux = losses.scl_loss(z_anchor, z_pos, z_neg, labels, row_weight, tau=cfg.tau,
                                      negative_valid=neg_valid)
      l_mslm, l_scl = s_mlm / norm_mlm, s_scl / norm_scl
      total = cfg.lambda_mslm * l_mslm + cfg.lambda_scl * l_scl
      return total, {"mslm_loss": l_mslm, "scl_loss": l_scl, "mlm_correct": correct,
                     "a2s": aux["anchor_to_span_correct"], "s2a": aux["span_to_anchor_correct"]}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss, aux, grads = psum(loss), psum(aux), psum(grads)
    params, opt_state = _apply(tx, params, opt_state, grads)
    metrics = {
        "loss": loss, "mslm_loss": aux["mslm_loss"], "scl_loss": aux["scl_loss"],
        "mlm_accuracy": aux["mlm_correct"] / norm_mlm, "num_predictions": n_pred,
        "anchor_to_span_acc": aux["a2s"] / norm_scl, "span_to_anchor_acc": aux["s2a"] / norm_scl,
        "scl_rows": n_rows, "grad_norm": optax.tree.norm(grads),
        "num_dropped": psum(jnp.sum(masked["num_dropped"] * weight)),
        "scl_fallback_rows": psum(jnp.sum(jnp.where(fallback, scl_weight, 0.0))),
        "scl_no_span_rows": psum(jnp.sum(jnp.where(has_span, 0.0, scl_weight))),
        "scl_no_negative_rows": psum(jnp.sum(jnp.where(neg_valid, 0.0, scl_weight))),
    }
    return params, opt_state, metrics

  return step


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

def validate_section(config: ml_collections.ConfigDict, stage: str) -> None:
  """Checks `config.<stage>` (and the masking fields of `config.mslm`).

  Raises:
    ValueError: naming the field and the problem.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown pre-training stage {stage!r}; expected one of {STAGES}")
  sec = config[stage]

  def need(cond, field, what):
    if not cond:
      raise ValueError(f"config.{stage}.{field} {what}, got {sec.get(field)!r}")

  need(isinstance(sec.steps, int) and sec.steps >= 1, "steps", "must be an int >= 1")
  need(sec.batch_size >= 1, "batch_size", "must be >= 1")
  need(sec.learning_rate > 0, "learning_rate", "must be > 0")
  need(0 <= sec.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
  need(sec.log_every_steps >= 1, "log_every_steps", "must be >= 1")
  need(sec.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1")
  need(sec.length_multiple >= 0, "length_multiple", "must be >= 0")
  if sec.length_multiple and config.data.max_seq_len % sec.length_multiple:
    raise ValueError(f"config.data.max_seq_len ({config.data.max_seq_len}) must be a multiple of "
                     f"config.{stage}.length_multiple ({sec.length_multiple})")
  m = config.mslm
  if not (isinstance(m.max_predictions, int) and m.max_predictions >= 1):
    raise ValueError(f"config.mslm.max_predictions must be an int >= 1, got {m.max_predictions!r}")
  for f in ("prob_relation", "prob_entity", "prob_context"):
    if not 0 <= m[f] <= 1:
      raise ValueError(f"config.mslm.{f} must be in [0, 1], got {m[f]!r}")
  if stage == "scl":
    need(sec.tau > 0, "tau", "must be > 0")
    need(sec.lambda_mslm >= 0 and sec.lambda_scl >= 0, "lambda_mslm", "and lambda_scl must be >= 0")
    need(sec.proj_dim >= 0, "proj_dim", "must be >= 0")
    need(1 <= sec.neg_min_len <= sec.neg_max_len, "neg_min_len",
         "must satisfy 1 <= neg_min_len <= neg_max_len")
    need(sec.anchor_init in ANCHOR_INITS, "anchor_init", f"must be one of {ANCHOR_INITS}")
    need(sec.span_input in SPAN_INPUTS, "span_input", f"must be one of {SPAN_INPUTS}")


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
              span_input=s.span_input, no_relation_id=-1 if no_rel is None else int(no_rel))
  return PretrainStepConfig(**kw)


# ---------------------------------------------------------------------------------------------------
# Weights: HF checkpoint, a previous stage's workdir, relation anchors
# ---------------------------------------------------------------------------------------------------

restore_param_tree = ckpt_lib.restore_param_tree


def _shapes_match(params, name: str, values: Mapping) -> bool:
  try:
    ours = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(params[name]))
  except (KeyError, AttributeError):
    return False
  theirs = jax.tree.map(lambda x: tuple(np.shape(x)), dict(values))
  norm = lambda t: {str(k): norm(v) if isinstance(v, dict) else v for k, v in t.items()}  # noqa: E731
  return norm(ours) == norm(theirs)


def init_weights(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                 init_from: str = "") -> tuple[str, list[str]]:
  """Loads starting weights into `model.params` in place.

  With `init_from` (a previous stage's workdir): its `encoder` (required) and every other sub-tree
  that this model has with the same shapes (`mlm_head`; `projection` and `anchors` when resuming
  contrastive training from an SCL workdir). Otherwise the HF checkpoint of `config.model.hf_dir`
  (default all-MiniLM-L6-v2): the encoder and, when the checkpoint has one, the MLM head.

  Returns:
    `(source description, names of the sub-trees loaded)`.

  Raises:
    FileNotFoundError: no checkpoint in `init_from`.
    KeyError: the checkpoint has no `encoder`.
  """
  from tkre_jax.data.prepare import model_dir
  from tkre_jax.model import hf_import
  if init_from:
    tree, where = restore_param_tree(pathlib.Path(init_from))
    if "encoder" not in tree:
      raise KeyError(f"{where}: the checkpoint has no 'encoder' parameters (keys: {sorted(tree)})")
    loaded = []
    for name in ("encoder", "mlm_head", "projection", "anchors"):
      if name in tree and name in model.params and _shapes_match(model.params, name, tree[name]):
        runtime.put_subtree(model.params, (name,), tree[name], model.shardings)
        loaded.append(name)
      elif name == "encoder":
        raise ValueError(f"{where}: its encoder does not match this model's encoder "
                         "(different config.model.hf_dir?)")
    return f"stage checkpoint {where}", loaded
  mdir = model_dir(config)
  _, encoder, mlm = hf_import.load_hf_encoder(mdir, dtype=config.model.dtype)
  runtime.put_subtree(model.params, ("encoder",), nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
                      model.shardings)
  loaded = ["encoder"]
  if mlm:
    cfg = encoder.config
    head = heads.MLMHead(cfg.hidden_size, cfg.vocab_size, layer_norm_eps=cfg.layer_norm_eps,
                         rngs=nnx.Rngs(0))
    hf_import.load_mlm_head(head, mlm, source=str(mdir))
    runtime.put_subtree(model.params, ("mlm_head",), nnx.to_pure_dict(nnx.state(head, nnx.Param)),
                        model.shardings)
    loaded.append("mlm_head")
  return f"HF checkpoint {mdir}", loaded


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

  return np.asarray(jax.device_get(pooled(params, ids, mask)), np.float32)


def init_anchors(config: ml_collections.ConfigDict, model: runtime.ShardedModel,
                 meta: Mapping[str, Any]) -> dict:
  """Sets the relation anchors to the encoder's embedding of each relation's text (`scl.anchor_init
  = "text"`, see `relation_texts`), with the encoder currently in `model.params`.

  Returns:
    the counts of `relation_texts` (all `random` when `anchor_init == "random"`).
  """
  from tkre_jax.data import prepare
  label_map = meta["label_map"]
  if config.scl.anchor_init == "random":
    return {"schema": 0, "label_words": 0, "random": len(label_map)}
  texts, counts = relation_texts(label_map, prepare.read_schema(config))
  todo = [i for i, t in enumerate(texts) if t is not None]
  if not todo:
    return counts
  tok_dir = pathlib.Path(meta.get("tokenizer_dir") or prepare.model_dir(config))
  tokenizer = prepare.load_tokenizer(tok_dir)
  emb = encode_texts(model.graphdef, model.params, tokenizer, [texts[i] for i in todo])
  current = np.array(jax.device_get(model.params["anchors"]["anchors"][...]), np.float32)
  current[np.asarray(todo)] = emb
  runtime.put_subtree(model.params, ("anchors",), {"anchors": current}, model.shardings)
  return counts


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def epoch_plan(lengths: np.ndarray, batch_size: int, epoch: int, seed: int,
               length_multiple: int = 0) -> list[np.ndarray]:
  """The row indices of every batch of one epoch (each batch at most `batch_size` rows).

  Without `length_multiple`: a `numpy.random.default_rng([seed, epoch])` permutation cut into
  `ceil(n / batch_size)` batches. With it: rows are grouped by their bucket
  (`ceil(length / length_multiple)`), each bucket is permuted and cut into batches, and the order of
  all batches is permuted, so a batch pads to its own bucket only (much less padding when short
  sentences and long explanations are mixed; at most one partial batch per bucket).

  Args:
    lengths: int[n] real tokens per row.

  Returns:
    list of int arrays; every row appears exactly once.
  """
  rng = np.random.default_rng([seed, epoch])
  n = len(lengths)
  if not length_multiple:
    order = rng.permutation(n)
    return [order[b:b + batch_size] for b in range(0, n, batch_size)]
  buckets = -(-np.asarray(lengths) // length_multiple)
  plan = []
  for bucket in np.unique(buckets):
    rows = np.nonzero(buckets == bucket)[0]
    rows = rows[rng.permutation(len(rows))]
    plan.extend(rows[b:b + batch_size] for b in range(0, len(rows), batch_size))
  return [plan[i] for i in rng.permutation(len(plan))]


def corpus_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
                   start_step: int = 0, length_multiple: int = 0):
  """Endless shuffled batches (epoch after epoch of `epoch_plan`), resumable at any step.

  Step s is found by walking the epoch plans (cheap: plans are index arrays), so a resumed run sees
  exactly the batches an uninterrupted one would. A partial batch is padded to `batch_size` with
  weight-0 rows (one compiled batch shape), and the sequence axis is cut to the smallest multiple of
  `length_multiple` holding the batch (see `tfrecord.iterate_batches`).

  Yields:
    numpy batches with the model keys and `weight: float32[batch_size]` (no `index`).
  """
  n = len(arrays["label"])
  if n == 0:
    raise ValueError("the pre-training split is empty")
  lengths = arrays["attention_mask"].sum(axis=1)
  epoch, skip = 0, start_step
  while True:
    plan = epoch_plan(lengths, batch_size, epoch, seed, length_multiple)
    if skip >= len(plan):
      skip -= len(plan)
      epoch += 1
      continue
    for rows in plan[skip:]:
      sub = {k: arrays[k][rows] for k in tfrecord.MODEL_KEYS}
      batch = next(tfrecord.iterate_batches(sub, batch_size, length_multiple=length_multiple))
      batch.pop("index")
      yield batch
    epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

def _prepared(config) -> tuple[pathlib.Path, dict]:
  if not config.data.prepared_dir:
    raise ValueError("set --config.data.prepared_dir to the workdir of a `--stage=prepare` run")
  d = pathlib.Path(config.data.prepared_dir)
  return d, tfrecord.read_meta(d)


def _check_tokenizer(config, meta) -> None:
  """The encoder must use the tokenizer the corpus was prepared with."""
  from tkre_jax.data import prepare
  prepared = meta.get("tokenizer_dir")
  mdir = prepare.model_dir(config)
  if not prepared or pathlib.Path(prepared).resolve() == mdir.resolve():
    return
  ours = prepare.load_tokenizer(mdir).get_vocab()
  theirs = prepare.load_tokenizer(pathlib.Path(prepared)).get_vocab()
  if ours != theirs:
    raise ValueError(f"the prepared data was tokenized with {prepared}, whose vocabulary differs from "
                     f"the model's ({mdir}); rerun prepare with this config.model.hf_dir")


def _mean(values) -> float:
  vals = [float(v) for v in values]
  return float(np.mean(vals)) if vals else float("nan")


def run_pretrain(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
                 init_from: str = "") -> dict:
  """Runs the `mslm` or `scl` stage; returns the summary written to `<workdir>/summary.json`.

  Raises:
    ValueError: bad config fields, a batch size not divisible by the data-parallel size, a
      tokenizer mismatch or no mask token.
    KeyError: the prepared directory has no `config.<stage>.split` split (run prepare with the LLM
      files, or set the split to `train`).
    FloatingPointError: a non-finite loss.
  """
  from tkre_jax.train import finetune
  validate_section(config, stage)
  t_start = time.time()
  workdir = pathlib.Path(workdir)
  sec = config[stage]
  prep_dir, meta = _prepared(config)
  if sec.split not in meta["splits"]:
    reason = meta.get("corpus", {}).get("reason", "")
    raise KeyError(f"{prep_dir}: no split {sec.split!r} to pre-train on (splits: "
                   f"{sorted(meta['splits'])}){'; ' + reason if reason else ''}. Run prepare with "
                   "config.data.edkg_file / scdg_file present (config.data.corpus='require'), or set "
                   f"--config.{stage}.split=train")
  _check_tokenizer(config, meta)
  cfg = step_config(config, meta, stage)
  arrays = tfrecord.load_arrays(prep_dir, sec.split)
  label_map = meta["label_map"]
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if sec.batch_size % n_data:
    raise ValueError(f"config.{stage}.batch_size ({sec.batch_size}) must be a multiple of the "
                     f"data-parallel size data*fsdp = {n_data}")
  total_steps = int(sec.steps)
  rules = sharding_lib.RULES[config.mesh.rules]
  enc_cfg = finetune.encoder_config(config)
  if meta.get("vocab_size", 0) > enc_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {meta['vocab_size']} tokens but the encoder only "
                     f"{enc_cfg.vocab_size} embeddings")

  # ------------------------------------------------------------------ model, optimizer, start
  num_relations = len(label_map) if stage == "scl" else 0
  model = build_pretrain_model(enc_cfg, num_relations=num_relations,
                               proj_dim=config.scl.proj_dim if stage == "scl" else 0,
                               seed=config.seed, mesh=mesh, rules=rules)
  tx, schedule = optim.adamw(sec, total_steps)
  opt_shardings = sharding_lib.state_shardings(jax.eval_shape(tx.init, model.params), mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(model.params)
  ckpts = ckpt_lib.StageCheckpoints(workdir)
  state_shardings = {"params": model.shardings, "opt_state": opt_shardings}
  start_step, anchors_from, loaded = 0, None, []
  if ckpts.latest_step() is not None:
    target = runtime.abstract_with_shardings({"params": model.params, "opt_state": opt_state},
                                             state_shardings)
    restored, rmeta = ckpts.restore_latest(target)
    model.params, opt_state = restored["params"], restored["opt_state"]
    start_step = int(rmeta["step"])
    source = f"resumed {workdir / 'checkpoints'} at step {start_step}"
    anchors_from = rmeta.get("anchors_init")
    if rmeta.get("total_steps") not in (None, total_steps):
      log.warning("%s: the checkpoint was written for %s steps, this run has %d", stage,
                  rmeta.get("total_steps"), total_steps)
  else:
    source, loaded = init_weights(config, model, init_from)
    if stage == "scl":
      anchors_from = ({"restored": len(label_map)} if "anchors" in loaded
                      else init_anchors(config, model, meta))
  corpus_info = meta.get("corpus", {})
  log.info("%s: %d sequences in split %r %s; %d steps at batch %d (%.1f epochs); %d parameters; "
           "weights from %s (%s)%s", stage, len(arrays["label"]), sec.split,
           corpus_info.get("by_kind", ""), total_steps, sec.batch_size,
           total_steps * sec.batch_size / len(arrays["label"]), runtime.count_params(model.params),
           source, ", ".join(loaded) or "all",
           f"; anchors: {anchors_from}" if anchors_from else "")

  # ------------------------------------------------------------------ compiled step
  batch_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  make = make_scl_step if stage == "scl" else make_mslm_step
  train_step = runtime.CompiledStep(
      make(model.graphdef, tx, cfg), f"{stage}_step",
      in_shardings=(model.shardings, opt_shardings, batch_sh, repl),
      out_shardings=(model.shardings, opt_shardings, repl), donate_argnums=(0, 1))

  # ------------------------------------------------------------------ train loop
  writer = runtime.MetricsWriter(workdir)
  base_key = jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT[stage])
  batches = corpus_batches(arrays, sec.batch_size, seed=config.seed, start_step=start_step,
                           length_multiple=sec.length_multiple)
  ckpt_meta = lambda s: {"step": s, "total_steps": total_steps, "stage": stage,  # noqa: E731
                         "anchors_init": anchors_from}
  window: list = []
  history: list[dict] = []
  tokens = 0
  t_train = time.time()
  t_steady, steady_from = None, None
  t_window = time.time()
  for step in range(start_step, total_steps):
    batch = next(batches)
    tokens += int(batch["attention_mask"][batch["weight"] > 0].sum())
    rng = jax.random.fold_in(base_key, step)
    model.params, opt_state, m = train_step(model.params, opt_state,
                                            runtime.to_global(batch, mesh), rng)
    window.append(m)
    done = step + 1
    if t_steady is None:  # the first step includes compilation
      jax.block_until_ready(m)
      t_steady, steady_from = time.time(), done
      compile_before = sum(train_step.compile_seconds.values())
    if done % sec.log_every_steps == 0 or done == total_steps:
      ms = jax.device_get(window)
      record = {k: _mean(x[k] for x in ms) for k in ms[0]}
      if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"{stage}: loss is {record['loss']} at step {done}")
      record.update(stage=stage, step=done, learning_rate=float(schedule(step)),
                    steps_in_window=len(ms),
                    seconds_per_step=round((time.time() - t_window) / len(ms), 4))
      writer.write(record)
      history.append(record)
      log.info("%s step %d/%d: loss %.4f%s, MLM accuracy %.3f, %.2f s/step", stage, done,
               total_steps, record["loss"],
               f" (mslm {record['mslm_loss']:.4f}, scl {record['scl_loss']:.4f})"
               if stage == "scl" else "", record["mlm_accuracy"], record["seconds_per_step"])
      window, t_window = [], time.time()
    if done % sec.checkpoint_every_steps == 0 and done < total_steps:
      ckpts.save_latest(done, {"params": model.params, "opt_state": opt_state}, ckpt_meta(done))
  jax.block_until_ready(model.params)
  t_end = time.time()
  train_seconds = t_end - t_train
  if start_step < total_steps:
    ckpts.save_latest(total_steps, {"params": model.params, "opt_state": opt_state},
                      ckpt_meta(total_steps))
  # best/ holds a pure dict ({"encoder": {...}, "mlm_head": {...}, ...} of arrays): what
  # `finetune.restore_encoder` / `restore_param_tree` read back for `--init_from`.
  if start_step < total_steps or ckpts.best_step() != total_steps:
    ckpts.save_best(total_steps, nnx.to_pure_dict(model.params), ckpt_meta(total_steps))
  ckpts.close()

  compile_seconds = sum(train_step.compile_seconds.values())
  steady_steps = total_steps - (steady_from or total_steps)
  step_seconds = None
  if steady_steps > 0:
    later_compiles = compile_seconds - compile_before
    step_seconds = round((t_end - t_steady - later_compiles) / steady_steps, 4)
  first = history[0] if history else {}
  last = history[-1] if history else {}
  summary = {
      "stage": stage,
      "steps": total_steps,
      "start_step": start_step,
      "resumed": start_step > 0,
      "weights_from": source,
      "loaded": loaded,
      "split": sec.split,
      "num_sequences": int(len(arrays["label"])),
      "corpus": {k: corpus_info[k] for k in ("by_kind", "num_instances") if k in corpus_info},
      "batch_size": int(sec.batch_size),
      "epochs": round(total_steps * sec.batch_size / len(arrays["label"]), 2),
      "num_params": runtime.count_params(model.params),
      "first_logged": first,
      "last_logged": last,
      "step_seconds": step_seconds,
      "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 and tokens else None,
      "compile_seconds": round(compile_seconds, 1),
      "seconds": {"total": round(time.time() - t_start, 1), "train": round(train_seconds, 1)},
      "mesh": dict(mesh.shape),
  }
  if stage == "scl":
    summary["anchors_init"] = anchors_from
  runtime.write_summary(workdir, summary)
  log.info("%s: done, %d steps in %.0f s (%s s/step after compilation); best/ holds the final "
           "parameters", stage, total_steps - start_step, train_seconds, step_seconds)
  return summary


def run_mslm(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
             init_from: str = "") -> dict:
  """Stage 1, Masked Span Language Modeling (see the module docstring and `run_pretrain`)."""
  return run_pretrain("mslm", config, workdir, mesh, init_from=init_from)


def run_scl(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
            init_from: str = "") -> dict:
  """Stage 2, Span-level Contrastive Learning with MSLM kept on (see `run_pretrain`)."""
  return run_pretrain("scl", config, workdir, mesh, init_from=init_from)
