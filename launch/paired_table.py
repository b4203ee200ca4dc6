r"""Per-seed paired differences of `launch/ablation.py` rows: a markdown table of each variant's score
per seed and its difference from a reference variant at the same seed (the grid's table gives
means and standard deviations only).

  python launch/paired_table.py runs/semeval/results.json --dataset=semeval --k=8 \
      --reference=baseline --variants=augment,tkre,tkre_infonce [--metric=micro_f1] [--also=macro_f1]

`results.json` is what `ablation.py` writes next to `results.md` (also with `--report_only`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def per_seed(rows: list[dict], dataset: str, k: int, variant: str, metric: str) -> dict[int, float]:
  """{seed: 100 * metric} of one (dataset, K, variant) row; {} when the row has no seed."""
  for r in rows:
    if (r["dataset"], r["k"], r["variant"]) == (dataset, k, variant):
      return {s: 100.0 * v for s, v in zip(r["seeds"], r[metric])}
  return {}


def table(rows: list[dict], dataset: str, k: int, reference: str, variants: list[str],
          metric: str, also: str = "") -> str:
  """The markdown table: one line per variant, one column per seed (score, then the paired
  difference from `reference`), the mean over the seeds both have, and `also` in brackets."""
  ref = per_seed(rows, dataset, k, reference, metric)
  seeds = sorted(ref)
  head = " | ".join(f"seed {s}" for s in seeds)
  lines = [f"| variant | {head} | mean | mean difference from {reference} |",
           "|---|" + "---|" * (len(seeds) + 2)]
  for v in [reference] + [x for x in variants if x != reference]:
    got = per_seed(rows, dataset, k, v, metric)
    extra = per_seed(rows, dataset, k, v, also) if also else {}
    cells, diffs = [], []
    for s in seeds:
      if s not in got:
        cells.append("–")
        continue
      cell = f"{got[s]:.2f}"
      if also and s in extra:
        cell += f" ({extra[s]:.2f})"
      if v != reference:
        d = got[s] - ref[s]
        diffs.append(d)
        cell += f", {d:+.2f}"
      cells.append(cell)
    mine = [got[s] for s in seeds if s in got]
    mean = f"{statistics.fmean(mine):.2f}" if mine else "–"
    if also and mine:
      mean += f" ({statistics.fmean([extra[s] for s in seeds if s in got and s in extra]):.2f})"
    diff = f"{statistics.fmean(diffs):+.2f}" if diffs else "–"
    lines.append(f"| {v} | " + " | ".join(cells) + f" | {mean} | {diff} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("results", help="results.json of launch/ablation.py")
  p.add_argument("--dataset", required=True)
  p.add_argument("--k", type=int, required=True)
  p.add_argument("--reference", required=True, help="the variant the differences are taken from")
  p.add_argument("--variants", required=True, help="comma list")
  p.add_argument("--metric", default="micro_f1", choices=("micro_f1", "accuracy", "macro_f1"))
  p.add_argument("--also", default="", choices=("", "micro_f1", "accuracy", "macro_f1"),
                 help="a second metric, in brackets")
  args = p.parse_args(argv)
  rows = json.load(open(args.results))["rows"]
  print(table(rows, args.dataset, args.k, args.reference, args.variants.split(","), args.metric,
              args.also))
  return 0


if __name__ == "__main__":
  sys.exit(main())
