"""Shared test helpers: a tiny HF-format encoder directory with the MiniLM tokenizer, and a tiny
FewRel-format data folder cut from the real val_wiki file."""

from __future__ import annotations

import json
import pathlib
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> pathlib.Path:
  import pytest
  try:
    from tkre_jax.model.hf_import import default_model_dir
    return default_model_dir()
  except Exception as e:  # package missing
    pytest.skip(f"all-MiniLM-L6-v2 not installed: {e}")


def make_tiny_hf_dir(path: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
  """A 2-layer, hidden-32 BERT with random weights and the real MiniLM tokenizer (vocab 30522)."""
  from flax import nnx
  from tkre_jax.model.encoder import Encoder, EncoderConfig
  from tkre_jax.model.hf_import import export_hf
  src = minilm_dir()
  cfg = EncoderConfig.tiny(vocab_size=30522, max_position_embeddings=512, pad_token_id=0, **overrides)
  export_hf(cfg, Encoder(cfg, rngs=nnx.Rngs(seed)), path)
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copy(src / name, path / name)
  return path


def make_tiny_fewrel(shared_data: pathlib.Path, path: pathlib.Path, relations: int = 4,
                     per_relation: int = 12, train: int = 4, dev: int = 4) -> pathlib.Path:
  """A FewRel-format folder: the first `per_relation` instances of the first `relations` relations
  of val_wiki, a split file (train_pool [0, train), dev [train, train+dev), test the rest), and
  pid2name.json."""
  src = json.load(open(shared_data / "fewrel" / "val_wiki.json"))
  rels = list(src)[:relations]
  (path / "fewrel").mkdir(parents=True, exist_ok=True)
  json.dump({r: src[r][:per_relation] for r in rels}, open(path / "fewrel" / "val_wiki.json", "w"))
  json.dump({"train_pool": [0, train], "dev": [train, train + dev], "test": [train + dev, per_relation]},
            open(path / "fewrel" / "val_wiki_split.json", "w"))
  pid = json.load(open(shared_data / "fewrel" / "pid2name.json"))
  json.dump({r: pid[r] for r in rels}, open(path / "fewrel" / "pid2name.json", "w"))
  return path


def load_script(relative_path: str):
  """Imports a repository script that is not a package module (e.g. `benchmarks/cpu_ceiling.py`),
  registered in `sys.modules` under its file stem (dataclasses look their module up there)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tkre_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = config_lib.REPO_ROOT / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module
  spec.loader.exec_module(module)
  return module
