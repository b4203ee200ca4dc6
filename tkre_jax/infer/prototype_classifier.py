"""`PrototypeClassifier`: the Python API that classifies a user's query records against their own
support records by prototypes, with the marker-state encoder of any stage workdir (the episodic
protocol's classifier; encoder loading and batched embedding: `tkre_jax.tasks.prototypical`).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import ml_collections
import numpy as np

from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import features as features_lib
from tkre_jax.data.predict_input import record_instance
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.eval import prototypes as proto_lib
from tkre_jax.parallel import mesh as mesh_lib
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks.prototypical import (LoadedEncoder, compiled_embed_step, embed, feature_config,
                                         load_encoder, round_up)

Record = Union[Mapping[str, Any], RelationInstance]


class PrototypeClassifier:
  """Classifies query records against the user's own support records by prototypes, with no
  gradient step (the episodic protocol's classifier).

      from tkre_jax.infer.prototype_classifier import PrototypeClassifier
      clf = PrototypeClassifier.from_workdir("runs/episodes/tkre/episodic")   # or "" : raw encoder
      clf.classify({"founded": [{"text": "Bill Gates founded Microsoft.", "subject": "Bill Gates",
                                 "object": "Microsoft"}],
                    "born in": [{"text": "Ada was born in London.", "subject": "Ada",
                                 "object": "London"}]},
                   [{"text": "Jobs founded Apple.", "subject": "Jobs", "object": "Apple"}])
      # [{"relation": "founded", "score": -812.4, "scores": {"founded": -812.4, "born in": -990.1}}]

  Records are the predict stage's (`{"text", "subject", "object"}`, entities as a string that
  occurs once or a character span; see `tkre_jax.data.predict_input`) or `RelationInstance`s.
  """

  def __init__(self, loaded: LoadedEncoder, mesh, config: ml_collections.ConfigDict):
    self.loaded, self.mesh, self.config = loaded, mesh, config
    self._step = compiled_embed_step(loaded.model, mesh)
    self.batch_size = round_up(config.episodes.batch_size, mesh)

  @classmethod
  def from_workdir(cls, workdir: Union[str, pathlib.Path] = "", *, mesh=None,
                   config: Optional[ml_collections.ConfigDict] = None) -> "PrototypeClassifier":
    """The encoder of a stage workdir (`""`: the raw HF encoder of `config.model.hf_dir`).

    Args:
      workdir: an mslm, scl, finetune or episodic workdir, or "".
      mesh: default all devices on the `data` axis.
      config: default `base_config()` (episodes.metric, max_seq_len, batch size, ...).
    """
    from tkre_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config if config is not None else config_lib.base_config()
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("data:-1")
    loaded = load_encoder(config, str(workdir or ""), mesh,
                          sharding_lib.RULES[config.mesh.rules], stage="episodes")
    return cls(loaded, mesh, config)

  def embed(self, instances: Sequence[RelationInstance]) -> np.ndarray:
    """float32[n, 2H] marker representations of `instances`.

    Raises:
      DataError: an instance the featurizer cannot mark (named).
    """
    if not instances:
      return np.zeros((0, 2 * self.loaded.enc_config.hidden_size), np.float32)
    feat = features_lib.Featurizer(self.loaded.tokenizer, {},
                                   feature_config(self.config, instances))
    arrays = feat(instances, allow_unknown_labels=True)
    return embed(self._step, self.loaded.model.params, arrays, self.batch_size, self.mesh,
                 self.config.episodes.length_multiple)

  @staticmethod
  def _instances(records: Sequence[Record], where: str) -> list[RelationInstance]:
    out = []
    for i, r in enumerate(records):
      if isinstance(r, RelationInstance):
        out.append(r)
        continue
      try:
        out.append(record_instance(r, source=f"{where} record {i}"))
      except DataError as e:
        raise DataError(f"{where} record {i}: {e}") from None
    return out

  def classify(self, support: Mapping[str, Sequence[Record]], queries: Sequence[Record], *,
               descriptions: Optional[Mapping[str, str]] = None, metric: Optional[str] = None,
               prototype: Optional[str] = None, nota_threshold: Optional[float] = None
               ) -> list[dict]:
    """Prototype classification of `queries` among the relations of `support`.

    Args:
      support: relation -> its support records (K >= 0 each; 0 needs a description).
      queries: the records to classify.
      descriptions: relation -> "name: description" text, for description / mixed prototypes
        and relations without support records.
      metric: euclidean | dot (default `config.episodes.metric`).
      prototype: support | description | mixed (default `config.episodes.prototype`).
      nota_threshold: a query whose best score is below it gets `relation: None`.

    Returns:
      one dict per query: `relation` (or None: none of the above), `score` (its score) and
      `scores` (relation -> score).

    Raises:
      DataError: a bad record (naming the relation or query and its index), or a relation with
        neither support records nor a description.
      ValueError: an unknown metric or prototype mode.
    """
    metric = metric or self.config.episodes.metric
    mode = prototype or self.config.episodes.prototype
    relations = list(support)
    if not relations:
      raise DataError("classify needs at least one relation in `support`")
    sup = {r: self._instances(support[r], f"support of {r!r}") for r in relations}
    ks = {len(v) for v in sup.values()}
    desc = None
    if descriptions is not None or mode != "support" or 0 in ks:
      missing = [r for r in relations if r not in (descriptions or {})]
      if missing:
        raise DataError(f"no description for relation(s) {missing}: description prototypes and "
                        "relations without support records need one")
      desc_inst = [episodes_lib.description_instance(r, *(descriptions[r].split(":", 1) + [""])[:2])
                   for r in relations]
      desc = self.embed(desc_inst)
    q_inst = self._instances(queries, "query")
    q_emb = self.embed(q_inst)
    if len(ks) == 1 and 0 not in ks:  # same K everywhere: one vectorised prototype computation
      s_emb = self.embed([x for r in relations for x in sup[r]]).reshape(len(relations), ks.pop(), -1)
      protos = proto_lib.prototypes(s_emb, desc, mode=mode,
                                    description_weight=self.config.episodes.description_weight)
    else:
      protos = np.stack([proto_lib.prototypes(
          self.embed(sup[r])[None] if sup[r] else None,
          None if desc is None else desc[i][None], mode=mode,
          description_weight=self.config.episodes.description_weight)[0]
          for i, r in enumerate(relations)])
    score = proto_lib.scores(q_emb, protos, metric)
    pred = proto_lib.predict(score, nota_threshold)
    return [{"relation": relations[p] if p < len(relations) else None,
             "score": float(score[i].max()),
             "scores": {r: float(score[i, j]) for j, r in enumerate(relations)}}
            for i, p in enumerate(pred)]
