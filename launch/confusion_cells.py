"""Counts the errors inside a group of relations in `predictions.jsonl` files of `--stage=eval`.

The predicate head's issue asks whether the spouse / mother / child confusions of the FewRel test
matrix fall: an error "inside the group" is a row whose gold and predicted relations differ and both
belong to the group. Usage (one column per file, the first is the reference the change is taken
against):

    python launch/confusion_cells.py --split=test --group=P26,P25,P40 \
        runs/ablation_lo/fewrel-k8-s42/ft_tkre_eval/predictions.jsonl \
        runs/ablation_lo/fewrel-k8-s42/ft_tkre_predicate_eval/predictions.jsonl

Prints a markdown table: every gold -> predicted cell of the group, the group's total, and the
total errors of the split.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from typing import Iterable, Sequence


def read_predictions(path: pathlib.Path, split: str) -> list[tuple[str, str]]:
  """`(gold, predicted)` of every row of `split` in a predictions.jsonl.

  Raises:
    ValueError: a line that is not a JSON object with `split`, `gold` and `predicted` (named by file
      and line), or no row of `split`.
  """
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if row["split"] == split:
          pairs.append((str(row["gold"]), str(row["predicted"])))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not a prediction row ({e!r})") from e
  if not pairs:
    raise ValueError(f"{path}: no row of split {split!r}")
  return pairs


def group_cells(pairs: Iterable[tuple[str, str]], group: Sequence[str]) -> dict:
  """Counts: `cells` {(gold, predicted): n} for gold != predicted both in `group`, `group_errors`
  (their sum), `errors` (all wrong rows) and `rows`."""
  members = set(group)
  cells = collections.Counter()
  errors = rows = 0
  for gold, predicted in pairs:
    rows += 1
    if gold != predicted:
      errors += 1
      if gold in members and predicted in members:
        cells[(gold, predicted)] += 1
  return {"cells": dict(cells), "group_errors": sum(cells.values()), "errors": errors, "rows": rows}


def table(counts: Sequence[dict], names: Sequence[str], group: Sequence[str]) -> str:
  """The markdown table of `group_cells` results, one column per run."""
  lines = ["| gold -> predicted | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for gold in group:
    for predicted in group:
      if gold != predicted:
        lines.append(f"| {gold} -> {predicted} | "
                     + " | ".join(str(c["cells"].get((gold, predicted), 0)) for c in counts) + " |")
  ref = counts[0]["group_errors"]
  change = [f" ({(c['group_errors'] - ref) / ref:+.0%})" if ref and i else ""
            for i, c in enumerate(counts)]
  lines.append("| **inside the group** | "
               + " | ".join(f"**{c['group_errors']}**{d}" for c, d in zip(counts, change)) + " |")
  lines.append("| all errors / rows | "
               + " | ".join(f"{c['errors']} / {c['rows']}" for c in counts) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("predictions", nargs="+", help="predictions.jsonl files (the first: reference)")
  p.add_argument("--group", default="P26,P25,P40", help="comma list of relation ids")
  p.add_argument("--split", default="test")
  p.add_argument("--names", default="", help="comma list of column names (default: parent dirs)")
  args = p.parse_args(argv)
  group = [g for g in args.group.split(",") if g]
  paths = [pathlib.Path(x) for x in args.predictions]
  names = args.names.split(",") if args.names else [x.parent.name for x in paths]
  if len(names) != len(paths):
    p.error(f"--names has {len(names)} names for {len(paths)} files")
  try:
    counts = [group_cells(read_predictions(x, args.split), group) for x in paths]
  except (OSError, ValueError) as e:
    print(f"confusion_cells: {e}", file=sys.stderr)
    return 2
  print(table(counts, names, group))
  return 0


if __name__ == "__main__":
  sys.exit(main())
