"""Relation prediction with a trained model: `RelationExtractor`, restored from a finetune workdir.

    from tkre_jax.infer.extractor import RelationExtractor
    rex = RelationExtractor.from_workdir("runs/fewrel/finetune")
    rex.predict([{"text": "Bill Gates founded Microsoft.", "subject": "Microsoft",
                  "object": "Bill Gates"}], top_k=3)
    # [{"relation": "P112", "probability": 0.93, "top_k": [{"relation": "P112", ...}, ...]}]

Everything comes from the workdir (`train.workdir`): the encoder shape from `run.json`, the label
map, the featurizer settings (max length, typed markers) the prepared data was made with, the
tokenizer from `tokenizer/`, the selected parameters from `best/`. Records go through the same
`data.features.Featurizer` (markers, truncation) and the same compiled predict step and batching
(`tasks.classifier.predict`) as `--stage=eval`, so an instance gets the prediction eval gave it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from flax import nnx

from tkre_jax.data import dataset
from tkre_jax.data import features as features_lib
from tkre_jax.data import templates as templates_lib
from tkre_jax.data.predict_input import InputItem, record_item
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.eval import metrics as metrics_lib
from tkre_jax.model import hf_import, hub
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.parallel import mesh as mesh_lib
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)
PREDICATE_ENCODER_DIR = "predicate_encoder"  # an export's predicate encoder (HF layout)

Record = Union[Mapping[str, Any], RelationInstance]


@dataclasses.dataclass
class RestoredClassifier:
  """The selected classifier of a finetune workdir, on a mesh.

  Attributes:
    info: the workdir's `run.json`.
    enc_config: the encoder config it was trained with.
    model: graph, abstract parameters and shardings (`runtime.ShardedModel`).
    params: the `best/` parameters, laid out with `model.shardings`.
    best_meta: the `best/` checkpoint's meta (step, epoch, dev scores).
  """
  info: dict
  enc_config: EncoderConfig
  model: runtime.ShardedModel
  params: Any
  best_meta: dict


def restore_classifier(workdir: pathlib.Path, mesh, rules_name: Optional[str] = None
                       ) -> RestoredClassifier:
  """Restores the `best/` classifier of a finetune workdir from its own files.

  Raises:
    FileNotFoundError: no `run.json` or no `best/` checkpoint.
    ValueError: the workdir is not a finetune stage's.
  """
  workdir = pathlib.Path(workdir)
  info = workdir_lib.read(workdir)
  if info.get("stage") != "finetune":
    raise ValueError(f"{workdir} is the workdir of a {info.get('stage')!r} stage; a finetune "
                     "workdir holds the relation classifier")
  config = info["config"]
  rules = sharding_lib.RULES[rules_name or config["mesh"]["rules"]]
  enc_cfg = workdir_lib.encoder_config(info)
  abstract = runtime.create_abstract(
      classifier_lib.classifier_builder(enc_cfg, len(info["label_map"]), config["model"]["dropout"],
                                        config["seed"], classifier_lib.predicate_from_run(info)),
      mesh, rules)
  ckpts = ckpt_lib.StageCheckpoints(workdir, read_only=True)
  try:
    params, best_meta = ckpts.restore_best(
        runtime.abstract_with_shardings(abstract.params, abstract.shardings))
  finally:
    ckpts.close()
  return RestoredClassifier(info, enc_cfg, abstract, params, best_meta)


def restore_export(hf_dir: pathlib.Path, mesh, rules_name: str = "dp"
                   ) -> tuple[RestoredClassifier, features_lib.FeatureConfig]:
  """Restores the classifier from an export folder (`--stage=export`: HF encoder files +
  `relation_head.*`); the `info` it returns is a minimal `run.json` (label map, batch settings).

  Raises:
    FileNotFoundError / ValueError: a missing or malformed file (see `hf_import`).
  """
  hf_dir = pathlib.Path(hf_dir)
  meta, head = hf_import.load_relation_head(hf_dir)
  enc_cfg, encoder, _ = hf_import.load_hf_encoder(hf_dir)
  label_map = {k: int(v) for k, v in meta["label_map"].items()}
  head_meta = meta.get("head") or {}
  predicate = None
  if head_meta.get("type") == "predicate":
    predicate = classifier_lib.predicate_options(
        head_meta["model"], templates_lib.TemplateTable.from_json(head_meta["templates"]))
  model = runtime.create_sharded(
      classifier_lib.classifier_builder(enc_cfg, len(label_map), 0.0, 0, predicate), mesh,
      sharding_lib.RULES[rules_name])
  runtime.put_subtree(model.params, ("encoder",), nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
                      model.shardings)
  predicate_head = head.pop("predicate_head", None)
  runtime.put_subtree(model.params, ("classifier",), head, model.shardings)
  if predicate:
    if predicate_head is None:
      raise ValueError(f"{hf_dir}: relation_head.json names a predicate head but "
                       f"{hf_import.RELATION_HEAD_WEIGHTS} has no predicate_head.* tensors")
    runtime.put_subtree(model.params, ("predicate_head",), predicate_head, model.shardings)
    if not predicate["shared_encoder"]:
      _, pred_encoder, _ = hf_import.load_hf_encoder(hf_dir / PREDICATE_ENCODER_DIR)
      runtime.put_subtree(model.params, ("predicate_encoder",),
                          nnx.to_pure_dict(nnx.state(pred_encoder, nnx.Param)), model.shardings)
  info = {"stage": "finetune", "label_map": label_map, "encoder": enc_cfg.to_hf_config(),
          "config": {"train": {"eval_batch_size": 64, "length_multiple": 32}},
          "features": {k: meta[k] for k in ("max_seq_len", "typed_markers")},
          "relation_names": dict(meta.get("relation_names") or {})}
  fcfg = features_lib.FeatureConfig(max_seq_len=int(meta["max_seq_len"]),
                                    typed_markers=bool(meta["typed_markers"]))
  return RestoredClassifier(info, enc_cfg, model, model.params,
                            {"step": meta.get("selected_step")}), fcfg


def feature_config(info: Mapping[str, Any]) -> features_lib.FeatureConfig:
  """The featurizer settings a finetune workdir's training data was prepared with: `run.json`'s
  `features` (written by finetune), else the prepared data's `meta.json`, else the config."""
  feats = info.get("features")
  if not feats and info.get("prepared_dir"):
    try:
      meta = dataset.read_meta(pathlib.Path(info["prepared_dir"]))
      feats = {"max_seq_len": meta["max_seq_len"], "typed_markers": meta["typed_markers"]}
    except (FileNotFoundError, ValueError, KeyError):
      feats = None
  if not feats:
    feats = {k: info["config"]["data"][k] for k in ("max_seq_len", "typed_markers")}
  return features_lib.FeatureConfig(max_seq_len=int(feats["max_seq_len"]),
                                    typed_markers=bool(feats["typed_markers"]))


def _round_up(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's batch shards (data x fsdp)."""
  shards = int(np.prod([mesh.shape[a] for a in sharding_lib.batch_sharding(mesh).spec[0]]))
  return -(-batch_size // shards) * shards


class RelationExtractor:
  """Predicts relations with the selected classifier of a finetune workdir; build it with
  `from_workdir`.

  Attributes:
    label_map: relation -> class id; `labels` the names by id.
    relation_names: relation id -> its schema name (e.g. "P26" -> "spouse"), for the relations
      the training data's schema named ({} without one).
    no_relation: the no-relation label (found by name), or None.
    feature_config: max length and marker format of the featurizer.
  """

  def __init__(self, restored: RestoredClassifier, tokenizer, mesh, *, batch_size: int,
               length_multiple: int, feature_config: features_lib.FeatureConfig):
    self.restored = restored
    self.info = restored.info
    self.label_map = dict(restored.info["label_map"])
    self.labels = sorted(self.label_map, key=self.label_map.get)
    self.relation_names = dict(restored.info.get("relation_names") or {})
    no_rel = metrics_lib.find_no_relation_id(self.label_map)
    self.no_relation = None if no_rel is None else self.labels[no_rel]
    self.feature_config = feature_config
    self.featurizer = features_lib.Featurizer(tokenizer, self.label_map, feature_config)
    self.mesh = mesh
    self.batch_size, self.length_multiple = batch_size, length_multiple
    self._step = classifier_lib.compiled_predict_step(restored.model, mesh)

  @classmethod
  def from_workdir(cls, workdir: Union[str, pathlib.Path], *, mesh=None,
                   batch_size: Optional[int] = None) -> "RelationExtractor":
    """Restores the classifier of a finetune workdir (no config needed).

    Args:
      workdir: the finetune workdir (`run.json`, `tokenizer/`, `best/`).
      mesh: the device mesh; default all devices on the `data` axis.
      batch_size: rows per device call; default the run's `eval_batch_size`, rounded up to a
        multiple of the mesh's batch shards.

    Raises:
      FileNotFoundError: a file of the workdir is missing. ValueError: not a finetune workdir.
      workdir.MismatchError: the saved tokenizer is not the one the model was trained with.
    """
    workdir = pathlib.Path(workdir)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("data:-1")
    restored = restore_classifier(workdir, mesh)
    tokenizer = workdir_lib.load_tokenizer(workdir)
    workdir_lib.check_compatible({"tokenizer_sha256": workdir_lib.tokenizer_fingerprint(tokenizer)},
                                 restored.info, f"the model in {workdir}",
                                 what="predict", ours_name=f"{workdir / workdir_lib.TOKENIZER_DIR}")
    tc = restored.info["config"]["train"]
    return cls(restored, tokenizer, mesh,
               batch_size=_round_up(int(batch_size or tc["eval_batch_size"]), mesh),
               length_multiple=int(tc["length_multiple"]), feature_config=feature_config(
                   restored.info))

  @classmethod
  def from_export(cls, hf_dir: Union[str, pathlib.Path], *, mesh=None,
                  batch_size: int = 64) -> "RelationExtractor":
    """Restores the classifier from a `--stage=export` folder (see `restore_export`)."""
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("data:-1")
    restored, fcfg = restore_export(pathlib.Path(hf_dir), mesh)
    return cls(restored, hub.load_tokenizer(pathlib.Path(hf_dir)), mesh,
               batch_size=_round_up(batch_size, mesh), length_multiple=32, feature_config=fcfg)

  # ------------------------------------------------------------------------------ predicting
  def featurize(self, instances: Sequence[RelationInstance]
                ) -> tuple[dict[str, np.ndarray], list[Optional[str]]]:
    """Model inputs of `instances` (`Featurizer`, unknown relations allowed) and, per instance,
    the featurizer's error (e.g. entities too far apart for `max_seq_len`) or None; rows of
    instances with an error are left as padding."""
    errors: list[Optional[str]] = [None] * len(instances)
    try:
      return self.featurizer(instances, allow_unknown_labels=True), errors
    except DataError:
      pass  # find the bad ones, one by one
    n, L = len(instances), self.feature_config.max_seq_len
    out = {k: np.zeros((n, L) if k in dataset.TOKEN_KEYS else (n,), np.int32)
           for k in features_lib.FEATURE_KEYS}
    out["attention_mask"][:, 0] = 1
    for i, inst in enumerate(instances):
      try:
        row = self.featurizer([inst], allow_unknown_labels=True)
      except DataError as e:
        errors[i] = str(e)
        continue
      for k in out:
        out[k][i] = row[k][0]
    return out, errors

  def logits(self, arrays: Mapping[str, np.ndarray], desc: str = "predict") -> np.ndarray:
    """float32[n, num_labels] logits of featurized rows (batched on the mesh)."""
    return classifier_lib.predict(self._step, self.restored.params, arrays, self.batch_size,
                                self.mesh, self.length_multiple, desc=desc)

  def predict(self, records: Sequence[Record], *, top_k: int = 3,
              threshold: Optional[float] = None) -> list[dict]:
    """Predicts the relation of each record.

    Args:
      records: prediction records (`{"text", "subject", "object"}`, see
        `tkre_jax.data.predict_input`) or `RelationInstance`s.
      top_k: how many relations to list with their probabilities.
      threshold: with a no-relation class: a record whose best probability is below it gets the
        no-relation label (its probability is then the no-relation class's).

    Returns:
      one dict per record, in order: `relation`, `probability` (softmax), `top_k` (list of
      `{"relation", "probability"}`, best first), plus `id` / `gold` when the record has them, and
      `relation_name` (and `name` in each `top_k` entry) when the schema names the relation; or
      `{"error": reason}` (with `id`) for a record that cannot be predicted. A gold relation that
      is not in the label map (the model cannot predict it) is logged as a warning with its
      count; such records are marked `"gold_in_label_map": false`.

    Raises:
      ValueError: a threshold without a no-relation class in the label map, or top_k < 1.
    """
    items = [InputItem(i, None, r.source or None, r, gold=r.relation or None)
             if isinstance(r, RelationInstance) else record_item(r, i, source=f"record {i}")
             for i, r in enumerate(records)]
    return self.predict_items(items, top_k=top_k, threshold=threshold)

  def predict_items(self, items: Sequence[InputItem], *, top_k: int = 3,
                    threshold: Optional[float] = None) -> list[dict]:
    """`predict` for `InputItem`s (`data.predict_input.read_input`); see `predict`."""
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}")
    if threshold is not None and self.no_relation is None:
      raise ValueError(f"a no-relation threshold needs a no-relation class in the label map "
                       f"({len(self.labels)} labels, none named no_relation / NA / Other)")
    good = [i for i, it in enumerate(items) if it.instance is not None]
    arrays, feat_errors = self.featurize([items[i].instance for i in good])
    ok = [j for j, e in enumerate(feat_errors) if e is None]
    errors = {good[j]: e for j, e in enumerate(feat_errors) if e is not None}
    probs = np.zeros((0, len(self.labels)), np.float32)
    if ok:
      rows = {k: v[ok] for k, v in arrays.items()}
      probs = classifier_lib.probabilities(self.logits(rows))
    prob_of = {good[j]: probs[r] for r, j in enumerate(ok)}
    out = []
    for i, it in enumerate(items):
      entry: dict[str, Any] = {} if it.id is None else {"id": it.id}
      if it.line is not None:
        entry["line"] = it.line
      if i not in prob_of:
        entry["error"] = it.error or errors.get(i) or "not predicted"
        out.append(entry)
        continue
      p = prob_of[i]
      order = np.argsort(-p, kind="stable")
      best = int(order[0])
      if threshold is not None and p[best] < threshold:
        best = self.label_map[self.no_relation]
      entry.update(relation=self.labels[best], probability=float(p[best]),
                   top_k=[self._named({"relation": self.labels[c], "probability": float(p[c])},
                                      "name") for c in order[:top_k]])
      self._named(entry, "relation_name")
      if it.gold is not None:
        entry["gold"] = it.gold
        if it.gold not in self.label_map:
          entry["gold_in_label_map"] = False
      out.append(entry)
    unknown = collections.Counter(r["gold"] for r in out if r.get("gold_in_label_map") is False)
    if unknown:
      log.warning("predict: %d record(s) have a gold relation that is not in the model's label map "
                  "(%d labels), so they cannot be predicted right: %s", sum(unknown.values()),
                  len(self.labels), ", ".join(f"{g!r} x{n}" for g, n in unknown.most_common(5))
                  + (", ..." if len(unknown) > 5 else ""))
    return out

  def _named(self, entry: dict, key: str) -> dict:
    """Adds the schema name of `entry["relation"]` under `key` when there is one."""
    name = self.relation_names.get(entry["relation"])
    if name:
      entry[key] = name
    return entry

