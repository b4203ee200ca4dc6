"""Model loading, in one place for every stage (and bench, predict, episodes): the prepared data a
stage reads, the encoder config and tokenizer, and the starting weights.

Start order of a training stage (the trainer handles the first): its own workdir checkpoint ->
`--init_from` (a previous stage's workdir: its `best/` parameters, checked against its `run.json`)
-> the HF checkpoint of `config.model.hf_dir` (default all-MiniLM-L6-v2).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from tkre_jax.data import dataset
from tkre_jax.model import heads, hf_import, hub
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import runtime, workdir as workdir_lib

log = logging.getLogger(__name__)


def prepared(config: ml_collections.ConfigDict) -> tuple[pathlib.Path, dict]:
  """`(prepared_dir, meta)` of `config.data.prepared_dir`.

  Raises:
    ValueError: the field is empty.
    FileNotFoundError: no prepared dataset there.
  """
  if not config.data.prepared_dir:
    raise ValueError("set --config.data.prepared_dir to the workdir of a `--stage=prepare` run")
  d = pathlib.Path(config.data.prepared_dir)
  return d, dataset.read_meta(d)


def data_tokenizer(meta: Mapping[str, Any], config: ml_collections.ConfigDict):
  """The tokenizer the prepared data was tokenized with (its `tokenizer_dir`, else the model's)."""
  return hub.load_tokenizer(pathlib.Path(meta.get("tokenizer_dir") or
                                         hub.model_dir(config.model.hf_dir)))


def encoder_config(config: ml_collections.ConfigDict,
                   meta: Optional[Mapping[str, Any]] = None) -> EncoderConfig:
  """The encoder config of `config.model.hf_dir` with compute dtype `config.model.dtype`.

  Raises:
    ValueError: the prepared data's tokenizer (`meta`) has more tokens than the encoder has
      embeddings.
  """
  cfg = hub.encoder_config(hub.model_dir(config.model.hf_dir), config.model.dtype)
  cfg = cfg.replace(attention_impl=config.model.attention_impl)
  if meta and meta.get("vocab_size", 0) > cfg.vocab_size:
    raise ValueError(f"the tokenizer of the prepared data ({meta.get('tokenizer_dir')}) has "
                     f"{meta['vocab_size']} tokens but the encoder of "
                     f"{hub.model_dir(config.model.hf_dir)} only {cfg.vocab_size} embeddings; "
                     "prepare the data with the same --config.model.hf_dir")
  return cfg


def _shapes_match(params, name: str, values: Mapping) -> bool:
  try:
    ours = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(params[name]))
  except (KeyError, AttributeError):
    return False
  theirs = jax.tree.map(lambda x: tuple(np.shape(x)), dict(values))
  norm = lambda t: {str(k): norm(v) if isinstance(v, dict) else v for k, v in t.items()}  # noqa: E731
  return norm(ours) == norm(theirs)


def init_weights(config: ml_collections.ConfigDict, model: runtime.ShardedModel, init_from: str,
                 run_info: Mapping[str, Any], *,
                 optional: Sequence[str] = ("mlm_head", "projection", "anchors")) -> tuple[str, list]:
  """Loads the starting weights of a fresh run into `model.params`, in place.

  With `init_from` (a previous stage's workdir): its `encoder` (required) and each `optional`
  sub-tree this model has with the same shapes. Its `run.json` must describe the same encoder shape
  and tokenizer as `run_info` (this run's `workdir.describe`). Otherwise the HF checkpoint of
  `config.model.hf_dir`: the encoder and, when the checkpoint has one and the model takes it, the
  MLM head.

  Returns:
    `(source description, names of the sub-trees loaded)`.

  Raises:
    FileNotFoundError: no checkpoint in `init_from`.
    workdir.MismatchError: `init_from` was trained with another encoder shape or tokenizer.
    KeyError: its checkpoint has no `encoder`.
  """
  if init_from:
    src = pathlib.Path(init_from)
    if (src / workdir_lib.RUN_FILE).is_file():
      workdir_lib.check_compatible(run_info, workdir_lib.read(src), f"--init_from={src}",
                                   what="--init_from", labels=False)
    tree, where = ckpt_lib.restore_param_tree(src)
    if "encoder" not in tree:
      raise KeyError(f"{where}: the checkpoint has no 'encoder' parameters (keys: {sorted(tree)})")
    loaded = []
    for name in ("encoder", *optional):
      if name in tree and name in model.params and _shapes_match(model.params, name, tree[name]):
        runtime.put_subtree(model.params, (name,), tree[name], model.shardings)
        loaded.append(name)
      elif name == "encoder":
        raise workdir_lib.MismatchError(f"--init_from={src}: its encoder ({where}) does not match "
                                        "this model's encoder (different config.model.hf_dir?)")
    return f"stage checkpoint {where}", loaded
  mdir = hub.model_dir(config.model.hf_dir)
  _, encoder, mlm = hf_import.load_hf_encoder(mdir, dtype=config.model.dtype)
  runtime.put_subtree(model.params, ("encoder",), nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
                      model.shardings)
  loaded = ["encoder"]
  if mlm and "mlm_head" in model.params:
    cfg = encoder.config
    head = heads.MLMHead(cfg.hidden_size, cfg.vocab_size, layer_norm_eps=cfg.layer_norm_eps,
                         rngs=nnx.Rngs(0))
    hf_import.load_mlm_head(head, mlm, source=str(mdir))
    runtime.put_subtree(model.params, ("mlm_head",), nnx.to_pure_dict(nnx.state(head, nnx.Param)),
                        model.shardings)
    loaded.append("mlm_head")
  return f"HF checkpoint {mdir}", loaded


def start_has_mlm_head(config: ml_collections.ConfigDict, init_from: str) -> bool:
  """Whether the starting weights of a fresh pre-training run (`--init_from`, else the HF
  checkpoint of `config.model.hf_dir`) include an MLM head.

  Raises:
    FileNotFoundError: no checkpoint in `init_from`.
  """
  if init_from:
    tree, _ = ckpt_lib.restore_param_tree(pathlib.Path(init_from))
    return "mlm_head" in tree
  return hf_import.has_mlm_head(hub.model_dir(config.model.hf_dir))


def head_warmup_skip_reason(config: ml_collections.ConfigDict, stage: str, workdir: pathlib.Path,
                            init_from: str) -> str:
  """Why a pre-training stage's MLM-head warm-up (heads trained alone, encoders frozen) does not
  run, or "" when it runs. Shared by `mslm` and `sacon`.

  Args:
    config: the run's config: `config.<stage>.head_warmup_steps`, and `model.hf_dir` when
      `init_from` is empty.
    stage: the config section that holds `head_warmup_steps` (`mslm`, `sacon`).
    workdir: the stage's workdir: a resume checkpoint there means the warm-up already ran.
    init_from: `--init_from`: starting weights that already have an MLM head need no warm-up.

  Raises:
    FileNotFoundError: no checkpoint in `init_from`.
  """
  if int(config[stage].head_warmup_steps) <= 0:
    return f"off (config.{stage}.head_warmup_steps=0)"
  if ckpt_lib.has_resume_checkpoint(workdir):
    return "resumed: the warm-up (if any) ran before this run's first checkpoint"
  if start_has_mlm_head(config, init_from):
    return "the starting weights have an MLM head"
  return ""


def put_warm_params(model: runtime.ShardedModel, warm_params: Mapping[str, Any],
                    weights_from: str, steps: int, warmup_dir: pathlib.Path) -> tuple[str, list]:
  """Writes a finished head warm-up's parameters (`{sub-tree name: pure dict}`: the encoders as
  loaded, the warmed-up heads) into `model` with its shardings; an `init_weights` for the trainer.

  Returns:
    `(source description, sorted sub-tree names)`, as `init_weights` returns.
  """
  for name in warm_params:
    runtime.put_subtree(model.params, (name,), warm_params[name], model.shardings)
  heads_ = "MLM heads" if sum(n.endswith("mlm_head") for n in warm_params) > 1 else "MLM head"
  return (f"{weights_from}, {heads_} warmed up for {steps} steps ({warmup_dir})",
          sorted(warm_params))


def restore_encoder(workdir: pathlib.Path) -> dict:
  """The `encoder` sub-tree of the parameters saved in a stage workdir (a pure dict of arrays).

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    KeyError: the checkpoint holds no `encoder` parameters.
  """
  tree, where = ckpt_lib.restore_param_tree(workdir)
  if "encoder" not in tree:
    raise KeyError(f"{where}: the checkpoint has no 'encoder' parameters (keys: {sorted(tree)})")
  return tree["encoder"]
