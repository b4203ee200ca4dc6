"""Host allocator settings for XLA:CPU: keep freed buffers in the process instead of handing them
back to the kernel after every step.

XLA:CPU allocates each step's temporaries (activations, gradients, the MLM logits) with `malloc` and
frees them when the step ends. With glibc's defaults, blocks above the mmap threshold (128 KiB,
rising to at most 32 MiB) are `mmap`-ed and `munmap`-ed each time, and every worker thread has its own
arena whose top is trimmed back to the kernel; the next step then page-faults all of that memory in
again, zero-filled by the kernel. On the project's 2-core machine that was 12-18% of a MiniLM
training process's CPU time spent in the kernel (7.8M page faults in a 2-minute bench process).

`tune_malloc()` sets, through glibc's `mallopt` (the same knobs as the environment variables
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX`):

  * `M_MMAP_MAX = 0`: no block is `mmap`-ed; every block comes from the heap;
  * `M_TRIM_THRESHOLD = 2**31 - 1`: freed memory at the heap's top is kept, not trimmed;
  * `M_ARENA_MAX = 1`: one arena (the `brk` heap) for every thread; the per-thread arenas are
    `mmap`-ed heaps that would be faulted in and trimmed the same way.

The numbers a run computes do not change (only where the buffers live); the process's resident
memory stays at its high-water mark instead of shrinking between steps (README Performance has the
measurements).

It must run before JAX starts its backend (and its thread pool): `tkre_jax.main` calls it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Mapping, Optional

log = logging.getLogger(__name__)

MODES = ("auto", "tuned", "default")

# glibc <malloc.h> parameter numbers of mallopt.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, "M_MMAP_MAX", 0), (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", 2**31 - 1),
            (M_ARENA_MAX, "M_ARENA_MAX", 1))


def cpu_run(mesh_spec: str, env: Optional[Mapping[str, str]] = None) -> bool:
  """Whether a run is meant for the CPU backend, decided without starting JAX's backend.

  True for the `cpu` mesh preset, `JAX_PLATFORMS=cpu`, or fake CPU devices
  (`--xla_force_host_platform_device_count` in `XLA_FLAGS`).
  """
  env = os.environ if env is None else env
  return (mesh_spec == "cpu" or env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
          or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""))


def tune_malloc(mode: str, *, mesh_spec: str = "cpu",
                env: Optional[Mapping[str, str]] = None) -> dict:
  """Applies the allocator settings of the module docstring when `mode` asks for them.

  Args:
    mode: "tuned" (always), "default" (never: glibc's defaults), or "auto" (when `cpu_run(mesh_spec)`;
      accelerator hosts keep glibc's defaults, which this project has not measured there).
    mesh_spec: the `--mesh` flag.
    env: the environment `cpu_run` reads (default `os.environ`).

  Returns:
    {"mode": mode, "applied": bool, "why": str}: what was done, for the stage's summary.

  Raises:
    ValueError: unknown `mode`.
  """
  if mode not in MODES:
    raise ValueError(f"--host_malloc must be one of {MODES}, got {mode!r}")
  if mode == "default" or (mode == "auto" and not cpu_run(mesh_spec, env)):
    return {"mode": mode, "applied": False, "why": "glibc defaults"}
  if not sys.platform.startswith("linux"):
    return {"mode": mode, "applied": False, "why": f"not Linux ({sys.platform})"}
  name = ctypes.util.find_library("c") or "libc.so.6"
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others: no mallopt
    return {"mode": mode, "applied": False, "why": f"{name} has no mallopt (not glibc)"}
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  failed = [label for param, label, value in SETTINGS if mallopt(param, value) != 1]
  if failed:
    log.warning("host_malloc: mallopt refused %s; glibc defaults kept for those", failed)
    return {"mode": mode, "applied": False, "why": f"mallopt refused {failed}"}
  return {"mode": mode, "applied": True,
          "why": ", ".join(f"{label}={value}" for _, label, value in SETTINGS)}
