"""Self-describing stage workdirs: what a checkpoint was trained with, written next to it.

Every training stage writes, before its first step:

    <workdir>/run.json      {"format", "stage", "config" (the resolved config), "label_map",
                             "encoder" (HF-style config of the encoder), "tokenizer_sha256",
                             "prepared_dir", "init_from", and for finetune "features": the
                             featurizer settings {"max_seq_len", "typed_markers"} of its data}
    <workdir>/tokenizer/    the tokenizer files (`save_pretrained` of the tokenizer used)

so that `eval` (and predict, episodes, bench) can rebuild the model from `--init_from` alone, and a
restore onto a different encoder shape, tokenizer or label map is refused with both sides named.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence

import ml_collections

from tkre_jax.model import hub
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.parallel.mesh import is_primary

RUN_FILE = "run.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "tkre_jax.run/1"
# The encoder fields that decide the parameter shapes (HF config.json names).
ENCODER_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "intermediate_size", "max_position_embeddings",
                      "type_vocab_size")


class MismatchError(ValueError):
  """A checkpoint does not fit the model, tokenizer or labels it is restored onto."""


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 of the tokenizer's vocabulary (token -> id pairs, sorted): equal fingerprints mean the
  same token ids for the same text pieces."""
  items = sorted(tokenizer.get_vocab().items())
  return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def describe(stage: str, config: ml_collections.ConfigDict, *, label_map: Mapping[str, int],
             enc_config: EncoderConfig, tokenizer, prepared_dir: str, init_from: str = "",
             features: Optional[Mapping[str, Any]] = None,
             pretrain_relations: Sequence[str] = (),
             eval_relations: Optional[Sequence[str]] = None) -> dict:
  """The `run.json` dict of a training stage (`features`: the featurizer settings of the prepared
  data, which predict needs to featurize new text as the training data was).

  Relation bookkeeping for few-shot honesty: `pretrain_relations` lists the relations whose labels
  trained this run's weights before the task (sacon, episodic), together with those recorded by
  `init_from`'s `run.json` (inherited along a chain sacon -> mslm -> scl -> finetune);
  `eval_relations` lists the relations the run is evaluated on (default: the label map's).
  `check_compatible` refuses weights pre-trained on relations a run is evaluated on.
  """
  inherited: list = []
  if init_from and (pathlib.Path(init_from) / RUN_FILE).is_file():
    inherited = read(pathlib.Path(init_from)).get("pretrain_relations", [])
  info = {
      "format": FORMAT,
      "stage": stage,
      "config": json.loads(config.to_json()),
      "label_map": dict(label_map),
      "encoder": enc_config.to_hf_config(),
      "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
      "prepared_dir": str(pathlib.Path(prepared_dir).resolve()) if prepared_dir else "",
      "init_from": str(pathlib.Path(init_from).resolve()) if init_from else "",
  }
  if features is not None:
    info["features"] = dict(features)
  info["pretrain_relations"] = sorted(set(inherited) | set(pretrain_relations))
  info["eval_relations"] = sorted(eval_relations if eval_relations is not None else label_map)
  return info


def write(workdir: pathlib.Path, info: Mapping[str, Any], tokenizer) -> None:
  """Writes `run.json` and `tokenizer/` into `workdir` atomically (process 0 only).

  A workdir that already describes a run (a resume) must describe the same model: same stage,
  encoder shape, tokenizer and label map.

  Raises:
    MismatchError: the workdir holds a different run, naming what differs.
  """
  workdir = pathlib.Path(workdir)
  if (workdir / RUN_FILE).is_file():
    check_compatible(info, read(workdir), str(workdir), what=f"--workdir={workdir}",
                     ours_name="this run")
  if not is_primary():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / TOKENIZER_DIR / "tokenizer_config.json").is_file():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=workdir))
    try:
      tokenizer.save_pretrained(str(tmp))
      shutil.rmtree(workdir / TOKENIZER_DIR, ignore_errors=True)
      os.replace(tmp, workdir / TOKENIZER_DIR)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  tmp_file = workdir / (RUN_FILE + ".tmp")
  with open(tmp_file, "w") as f:
    json.dump(dict(info), f, indent=2, sort_keys=True)
  tmp_file.replace(workdir / RUN_FILE)


def read(workdir: pathlib.Path) -> dict:
  """The `run.json` of a stage workdir.

  Raises:
    FileNotFoundError: no `run.json` (not a training stage's workdir, or one written before
      workdirs described themselves: pass the config flags it was trained with).
  """
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir of a training stage "
                            "(mslm, scl, finetune) of this version")
  with open(path) as f:
    return json.load(f)


def load_tokenizer(workdir: pathlib.Path):
  """The tokenizer saved in a stage workdir."""
  return hub.load_tokenizer(pathlib.Path(workdir) / TOKENIZER_DIR)


def encoder_config(info: Mapping[str, Any], dtype: Optional[str] = None) -> EncoderConfig:
  """The `EncoderConfig` recorded in a `run.json` dict (compute `dtype` from its config unless
  given)."""
  cfg = EncoderConfig.from_hf_config(info["encoder"])
  return cfg.replace(dtype=dtype or info["config"]["model"]["dtype"])


def _shape(encoder: Mapping[str, Any]) -> dict:
  return {k: encoder.get(k) for k in ENCODER_SHAPE_KEYS}


def _labels(label_map: Mapping[str, int], limit: int = 6) -> str:
  names = sorted(label_map, key=label_map.get)
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return "[" + ", ".join(names[:limit]) + more + "]"


def check_compatible(ours: Mapping[str, Any], theirs: Mapping[str, Any], theirs_name: str, *,
                     what: str, ours_name: str = "this run", labels: bool = True) -> None:
  """Checks that a checkpoint described by `theirs` fits the model described by `ours` (both
  `run.json`-style dicts; missing keys are not compared).

  Args:
    labels: compare the label maps too (off when only the encoder is taken, e.g. finetune from an
      SCL workdir, whose classifier is new).

  Raises:
    MismatchError: naming both sides and the first difference (encoder shape, tokenizer, labels).
  """
  if "encoder" in ours and "encoder" in theirs:
    a, b = _shape(ours["encoder"]), _shape(theirs["encoder"])
    if a != b:
      diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in ENCODER_SHAPE_KEYS if a[k] != b[k])
      raise MismatchError(f"{what}: the encoder of {theirs_name} does not match {ours_name}'s "
                          f"({ours_name} vs {theirs_name}: {diff}); use the same "
                          "--config.model.hf_dir as the run that wrote it")
  ta, tb = ours.get("tokenizer_sha256"), theirs.get("tokenizer_sha256")
  if ta and tb and ta != tb:
    raise MismatchError(f"{what}: {theirs_name} was trained with another tokenizer than {ours_name} "
                        f"(vocabulary sha256 {tb[:12]} vs {ta[:12]}); prepare the data with the "
                        "same --config.model.hf_dir")
  shared = sorted(set(theirs.get("pretrain_relations", [])) & set(ours.get("eval_relations", [])))
  if shared:
    raise MismatchError(f"{what}: the weights of {theirs_name} were pre-trained on "
                        f"{len(shared)} relation(s) that {ours_name} is evaluated on: "
                        + ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else "")
                        + "; a few-shot result needs pre-training relations disjoint from the "
                        "evaluated ones")
  if labels and "label_map" in ours and "label_map" in theirs:
    la, lb = dict(ours["label_map"]), dict(theirs["label_map"])
    if la != lb:
      raise MismatchError(f"{what}: the label map of {theirs_name} {_labels(lb)} differs from "
                          f"{ours_name}'s {_labels(la)}")
