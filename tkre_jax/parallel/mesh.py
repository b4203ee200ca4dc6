"""Device meshes: named presets, explicit mesh specs, and multi-host set-up.

Every mesh in tkre_jax has the same three axes, in this order:

  * `data`:   pure data parallelism (batch split; parameters replicated along it). Across hosts /
              slices, where links are slow.
  * `fsdp`:   fully sharded data parallelism (batch split; parameters sharded along it when the
              sharding rules say so, see `tkre_jax.parallel.sharding.RULES`).
  * `tensor`: tensor (Megatron-style) parallelism (batch replicated; attention heads / MLP columns
              split).

The batch is always split over `("data", "fsdp")`, so a mesh that puts every device on `fsdp` runs
plain data parallelism under the `dp` rules and FSDP under the `fsdp` rules: the single-host
accelerator presets therefore put all devices on `fsdp` and let the rules decide.

A mesh is named by a preset (`cpu`, `gpu`, `gpu-8`, `tpu-v4-8`, `tpu-v4-32`, `tpu-v5e-8`,
`tpu-v5p-8`, `tpu-v6e-8`; see `PRESETS` and `describe_presets()`) or by an explicit spec such as
`data:2,fsdp:2,tensor:2` (any subset of the three axes, missing axes are 1, one size may be -1 and
is filled in from the device count). `make_mesh` checks the mesh against the devices present and
raises `MeshError` saying what was expected and what was found: there is no silent fallback.

Axis types: all three axes are `AxisType.Auto`. JAX 0.10's `jax.make_mesh` defaults to
`AxisType.Explicit`, where sharding is part of every array's type and e.g. a matmul whose
contracting dimension is sharded raises `ShardingTypeError` unless the output sharding is spelled
out at every op. tkre_jax instead gives shardings only at the edges (jit `in_shardings` /
`out_shardings`) and at a few points inside (`jax.lax.with_sharding_constraint`) and lets the XLA
SPMD partitioner propagate the rest and insert the collectives, which is what `Auto` means.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

from absl import logging
import jax
from jax.sharding import AxisType, Mesh

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Mesh axis names, in mesh order."""

_DISTRIBUTED_FLAG = "TKRE_DISTRIBUTED"


class MeshError(ValueError):
  """A mesh spec is malformed, or does not match the devices present."""


@dataclasses.dataclass(frozen=True)
class MeshPreset:
  """A named mesh layout and the hardware it is meant for.

  Attributes:
    name: preset name (`tpu-v4-8`) or, for explicit specs, the spec string itself.
    shape: mesh axis name -> size, over a subset of `AXES`; at most one size is -1 (filled in from
      the device count); missing axes have size 1.
    platform: expected `jax.Device.platform` (`cpu`, `gpu`, `tpu`), or None for any platform.
    num_devices: expected total (global) device count, or None for any count.
    num_hosts: expected number of JAX processes, or None for any number.
    description: one line for humans (shown in `describe_presets()` and in errors).
    device_kinds: accepted `jax.Device.device_kind` values; a mismatch only logs a warning (the
      strings vary between runtimes), an empty tuple accepts any kind.
  """

  name: str
  shape: Mapping[str, int]
  platform: str | None
  num_devices: int | None
  num_hosts: int | None
  description: str
  device_kinds: tuple[str, ...] = ()

  def resolved_shape(self, num_devices: int) -> dict[str, int]:
    """This preset's mesh shape for `num_devices` devices, all of `AXES` present, -1 filled in."""
    return resolve_shape(self.shape, num_devices, what=self.name)

  @property
  def hardware(self) -> str:
    """What the preset expects, in words: `4 TPU devices (TPU v4)`, `any number of cpu devices`."""
    platform = self.platform.upper() if self.platform in ("gpu", "tpu") else (self.platform or "")
    kinds = f" ({' / '.join(self.device_kinds)})" if self.device_kinds else ""
    if self.num_devices is None:
      what = f"any number of {platform} devices".replace("  ", " ")
    else:
      what = f"{self.num_devices} {platform} devices".replace("  ", " ")
    if self.num_hosts is not None and self.num_hosts > 1:
      what += f" on {self.num_hosts} hosts"
    return what + kinds


def _tpu(name, n, hosts, kinds, description):
  return MeshPreset(name=name, shape={"fsdp": n}, platform="tpu", num_devices=n, num_hosts=hosts,
                    description=description, device_kinds=kinds)


PRESETS: dict[str, MeshPreset] = {
    p.name: p for p in (
        MeshPreset("cpu", {"data": -1}, "cpu", None, 1,
                   "all local CPU devices on data (tests use 8 fake ones)"),
        MeshPreset("gpu", {"data": -1}, "gpu", None, None,
                   "all GPUs (of every process) on data: plain data parallelism"),
        # fsdp=8 rather than data=8: the batch is split over (data, fsdp) either way, so this one
        # mesh runs pure data parallelism under RULES["dp"] and ZeRO-3 style FSDP under
        # RULES["fsdp"]; the choice is left to the rules. NVLink makes the all-gathers cheap.
        MeshPreset("gpu-8", {"fsdp": 8}, "gpu", 8, 1,
                   "one host with 8 GPUs, all on fsdp (rules choose DP or FSDP)"),
        _tpu("tpu-v4-8", 4, 1, ("TPU v4",), "TPU v4-8: 4 chips (8 cores), one host"),
        # A single v4-32 slice: all 16 chips are on one ICI torus, so fsdp spans the whole slice
        # (as MaxText's default ici_fsdp=-1 does); `data` is for slow links (DCN, multi-slice).
        _tpu("tpu-v4-32", 16, 4, ("TPU v4",), "TPU v4-32: 16 chips on 4 hosts, one ICI slice"),
        _tpu("tpu-v5e-8", 8, 1, ("TPU v5 lite", "TPU v5e"), "TPU v5e-8 (v5litepod-8): 8 chips"),
        _tpu("tpu-v5p-8", 4, 1, ("TPU v5", "TPU v5p"), "TPU v5p-8: 4 chips (8 cores), one host"),
        _tpu("tpu-v6e-8", 8, 1, ("TPU v6 lite", "TPU v6e"), "TPU v6e-8 (Trillium): 8 chips"),
    )
}
"""The named meshes; `make_mesh` also accepts explicit specs like `data:2,fsdp:2,tensor:2`."""


def describe_presets() -> str:
  """A table of the presets (name, mesh shape, expected hardware, description), one per line."""
  lines = []
  for p in PRESETS.values():
    shape = ",".join(f"{k}:{v}" for k, v in p.shape.items())
    lines.append(f"{p.name:<10} {shape:<10} {p.hardware:<40} {p.description}")
  lines.append(f"{'explicit':<10} {'e.g. data:2,fsdp:2,tensor:2':<51} any subset of {AXES}, "
               "missing axes = 1, at most one -1")
  return "\n".join(lines)


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses an explicit spec `data:2,fsdp:-1` into `{"data": 2, "fsdp": -1}` (missing axes left out).

  Args:
    spec: comma-separated `axis:size` items over `AXES`; a size is a positive int or -1 (at most
      one -1).

  Returns:
    axis -> size, in the order written.

  Raises:
    MeshError: empty spec, an item without `:`, an unknown or repeated axis, a size that is not an
      int, zero or below -1, or more than one -1.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise MeshError(f"empty mesh spec {spec!r}; give a preset ({', '.join(PRESETS)}) or "
                    "axis:size items like data:2,fsdp:2,tensor:2")
  shape: dict[str, int] = {}
  for item in spec.split(","):
    item = item.strip()
    axis, sep, size_text = item.partition(":")
    axis = axis.strip()
    if not sep:
      raise MeshError(f"mesh spec {spec!r}: item {item!r} is not axis:size (e.g. data:2); "
                      f"{spec!r} is not a preset either (presets: {', '.join(PRESETS)})")
    if axis not in AXES:
      raise MeshError(f"mesh spec {spec!r}: unknown axis {axis!r}; axes are {', '.join(AXES)}")
    if axis in shape:
      raise MeshError(f"mesh spec {spec!r}: axis {axis!r} given twice")
    try:
      size = int(size_text.strip())
    except ValueError:
      raise MeshError(f"mesh spec {spec!r}: size {size_text!r} of axis {axis!r} is not an "
                      "integer") from None
    if size == 0 or size < -1:
      raise MeshError(f"mesh spec {spec!r}: size {size} of axis {axis!r} must be >= 1 or -1")
    shape[axis] = size
  if sum(1 for v in shape.values() if v == -1) > 1:
    raise MeshError(f"mesh spec {spec!r}: at most one axis may be -1 (filled in from the device "
                    "count)")
  return shape


def resolve_shape(shape: Mapping[str, int], num_devices: int, *,
                  what: str = "mesh") -> dict[str, int]:
  """Fills in the -1 axis and the missing axes of `shape` for `num_devices` devices.

  Args:
    shape: axis -> size over a subset of `AXES`; at most one -1.
    num_devices: device count the axis sizes must multiply to.
    what: name used in error messages.

  Returns:
    `{"data": d, "fsdp": f, "tensor": t}` in `AXES` order with d * f * t == num_devices.

  Raises:
    MeshError: unknown axis, more than one -1, or sizes that cannot multiply to `num_devices`.
  """
  unknown = [a for a in shape if a not in AXES]
  if unknown:
    raise MeshError(f"{what}: unknown mesh axes {unknown}; axes are {', '.join(AXES)}")
  free = [a for a, v in shape.items() if v == -1]
  if len(free) > 1:
    raise MeshError(f"{what}: at most one axis may be -1, got {dict(shape)}")
  bad = {a: v for a, v in shape.items() if v != -1 and (not isinstance(v, int) or v < 1)}
  if bad:
    raise MeshError(f"{what}: axis sizes must be positive ints or -1, got {bad}")
  full = {a: int(shape.get(a, 1)) for a in AXES}
  fixed = math.prod(v for v in full.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(
          f"{what}: cannot fill {free[0]}=-1: the other axes multiply to {fixed}, which does not "
          f"divide the {num_devices} devices")
    full[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f"{what}: axis sizes {full} multiply to {fixed}, but there are {num_devices} "
                    "devices; the product must equal the device count (or use -1 for one axis)")
  return full


def get_preset(spec: str | MeshPreset) -> MeshPreset:
  """The `MeshPreset` for a preset name or an explicit `axis:size,...` spec.

  An explicit spec accepts any platform and any number of hosts; its device count is the product
  of its sizes (None when one size is -1).

  Raises:
    MeshError: neither a known preset nor a valid explicit spec.
  """
  if isinstance(spec, MeshPreset):
    return spec
  if isinstance(spec, str) and spec.strip() in PRESETS:
    return PRESETS[spec.strip()]
  shape = parse_mesh_spec(spec)
  n = None if -1 in shape.values() else math.prod(shape.values())
  return MeshPreset(name=spec.strip(), shape=shape, platform=None, num_devices=n, num_hosts=None,
                    description="explicit mesh spec")


def _describe_devices(devices: Sequence[jax.Device], limit: int = 8) -> str:
  platforms = sorted({d.platform for d in devices})
  kinds = sorted({d.device_kind for d in devices})
  names = ", ".join(str(d) for d in devices[:limit])
  if len(devices) > limit:
    names += f", ... ({len(devices) - limit} more)"
  return (f"found {len(devices)} devices of platform {'/'.join(platforms) or 'none'} "
          f"(kind {'/'.join(kinds) or 'none'}) in {jax.process_count()} process(es): {names}")


def validate_devices(preset: MeshPreset, devices: Sequence[jax.Device]) -> dict[str, int]:
  """Checks `devices` against `preset`; returns the resolved mesh shape.

  Raises:
    MeshError: wrong platform, wrong device count, sizes that do not multiply to the device count,
      or a multi-host preset run with the wrong number of processes (in particular one process).
  """
  devices = list(devices)
  found = _describe_devices(devices)
  kind = "preset" if PRESETS.get(preset.name) is preset else "mesh"
  expects = f"{kind} {preset.name} expects {preset.hardware}"
  if preset.num_hosts is not None and preset.num_hosts > 1 and jax.process_count() == 1:
    raise MeshError(
        f"{expects}, but this is a single process: {preset.name} is a multi-host pod slice, so "
        f"start the program on all {preset.num_hosts} hosts (e.g. gcloud ... tpu-vm ssh "
        "--worker=all) and call tkre_jax.parallel.mesh.maybe_initialize_distributed() before any "
        f"JAX computation; {found}")
  if preset.num_hosts is not None and jax.process_count() != preset.num_hosts:
    raise MeshError(f"{expects}, but jax.process_count() is {jax.process_count()}; {found}")
  if preset.platform is not None and any(d.platform != preset.platform for d in devices):
    hint = " (set JAX_PLATFORMS=cpu)" if preset.platform == "cpu" else ""
    raise MeshError(f"{expects}{hint}; {found}")
  if preset.num_devices is not None and len(devices) != preset.num_devices:
    sizes = " x ".join(f"{a}={v}" for a, v in preset.shape.items())
    raise MeshError(f"{expects} (axis sizes {sizes} must multiply to the device count); {found}")
  if not devices:
    raise MeshError(f"{expects}; found no devices")
  if preset.device_kinds and not all(d.device_kind in preset.device_kinds for d in devices):
    logging.warning("mesh preset %s expects device kind %s; building the mesh anyway, %s",
                    preset.name, " / ".join(preset.device_kinds), found)
  try:
    return preset.resolved_shape(len(devices))
  except MeshError as e:
    raise MeshError(f"{e}; {found}") from None


def make_mesh(spec: str | MeshPreset, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `("data", "fsdp", "tensor")` mesh for a preset or explicit spec.

  Args:
    spec: a preset name (see `PRESETS`), an explicit spec like `data:2,fsdp:2,tensor:2` or
      `data:-1,tensor:2`, or a `MeshPreset`.
    devices: the devices to lay out; default `jax.devices()` (all devices of all processes). All of
      them are used: the axis sizes must multiply to their number.

  Returns:
    A `jax.sharding.Mesh` with axis names `AXES` (sizes in that order) and all axis types
    `AxisType.Auto` (see the module docstring for why not `Explicit`).

  Raises:
    MeshError: malformed spec, or a mesh that does not match the devices (platform, count, number
      of hosts); the message lists what was expected and what was found.
  """
  preset = get_preset(spec)
  devices = list(jax.devices() if devices is None else devices)
  shape = validate_devices(preset, devices)
  # Auto axes: shardings come from jit in/out_shardings and with_sharding_constraint; the SPMD
  # partitioner propagates them and inserts collectives (Explicit would make a matmul over a
  # sharded contracting dim a ShardingTypeError).
  return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def multi_process_reason(env: Mapping[str, str] | None = None) -> str | None:
  """Why this process looks like one of several JAX processes, or None for a single process.

  Looks at (in order): `TKRE_DISTRIBUTED=1`, `JAX_COORDINATOR_ADDRESS`, `TPU_WORKER_HOSTNAMES` with
  more than one host (Cloud TPU pod slices), `SLURM_NTASKS` / `SLURM_STEP_NUM_TASKS` > 1, and
  `OMPI_COMM_WORLD_SIZE` > 1 (Open MPI). `TKRE_DISTRIBUTED=0` forces a single process.
  """
  env = os.environ if env is None else env
  flag = env.get(_DISTRIBUTED_FLAG, "").strip().lower()
  if flag in ("0", "false", "no"):
    return None
  if flag in ("1", "true", "yes"):
    return f"{_DISTRIBUTED_FLAG}={env[_DISTRIBUTED_FLAG]}"
  if env.get("JAX_COORDINATOR_ADDRESS", "").strip():
    return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    value = env.get(name, "").strip()
    if value.isdigit() and int(value) > 1:
      return f"{name}={value}"
  return None


def maybe_initialize_distributed(force: bool | None = None, **kwargs) -> bool:
  """Calls `jax.distributed.initialize()` when running as one of several processes.

  Must run before any JAX computation. A no-op on a single process, and when already initialised.

  Args:
    force: True: always initialise; False: never; None: decide with `multi_process_reason()`.
    **kwargs: passed to `jax.distributed.initialize` (coordinator_address, num_processes,
      process_id, ...); by default JAX detects them from the cluster environment.

  Returns:
    True when the distributed system is (now) initialised, False for a single process.

  Raises:
    RuntimeError: a multi-process run detected after JAX's backends were already started.
  """
  if jax.distributed.is_initialized():
    return True
  reason = "force=True" if force else (None if force is False else multi_process_reason())
  if reason is None:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    raise RuntimeError(
        f"multi-process run detected ({reason}) but JAX backends are already initialised; call "
        "maybe_initialize_distributed() first thing, before any jax.devices() or computation")
  logging.info("initialising jax.distributed (%s)", reason)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0 (the one that logs, writes summaries and metadata)."""
  return jax.process_index() == 0


def per_process(value: int) -> list[int]:
  """Every process's `value`, in process order (`[value]` on a single process). A collective with
  more than one process: all of them must call it, at the same point of the program."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray([value], np.int32))
  return [int(v) for v in np.asarray(gathered).reshape(-1)]
