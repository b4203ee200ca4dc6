"""Sharding by logical axis names (MaxText style), batch sharding and multi-host input.

Model parameters carry LOGICAL axis names in their flax `out_sharding` metadata, e.g. an embedding
table `("vocab", "embed")`, a query kernel `("embed", "heads")`, an MLP kernel `("embed", "mlp")`,
a LayerNorm scale `("norm",)`, position embeddings `(None, "embed")`. Eager sharding is off
(`flax_always_shard_variable=False`), so building a model needs no mesh; `nnx.get_partition_spec`
of its state gives PartitionSpecs of logical names. This module maps those names to the mesh axes
`data`, `fsdp`, `tensor` (see `tkre_jax.parallel.mesh`) with RULES kept in the config:

  rules: a preset name from `RULES` (`"dp"`, `"fsdp"`, `"fsdp_tp"`), or a sequence of
    `(logical_name, mesh_axes)` pairs, or a mapping `logical_name -> mesh_axes`, where `mesh_axes`
    is None (replicated), one mesh axis name, or a tuple of mesh axis names (one dimension split
    over several axes). In the pair form a logical name may appear several times: the candidates
    are tried in order and the first one that fits is taken (see `logical_to_mesh_spec`).

Logical names that no rule mentions are replicated. A typical use, creating the parameters and the
optimizer state directly in their sharded layout (never whole on one host):

    def create():
      model = Encoder(config, rngs=nnx.Rngs(seed))
      params = nnx.state(model, nnx.Param)
      return params, tx.init(params)

    abstract = jax.eval_shape(create)
    shardings = state_shardings(abstract, mesh, "fsdp")
    params, opt_state = jax.jit(create, out_shardings=shardings)()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from flax import nnx
import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec
import numpy as np

from tkre_jax.parallel.mesh import AXES

T = TypeVar("T")

MeshAxes = tuple[str, ...] | None
"""One rule's target: None (replicated) or the mesh axes one dimension is split over."""

LogicalRules = tuple[tuple[str, MeshAxes], ...]
"""Normalised rules: `(logical_name, mesh_axes)` pairs, in priority order."""

BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""

LOGICAL_AXES: tuple[str, ...] = (
    "batch", "length", "vocab", "embed", "heads", "kv", "mlp", "norm", "classes")
"""The logical names the presets know (`kv`: per-head dim, `length`: sequence positions)."""

_PRESET_RULES = {
    # Data parallelism: every parameter replicated, the batch split over data x fsdp.
    "dp": (
        ("batch", BATCH_AXES),
        ("length", None), ("vocab", None), ("embed", None), ("heads", None), ("kv", None),
        ("mlp", None), ("norm", None), ("classes", None),
    ),
    # FSDP (ZeRO-3): the first dimension that is vocab / embed / mlp / heads and divisible by the
    # fsdp size is split over fsdp (each mesh axis once per array), so every matrix is sharded;
    # only LayerNorms, odd-sized biases and small heads stay replicated (< 5% of BERT's bytes).
    "fsdp": (
        ("batch", BATCH_AXES),
        ("length", None),
        ("vocab", "fsdp"), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
        ("kv", None), ("norm", None), ("classes", None),
    ),
    # FSDP over `fsdp` plus Megatron tensor parallelism over `tensor`: attention heads, MLP
    # columns/rows and the vocabulary split over tensor, the embedding dim over fsdp. When tensor
    # does not divide vocab / mlp, those fall back to fsdp.
    "fsdp_tp": (
        ("batch", BATCH_AXES),
        ("length", None),
        ("vocab", "tensor"), ("vocab", "fsdp"),
        # When vocab cannot use tensor (30522 is odd) it takes fsdp, even a size-1 fsdp axis; the
        # embedding dim then falls back to tensor, so the word embeddings stay sharded.
        ("embed", "fsdp"), ("embed", "tensor"),
        ("mlp", "tensor"), ("mlp", "fsdp"),
        ("heads", "tensor"),
        ("kv", None), ("norm", None), ("classes", None),
    ),
}


class ShardingRulesError(ValueError):
  """Malformed sharding rules, or rules / logical specs that do not fit the mesh or the shape."""


def _as_mesh_axes(value: Any, where: str) -> MeshAxes:
  if value is None:
    return None
  if isinstance(value, str):
    return (value,)
  if isinstance(value, Sequence) and all(isinstance(a, str) for a in value):
    return tuple(value) or None
  raise ShardingRulesError(f"{where}: mesh axes must be None, a mesh axis name or a tuple of "
                           f"names, got {value!r}")


def get_rules(rules: str | Mapping[str, Any] | Iterable[Sequence[Any]]) -> LogicalRules:
  """Normalises rules from the config into `(logical_name, mesh_axes | None)` pairs.

  Args:
    rules: a preset name (`"dp"`, `"fsdp"`, `"fsdp_tp"`), a mapping `name -> axes` (a dict or an
      ml_collections ConfigDict), or an iterable of `(name, axes)` pairs (tuples or lists), where
      `axes` is None, a mesh axis name, or a sequence of mesh axis names.

  Returns:
    The rules as a tuple of `(str, tuple[str, ...] | None)` pairs, in priority order.

  Raises:
    ShardingRulesError: unknown preset name, or an entry that is not a `(name, axes)` pair.
  """
  if isinstance(rules, str):
    if rules not in RULES:  # pylint: disable=used-before-assignment
      raise ShardingRulesError(f"unknown sharding rules {rules!r}; presets are {sorted(RULES)} (or "
                               "give (logical_name, mesh_axes) pairs)")
    return RULES[rules]
  if hasattr(rules, "items"):
    pairs = list(rules.items())
  else:
    try:
      pairs = list(rules)
    except TypeError:
      raise ShardingRulesError(f"sharding rules must be a preset name, a mapping or pairs, got "
                               f"{type(rules).__name__}") from None
  out = []
  for i, pair in enumerate(pairs):
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
      raise ShardingRulesError(f"sharding rule #{i} must be a (logical_name, mesh_axes) pair, got "
                               f"{pair!r}")
    name, axes = pair
    if not isinstance(name, str):
      raise ShardingRulesError(f"sharding rule #{i}: logical name must be a str, got {name!r}")
    out.append((name, _as_mesh_axes(axes, f"sharding rule #{i} ({name})")))
  return tuple(out)


RULES: dict[str, LogicalRules] = {name: get_rules(pairs) for name, pairs in _PRESET_RULES.items()}
"""Rule presets, by name (the config's `sharding_rules` names one, or spells the pairs out)."""


def _mesh_sizes(mesh: Mesh | Mapping[str, int] | None) -> dict[str, int] | None:
  if mesh is None:
    return None
  if isinstance(mesh, (Mesh, AbstractMesh)):  # AbstractMesh: lowering for another platform
    return dict(mesh.shape)
  return dict(mesh)


def logical_to_mesh_spec(logical_spec: PartitionSpec | Sequence[Any] | None,
                         rules: str | Mapping[str, Any] | Iterable[Sequence[Any]], *,
                         mesh: Mesh | Mapping[str, int] | None = None,
                         shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps a spec of logical axis names to a PartitionSpec of mesh axes.

  For each dimension, left to right, and each logical name in it (an entry may be None, a name, or
  a tuple of names), the rules for that name are tried in order; a rule is taken when
    * its mesh axes are not already used by an earlier dimension (a mesh axis may appear once per
      spec: a later use is dropped, and the remaining axes of a multi-axis rule are kept), and
    * with `mesh` and `shape` given: the product of the sizes of all mesh axes on that dimension
      divides the dimension (otherwise the dimension falls back to the next rule, in the end to
      replicated).
  A rule with target None stops the search (replicated); names without rules are replicated.

  Args:
    logical_spec: e.g. `PartitionSpec("vocab", "embed")` or `("embed", "mlp")`; None / `()` for a
      scalar or a fully replicated array.
    rules: see `get_rules`.
    mesh: a Mesh or `{axis: size}`; enables the axis-name and divisibility checks.
    shape: the array's shape; with `mesh`, enables the divisibility check. May have more
      dimensions than `logical_spec` (the rest are replicated), not fewer.

  Returns:
    A PartitionSpec of mesh axis names (None, a name, or a tuple of names per dimension), with as
    many entries as `logical_spec`.

  Raises:
    ShardingRulesError: a rule names an axis the mesh lacks, or `logical_spec` has more dimensions
      than `shape`.
  """
  pairs = get_rules(rules)
  sizes = _mesh_sizes(mesh)
  logical = tuple(logical_spec) if logical_spec is not None else ()
  if shape is not None and len(logical) > len(shape):
    raise ShardingRulesError(f"logical spec {logical} has {len(logical)} dimensions but the array "
                             f"has shape {tuple(shape)}")
  by_name: dict[str, list[MeshAxes]] = {}
  for name, axes in pairs:
    by_name.setdefault(name, []).append(axes)
    if sizes is not None and axes is not None:
      missing = [a for a in axes if a not in sizes]
      if missing:
        raise ShardingRulesError(f"sharding rule ({name!r}, {axes}) names mesh axes {missing} that "
                                 f"the mesh {sizes} does not have")
  used: set[str] = set()
  out = []
  for dim, entry in enumerate(logical):
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
      out.append(entry)
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    dim_axes: list[str] = []
    for name in names:
      for candidate in by_name.get(name, ()):
        if candidate is None:
          break
        fresh = [a for a in candidate if a not in used and a not in dim_axes]
        if not fresh:
          continue
        if sizes is not None and shape is not None:
          if shape[dim] % math.prod(sizes[a] for a in (*dim_axes, *fresh)):
            continue
        dim_axes.extend(fresh)
        break
    used.update(dim_axes)
    out.append(None if not dim_axes else dim_axes[0] if len(dim_axes) == 1 else tuple(dim_axes))
  return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, logical_spec: PartitionSpec | Sequence[Any] | None,
                     rules: str | Mapping[str, Any] | Iterable[Sequence[Any]],
                     shape: Sequence[int] | None = None) -> NamedSharding:
  """`NamedSharding(mesh, logical_to_mesh_spec(logical_spec, rules, mesh=mesh, shape=shape))`."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical_spec, rules, mesh=mesh, shape=shape))


def with_logical_constraint(x: jax.Array, logical_spec: PartitionSpec | Sequence[Any],
                            mesh: Mesh,
                            rules: str | Mapping[str, Any] | Iterable[Sequence[Any]]) -> jax.Array:
  """`jax.lax.with_sharding_constraint` by logical names, e.g. `("batch", "length", "embed")`.

  Use inside jit on activations; the divisibility fallback uses `x.shape`.
  """
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical_spec, rules, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on `mesh` (scalars, step counters, RNG keys)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over `("data", "fsdp")`; other dimensions replicated.

  The spec names only the leading dimension, so one sharding serves arrays of any rank >= 1
  (`input_ids` [batch, seq_len] and `label` [batch] alike).

  Raises:
    ShardingRulesError: the mesh has neither a `data` nor an `fsdp` axis.
  """
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ShardingRulesError(f"mesh with axes {mesh.axis_names} has none of the batch axes "
                             f"{BATCH_AXES}")
  return NamedSharding(mesh, PartitionSpec(axes))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_value(x: Any) -> Any:
  return x.get_value() if _is_variable(x) else x


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _signature(tree: Any) -> tuple:
  """(path, shape) of every leaf (Variables as leaves), paths as plain strings."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
  return tuple((tuple(_key_name(k) for k in path), tuple(getattr(_leaf_value(x), "shape", ())))
               for path, x in flat)


def state_shardings(abstract_state: T, mesh: Mesh,
                    rules: str | Mapping[str, Any] | Iterable[Sequence[Any]], *,
                    mirror: Any = None) -> T:
  """NamedShardings for every array of an nnx State / optax state / any pytree of them.

  * An `nnx.Variable` with `out_sharding` metadata gets `logical_to_mesh_spec(out_sharding, rules,
    mesh=mesh, shape=its shape)`. This covers model state from `nnx.state(model)`, the
    `OptVariable`s of an `nnx.Optimizer`, and optax state built by `tx.init(nnx_state)` (optax's
    `tree_map` keeps the Param wrappers, so `mu` / `nu` carry the metadata of the param they
    mirror).
  * With `mirror` (a params tree of Variables with `out_sharding`, e.g. `nnx.state(model,
    nnx.Param)`, abstract or not): any subtree of plain arrays with the same paths and shapes as
    `mirror` (optax moments of a pure-dict params tree, `nnx.to_pure_dict`) gets `mirror`'s
    shardings.
  * Everything else (scalars such as optax's `count`, RNG keys, arrays without metadata) is
    replicated.

  Args:
    abstract_state: a pytree whose leaves are Variables, arrays or `jax.ShapeDtypeStruct`s, e.g.
      `jax.eval_shape(create_fn)` or `nnx.eval_shape(...)` output.
    mesh: the device mesh.
    rules: see `get_rules`.
    mirror: optional params tree used to shard plain-array subtrees that mirror it.

  Returns:
    The same pytree structure with a `NamedSharding` in place of every array (a Variable keeps its
    wrapper and metadata, its value becomes the sharding, as `nnx.get_named_sharding` does), so it
    is a valid `out_shardings` for `jax.jit(create_fn)` and `in_shardings` for a train step.

  Raises:
    ShardingRulesError: an `out_sharding` with more names than its array has dimensions, or rules
      naming axes that `mesh` lacks.
  """
  pairs = get_rules(rules)
  repl = replicated(mesh)

  def leaf_sharding(x: Any) -> Any:
    value = _leaf_value(x)
    shape = getattr(value, "shape", None)
    if not _is_variable(x):
      return repl
    logical = x.get_metadata().get("out_sharding", None)
    if not logical or shape is None or len(shape) == 0:
      return x.replace(repl)
    try:
      spec = logical_to_mesh_spec(logical, pairs, mesh=mesh, shape=shape)
    except ShardingRulesError as e:
      raise ShardingRulesError(f"{type(x).__name__} of shape {tuple(shape)}: {e}") from None
    return x.replace(NamedSharding(mesh, spec))

  if mirror is None:
    return jax.tree.map(leaf_sharding, abstract_state, is_leaf=_is_variable)

  mirror_sig = _signature(mirror)
  mirror_shardings = jax.tree.leaves(
      jax.tree.map(lambda v: _leaf_value(leaf_sharding(v)), mirror, is_leaf=_is_variable),
      is_leaf=lambda s: isinstance(s, NamedSharding))

  def assign(node: Any) -> Any:
    if _is_variable(node):
      return leaf_sharding(node)
    leaves, treedef = jax.tree_util.tree_flatten(node, is_leaf=_is_variable)
    if len(leaves) == len(mirror_sig) and _signature(node) == mirror_sig:
      out = []
      for leaf, sharding in zip(leaves, mirror_shardings):
        if _is_variable(leaf):
          own = leaf_sharding(leaf)
          has_own = bool(leaf.get_metadata().get("out_sharding", None))
          out.append(own if has_own else leaf.replace(sharding))
        else:
          out.append(sharding)
      return treedef.unflatten(out)
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
      return leaf_sharding(node)
    return treedef.unflatten([assign(c) for c in children])

  return assign(abstract_state)


def _nbytes(x: Any) -> int:
  shape = getattr(x, "shape", None)
  if shape is None:
    return 0
  try:
    itemsize = np.dtype(x.dtype).itemsize
  except TypeError:  # e.g. PRNG key dtypes
    itemsize = getattr(x.dtype, "itemsize", 0) or 0
  return math.prod(shape) * itemsize


def replicated_fraction(state: Any, shardings: Any = None) -> float:
  """Fraction of the BYTES of `state` whose sharding is fully replicated.

  Args:
    state: pytree of arrays / `ShapeDtypeStruct`s (Variables allowed), normally the parameters.
    shardings: matching pytree of `jax.sharding.Sharding` (e.g. from `state_shardings`); None uses
      each leaf's own `.sharding` (concrete jax.Arrays).

  Returns:
    replicated bytes / total bytes, in [0, 1]; 0.0 for an empty state.

  Raises:
    ValueError: `shardings` does not have one sharding per array of `state`.
  """
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]
  if shardings is None:
    sharding_leaves = [x.sharding for x in leaves]
  else:
    sharding_leaves = jax.tree.leaves(shardings,
                                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(sharding_leaves) != len(leaves):
    raise ValueError(f"{len(leaves)} arrays but {len(sharding_leaves)} shardings")
  total = replicated_bytes = 0
  for x, s in zip(leaves, sharding_leaves):
    n = _nbytes(x)
    total += n
    if s.is_fully_replicated:
      replicated_bytes += n
  return replicated_bytes / total if total else 0.0


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into global arrays split by `batch_sharding(mesh)`.

  Every process passes its own rows (the global batch is the concatenation over processes, in
  process order); `jax.make_array_from_process_local_data` places them on the local devices.

  Args:
    batch: key -> host-local numpy array [local_batch, ...]; all with the same leading size.
    mesh: the device mesh.

  Returns:
    key -> jax.Array [local_batch * process_count, ...] sharded over `("data", "fsdp")`.

  Raises:
    ValueError: a scalar, mismatched leading sizes, or a local batch not divisible by this
      process's number of batch shards.
  """
  sharding = batch_sharding(mesh)
  batch_shards = math.prod(mesh.shape[a] for a in sharding.spec[0])
  processes = jax.process_count()
  local_shards = batch_shards // processes if batch_shards % processes == 0 else 1
  leading = {}
  out = {}
  for key, value in batch.items():
    local = np.asarray(value)
    if local.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch array needs a leading batch dim")
    leading[key] = local.shape[0]
    if local.shape[0] % local_shards:
      raise ValueError(
          f"batch[{key!r}] has {local.shape[0]} rows on this host, not divisible by its "
          f"{local_shards} batch shards (mesh {dict(mesh.shape)}: data x fsdp = {batch_shards} "
          f"over {processes} process(es)); make the per-host batch size a multiple of "
          f"{local_shards}")
    out[key] = jax.make_array_from_process_local_data(sharding, local)
  if len(set(leading.values())) > 1:
    raise ValueError(f"batch arrays have different leading sizes: {leading}")
  return out


def global_to_host(x) -> np.ndarray:
  """The whole of a (global) `jax.Array` as a numpy array on this host.

  `np.asarray` when this process holds all of it (one process, or a replicated array); otherwise,
  e.g. a parameter the fsdp rules split over the devices of several processes, an all-gather
  (`multihost_utils.process_allgather`): then every process must call it, at the same point.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


__all__ = [
    "AXES", "BATCH_AXES", "LOGICAL_AXES", "LogicalRules", "RULES", "ShardingRulesError",
    "batch_sharding", "get_rules", "global_to_host", "host_local_to_global", "logical_sharding",
    "logical_to_mesh_spec", "replicated", "replicated_fraction",
    "state_shardings", "with_logical_constraint",
]
