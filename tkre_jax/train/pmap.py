"""The `--parallelism=pmap` data-parallel path, kept in this one module.

The main path of tkre_jax is `jax.jit` with explicit shardings over the `(data, fsdp, tensor)` mesh
(`tkre_jax.train.runtime.CompiledStep`). This module keeps a classic `jax.pmap` data-parallel step
for older runtimes and for comparison, and it computes EXACTLY what the jit path computes:

  * parameters and optimizer state are replicated over the devices (one full copy per device);
  * the global batch is split row-wise into `[n_devices, per_device, ...]`;
  * every device computes the loss SUM and the weight of its rows, and the gradient of the SUM;
  * `jax.lax.psum` adds sums, weights and gradients over all devices (of all hosts);
  * the gradients are divided by the GLOBAL weight `max(sum_d weight_d, 1)`, so the loss and the
    gradient are those of `sum / weight` over the global batch, as in the jit step, and not a mean
    of per-device means (which weights a device holding 1 real row like one holding 8);
  * every device then applies the same optax update to its (identical) copy.

Only losses of the form `sum_rows / sum_weights` fit: a loss that is not a sum over rows (the SCL
InfoNCE, whose in-batch negatives are the whole global batch) or that divides by two different
weights (the SCL stage's `lambda1 * L_mslm + lambda2 * L_scl`) cannot be split this way, which is
why `--parallelism=pmap` is offered for the finetune stage and the pre-training stages run on the
jit path only.

Randomness: the step key is broadcast to all devices and folded with the device index
(`fold_in(rng, axis_index)`), so devices draw independent dropout masks. The jit path draws the
masks for the global `[batch, ...]` shape from the unfolded key, so with dropout on the two paths
draw DIFFERENT (equally valid) masks; they agree to float rounding when dropout is off (rates 0, or
no key passed to the model). `tests/test_sharded_steps.py` checks the parity with dropout off.

Since JAX 0.8 `jax.pmap` is implemented on `jit` + `shard_map`: an unmapped argument (`in_axes=None`)
that is already replicated over the devices stays where it is between steps, and an unmapped output
(`out_axes=None`) comes back as one replicated `jax.Array`. The step therefore takes and returns the
parameters and optimizer state as ordinary replicated arrays (the layout of the `dp` rules), with no
`[n_devices, ...]` stacking and no per-step copies; `PmapTrainStep` wraps it with the same call
signature and layouts as the jit train step so a training loop can use either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

from tkre_jax.train.step import apply_if_finite

log = logging.getLogger(__name__)

AXIS = "devices"
"""The pmap axis name (the axis `psum` reduces over)."""

LossSumFn = Callable[[Any, Mapping[str, jax.Array], jax.Array],
                     tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]
"""`loss_sum_fn(params, batch, rng) -> (loss_sum, weight, aux)`: float32 scalars summed over the
rows of `batch` (no normalisation) and a dict of float32 scalar sums to be divided by the same
global weight (non-scalar entries are ignored)."""


def _device_list(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("pmap needs at least one device")
  return devices


def check_mesh(mesh: Mesh, rules: Any = None) -> None:
  """Checks that `mesh` (and the sharding `rules`, if given) suit the pmap path.

  pmap replicates the parameters and splits only the batch, so the mesh must be pure data
  parallelism: `tensor == 1`, and the rules (a `sharding.RULES` name or pairs) must replicate every
  parameter (the `dp` preset).

  Raises:
    ValueError: a tensor axis > 1, or rules that shard some parameter, naming the fix.
  """
  if mesh.shape.get("tensor", 1) != 1:
    raise ValueError(f"--parallelism=pmap is data parallelism only: the mesh {dict(mesh.shape)} has "
                     "tensor > 1; use a data/fsdp-only mesh (e.g. --mesh=cpu, --mesh=gpu) or "
                     "--parallelism=jit")
  if rules is None:
    return
  from tkre_jax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  sharded = sorted({name for name, axes in sharding_lib.get_rules(rules)
                    if axes is not None and name != "batch"})
  if sharded:
    raise ValueError(f"--parallelism=pmap replicates every parameter, but the sharding rules "
                     f"shard {sharded}; use --config.mesh.rules=dp (or --parallelism=jit for "
                     "fsdp / fsdp_tp)")


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """Places every array of `tree` whole on each of `devices` (default: all devices).

  Returns:
    The same pytree of `jax.Array`s, each with a fully replicated `NamedSharding` over a 1-D mesh of
    `devices` (the layout `make_pmap_train_step` takes for `params` and `opt_state`).
  """
  devices = _device_list(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec())
  return jax.device_put(tree, sharding)


def shard_batch(batch: Mapping[str, Any], num_devices: int) -> dict[str, np.ndarray]:
  """Reshapes a host batch `[rows, ...]` to `[num_devices, rows // num_devices, ...]`.

  Device d gets rows `d * per_device ... (d + 1) * per_device - 1`, the same rows the jit path's
  `batch_sharding` gives the d-th batch shard.

  Raises:
    ValueError: a scalar, arrays with different leading sizes, or rows not divisible by
      `num_devices`.
  """
  out = {}
  rows = None
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch array needs a leading batch dim")
    if rows is None:
      rows = value.shape[0]
    if value.shape[0] != rows:
      raise ValueError(f"batch arrays have different leading sizes: {key!r} has {value.shape[0]}, "
                       f"others {rows}")
    if rows % num_devices:
      raise ValueError(f"batch[{key!r}] has {rows} rows, not divisible by the {num_devices} pmap "
                       "devices; make the batch size a multiple of the device count")
    out[key] = value.reshape((num_devices, rows // num_devices) + value.shape[1:])
  return out


def make_pmap_train_step(loss_sum_fn: LossSumFn, tx: optax.GradientTransformation, *,
                         devices: Sequence[jax.Device] | None = None,
                         donate: bool = True) -> Callable:
  """A pmapped data-parallel train step whose loss and update equal the jit path's.

  Args:
    loss_sum_fn: `(params, batch, rng) -> (loss_sum, weight, aux)`, see `LossSumFn`; it sees one
      device's rows and must NOT normalise.
    tx: the optax transformation (the same one the jit path uses).
    devices: the devices to map over, in batch-shard order; default `jax.devices()`. With several
      processes this lists the devices of all of them (as `jax.pmap` requires); each process passes
      its local part of the mapped axis.
    donate: donate the parameter and optimizer-state buffers (updated in place).

  Returns:
    `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)` where
      params, opt_state: pytrees of arrays replicated over `devices` (see `replicate`); returned in
        the same layout (a `NamedSharding(Mesh(devices, ("devices",)), P())`);
      batch: dict of arrays `[local devices, per_device, ...]` (`shard_batch`);
      rng: one PRNG key, broadcast, folded with the device index inside;
      metrics: replicated float32 scalars `loss` (global sum / global weight), `weight` (global),
        `grad_norm` (of the normalised gradient) and, per scalar `aux` entry, its global sum
        divided by the global weight.
  """
  devices = _device_list(devices)

  def step(params, opt_state, batch, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))

    def sum_fn(p):
      loss_sum, weight, aux = loss_sum_fn(p, batch, rng)
      aux = {k: v for k, v in dict(aux).items() if jnp.ndim(v) == 0}
      return loss_sum, (weight, aux)

    (loss_sum, (weight, aux)), grads = jax.value_and_grad(sum_fn, has_aux=True)(params)
    loss_sum, weight, aux, grads = jax.lax.psum((loss_sum, weight, aux, grads), AXIS)
    denom = jnp.maximum(weight.astype(jnp.float32), 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    loss = loss_sum / denom
    params, opt_state, grad_norm, finite = apply_if_finite(tx, params, opt_state, grads, loss)
    metrics = {"loss": loss, "weight": weight, "grad_norm": grad_norm,
               "finite": finite.astype(jnp.float32), **{k: v / denom for k, v in aux.items()}}
    return params, opt_state, metrics

  return jax.pmap(step, axis_name=AXIS, in_axes=(None, None, 0, None),
                  out_axes=(None, None, None), devices=devices,
                  donate_argnums=(0, 1) if donate else ())


class PmapTrainStep:
  """The pmap step with the jit train step's signature and layouts, for a stage's training loop.

  `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)` takes what the jit step of
  `runtime.CompiledStep` takes: params / opt_state replicated on `mesh` (the `dp` rules), the batch
  as global arrays split over `(data, fsdp)` (`runtime.to_global`), and a key; it returns params /
  opt_state with `state_shardings` (the same device buffers, relabelled without a copy) and
  replicated metrics. The batch is re-viewed as `[n_devices, per_device, ...]` by a jitted reshape
  that moves no data between devices.

  Args:
    loss_sum_fn: see `make_pmap_train_step`.
    tx: the optax transformation.
    mesh: the `(data, fsdp, tensor)` mesh with `tensor == 1`.
    state_shardings: `(param_shardings, opt_shardings)`, all fully replicated on `mesh`.
    name: used in the log line of the first call (which compiles).

  Raises:
    ValueError: a mesh with `tensor > 1`, or a sharding in `state_shardings` that is not fully
      replicated (use the `dp` rules).
  """

  def __init__(self, loss_sum_fn: LossSumFn, tx: optax.GradientTransformation, mesh: Mesh,
               state_shardings: tuple[Any, Any], name: str = "pmap_train_step"):
    check_mesh(mesh)
    leaves = jax.tree.leaves(state_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    bad = [s for s in leaves if not s.is_fully_replicated]
    if bad:
      raise ValueError(f"--parallelism=pmap replicates every parameter, but {len(bad)} state arrays "
                       f"are sharded (e.g. {bad[0].spec}); use --config.mesh.rules=dp")
    self.name = name
    self.mesh = mesh
    self.state_shardings = state_shardings
    # Batch shard d of `batch_sharding(mesh)` lives on mesh.devices.flat[d] when tensor == 1.
    self.devices = list(mesh.devices.flat)
    self.pmapped = make_pmap_train_step(loss_sum_fn, tx, devices=self.devices)
    stacked = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), PartitionSpec(AXIS))
    n = len(self.devices)
    self._stack = jax.jit(
        lambda b: jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), b),
        out_shardings=stacked)
    self.compile_seconds: dict = {}  # batch shapes -> seconds of the first call (compile + run)

  def __call__(self, params, opt_state, batch, rng):
    n = len(self.devices)
    bad = {k: v.shape[0] for k, v in batch.items() if v.shape[0] % n}
    if bad:
      raise ValueError(f"batch rows {bad} are not divisible by the {n} pmap devices")
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    first = key not in self.compile_seconds
    t0 = time.perf_counter()
    params, opt_state, metrics = self.pmapped(params, opt_state, self._stack(dict(batch)), rng)
    if first:
      jax.block_until_ready(metrics)
      self.compile_seconds[key] = time.perf_counter() - t0
      log.info("%s: first call for batch shapes %s (compile + run) took %.1f s on %d devices",
               self.name, dict(key), self.compile_seconds[key], n)
    params, opt_state = jax.device_put((params, opt_state), self.state_shardings)
    return params, opt_state, metrics


__all__ = ["AXIS", "LossSumFn", "PmapTrainStep", "check_mesh", "make_pmap_train_step", "replicate",
           "shard_batch"]
