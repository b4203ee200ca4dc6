r"""Merges bench rows from several machines into one markdown table and one PNG plot.

    python -m tkre_jax.benchmarking.compare runs/bench-*/rows/*.json benchmarks/rows/*.json --out=runs/report

Reads the JSON rows `--stage=bench` writes (one per stage and machine; folders are searched for
`*.json`), keeps the newest row of each (device kind, devices, mesh, rules, stage, model, dtype,
batch, sequence length), and writes to `--out`:

  * `bench_report.md`: one table row per bench row, sorted by model, stage, platform and devices:
    step time, sequences/s, tokens/s (global and per device), model TFLOP/s per device, MFU, and the
    input pipeline's rate over the step's;
  * `bench_report.png`: tokens/s per device and MFU per (device, mesh, batch) for every stage and
    model: the GPU-vs-TPU comparison (matplotlib).

It reads JSON only and imports nothing else of the project, so it runs anywhere rows were copied to.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Iterable, Mapping, Sequence

REQUIRED = ("stage", "model", "dtype", "batch_size", "seq_len", "platform", "device_kind",
            "num_devices", "mesh", "rules", "step_seconds", "sequences_per_second",
            "tokens_per_second", "tokens_per_second_per_device",
            "model_tflops_per_second_per_device", "mfu")
KEY = ("device_kind", "num_devices", "mesh", "rules", "stage", "model", "dtype", "batch_size",
       "seq_len")
STAGE_ORDER = {"mslm": 0, "scl": 1, "finetune": 2, "eval": 3, "finetune_predicate": 4, "eval_predicate": 5}


class RowError(ValueError):
  """A file that is not a bench row; the message names it."""


def expand(paths: Iterable[str]) -> list[pathlib.Path]:
  """Files as given, folders as their `*.json` files (sorted).

  Raises:
    FileNotFoundError: a path that does not exist.
  """
  out = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      out.extend(sorted(p.glob("*.json")))
    elif p.is_file():
      out.append(p)
    else:
      raise FileNotFoundError(f"{p}: no such bench row file or folder")
  return out


def read_rows(files: Sequence[pathlib.Path]) -> list[dict]:
  """The rows of `files`, the newest of each `KEY` kept (by its `time`, else the later file).

  Raises:
    RowError: a file that is not JSON or lacks a field of `REQUIRED` (named).
  """
  rows: dict[tuple, dict] = {}
  for f in files:
    try:
      row = json.loads(pathlib.Path(f).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise RowError(f"{f}: not a JSON bench row ({e})") from None
    if not isinstance(row, dict):
      raise RowError(f"{f}: not a JSON bench row (a {type(row).__name__})")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
      raise RowError(f"{f}: not a bench row, missing {', '.join(missing)}")
    key = tuple(json.dumps(row[k], sort_keys=True) for k in KEY)
    old = rows.get(key)
    if old is None or str(row.get("time", "")) >= str(old.get("time", "")):
      rows[key] = {**row, "_file": str(f)}
  return sorted(rows.values(), key=_sort_key)


def _sort_key(r: Mapping[str, Any]) -> tuple:
  return (r["model"], STAGE_ORDER.get(r["stage"], 9), r["stage"], r["dtype"], r["platform"],
          r["device_kind"], r["num_devices"], r["batch_size"], r["seq_len"])


def mesh_text(mesh: Mapping[str, int]) -> str:
  """`{"data": 1, "fsdp": 8, "tensor": 1}` -> `fsdp:8` (axes of size 1 left out; `1` when all)."""
  parts = [f"{k}:{v}" for k, v in mesh.items() if int(v) > 1]
  return ",".join(parts) or "1"


def device_text(r: Mapping[str, Any]) -> str:
  return f"{r['num_devices']}x {r['device_kind']}"


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The markdown table of `rows` (see the module docstring)."""
  head = ("| model | stage | dtype | batch x seq | device | mesh (rules) | step ms (p10-p90) | "
          "seq/s | tokens/s | tokens/s/device | TFLOP/s/device | MFU | input / step |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    t = r["step_seconds"]
    ip = r.get("input_pipeline") or {}
    over = ip.get("over_step")
    lines.append(
        f"| {r['model']} | {r['stage']} | {r['dtype']} | {r['batch_size']}x{r['seq_len']} | "
        f"{device_text(r)} | {mesh_text(r['mesh'])} ({r['rules']}) | "
        f"{1000 * t['median']:.1f} ({1000 * t['p10']:.1f}-{1000 * t['p90']:.1f}) | "
        f"{r['sequences_per_second']:.1f} | {r['tokens_per_second']:,.0f} | "
        f"{r['tokens_per_second_per_device']:,.0f} | "
        f"{r['model_tflops_per_second_per_device']:.3g} | {_pct(r['mfu'])} | "
        f"{'n/a' if over is None else f'{over:.0f}x'} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> pathlib.Path:
  """A PNG with two panels, tokens/s per device and MFU, one bar per row, grouped by model and
  stage; bars are labelled with the device, mesh, batch and dtype."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  labels = [f"{r['model']} {r['stage']}\n{device_text(r)} {mesh_text(r['mesh'])}\n"
            f"b{r['batch_size']}x{r['seq_len']} {r['dtype']}" for r in rows]
  platforms = sorted({r["platform"] for r in rows})
  colors = {p: c for p, c in zip(platforms, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
  bar_colors = [colors[r["platform"]] for r in rows]
  x = list(range(len(rows)))
  fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(rows) + 2), 8), sharex=True)
  axes[0].bar(x, [r["tokens_per_second_per_device"] for r in rows], color=bar_colors)
  axes[0].set_ylabel("tokens/s per device")
  axes[0].set_yscale("log")
  axes[1].bar(x, [100 * (r["mfu"] or 0.0) for r in rows], color=bar_colors)
  axes[1].set_ylabel("MFU (%)")
  axes[1].set_xticks(x)
  axes[1].set_xticklabels(labels, rotation=90, fontsize=7)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in platforms]
  axes[0].legend(handles, platforms, loc="upper left")
  axes[0].set_title("bench: throughput and MFU per device, mesh and batch")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def report(paths: Sequence[str], out: pathlib.Path) -> dict:
  """Reads the rows of `paths` and writes `bench_report.md` and `bench_report.png` to `out`.

  Returns:
    `{"rows": n, "markdown": path, "png": path}`.

  Raises:
    FileNotFoundError: a missing path, or no rows at all. RowError: a file that is not a row.
  """
  rows = read_rows(expand(paths))
  if not rows:
    raise FileNotFoundError(f"no bench rows (*.json) in {', '.join(map(str, paths))}")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  md = out / "bench_report.md"
  md.write_text("# Bench report\n\n" + markdown(rows) + "\nRows: "
                + ", ".join(sorted({pathlib.Path(r["_file"]).name for r in rows})) + "\n")
  png = plot(rows, out / "bench_report.png")
  return {"rows": len(rows), "markdown": str(md), "png": str(png)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tkre_jax.benchmarking.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("rows", nargs="+", help="bench row JSON files or folders of them")
  parser.add_argument("--out", required=True, help="folder for bench_report.md and .png")
  args = parser.parse_args(argv)
  try:
    result = report(args.rows, pathlib.Path(args.out))
  except (FileNotFoundError, RowError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
