"""The accelerator programs checked without an accelerator (`benchmarking.lowering`): every program
lowers for every preset's platform (the tiny encoder), per-device bytes against a hand count, the
memory plan's parts, and the first-hour script failing clearly on a machine without the device."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from tkre_jax import config as config_lib
from tkre_jax.benchmarking import flops as flops_lib
from tkre_jax.benchmarking import lowering
from tests.conftest import REPO_ROOT
from tests.helpers import subprocess_env


@pytest.mark.slow
def test_every_program_lowers_for_every_preset():
  config = config_lib.base_config()
  enc = flops_lib.encoder_shape("tiny")
  shapes = lowering.Shapes(batch_size=16, seq_len=32, num_labels=16)
  failed, rows = [], []
  for preset in lowering.ACCELERATOR_PRESETS:
    for program in lowering.PROGRAMS:
      row = lowering.lower(program, preset, enc, shapes, config, "fsdp")
      rows.append(row)
      if row["status"] != "lowered":
        failed.append(f"{preset} {program}: {row['error']}\n{row.get('traceback', '')}")
  assert not failed, "\n".join(failed)
  assert len(rows) == 7 * 7
  assert {r["platform"] for r in rows} == {"tpu", "cuda"}
  # under the fsdp rules a device holds a shard of the parameters
  ft = next(r for r in rows if (r["preset"], r["program"]) == ("tpu-v4-8", "finetune"))
  assert ft["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert ft["param_bytes_per_device"] < ft["param_bytes"]
  # dp rules replicate the parameters: one device holds them all
  dp = lowering.lower("finetune", "tpu-v4-8", enc, shapes, config, "dp")
  assert dp["status"] == "lowered" and dp["param_bytes_per_device"] == dp["param_bytes"]


def test_per_device_bytes_count_the_shards():
  mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
  tree = {"a": jax.ShapeDtypeStruct((64, 32), jnp.float32),   # split 4 ways: 2048 B
          "b": jax.ShapeDtypeStruct((16,), jnp.bfloat16),       # replicated: 32 B
          "c": jax.ShapeDtypeStruct((8, 8), jnp.float32)}       # split 8 ways: 32 B
  shardings = {"a": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P()),
               "c": NamedSharding(mesh, P(("data", "fsdp"), None))}
  assert lowering.per_device_bytes(tree, shardings) == 64 * 32 * 4 // 4 + 32 + 8 * 8 * 4 // 8
  top = lowering.largest_arrays(tree, shardings, n=2)
  assert [t["path"] for t in top] == ["['a']", "['c']"] and top[0]["spec"] == "('fsdp', None)"


def test_the_memory_plan_adds_its_parts_and_scales_with_the_mesh():
  enc = flops_lib.encoder_shape("bert-base", dtype="bfloat16")
  plan4 = lowering.memory_plan(enc, "tpu-v4-8", "fsdp", 64, 128)
  plan8 = lowering.memory_plan(enc, "gpu-8", "fsdp", 64, 128)
  for p in (plan4, plan8):
    assert p["total_bytes"] == (p["param_bytes"] + p["opt_bytes"] + p["grad_bytes"]
                                + p["activation_bytes"])
    assert p["grad_bytes"] == p["param_bytes"]
  # bert-base, ~110M float32 parameters: fsdp over 4 and 8 devices
  assert 100e6 * 4 / 4 < plan4["param_bytes"] < 120e6 * 4 / 4 * 1.05
  assert plan8["param_bytes"] == pytest.approx(plan4["param_bytes"] / 2, rel=0.05)
  # AdamW's two float32 moments: twice the parameters (plus a counter)
  assert plan4["opt_bytes"] == pytest.approx(2 * plan4["param_bytes"], rel=0.01)
  # activations: 16 rows a device on 4 chips (Korthikanti et al. at 16-bit), 8 on 8
  s, b, h, a, layers = 128, 16, 768, 12, 12
  want = layers * s * b * h * (34 + 5 * a * s / h) + s * b * h * 2
  assert plan4["activation_bytes"] == pytest.approx(want, rel=1e-6)
  assert plan8["activation_bytes"] == pytest.approx(want / 2, rel=1e-6)
  assert plan4["max_batch"] % 4 == 0 and plan4["max_batch"] > 64


@pytest.mark.subprocess
@pytest.mark.parametrize("mesh,names", [("gpu", "GPU"), ("tpu-v4-8", "TPU")])
def test_the_first_hour_script_stops_without_the_device(tmp_path, mesh, names):
  env = {**subprocess_env(), "OUT": str(tmp_path / "fh"), "PY": sys.executable}
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine without the accelerator
  proc = subprocess.run(["bash", "launch/first_hour.sh", mesh], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert f"preset {mesh} expects" in proc.stderr and names in proc.stderr
  assert not (tmp_path / "fh" / "check" / "step").exists()  # stopped before any step
