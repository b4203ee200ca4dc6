"""JAX's persistent compilation cache, shared by the stage processes of a pipeline, and this
process's compilation accounting.

Every stage is a fresh `python -m tkre_jax.main` process, so without a disk cache each one compiles
its programs from scratch, although many are the same XLA programs: the baseline fine-tuning
compiles the predict step the TKRE fine-tuning compiled, eval compiles it again, every training
stage its parameter-init and optimizer-init programs. With `enable(path)` (`--compilation_cache_dir`,
default `$TKRE_COMPILATION_CACHE`) each compiled executable is written to `path`, and a later process
that lowers the same program (same HLO, compile options, devices, jax and XLA versions) loads it
instead of compiling. The loaded executable is the one the first process compiled, so results are
the same bit for bit.

Every program is cached, on every backend (CPU included): no minimum compile time or entry size.

`track()` (called by `tkre_jax.main`, with or without a cache) counts this process's XLA
compilations, their seconds (a cache load counts as one, with its load time) and the cache hits;
`stats()` returns them and `runtime.CompiledStep` logs whether each step's compile was a hit.

The cache is trusted code: a folder others can write to lets them run code in your process (JAX's
warning). Keep it inside your own workdir.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Optional

import jax

log = logging.getLogger(__name__)

ENV_VAR = "TKRE_COMPILATION_CACHE"

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # compile or cache load
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")

_lock = threading.Lock()
_counts = {"hits": 0, "compiles": 0, "compile_seconds": 0.0, "trace_seconds": 0.0}
_tracking = False


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event == _HIT_EVENT:
    with _lock:
      _counts["hits"] += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == _BACKEND_COMPILE_EVENT:
    with _lock:
      _counts["compiles"] += 1
      _counts["compile_seconds"] += float(duration)
  elif event in _TRACE_EVENTS:
    with _lock:
      _counts["trace_seconds"] += float(duration)


def track() -> None:
  """Starts counting this process's compilations and cache hits (idempotent)."""
  global _tracking
  with _lock:
    if _tracking:
      return
    _tracking = True
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


def default_dir() -> str:
  """`$TKRE_COMPILATION_CACHE`, or '' (no cache)."""
  return os.environ.get(ENV_VAR, "")


def enable(path: Optional[str]) -> Optional[pathlib.Path]:
  """Turns JAX's persistent compilation cache on at `path` (created if missing) and starts
  `track()`ing; '' or None leaves it off. Call it before the process's first compilation.

  Returns:
    the absolute cache folder, or None when off.
  """
  if not path:
    return None
  folder = pathlib.Path(os.path.expanduser(path)).resolve()
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Cache every program: the defaults skip those compiled in under 1 s and, on some file systems,
  # small entries; a stage's many small programs (parameter and optimizer init, the finiteness
  # check) add up. jax_persistent_cache_enable_xla_caches keeps its default: XLA's GPU autotuning
  # results go under the same folder (the CPU backend has no XLA-level cache).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  track()
  log.info("persistent compilation cache: %s", folder)
  return folder


def is_enabled() -> bool:
  """Whether this process has a persistent compilation cache folder set."""
  return bool(jax.config.jax_compilation_cache_dir)


def hits() -> int:
  """Persistent-cache hits of this process so far (counted from `track()` / `enable` on)."""
  with _lock:
    return _counts["hits"]


def stats() -> dict:
  """This process's XLA compilations since `track()`: `compiles` (cache loads included),
  `compile_seconds` (XLA compile or cache load), `trace_seconds` (tracing and lowering to MLIR),
  `cache_hits`, and `cache` (the folder, or None)."""
  with _lock:
    c = dict(_counts)
  return {"compiles": c["compiles"], "compile_seconds": round(c["compile_seconds"], 1),
          "trace_seconds": round(c["trace_seconds"], 1), "cache_hits": c["hits"],
          "cache": jax.config.jax_compilation_cache_dir or None}
