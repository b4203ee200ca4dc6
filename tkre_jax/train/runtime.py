"""What every training stage shares: the mesh and shardings, ahead-of-time compiled steps, model
state creation in its sharded layout, and the workdir's log files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tkre_jax.parallel import sharding as sharding_lib
from tkre_jax.parallel.mesh import is_primary
from tkre_jax.train import compile_cache

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Sharded model state
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardedModel:
  """A model split into its graph and its sharded parameter state.

  Attributes:
    graphdef: the `nnx.GraphDef` (static structure).
    params: the `nnx.State` of `nnx.Param`s, each array laid out with `shardings`.
    shardings: pytree of `NamedSharding` matching `params`.
  """
  graphdef: Any
  params: Any
  shardings: Any

  def merge(self, params=None) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params if params is None else params)


def create_sharded(build: Callable[[], nnx.Module], mesh, rules) -> ShardedModel:
  """Builds a model directly in its sharded layout.

  `build()` constructs the module with random initialisation. It is first traced abstractly
  (`nnx.eval_shape`) to find shapes and logical axis names; then the parameters are created by a
  `jax.jit` whose `out_shardings` place each array on its shard, so no host ever holds a parameter
  whole.
  """
  abstract = create_abstract(build, mesh, rules)
  graphdef, shardings = abstract.graphdef, abstract.shardings

  @jax.jit
  def init():
    return nnx.split(build(), nnx.Param)[1]

  params = jax.jit(init, out_shardings=shardings)()
  return ShardedModel(graphdef, params, shardings)


def create_abstract(build: Callable[[], nnx.Module], mesh, rules) -> ShardedModel:
  """The model's graph, its parameters as `jax.ShapeDtypeStruct`s and their shardings, without
  creating any array (`nnx.eval_shape`): enough to compile a step before the weights exist."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(build), nnx.Param)
  return ShardedModel(graphdef, abstract_params, sharding_lib.state_shardings(abstract_params, mesh,
                                                                                rules))


def put_subtree(params, path: tuple[str, ...], values: Mapping, shardings) -> None:
  """Replaces the sub-state at `path` of `params` with host `values` (a pure dict), placing every
  array on the sharding of the parameter it replaces.

  Raises:
    ValueError: a key of `values` has no parameter, or shapes differ.
  """
  target = params
  shard_target = shardings
  for p in path:
    target = target[p]
    shard_target = shard_target[p]
  flat_target = dict(nnx.to_flat_state(target))
  flat_shard = dict(nnx.to_flat_state(shard_target)) if isinstance(shard_target, nnx.State) else None
  pure = {}
  flat_values = traverse_util.flatten_dict(dict(values))
  for key, value in flat_values.items():
    k = tuple(int(x) if isinstance(x, str) and x.isdigit() else x for x in key)
    if k not in flat_target:
      raise ValueError(f"parameter {'/'.join(map(str, path + key))} is not in the model")
    var = flat_target[k]
    if tuple(var.shape) != tuple(np.shape(value)):
      raise ValueError(f"parameter {'/'.join(map(str, path + key))}: shape {np.shape(value)} does not "
                       f"match the model's {tuple(var.shape)}")
    sh = flat_shard[k] if flat_shard is not None else None
    if isinstance(sh, nnx.Variable):
      sh = sh.get_value()
    arr = jnp.asarray(value, dtype=var.dtype)
    pure[key] = jax.device_put(arr, sh) if sh is not None else arr
  nnx.replace_by_pure_dict(target, traverse_util.unflatten_dict(pure))


def abstract_with_shardings(tree, shardings):
  """`jax.ShapeDtypeStruct`s carrying `shardings`, a restore target for Orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compiled steps
# ---------------------------------------------------------------------------------------------------

class CompiledStep:
  """A jitted step compiled ahead of time per input shape, with its compile time and memory logged.

  Args:
    fn: the pure step function.
    name: used in log lines.
    in_shardings, out_shardings, donate_argnums: as for `jax.jit`.
  """

  def __init__(self, fn: Callable, name: str, *, in_shardings=None, out_shardings=None,
               donate_argnums=()):
    kw = {}
    if in_shardings is not None:
      kw["in_shardings"] = in_shardings
    if out_shardings is not None:
      kw["out_shardings"] = out_shardings
    self.jitted = jax.jit(fn, donate_argnums=donate_argnums, **kw)
    self.name = name
    self.compiled: dict = {}
    self.compile_seconds: dict = {}
    self.cache_hits: dict = {}  # shapes -> whether the executable came from the persistent cache

  @staticmethod
  def _key(args) -> tuple:
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))

  def __call__(self, *args):
    key = self._key(args)
    exe = self.compiled.get(key)
    if exe is None:
      t0 = time.perf_counter()
      hits = compile_cache.hits()
      exe = self.jitted.lower(*args).compile()
      dt = time.perf_counter() - t0
      self.compiled[key] = exe
      self.compile_seconds[key] = dt
      self.cache_hits[key] = compile_cache.hits() > hits
      mem = memory_summary(exe)
      log.info("compiled %s for shapes %s in %.1f s%s%s", self.name, _shape_hint(args), dt,
               " (persistent cache hit)" if self.cache_hits[key] else "",
               f"; memory: {mem}" if mem else "")
    return exe(*args)


def _shape_hint(args) -> str:
  for leaf in jax.tree.leaves(args):
    if getattr(leaf, "ndim", 0) == 2 and jnp.issubdtype(leaf.dtype, jnp.integer):
      return "x".join(map(str, leaf.shape))
  return "?"


def memory_summary(compiled) -> str:
  """Bytes of arguments, outputs and temporaries from `compiled.memory_analysis()`, in MiB."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return ""
  if m is None:
    return ""
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  parts = [f"{f.split('_size')[0]} {getattr(m, f, 0) / 2**20:.1f} MiB" for f in fields if hasattr(m, f)]
  return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Workdir logs
# ---------------------------------------------------------------------------------------------------

class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = is_primary()

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

  def records(self, stage: Optional[str] = None) -> list[dict]:
    """The records written so far (of `stage` only, when given), in file order."""
    if not self.path.is_file():
      return []
    with open(self.path) as f:
      out = [json.loads(line) for line in f if line.strip()]
    return [r for r in out if stage is None or r.get("stage") == stage]

  def truncate_after(self, step: int) -> int:
    """Drops the records of steps after `step` (written after the checkpoint a resumed run starts
    from, and about to be written again), atomically. Returns how many were dropped."""
    if not self.enabled or not self.path.is_file():
      return 0
    records = self.records()
    keep = [r for r in records if int(r.get("step", 0)) <= step]
    if len(keep) == len(records):
      return 0
    tmp = self.path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
    tmp.replace(self.path)
    return len(records) - len(keep)


def write_summary(workdir: pathlib.Path, summary: Mapping[str, Any]) -> pathlib.Path:
  """Writes `<workdir>/summary.json` atomically (process 0 only)."""
  path = pathlib.Path(workdir) / "summary.json"
  if not is_primary():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  with open(tmp, "w") as f:
    json.dump(_jsonable(summary), f, indent=2, sort_keys=True)
  tmp.replace(path)
  return path


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x).tolist()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def to_global(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The GLOBAL numpy batch, which every host holds whole -> arrays split over (`data`, `fsdp`).

  The stages read their (small) splits whole on every host and draw batches in the same seeded
  order, so every host holds the same global batch; each device receives only its own rows
  (`jax.make_array_from_callback`), whatever the mesh's device order. With one process this is a
  `device_put`; with several, the global batch stays `batch` (not `process_count` copies of it).
  Streamed host-local batches (`data.pipeline.pretrain_batches`) go through
  `sharding.host_local_to_global` instead.

  Args:
    batch: key -> numpy array [global_batch, ...], the same on every host.
    mesh: the device mesh.

  Returns:
    key -> `jax.Array` [global_batch, ...] with `sharding.batch_sharding(mesh)`.

  Raises:
    ValueError: a scalar, or rows not divisible by the number of batch shards (data * fsdp).
  """
  sharding = sharding_lib.batch_sharding(mesh)
  shards = int(np.prod([mesh.shape[a] for a in sharding.spec[0]]))
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % shards:
      raise ValueError(f"batch[{key!r}] has shape {value.shape}: the leading (batch) size must be a "
                       f"multiple of the {shards} batch shards (data x fsdp of {dict(mesh.shape)})")
    out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return out
