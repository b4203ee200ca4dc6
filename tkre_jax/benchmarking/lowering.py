"""Every program the stages compile, lowered for a platform this machine does not have, at each
mesh preset, and a per-device memory plan.

JAX lowers for any platform it knows (`jax.export.export(jax.jit(f), platforms=("tpu",))`, also
"cuda"), from abstract arguments: parameters, optimizer state and batch as `jax.ShapeDtypeStruct`s
whose `NamedSharding`s sit on a `jax.sharding.AbstractMesh` of the preset's shape. Nothing is
allocated and no device is needed, so a platform-only failure (an op without a lowering there, a
dtype it rejects, a sharding that does not fit the mesh, a host callback inside a step) shows here
before anyone pays for a device. What lowering does not check: the platform compiler's own passes
(XLA:TPU / XLA:GPU), memory at run time, and speed.

The programs (`PROGRAMS`) are built the way the stages build them: the train steps of mslm, scl,
finetune (linear and predicate head), sacon and episodic through `step.make_train_step` with the
stage's loss and `optim.adamw`, and the classifier's eval forward pass, with the shardings of
`parallel.sharding` (`state_shardings`, `batch_sharding`) under the config's rules.

`memory_plan` counts, per device, parameters, AdamW's two moments, gradients and activations
(analytic, no rematerialisation: the encoder keeps every layer's activations for the backward pass,
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1:
s b h (34 + 5 a s / h) bytes per layer at 16-bit) and the largest batch that fits a device's
memory (`DEVICE_MEMORY_GIB`, published HBM per chip).
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from tkre_jax import config as config_lib
from tkre_jax.data import templates as templates_lib
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.parallel import mesh as mesh_lib
from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.tasks import label_contrastive, mslm_scl, prototypical
from tkre_jax.train import optim, runtime
from tkre_jax.train.step import make_train_step

PROGRAMS = ("mslm", "scl", "finetune", "finetune_predicate", "sacon", "episodic", "eval")
PLATFORMS = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}  # preset platform -> jax.export's name
ACCELERATOR_PRESETS = ("gpu", "gpu-8", "tpu-v4-8", "tpu-v4-32", "tpu-v5e-8", "tpu-v5p-8",
                       "tpu-v6e-8")
DEVICES_IF_ANY = 8  # a preset that takes any number of devices (`gpu`) is lowered for this many
# HBM per device (GiB), as published: NVIDIA H100 SXM 80 GB (the `gpu` presets' card here); Cloud
# TPU system architecture pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB per chip.
DEVICE_MEMORY_GIB = {"gpu": 80.0, "gpu-8": 80.0, "tpu-v4-8": 32.0, "tpu-v4-32": 32.0,
                     "tpu-v5e-8": 16.0, "tpu-v5p-8": 95.0, "tpu-v6e-8": 32.0}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def abstract_mesh(preset_name: str) -> tuple[AbstractMesh, str]:
  """The `AbstractMesh` of a preset's shape and the platform to lower for ("tpu", "cuda")."""
  preset = mesh_lib.get_preset(preset_name)
  n = preset.num_devices or DEVICES_IF_ANY
  shape = preset.resolved_shape(n)
  names = tuple(shape)
  return AbstractMesh(tuple(shape[a] for a in names), names), PLATFORMS[preset.platform or "cpu"]


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a program is lowered at.

  Attributes:
    batch_size: global batch (sequences; sacon: relations x sentences; episodic: one episode,
      padded to the data-parallel size).
    seq_len: tokens per sequence.
    num_labels: relations (classifier classes, SCL anchors, sacon labels per batch).
  """
  batch_size: int = 64
  seq_len: int = 128
  num_labels: int = 16


def synthetic_templates(enc: EncoderConfig, num_labels: int, model_config,
                        seed: int = 0) -> templates_lib.TemplateTable:
  """A `TemplateTable` of `num_labels` relations shaped like FewRel's default templates: no text
  before the subject, a 3-token name between the entities, a 24-token description after, random
  token ids; `model_config.template_max_len` / `template_entity_len` (the bench stage's too)."""
  rng = np.random.default_rng(seed)
  pieces = tuple(((), tuple(int(t) for t in rng.integers(5, enc.vocab_size, 3)),
                  tuple(int(t) for t in rng.integers(5, enc.vocab_size, 24)))
                 for _ in range(num_labels))
  return templates_lib.TemplateTable(
      pieces, (True,) * num_labels, ("synthetic",) * num_labels, cls_id=1, sep_id=2, pad_id=0,
      subj_marker_id=3, obj_marker_id=4, max_len=int(model_config.template_max_len),
      entity_len=int(model_config.template_entity_len))


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def batch_specs(program: str, shapes: Shapes, sharding: NamedSharding,
                config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract batch a program's step reads (keys, shapes and dtypes as the stage feeds it)."""
  b, L = shapes.batch_size, shapes.seq_len
  i32, f32 = jnp.int32, jnp.float32
  rows = {"input_ids": (b, L), "attention_mask": (b, L), "span_ids": (b, L)}
  out = {k: _spec(s, i32, sharding) for k, s in rows.items()}
  out.update(subj_pos=_spec((b,), i32, sharding), obj_pos=_spec((b,), i32, sharding),
             label=_spec((b,), i32, sharding), weight=_spec((b,), f32, sharding))
  if program == "episodic":
    out["is_query"] = _spec((b,), i32, sharding)
  if program == "sacon":
    u, ll = int(config.sacon.relations_per_batch), int(config.sacon.label_max_len)
    out.update(label_input_ids=_spec((u, ll), i32, sharding),
               label_attention_mask=_spec((u, ll), i32, sharding),
               label_span_ids=_spec((u, ll), i32, sharding),
               label_weight=_spec((u,), f32, sharding))
  return out


def build_program(program: str, enc: EncoderConfig, shapes: Shapes,
                  config: ml_collections.ConfigDict):
  """`(build, loss_fn or None, section)`: the model builder, `graphdef -> LossFn` of a train step
  (None: the eval forward pass) and the config section of its optimizer.

  Raises:
    ValueError: an unknown program.
  """
  seed, n = int(config.seed), shapes.num_labels
  mask_id = min(103, enc.vocab_size - 1)
  meta_like = {"special_ids": {"mask": mask_id}, "label_map": {f"R{i}": i for i in range(n)}}
  if program in ("finetune", "eval"):
    return classifier_lib.classifier_builder(enc, n, config.model.dropout, seed), (
        classifier_lib.make_loss_fn if program == "finetune" else None), config.train
  if program == "finetune_predicate":
    table = synthetic_templates(enc, n, config.model, seed)
    opts = classifier_lib.predicate_options({**config.model.to_dict(), "head": "predicate"}, table)
    return (classifier_lib.classifier_builder(enc, n, config.model.dropout, seed, opts),
            classifier_lib.make_loss_fn, config.train)
  if program in ("mslm", "scl"):
    cfg = mslm_scl.step_config(config, meta_like, program)
    build = mslm_scl.pretrain_builder(enc, num_relations=n if program == "scl" else 0,
                                      proj_dim=int(config.scl.proj_dim) if program == "scl" else 0,
                                      seed=seed)
    return build, (lambda graphdef: mslm_scl.LOSSES[program](graphdef, cfg)), config[program]
  if program == "sacon":
    s = config.sacon
    cfg = label_contrastive.SaconStepConfig(
        mask_token_id=mask_id, vocab_size=enc.vocab_size, max_predictions=int(s.max_predictions),
        label_max_predictions=int(s.label_max_predictions), mlm_prob=float(s.mlm_prob),
        lambda_mlm=float(s.lambda_mlm))
    build = label_contrastive.builder(enc, seed, shared_label_encoder=s.label_encoder == "shared",
                                      temperature=float(s.temperature))
    return build, label_contrastive.make_loss_fn(cfg), s
  if program == "episodic":
    return (prototypical.builder(enc, seed),
            prototypical.make_loss_fn(int(config.episodic.n_way), config.episodes.metric),
            config.episodic)
  raise ValueError(f"unknown program {program!r}; programs: {PROGRAMS}")


def program_shapes(program: str, shapes: Shapes, config: ml_collections.ConfigDict,
                   data_parallel: int) -> Shapes:
  """The shapes a program runs at: sacon's batch is relations x sentences and episodic's one
  episode, N (K + Q) rows, each rounded up to the data-parallel size as the stages do."""
  up = lambda x: -(-x // data_parallel) * data_parallel  # noqa: E731
  if program == "sacon":
    s = config.sacon
    return dataclasses.replace(shapes, batch_size=up(int(s.relations_per_batch)
                                                     * int(s.sentences_per_relation)),
                               num_labels=int(s.relations_per_batch))
  if program == "episodic":
    e = config.episodic
    return dataclasses.replace(shapes, batch_size=up(int(e.n_way) * (int(e.k_shot) + int(e.q_query))))
  return dataclasses.replace(shapes, batch_size=up(shapes.batch_size))


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of a tree of abstract arrays under `shardings` (each array's bytes over
  the product of the mesh axis sizes its spec splits it on)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    parts = 1
    for entry in s.spec:
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        if axis is not None:
          parts *= s.mesh.shape[axis]
    total += math.prod(x.shape) * np.dtype(x.dtype).itemsize // parts
  return int(total)


def largest_arrays(tree, shardings, n: int = 3) -> list[dict]:
  """The `n` largest arrays: path, shape, dtype and the mesh spec they are split by."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shs = jax.tree.leaves(shardings)
  rows = [(math.prod(x.shape) * np.dtype(x.dtype).itemsize, jax.tree_util.keystr(path), x, s)
          for (path, x), s in zip(flat, shs)]
  rows.sort(key=lambda r: -r[0])
  return [{"path": p, "shape": list(x.shape), "dtype": str(np.dtype(x.dtype)),
           "spec": str(tuple(s.spec))} for _, p, x, s in rows[:n]]


def lower(program: str, preset_name: str, enc: EncoderConfig, shapes: Shapes,
          config: ml_collections.ConfigDict, rules_name: str) -> dict:
  """Lowers one program for one preset's platform; never raises for a lowering failure (the row
  says `error`: the exception's type and message).

  Returns:
    a row: preset, platform, mesh shape, program, rules, dtype, batch, seq_len, `status`
    ("lowered" | "error"), `error`, seconds, `param_bytes_per_device`, `opt_bytes_per_device`,
    `largest` (the three largest parameter arrays with their specs), and the StableHLO size.
  """
  mesh, platform = abstract_mesh(preset_name)
  rules = sharding_lib.RULES[rules_name]
  dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  sh = program_shapes(program, shapes, config, dp)
  row = {"preset": preset_name, "platform": platform, "mesh": dict(mesh.shape), "program": program,
         "rules": rules_name, "dtype": enc.dtype, "batch_size": sh.batch_size,
         "seq_len": sh.seq_len, "status": "error", "error": None}
  t0 = time.time()
  try:
    build, loss_fn, section = build_program(program, enc, sh, config)
    model = runtime.create_abstract(build, mesh, rules)
    params = runtime.abstract_with_shardings(model.params, model.shardings)
    batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    batch = batch_specs(program, sh, batch_sh, config)
    row["param_bytes_per_device"] = per_device_bytes(model.params, model.shardings)
    row["param_bytes"] = int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                                 for x in jax.tree.leaves(model.params)))
    row["largest"] = largest_arrays(model.params, model.shardings)
    if loss_fn is None:  # the eval forward pass
      fn = classifier_lib.make_predict_step(model.graphdef)
      jitted = jax.jit(fn, in_shardings=(model.shardings, batch_sh), out_shardings=repl)
      args = (params, {k: v for k, v in batch.items() if k != "weight"})
      row["opt_bytes_per_device"] = 0
    else:
      tx, _ = optim.adamw(section.optim, 1000)
      opt_abstract = jax.eval_shape(tx.init, model.params)
      opt_sh = sharding_lib.state_shardings(opt_abstract, mesh, rules)
      row["opt_bytes_per_device"] = per_device_bytes(opt_abstract, opt_sh)
      jitted = jax.jit(make_train_step(loss_fn(model.graphdef), tx),
                       in_shardings=(model.shardings, opt_sh, batch_sh, repl),
                       out_shardings=(model.shardings, opt_sh, repl), donate_argnums=(0, 1))
      key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
      args = (params, runtime.abstract_with_shardings(opt_abstract, opt_sh), batch, key)
    exported = jax.export.export(jitted, platforms=(platform,))(*args)
    row["stablehlo_chars"] = len(exported.mlir_module())
    row["status"] = "lowered"
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else (
        type(e).__name__)
    row["traceback"] = traceback.format_exc(limit=6)
  row["seconds"] = round(time.time() - t0, 2)
  return row


# ---------------------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------------------

def activation_bytes(enc: EncoderConfig, batch_per_device: int, seq_len: int,
                     compute_bytes: int) -> int:
  """Activations one device keeps for the backward pass of the encoder, no rematerialisation:
  L s b h (34 + 5 a s / h) bytes at 16-bit compute (Korthikanti et al. 2022, Sec. 4.1), scaled by
  compute_bytes / 2, plus the embedding output s b h."""
  s, b, h, a = seq_len, batch_per_device, enc.hidden_size, enc.num_heads
  per_layer = s * b * h * (34 + 5 * a * s / h) * compute_bytes / 2
  return int(enc.num_layers * per_layer + s * b * h * compute_bytes)


def memory_plan(enc: EncoderConfig, preset_name: str, rules_name: str, batch_size: int,
                seq_len: int, num_labels: int = 16, config: Optional[ml_collections.ConfigDict]
                = None) -> dict:
  """The finetune step's per-device bytes on a preset: parameters, AdamW moments, gradients (the
  parameters' layout), activations (`activation_bytes` at the batch per data-parallel shard) and
  the largest global batch that fits `DEVICE_MEMORY_GIB` (a multiple of the data-parallel size;
  0 when not even that fits), with 10% kept free for XLA's workspace."""
  config = config or config_lib.base_config()
  mesh, _ = abstract_mesh(preset_name)
  rules = sharding_lib.RULES[rules_name]
  dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  build = classifier_lib.classifier_builder(enc, num_labels, 0.1, 0)
  model = runtime.create_abstract(build, mesh, rules)
  params = per_device_bytes(model.params, model.shardings)
  tx, _ = optim.adamw(config.train.optim, 1000)
  opt_abstract = jax.eval_shape(tx.init, model.params)
  opt = per_device_bytes(opt_abstract, sharding_lib.state_shardings(opt_abstract, mesh, rules))
  cb = _DTYPE_BYTES[enc.dtype]
  b_dev = max(1, -(-batch_size // dp))
  act = activation_bytes(enc, b_dev, seq_len, cb)
  total = params + opt + params + act
  budget = DEVICE_MEMORY_GIB.get(preset_name, 0.0) * 2 ** 30 * 0.9
  per_row = activation_bytes(enc, 1, seq_len, cb)
  fixed = params + opt + params
  max_rows = int((budget - fixed) // per_row) if budget > fixed else 0
  return {"preset": preset_name, "rules": rules_name, "dtype": enc.dtype, "batch_size": batch_size,
          "seq_len": seq_len, "data_parallel": dp, "batch_per_device": b_dev,
          "param_bytes": params, "opt_bytes": opt, "grad_bytes": params, "activation_bytes": act,
          "total_bytes": total, "device_memory_gib": DEVICE_MEMORY_GIB.get(preset_name),
          "max_batch": max_rows * dp}


def xla_memory(compiled) -> dict:
  """Per-device bytes of a compiled (SPMD-partitioned) executable from XLA's memory analysis."""
  m = compiled.memory_analysis()
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
          "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                             + m.temp_size_in_bytes - m.alias_size_in_bytes)}


def table_markdown(rows: list[Mapping[str, Any]]) -> str:
  """preset x program: lowered (seconds) or the error; parameter / optimizer MiB per device."""
  programs = list(dict.fromkeys(r["program"] for r in rows))
  presets = list(dict.fromkeys(r["preset"] for r in rows))
  lines = ["| preset (platform, mesh) | " + " | ".join(programs) + " | params / AdamW MiB per device "
           "(finetune) |", "|---|" + "---|" * (len(programs) + 1)]
  for p in presets:
    mine = {r["program"]: r for r in rows if r["preset"] == p}
    any_row = next(iter(mine.values()))
    mesh = ",".join(f"{k}:{v}" for k, v in any_row["mesh"].items() if v > 1) or "1 device"
    cells = []
    for prog in programs:
      r = mine.get(prog)
      cells.append("–" if r is None else
                   (f"ok ({r['seconds']:.1f} s)" if r["status"] == "lowered" else
                    f"**{r['error']}**"))
    ft = mine.get("finetune") or any_row
    mib = (f"{ft.get('param_bytes_per_device', 0) / 2**20:.1f} / "
           f"{ft.get('opt_bytes_per_device', 0) / 2**20:.1f}")
    lines.append(f"| {p} ({any_row['platform']}, {mesh}) | " + " | ".join(cells) + f" | {mib} |")
  return "\n".join(lines)
