"""`--host_malloc`: when the glibc allocator is tuned, and that tuning keeps freed buffers in the
process (a buffer allocated again after a free costs no page faults)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tkre_jax import config as config_lib
from tkre_jax.parallel import host_memory


@pytest.mark.parametrize("mesh, env, expected", [
    ("cpu", {}, True),
    ("gpu", {}, False),
    ("tpu-v4-8", {}, False),
    ("data:2,fsdp:4", {}, False),
    ("data:2,fsdp:4", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, True),
    ("gpu", {"JAX_PLATFORMS": "cpu"}, True),
    ("gpu", {"JAX_PLATFORMS": "cuda"}, False),
])
def test_cpu_run_is_read_from_the_mesh_and_the_environment(mesh, env, expected):
  assert host_memory.cpu_run(mesh, env) is expected


def test_modes_that_do_not_tune_and_a_bad_mode():
  assert host_memory.tune_malloc("default")["applied"] is False
  # auto on an accelerator host: glibc's defaults (nothing is called in this process)
  assert host_memory.tune_malloc("auto", mesh_spec="tpu-v4-8", env={}) == {
      "mode": "auto", "applied": False, "why": "glibc defaults"}
  with pytest.raises(ValueError, match="--host_malloc must be one of"):
    host_memory.tune_malloc("fast")


_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from tkre_jax.parallel import host_memory
    result = host_memory.tune_malloc(sys.argv[1])
    a = np.ones(16 << 20, np.float32); del a          # 64 MiB: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      a = np.ones(16 << 20, np.float32); del a
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"faults": faults, **result}))
""")


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_tuned_malloc_reuses_freed_buffers_without_page_faults():
  out = {}
  for mode in ("default", "tuned"):
    proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=config_lib.REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  # one 64 MiB buffer is 32 faults at the least (2 MiB transparent huge pages), 16,384 with 4 KiB
  huge_pages = (64 << 20) // (2 << 20)
  # glibc's defaults: every 64 MiB buffer is a fresh mmap, faulted in again
  assert out["default"]["applied"] is False and out["default"]["faults"] >= 10 * huge_pages, out
  # tuned: the freed buffer is reused from the heap: not even one buffer's worth of faults
  assert out["tuned"]["applied"] is True, out
  assert out["tuned"]["faults"] < huge_pages, out
