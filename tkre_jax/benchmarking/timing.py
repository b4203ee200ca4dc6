"""Timing and the JSON rows of the bench stage (`tkre_jax.stages.bench`): a train step or the
eval forward pass timed across `jax.block_until_ready`, its compiled program's FLOPs and memory, the
CPU matmul peak measured in the same run, and one row per timed step.

A row (`row_filename`:
`<platform>x<devices>[-<mesh>]-<rules>_<stage>_<model>_<dtype>_b<batch>x<seq_len>.json`) holds
compile time; step time (median, p10, p90, mean, in seconds); sequences/s and tokens/s
(positions per second: batch x seq_len / median step time), globally and per device; the analytic
FLOPs of the step (`benchmarking.flops.step_flops`, PaLM App. B: matmuls only, train = 3x forward) next to
XLA's count of the compiled step (`cost_analysis()["flops"]`, per device: it also counts element-wise
work, so analytic / XLA < 1); model TFLOP/s per device and MFU = model TFLOP/s / peak TFLOP/s
(`benchmarking.peaks`: the bf16 table for accelerators; on a CPU the matmul peak of the row's dtype
measured in the same run); device memory; the input pipeline; versions and `XLA_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform as platform_lib
import time
from typing import Any, Mapping, Optional

import flax
import jax
import jaxlib
import numpy as np

from tkre_jax.benchmarking import peaks
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.tasks import classifier as classifier_lib
from tkre_jax.train import runtime, trainer

log = logging.getLogger(__name__)

ROW_SCHEMA = 1


@dataclasses.dataclass
class StepTiming:
  """Seconds of each timed step and of the compilation, and the compiled executable."""
  seconds: list
  compile_seconds: float
  compiled: Any


def _time_calls(call, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(call())
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    out.append(time.perf_counter() - t0)
  return out


def time_train_step(task: trainer.TrainTask, mesh, rules, batch: Mapping[str, jax.Array],
                    steps: int, warmup: int, seed: int) -> StepTiming:
  """Times the trainer's compiled step of `task` on one device-resident batch.

  The state is the trainer's (`trainer.init_state`), the step `trainer.compiled_train_step`, the
  key of step i `fold_in(key(seed), i)` as in training; parameters and optimizer state are carried
  from step to step (donated).
  """
  state = trainer.init_state(task, mesh, rules)
  step = trainer.compiled_train_step(task, state, mesh)
  carry = {"params": state.model.params, "opt_state": state.opt_state, "i": 0}
  base = jax.random.key(seed)

  def call():
    params, opt_state, metrics = step(carry["params"], carry["opt_state"], batch,
                                      jax.random.fold_in(base, carry["i"]))
    carry.update(params=params, opt_state=opt_state, i=carry["i"] + 1)
    return params, opt_state, metrics

  jax.block_until_ready(call())  # compiles
  seconds = _time_calls(call, steps, warmup)
  (exe,) = step.compiled.values()
  return StepTiming(seconds, sum(step.compile_seconds.values()), exe)


def time_eval_step(build, mesh, rules, batch: Mapping[str, jax.Array], steps: int,
                   warmup: int) -> StepTiming:
  """Times the classifier's compiled forward pass (`finetune.compiled_predict_step`)."""
  model = runtime.create_sharded(build, mesh, rules)
  predict = classifier_lib.compiled_predict_step(model, mesh)
  call = lambda: predict(model.params, batch)  # noqa: E731
  jax.block_until_ready(call())
  seconds = _time_calls(call, steps, warmup)
  (exe,) = predict.compiled.values()
  return StepTiming(seconds, sum(predict.compile_seconds.values()), exe)


def xla_flops(compiled) -> Optional[float]:
  """`compiled.cost_analysis()["flops"]` (per device for a partitioned program), or None."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  value = (ca or {}).get("flops")
  return float(value) if value is not None and value > 0 else None


def memory(compiled) -> dict:
  """Device memory: the runtime's peak bytes in use on device 0 (None where the backend reports
  none, e.g. CPU; the process's peak so far), and the compiled step's argument, output and temporary
  bytes (`memory_analysis()`)."""
  out: dict[str, Any] = {"peak_bytes_in_use": None}
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    out["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    m = compiled.memory_analysis()
    for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
      out[f"compiled_{f.replace('_size_in_bytes', '_bytes')}"] = int(getattr(m, f))
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def cpu_peaks(size: int) -> dict[str, float]:
  """TFLOP/s of a `size` x `size` matmul on CPU device 0 in float32 and bfloat16, this run.

  The bench stage (`stages.bench.run`) measures it at the start and again right after each stage's
  timing, and each row divides by the best so far (the row's `cpu_matmul_peak_tflops`).
  """
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype] = round(peaks.measure_matmul_peak(dtype, size=size), 4)
    log.info("bench: CPU %s matmul peak (%dx%d): %.3f TFLOP/s", dtype, size, size, out[dtype])
  return out


def peak_for(device: jax.Device, dtype: str, cpu_peak: Optional[Mapping[str, float]]
             ) -> tuple[Optional[float], str]:
  """`(peak TFLOP/s per device, where it comes from)` for the row's device and compute dtype."""
  if device.platform == "cpu":
    if not cpu_peak:
      return None, "not measured"
    return cpu_peak[dtype], f"{dtype} matmul peak measured in this run"
  found = peaks.table_peak(device.device_kind)
  if found is None:
    return None, f"no peak known for device kind {device.device_kind!r}"
  return found[0], found[1]


def _sig(x: float, digits: int = 6) -> float:
  """`x` rounded to `digits` significant digits."""
  return float(f"{x:.{digits}g}")


def _percentiles(seconds) -> dict:
  s = np.asarray(seconds, np.float64)
  return {"median": round(float(np.median(s)), 9), "p10": round(float(np.percentile(s, 10)), 9),
          "p90": round(float(np.percentile(s, 90)), 9), "mean": round(float(s.mean()), 9),
          "n": int(s.size)}


def make_row(*, stage: str, model_name: str, enc: EncoderConfig, batch_size: int, seq_len: int,
             mesh, rules: str, timing: StepTiming, flops: Mapping[str, int],
             peak: tuple[Optional[float], str], cpu_peak: Optional[Mapping[str, float]],
             input_pipeline: Optional[Mapping[str, Any]], data: str, warmup: int) -> dict:
  """One JSON row (see the module docstring); `flops` from `benchmarking.flops.step_flops`."""
  n_dev = int(mesh.devices.size)
  device = mesh.devices.flat[0]
  t = _percentiles(timing.seconds)
  seq_s = _sig(batch_size / t["median"], 9)  # the other rates are exact multiples of this one
  analytic_dev = flops["step"] / n_dev
  xla = xla_flops(timing.compiled)
  model_tflops = analytic_dev / t["median"] / 1e12
  row = {
      "schema": ROW_SCHEMA,
      "stage": stage,
      "model": model_name,
      "encoder": {"hidden_size": enc.hidden_size, "num_layers": enc.num_layers,
                  "num_heads": enc.num_heads, "intermediate_size": enc.intermediate_size,
                  "vocab_size": enc.vocab_size, "attention_impl": enc.attention_impl},
      "dtype": enc.dtype,
      "batch_size": batch_size,
      "seq_len": seq_len,
      "data": data,
      "platform": device.platform,
      "device_kind": device.device_kind,
      "num_devices": n_dev,
      "num_processes": jax.process_count(),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "rules": rules,
      "compile_seconds": round(timing.compile_seconds, 3),
      "warmup_steps": warmup,
      "step_seconds": t,
      "steps_per_second": _sig(1.0 / t["median"]),
      "sequences_per_second": seq_s,
      "tokens_per_second": seq_s * seq_len,
      "sequences_per_second_per_device": seq_s / n_dev,
      "tokens_per_second_per_device": seq_s * seq_len / n_dev,
      "flops": {"analytic_per_step": flops["step"], "analytic_forward": flops["forward"],
                "analytic_per_step_per_device": analytic_dev,
                "xla_per_step_per_device": xla,
                "analytic_over_xla": _sig(analytic_dev / xla, 4) if xla else None,
                "formula": "benchmarking.flops.step_flops (PaLM App. B: matmuls only, train = 3x forward)"},
      "model_tflops_per_second_per_device": _sig(model_tflops),
      "xla_tflops_per_second_per_device": _sig(xla / t["median"] / 1e12) if xla else None,
      "peak_tflops_per_device": peak[0],
      "peak_source": peak[1],
      "mfu": _sig(model_tflops / peak[0]) if peak[0] else None,
      "cpu_matmul_peak_tflops": dict(cpu_peak) if cpu_peak else None,
      "memory": memory(timing.compiled),
      "input_pipeline": None,
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "python": platform_lib.python_version()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cpu_count": os.cpu_count(),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if input_pipeline:
    ip = dict(input_pipeline)
    if not stage.startswith("eval"):
      ip["over_step"] = round(ip["sequences_per_second"] / seq_s, 2)
      ip["input_bound"] = ip["over_step"] < 1.0
    row["input_pipeline"] = ip
  return row


def row_filename(row: Mapping[str, Any]) -> str:
  """`cpux1-dp_mslm_minilm-l6_float32_b16x128.json`; the mesh axes larger than 1 join the name
  when the mesh is not plain data parallelism (`cpux8-fsdp8-fsdp_...`)."""
  split = {k: int(v) for k, v in row["mesh"].items() if int(v) > 1}
  mesh = "" if set(split) <= {"data"} else "-" + "".join(f"{k}{v}" for k, v in split.items())
  return (f"{row['platform']}x{row['num_devices']}{mesh}-{row['rules']}_{row['stage']}_"
          f"{row['model']}_{row['dtype']}_b{row['batch_size']}x{row['seq_len']}.json")


def one_line(row: Mapping[str, Any]) -> str:
  """A row as one log line: step time in ms (median, p10, p90), sequences/s, tokens/s, model
  TFLOP/s per device and MFU."""
  mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
  ms = {k: 1000 * row["step_seconds"][k] for k in ("median", "p10", "p90")}
  return (f"{row['stage']:<8} {row['model']} {row['dtype']} {row['batch_size']}x{row['seq_len']} "
          f"on {row['num_devices']} {row['platform']}: {ms['median']:.1f} ms "
          f"(p10 {ms['p10']:.1f}, p90 {ms['p90']:.1f}), "
          f"{row['sequences_per_second']:.1f} seq/s, {row['tokens_per_second']:.0f} tok/s, "
          f"{row['model_tflops_per_second_per_device']:.3f} TFLOP/s/device, MFU {mfu}")
