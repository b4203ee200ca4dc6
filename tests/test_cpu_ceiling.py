"""benchmarks/cpu_ceiling.py on the tiny shape: the matmul floor counts every product of the step
(its FLOPs add up to the analytic count), and the figures are consistent with each other."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script
from tkre_jax.benchmarking import flops as flops_lib


def _module():
  return load_script("benchmarks/cpu_ceiling.py")


def test_floor_products_add_up_to_the_analytic_flops():
  """The products the floor times are exactly the matmuls of the analytic count: per layer and for
  the MLM head, their FLOPs sum to `flops.step_flops("mslm")["forward"]`."""
  batch, seq_len, slots = 2, 16, 4
  cfg = flops_lib.encoder_shape("tiny")
  floor = _module().gemm_floor("tiny", batch, seq_len, slots)
  products = floor["products"]
  assert set(products) == {"qkvo", "ffn_up", "ffn_down", "attn_scores", "attn_context",
                           "mlm_transform", "mlm_decoder"}
  forward = sum(cfg.num_layers * p["count_per_layer"] * p["flops"] if "count_per_layer" in p
                else p["count"] * p["flops"] for p in products.values())
  assert forward == flops_lib.step_flops("mslm", cfg, batch, seq_len, max_predictions=slots)["forward"]
  assert floor["mslm_train"]["analytic_flops"] == 3 * forward
  assert floor["mslm_train"]["seconds"] > floor["eval_forward"]["seconds"] > 0


@pytest.mark.slow
def test_main_writes_the_figures(tmp_path):
  out = tmp_path / "ceiling.json"
  result = _module().main(["--model=tiny", "--batch_size=2", "--seq_len=16",
                           "--max_predictions=4", f"--out={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  peaks = result["peak_gflops_per_s"]
  assert peaks["best"] == max(peaks["runs"]) > 0
  for part in ("mslm_train", "eval_forward"):
    f = result["gemm_floor"][part]
    assert f["floor_mfu"] == pytest.approx(f["gflops_per_s"] / peaks["best"], abs=2e-3)
  drop = result["dropout"]
  assert drop["elements"] == 2 * (2 * 4 * 16 * 16 + 2 * 2 * 16 * 32)
  assert drop["bernoulli_32bit_ms"] > 0 and drop["keep_mask_16bit_ms"] > 0
