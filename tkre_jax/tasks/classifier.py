"""The K-shot relation classifier, the library part: model builder, loss, prediction, evaluation.

Model (`model.tasks.RelationModel`): the encoder, then the hidden states at the subject-start (`@`)
and object-start (`#`) markers concatenated -> Linear(2H->H) -> ReLU -> dropout -> Linear(H->C)
(the TKRE reference classifier). Loss: cross-entropy normalised over the global batch. The stages
that use it are `tkre_jax/stages/finetune.py` and `tkre_jax/stages/evaluate.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tkre_jax.data import pipeline
from tkre_jax.data import templates as templates_lib
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.model.tasks import PredicateRelationModel, RelationModel
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.parallel.mesh import is_primary
from tkre_jax.progress import Progress
from tkre_jax.tasks import losses
from tkre_jax.train import runtime
from tkre_jax.train.step import make_train_step as _make_guarded_step


def classifier_builder(enc_config: EncoderConfig, num_labels: int, dropout: float, seed: int,
                       predicate: Optional[Mapping[str, Any]] = None
                       ) -> Callable[[], RelationModel | PredicateRelationModel]:
  """`() -> model` with random initialisation from `seed` (for `runtime.create_sharded`): a
  `RelationModel`, or with `predicate` (`predicate_options`) a `PredicateRelationModel`."""
  if predicate:
    return lambda: PredicateRelationModel(enc_config, num_labels, dropout, **predicate,
                                          rngs=nnx.Rngs(seed))
  return lambda: RelationModel(enc_config, num_labels, dropout, rngs=nnx.Rngs(seed))


def predicate_options(model_config: Mapping[str, Any], table: Any) -> Optional[dict]:
  """The `PredicateRelationModel` options of a `config.model` section (a ConfigDict or run.json's
  dict) and a `TemplateTable`; None for the linear head."""
  if model_config.get("head", "linear") != "predicate":
    return None
  return {"table": table, "shared_encoder": model_config["predicate_encoder"] == "shared",
          "temperature": float(model_config["predicate_temperature"]),
          "train_relations": int(model_config["predicate_train_relations"]),
          "alpha": float(model_config["predicate_alpha"]),
          # run.json files of runs before the cached pass existed used the full one
          "template_pass": model_config.get("predicate_template_pass", "full"),
          "fusion_layers": int(model_config.get("predicate_fusion_layers", 0)),
          # run.json files of runs before the source form existed used the split one
          "head_form": model_config.get("predicate_head_form", "split")}


def predicate_from_run(info: Mapping[str, Any]) -> Optional[dict]:
  """`predicate_options` of a finetune workdir's `run.json` (its `config.model` and `templates`);
  None for the linear head (and for run.json files written before the predicate head)."""
  model_config = info.get("config", {}).get("model", {})
  if model_config.get("head", "linear") != "predicate":
    return None
  return predicate_options(model_config, templates_lib.TemplateTable.from_json(info["templates"]))


def build_model(enc_config: EncoderConfig, num_labels: int, dropout: float, seed: int, mesh,
                rules, predicate: Optional[Mapping[str, Any]] = None) -> runtime.ShardedModel:
  """The classifier created directly in its sharded layout on `mesh`."""
  return runtime.create_sharded(classifier_builder(enc_config, num_labels, dropout, seed,
                                                   predicate), mesh, rules)


def row_weights(batch) -> jax.Array:
  """float32[batch]: the batch `weight` (1 real row, 0 padding) times the rows' learning-order
  weights when the batch carries them (`instance_weight`, `config.train.learning_order_from`):
  the cross-entropy is then the weighted mean sum_b w_b CE_b / sum_b w_b."""
  w = batch["weight"].astype(jnp.float32)
  if pipeline.INSTANCE_WEIGHT_KEY in batch:
    w = w * batch[pipeline.INSTANCE_WEIGHT_KEY].astype(jnp.float32)
  return w


def make_loss_sum_fn(graphdef):
  """`(params, batch, rng) -> (loss_sum, weight, aux)`: the classifier cross-entropy SUMMED over the
  rows of `batch` (float32 scalar), their total weight (float32 scalar) and `{}`; `rng` is the
  dropout key (None: no dropout). The pmap path (`tkre_jax.train.pmap`) sums over devices and then
  divides by the global weight."""

  def loss_sum_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    if isinstance(model, PredicateRelationModel):
      # alpha * CE(linear head) + (1 - alpha) * CE(predicate scores) (arXiv 2503.17799)
      logits, scores, target = model.outputs(batch, dropout_rng=rng)
      w = row_weights(batch)
      s_lin, total = losses.classification_loss(logits, batch["label"], w)
      s_pred, _ = losses.classification_loss(scores, target, w)
      return (model.alpha * s_lin + (1.0 - model.alpha) * s_pred, total,
              {"linear_loss": s_lin, "predicate_loss": s_pred})
    logits = model(batch, dropout_rng=rng)
    s, w = losses.classification_loss(logits, batch["label"], row_weights(batch))
    return s, w, {}

  return loss_sum_fn


def make_loss_fn(graphdef):
  """The classifier loss (`tkre_jax.train.step.LossFn`): cross-entropy summed over the global batch
  divided by the global weight; metrics `{"weight": float32}` (real rows in the batch)."""
  loss_sum_fn = make_loss_sum_fn(graphdef)

  def loss_fn(params, batch, rng, psum):
    s, w, aux = loss_sum_fn(params, batch, rng)
    norm = jnp.maximum(psum(w), 1.0)
    return s / norm, {"weight": w, **{k: v / norm for k, v in aux.items()}}

  return loss_fn


def make_train_step(graphdef, tx):
  """The guarded jit train step `(params, opt_state, batch, rng) -> (params, opt_state, metrics)`."""
  return _make_guarded_step(make_loss_fn(graphdef), tx)


def make_predict_step(graphdef):
  """`(params, batch) -> float32[batch, num_labels]` logits (the predicate scores s_r with the
  predicate head), without dropout."""

  def predict_step(params, batch):
    return nnx.merge(graphdef, params)(batch)

  return predict_step


def compiled_predict_step(model: runtime.ShardedModel, mesh) -> runtime.CompiledStep:
  """`make_predict_step` compiled with the model's shardings; logits come back replicated (an
  all-gather of [batch, classes]) so every host can read them."""
  return runtime.CompiledStep(make_predict_step(model.graphdef), "predict_step",
                              in_shardings=(model.shardings, sharding_lib.batch_sharding(mesh)),
                              out_shardings=sharding_lib.replicated(mesh))


def predict(predict_fn, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh,
            length_multiple: int, *, desc: str = "predict") -> np.ndarray:
  """Logits for every row of `arrays`: float32[n, num_labels], in row order.

  Rows go in batches of `batch_size`, shortest first, the sequence axis cut to a multiple of
  `length_multiple`; progress (`desc`) is shown on a terminal or logged every 30 s.
  """
  n = len(arrays["label"])
  out = None
  with Progress(n, desc, "row", enabled=is_primary()) as bar:
    for batch in pipeline.iterate_batches(arrays, batch_size, sort_by_length=True,
                                          length_multiple=length_multiple):
      index = batch.pop("index")
      logits = np.asarray(jax.device_get(predict_fn(params, runtime.to_global(batch, mesh))))
      if out is None:
        out = np.zeros((n, logits.shape[-1]), np.float32)
      valid = index >= 0
      out[index[valid]] = logits[valid]
      bar.update(int(valid.sum()))
  return out


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis: float32[n, C] logits -> float32[n, C] probabilities."""
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def scores(logits: np.ndarray, labels: np.ndarray, label_map: Mapping[str, int]) -> dict:
  """Accuracy, micro-F1 (the no-relation class excluded, found by name) and macro-F1 of the argmax
  of `logits` (float32[n, C]) against `labels` (int[n]); see
  `eval.metrics.classification_metrics`."""
  return metrics_lib.classification_metrics(logits.argmax(-1), labels, len(label_map),
                                            metrics_lib.find_no_relation_id(label_map))


def inverse_ids(meta: Mapping[str, Any]) -> dict[int, int]:
  """Relation id -> its inverse's id from a prepared `meta.json` (`inverses.map`; {} for data
  prepared without it)."""
  label_map = meta["label_map"]
  pairs = (meta.get("inverses") or {}).get("map") or {}
  return {int(label_map[r]): int(label_map[v]) for r, v in pairs.items()}


def direction(predict_fn, params, logits: np.ndarray, arrays: Mapping[str, np.ndarray],
              swap_arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], batch_size: int,
              mesh, length_multiple: int, desc: str = "swapped") -> dict:
  """`eval.metrics.direction_metrics` of a split whose logits are `logits` (float32[n, C]), its
  `<split>_swap` rows scored here; relation names as keys."""
  swap_logits = predict(predict_fn, params, swap_arrays, batch_size, mesh, length_multiple,
                        desc=desc)
  names = sorted(meta["label_map"], key=meta["label_map"].get)
  return metrics_lib.direction_metrics(logits.argmax(-1), arrays["label"], swap_logits.argmax(-1),
                                       swap_arrays["label"], inverse_ids(meta), names)


def evaluate(predict_fn, params, arrays, label_map, batch_size, mesh, length_multiple,
             desc: str = "evaluate") -> dict:
  """`scores` of the predictions on `arrays`."""
  logits = predict(predict_fn, params, arrays, batch_size, mesh, length_multiple, desc=desc)
  return scores(logits, arrays["label"], label_map)
