r"""What bounds the MFU of our steps on this CPU: the matmul-only floor and the cost of dropout draws.

The bench stage divides a step's analytic model FLOPs (`tkre_jax.benchmarking.flops`: matmuls only) by
the best 2048 x 2048 float32 matmul rate measured in the same run. A step also does work that is
not a matmul (softmax, LayerNorm, GELU, dropout's random bits, the loss, AdamW), and its own
matmuls are smaller and more oddly shaped than 2048^3. This script measures, in one run:

  * `peak`: the 2048 x 2048 float32 matmul rate (GFLOP/s), before and after, and the best;
  * `gemm_floor`: every matrix product of the step, each timed alone at the step's own shapes
    (for training: the forward product and both backward products, dA = dC B^T and dB = A^T dC),
    summed over layers: the step time if nothing but matmuls ran. `floor_mfu` is the analytic
    FLOPs over that time over the peak: no step can reach a higher MFU;
  * `dropout`: the time of the train step's ~29 M dropout draws (attention probabilities and two
    hidden-state sites per layer, MiniLM-L6 16 x 128) with `jax.random.bernoulli` (one 32-bit
    word each) and with `tkre_jax.model.attention.keep_mask` (16-bit draws, two per word).

    python benchmarks/cpu_ceiling.py --out=benchmarks/cpu_ceiling.json

Figures vary with the host (this 2-core VM's matmul rate drifts 260-420 GFLOP/s); compare them only
with figures from the same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tkre_jax.benchmarking import flops as flops_lib  # noqa: E402
from tkre_jax.model import attention as attention_lib  # noqa: E402


def median_seconds(fn, *args, steps: int = 7, warmup: int = 1) -> float:
  """Median wall seconds of the jitted `fn(*args)` across `block_until_ready` (compile excluded)."""
  fn = jax.jit(fn)
  for _ in range(warmup + 1):
    jax.block_until_ready(fn(*args))
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def matmul_peak(size: int = 2048) -> float:
  """FLOP/s of a float32 `size` x `size` matmul."""
  a = jnp.ones((size, size), jnp.float32)
  return 2 * size ** 3 / median_seconds(lambda x: x @ x, a, steps=10)


def gemm_times(m: int, k: int, n: int, batch: int = 0) -> tuple[float, float, float, int]:
  """Seconds of C = A B, dA = dC B^T and dB = A^T dC for A [m, k], B [k, n] (batched over `batch`
  when > 0), and the FLOPs of one of them."""
  lead = (batch,) if batch else ()
  a, b, c = (jnp.ones(lead + s, jnp.float32) for s in ((m, k), (k, n), (m, n)))
  p = "z" if batch else ""
  fwd = median_seconds(lambda a, b: jnp.einsum(f"{p}mk,{p}kn->{p}mn", a, b), a, b)
  d_a = median_seconds(lambda c, b: jnp.einsum(f"{p}mn,{p}kn->{p}mk", c, b), c, b)
  d_b = median_seconds(lambda a, c: jnp.einsum(f"{p}mk,{p}mn->{p}kn", a, c), a, c)
  return fwd, d_a, d_b, 2 * max(batch, 1) * m * k * n


def gemm_floor(model: str, batch: int, seq_len: int, max_predictions: int) -> dict:
  """The matmul-only time of the MSLM train step and of the eval forward pass (encoder only)."""
  cfg = flops_lib.encoder_shape(model)
  t, h, i = batch * seq_len, cfg.hidden_size, cfg.intermediate_size
  heads = cfg.num_heads
  d = h // heads
  layer = {
      "qkvo": (4, gemm_times(t, h, h)),
      "ffn_up": (1, gemm_times(t, h, i)),
      "ffn_down": (1, gemm_times(t, i, h)),
      "attn_scores": (1, gemm_times(seq_len, d, seq_len, batch * heads)),
      "attn_context": (1, gemm_times(seq_len, seq_len, d, batch * heads)),
  }
  p = batch * max_predictions
  head = {"mlm_transform": (1, gemm_times(p, h, h)),
          "mlm_decoder": (1, gemm_times(p, h, cfg.vocab_size))}
  nl = cfg.num_layers
  fwd_s = nl * sum(c * g[0] for c, g in layer.values())
  train_s = (nl * sum(c * sum(g[:3]) for c, g in layer.values())
             + sum(c * sum(g[:3]) for c, g in head.values()))
  fl = {k: flops_lib.step_flops(k, cfg, batch, seq_len, max_predictions=max_predictions)
        for k in ("mslm", "eval")}
  per = {name: {"count_per_layer" if name in layer else "count": c, "flops": g[3],
                "ms": [round(1e3 * x, 2) for x in g[:3]],
                "gflops_per_s": [round(g[3] / x / 1e9, 1) for x in g[:3]]}
         for name, (c, g) in {**layer, **head}.items()}
  return {"mslm_train": {"seconds": train_s, "analytic_flops": fl["mslm"]["step"]},
          "eval_forward": {"seconds": fwd_s, "analytic_flops": fl["eval"]["step"]},
          "products": per}


def dropout_draws(batch: int, seq_len: int, model: str) -> dict:
  """Seconds of one train step's dropout masks (every layer: attention probabilities and two
  hidden-state sites) with `jax.random.bernoulli` and with `attention.keep_mask`."""
  cfg = flops_lib.encoder_shape(model)
  shapes = ([(batch, cfg.num_heads, seq_len, seq_len)] + [(batch, seq_len, cfg.hidden_size)] * 2)
  draws = {
      "bernoulli_32bit": lambda k, s: jax.random.bernoulli(k, 0.9, s),
      "keep_mask_16bit": lambda k, s: attention_lib.keep_mask(k, 0.1, s)[0],
  }
  out = {"elements": cfg.num_layers * sum(int(jnp.prod(jnp.array(s))) for s in shapes)}
  xs = [jnp.ones(s, jnp.float32) for s in shapes]
  for name, draw in draws.items():
    def masks(key, xs, draw=draw):
      total = jnp.float32(0)
      for layer in range(cfg.num_layers):
        for j, x in enumerate(xs):
          keep = draw(jax.random.fold_in(key, 3 * layer + j), x.shape)
          total = total + jnp.where(keep, x, 0.0).sum()
      return total
    out[name + "_ms"] = round(1e3 * median_seconds(masks, jax.random.key(0), xs), 1)
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="minilm-l6")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--max_predictions", type=int, default=32)
  ap.add_argument("--out", default="", help="write the figures as JSON here")
  args = ap.parse_args(argv)
  peaks = [matmul_peak()]
  floor = gemm_floor(args.model, args.batch_size, args.seq_len, args.max_predictions)
  drop = dropout_draws(args.batch_size, args.seq_len, args.model)
  peaks.append(matmul_peak())
  peak = max(peaks)
  for part in ("mslm_train", "eval_forward"):
    f = floor[part]
    f["ms"] = round(1e3 * f.pop("seconds"), 1)
    f["gflops_per_s"] = round(f["analytic_flops"] / f["ms"] / 1e6, 1)
    f["floor_mfu"] = round(f["analytic_flops"] / (f["ms"] / 1e3) / peak, 3)
  result = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "max_predictions": args.max_predictions, "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "peak_gflops_per_s": {"runs": [round(p / 1e9, 1) for p in peaks], "best": round(peak / 1e9, 1)},
            "gemm_floor": floor, "dropout": drop,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  print(f"float32 2048^3 matmul: {result['peak_gflops_per_s']['runs']} GFLOP/s (best {peak / 1e9:.0f})")
  for part, label in (("mslm_train", "MSLM train step"), ("eval_forward", "eval forward")):
    f = floor[part]
    print(f"{label}: its matmuls alone take {f['ms']:.0f} ms for {f['analytic_flops'] / 1e9:.1f} "
          f"GFLOP = {f['gflops_per_s']:.0f} GFLOP/s = {f['floor_mfu']:.0%} of the peak (the MFU ceiling)")
  print(f"dropout masks of one train step ({drop['elements'] / 1e6:.1f} M draws): bernoulli "
        f"{drop['bernoulli_32bit_ms']:.0f} ms, 16-bit keep_mask {drop['keep_mask_16bit_ms']:.0f} ms")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)
  return result


if __name__ == "__main__":
  main()
