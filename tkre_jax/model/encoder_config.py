"""`EncoderConfig`: the hyper-parameters of a BERT / RoBERTa encoder, and their HF `config.json` form.

Kept apart from the layers (`tkre_jax.model.encoder`) so that code which only reads or writes a
configuration (workdirs, exports, FLOP counts, config files) does not need the network. The dtype
names and the initializer scale live here because the config validates them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Union

import jax.numpy as jnp

from tkre_jax.model.attention import ATTENTION_IMPLS

MODEL_TYPES = ("bert", "roberta")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# HF initializer_range (BERT and RoBERTa both use 0.02).
INIT_STDDEV = 0.02


def resolve_dtype(name: str) -> jnp.dtype:
  """Maps a compute dtype name ("float32" | "bfloat16" | "float16") to a jnp dtype.

  Raises:
    ValueError: unknown name.
  """
  try:
    return jnp.dtype(_DTYPES[name])
  except KeyError:
    raise ValueError(f"unknown compute dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyper-parameters of a BERT / RoBERTa encoder (the fields of an HF `config.json`).

  Attributes:
    vocab_size: rows of the word-embedding matrix.
    hidden_size: model width H.
    num_layers: number of Transformer layers (HF `num_hidden_layers`).
    num_heads: attention heads (HF `num_attention_heads`); must divide `hidden_size`.
    intermediate_size: feed-forward width.
    max_position_embeddings: rows of the position-embedding matrix.
    type_vocab_size: rows of the token-type embedding matrix (>= 1; RoBERTa has 1).
    layer_norm_eps: LayerNorm epsilon.
    hidden_dropout: dropout on embeddings and on each sub-layer output (HF `hidden_dropout_prob`).
    attention_dropout: dropout on attention probabilities (HF `attention_probs_dropout_prob`).
    pad_token_id: id of the padding token.
    position_offset: 0 for BERT (position ids `0 .. seq_len-1`); `pad_token_id + 1` for RoBERTa, whose
      position ids start after the padding index (see `make_position_ids`).
    use_token_types: whether `token_type_ids` are accepted (False for RoBERTa, where token type 0 is
      always used).
    model_type: "bert" or "roberta".
    dtype: compute dtype name, "float32" | "bfloat16" | "float16".
    attention_impl: "auto" | "dot_product" | "explicit" (see `ATTENTION_IMPLS`); not part of the
      HF config: the same weights give the same outputs either way (tested to 1e-5 in float32).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  position_offset: int = 0
  use_token_types: bool = True
  model_type: str = "bert"
  dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"EncoderConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    for name in ("hidden_dropout", "attention_dropout"):
      rate = getattr(self, name)
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {rate}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"EncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
    expected_offset = self.pad_token_id + 1 if self.model_type == "roberta" else 0
    if self.position_offset != expected_offset:
      raise ValueError(f"position_offset must be {expected_offset} for model_type {self.model_type!r} "
                       f"(BERT: 0, RoBERTa: pad_token_id + 1), got {self.position_offset}")
    if self.position_offset >= self.max_position_embeddings:
      raise ValueError(f"position_offset {self.position_offset} leaves no room in "
                       f"max_position_embeddings {self.max_position_embeddings}")
    resolve_dtype(self.dtype)
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"EncoderConfig.attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head, `hidden_size // num_heads`."""
    return self.hidden_size // self.num_heads

  @property
  def max_seq_len(self) -> int:
    """Longest input the position embeddings allow: `max_position_embeddings - position_offset`."""
    return self.max_position_embeddings - self.position_offset

  def replace(self, **changes: Any) -> "EncoderConfig":
    """A copy with some fields changed (re-validated)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_config(cls, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]],
                     **overrides: Any) -> "EncoderConfig":
    """Reads an HF `config.json` (a checkpoint directory, the file itself, or the parsed dict).

    Args:
      path_or_dict: a directory holding `config.json`, a path to a JSON file, or a mapping.
      **overrides: EncoderConfig fields to set afterwards (e.g. `dtype="bfloat16"`, `hidden_dropout=0.`).

    Raises:
      FileNotFoundError: no config file.
      ValueError: unknown `model_type`, a missing required key, or an unsupported setting
        (`hidden_act` other than "gelu", `position_embedding_type` other than "absolute").
    """
    if isinstance(path_or_dict, Mapping):
      hf, source = dict(path_or_dict), "<config dict>"
    else:
      path = pathlib.Path(path_or_dict)
      if path.is_dir():
        path = path / "config.json"
      if not path.is_file():
        raise FileNotFoundError(f"HF config file not found: {path}")
      hf, source = json.loads(path.read_text()), str(path)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"{source}: unsupported model_type {model_type!r}; expected one of {MODEL_TYPES}")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"{source}: unsupported hidden_act {act!r}; only exact 'gelu' is implemented")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{source}: unsupported position_embedding_type {pos_type!r}; only 'absolute'")

    def get(key: str) -> Any:
      if key not in hf:
        raise ValueError(f"{source}: required key {key!r} is missing")
      return hf[key]

    pad = hf.get("pad_token_id")
    pad = (1 if model_type == "roberta" else 0) if pad is None else int(pad)
    fields = dict(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(get("num_attention_heads")),
        intermediate_size=int(get("intermediate_size")),
        max_position_embeddings=int(get("max_position_embeddings")),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=pad,
        position_offset=pad + 1 if model_type == "roberta" else 0,
        use_token_types=model_type != "roberta",
        model_type=model_type,
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """The HF `config.json` dict describing this encoder (inverse of `from_hf_config`)."""
    arch = "RobertaModel" if self.model_type == "roberta" else "BertModel"
    return {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "intermediate_size": self.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": self.hidden_dropout,
        "attention_probs_dropout_prob": self.attention_dropout,
        "max_position_embeddings": self.max_position_embeddings,
        "type_vocab_size": self.type_vocab_size,
        "layer_norm_eps": self.layer_norm_eps,
        "pad_token_id": self.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": INIT_STDDEV,
    }

  @classmethod
  def tiny(cls, **overrides: Any) -> "EncoderConfig":
    """A small config for tests: 2 layers, hidden 32, 4 heads, intermediate 64, vocab 128.

    `tiny(model_type="roberta")` also switches to the RoBERTa conventions (pad id 1, position offset 2,
    one token type, no token-type ids) unless those fields are overridden too.
    """
    fields: dict[str, Any] = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    if overrides.get("model_type") == "roberta":
      pad = overrides.get("pad_token_id", 1)
      fields.update(pad_token_id=pad, position_offset=pad + 1, type_vocab_size=1, use_token_types=False)
    fields.update(overrides)
    return cls(**fields)
