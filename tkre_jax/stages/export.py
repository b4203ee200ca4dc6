"""The export stage: a finetune workdir's classifier in Hugging Face's layout.

    python -m tkre_jax.main --stage=export --init_from=runs/fewrel/finetune --output=runs/fewrel/hf

writes into the output folder:

    config.json, model.safetensors    the encoder (`BertModel` / `RobertaModel` layout): loads with
                                      `transformers.AutoModel.from_pretrained(dir)`
    tokenizer files                   `AutoTokenizer.from_pretrained(dir)`; the entity markers
                                      (`@ * type * subject @`, `# ^ type ^ object #`) are ordinary
                                      punctuation tokens of the vocabulary, so none is added
    relation_head.safetensors         the classifier: hidden.weight [H, 2H], hidden.bias [H],
                                      output.weight [C, H], output.bias [C] (torch nn.Linear layout)
    relation_head.json                label map, id2label, the classifier formula, the marker format
                                      and max_seq_len (`tkre_jax.model.hf_import.export_relation_head`)
    predicate_encoder/                with `config.model.head=predicate` and its own predicate
                                      encoder: that encoder (HF layout); the predicate head's
                                      tensors are `predicate_head.*` in relation_head.safetensors,
                                      its templates and options `head` in relation_head.json

`RelationExtractor.from_export(dir)` restores the full classifier from these files;
`docs/export.md` has the PyTorch code. The folder is written beside the target and renamed into
place; an existing target is replaced only when it is an earlier export. Files and folder get the
modes a plain write would (0o644 / 0o755 under umask 022), like `save_pretrained`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx

from tkre_jax.data import features as features_lib
from tkre_jax.infer import extractor
from tkre_jax.llm.cache import publish_modes
from tkre_jax.model import hf_import
from tkre_jax.model.tasks import PredicateRelationModel
from tkre_jax.parallel.mesh import is_primary
from tkre_jax.train import runtime
from tkre_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)
PREDICATE_ENCODER_DIR = extractor.PREDICATE_ENCODER_DIR
PREDICATE_FIELDS = ("head", "predicate_head_form", "predicate_encoder", "predicate_alpha",
                    "predicate_temperature",
                    "predicate_train_relations", "predicate_template_pass",
                    "predicate_fusion_layers")


def marker_meta(fcfg: features_lib.FeatureConfig) -> dict:
  """What `relation_head.json` says about the input format (read back by `from_export`)."""
  return {
      "max_seq_len": fcfg.max_seq_len,
      "typed_markers": fcfg.typed_markers,
      "markers": {"subject": features_lib.SUBJ_MARKER, "subject_type": features_lib.SUBJ_TYPE_MARKER,
                  "object": features_lib.OBJ_MARKER, "object_type": features_lib.OBJ_TYPE_MARKER,
                  "example": "@ * person * Bill Gates @ founded # ^ organization ^ Microsoft #",
                  "untyped_example": "@ Bill Gates @ founded # Microsoft #",
                  "note": "words joined by single spaces; the type words are the entity type "
                          "lower-cased with '_' as a space; subject_start / object_start are "
                          "the first tokens of the opening '@' / '#'"},
  }


def run(stage, config, workdir: Optional[pathlib.Path], *, mesh, init_from: str = "",
        output_path: str = "", **_) -> dict:
  """Exports the `best/` classifier of `init_from` to `output_path`; returns the summary.

  Raises:
    ValueError: a missing flag. FileNotFoundError: the workdir's files are missing.
    FileExistsError: the output exists, is not empty and is not an earlier export.
  """
  del stage, config
  if not init_from or not output_path:
    raise ValueError("--stage=export needs --init_from=FINETUNE_WORKDIR and --output=HF_DIR")
  t0 = time.time()
  out = pathlib.Path(output_path)
  if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not
                                              (out / hf_import.RELATION_HEAD_META).is_file())):
    raise FileExistsError(f"--output={out} exists and is not an earlier export; choose a new or "
                          "empty folder")
  restored = extractor.restore_classifier(pathlib.Path(init_from), mesh)
  tokenizer = workdir_lib.load_tokenizer(pathlib.Path(init_from))
  model = restored.model.merge(restored.params)
  label_map = restored.info["label_map"]
  meta = {**marker_meta(extractor.feature_config(restored.info)),
          "source": str(pathlib.Path(init_from).resolve()),
          "selected_step": restored.best_meta.get("step"),
          "relation_names": dict(restored.info.get("relation_names") or {})}
  if is_primary():
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
      hf_import.export_hf(restored.enc_config, model.encoder, tmp, tokenizer=tokenizer)
      predicate_head = None
      if isinstance(model, PredicateRelationModel):
        model_config = restored.info["config"]["model"]
        meta["head"] = {"type": "predicate", "templates": restored.info["templates"],
                        "model": {k: model_config[k] for k in PREDICATE_FIELDS if k in model_config}}
        predicate_head = jax.tree.map(np.asarray, nnx.to_pure_dict(
            nnx.state(model.predicate_head, nnx.Param)))
        if not model.shared_encoder:
          hf_import.export_hf(restored.enc_config, model.predicate_encoder,
                              tmp / PREDICATE_ENCODER_DIR)
      hf_import.export_relation_head(tmp, model.classifier, label_map, meta,
                                     predicate_head=predicate_head)
      publish_modes(tmp)  # mkdtemp's 0o700: readable like `save_pretrained`'s output
      old = None
      if out.exists():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
      os.replace(tmp, out)
      if old is not None:
        shutil.rmtree(old)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  summary = {"stage": "export", "init_from": str(init_from), "output": str(out),
             "num_labels": len(label_map), "files": sorted(p.name for p in out.iterdir()),
             "seconds": round(time.time() - t0, 1)}
  log.info("export: %s -> %s (%d labels)", init_from, out, len(label_map))
  if workdir:
    runtime.write_summary(workdir, summary)
  return summary
