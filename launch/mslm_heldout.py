r"""Masked-token accuracy of MSLM on held-out corpus rows: at the start (HF encoder, fresh MLM head),
after the MLM-head warm-up and after MSLM (fixed masks, so the three numbers compare models only).

Prepares FewRel 16-way K-shot with its knowledge-guided corpus, moves every `--every`-th corpus row
(gold, EDKG and SCDG alike) into a `heldout` split that MSLM never trains on, and runs the mslm
stage with `--config.mslm.eval_split=heldout`; the numbers are in `<out>/mslm/summary.json`
(`mlm_eval`, `head_warmup`).

  python launch/mslm_heldout.py --out=runs/mslm_heldout [--set=config.mslm.head_warmup_steps=0 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--every", type=int, default=8, help="hold out every N-th corpus row")
  p.add_argument("--set", action="append", default=[], metavar="config.FIELD=VALUE")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  from tkre_jax import config as config_lib, stages
  from tkre_jax.data import corpus as corpus_lib, markers, preparation
  from tkre_jax.parallel.mesh import make_mesh
  config = config_lib.base_config()
  for item in args.set:
    key, value = item[len("config."):].split("=", 1)
    section, field = key.split(".")
    config[section][field] = type(config[section][field])(value)
  out = pathlib.Path(args.out)
  data = preparation.load_splits(config)
  typed = markers.use_typed_markers(config.data.typed_markers, data["train"])
  rows, _ = corpus_lib.corpus_from_config(config, data, typed=typed)
  held = rows[::args.every]
  kept = [r for i, r in enumerate(rows) if i % args.every]
  if not (out / "prepared" / "meta.json").is_file():
    preparation.run_prepare(config, out / "prepared", extra_splits={"corpus": kept, "heldout": held})
  config.data.prepared_dir = str(out / "prepared")
  config.mslm.eval_split = "heldout"
  summary = stages.run("mslm", config, out / "mslm", mesh=make_mesh("cpu"))
  print(json.dumps({"heldout_rows": len(held), "corpus_rows": len(kept),
                    "mlm_eval": summary.get("mlm_eval"), "head_warmup": summary.get("head_warmup"),
                    "max_predictions_cap": summary.get("max_predictions_cap"),
                    "seconds": summary["seconds"]}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
