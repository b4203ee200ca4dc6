r"""The accelerator programs checked without an accelerator: every program the stages compile,
lowered for each mesh preset's platform (TPU, GPU) with an abstract mesh of its shape, a memory plan
per preset, and the plan's analytic bytes against XLA's memory analysis of the same step compiled
for this machine's 8 fake CPU devices (`tkre_jax/benchmarking/lowering.py` says what each checks).

  python launch/lowering.py --out=runs/lowering                       # the full table (~5-10 min)
  python launch/lowering.py --out=/tmp/low --models=tiny --rules=fsdp --no_xla_check   # seconds

Writes `<out>/lowering.json` (every row, errors with their traceback) and `<out>/lowering.md` (the
tables), and prints the markdown. Exit status 1 when any program failed to lower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402

from tkre_jax import config as config_lib  # noqa: E402
from tkre_jax.benchmarking import flops as flops_lib  # noqa: E402
from tkre_jax.benchmarking import lowering  # noqa: E402

# The bench batch sizes of launch/gpu.sh and launch/tpu_vm.sh: 64 sequences data-parallel, 256
# with the parameters sharded (fsdp), 128 tokens.
BENCH_BATCH = {"dp": 64, "fsdp": 256}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--models", default="bert-base,roberta-large",
                 help="encoder shapes (benchmarking.flops.ENCODER_SHAPES, or tiny)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--rules", default="dp,fsdp", help="sharding rules, comma list")
  p.add_argument("--presets", default=",".join(lowering.ACCELERATOR_PRESETS))
  p.add_argument("--programs", default=",".join(lowering.PROGRAMS))
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=0,
                 help="global batch of every row (0: the bench batch of the rules, 64 dp / 256 fsdp)")
  p.add_argument("--xla_check_model", default="bert-base",
                 help="the model of the analytic-vs-XLA memory check (finetune step, 8 fake CPU "
                 "devices, fsdp:8, the dtype above)")
  p.add_argument("--no_xla_check", action="store_true")
  return p.parse_args(argv)


def xla_check(model: str, dtype: str, batch_size: int, seq_len: int) -> dict:
  """The finetune step compiled for the 8 fake CPU devices on fsdp:8 under the fsdp rules, XLA's
  per-device bytes against `lowering.memory_plan` for the gpu-8 preset (the same mesh shape)."""
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from tkre_jax.parallel import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from tkre_jax.tasks import classifier as classifier_lib  # pylint: disable=import-outside-toplevel
  from tkre_jax.train import optim, runtime  # pylint: disable=import-outside-toplevel
  from tkre_jax.train.step import make_train_step  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  enc = flops_lib.encoder_shape(model, dtype=dtype)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  rules = sharding_lib.RULES["fsdp"]
  config = config_lib.base_config()
  model_abs = runtime.create_abstract(classifier_lib.classifier_builder(enc, 16, 0.1, 0), mesh, rules)
  tx, _ = optim.adamw(config.train.optim, 1000)
  opt_abs = jax.eval_shape(tx.init, model_abs.params)
  opt_sh = sharding_lib.state_shardings(opt_abs, mesh, rules)
  bsh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  batch = lowering.batch_specs("finetune", lowering.Shapes(batch_size, seq_len, 16), bsh, config)
  jitted = jax.jit(make_train_step(classifier_lib.make_loss_fn(model_abs.graphdef), tx),
                   in_shardings=(model_abs.shardings, opt_sh, bsh, repl),
                   out_shardings=(model_abs.shardings, opt_sh, repl), donate_argnums=(0, 1))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  compiled = jitted.lower(runtime.abstract_with_shardings(model_abs.params, model_abs.shardings),
                          runtime.abstract_with_shardings(opt_abs, opt_sh), batch, key).compile()
  xla = lowering.xla_memory(compiled)
  plan = lowering.memory_plan(enc, "gpu-8", "fsdp", batch_size, seq_len, config=config)
  return {"model": model, "dtype": dtype, "batch_size": batch_size, "seq_len": seq_len,
          "mesh": "fsdp:8 (8 fake CPU devices)", "xla": xla, "plan": plan,
          "ratio": round(plan["total_bytes"] / xla["total_bytes"], 3)}


def _mib(x) -> str:
  return f"{x / 2**20:,.0f}"


def plan_markdown(plans: list[dict]) -> str:
  lines = ["| model | preset | rules | batch (per device) | params | AdamW | grads | activations | "
           "total MiB per device | device GiB | largest batch that fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for p in plans:
    lines.append(f"| {p['model']} | {p['preset']} | {p['rules']} | {p['batch_size']} "
                 f"({p['batch_per_device']}) | {_mib(p['param_bytes'])} | {_mib(p['opt_bytes'])} | "
                 f"{_mib(p['grad_bytes'])} | {_mib(p['activation_bytes'])} | "
                 f"{_mib(p['total_bytes'])} | {p['device_memory_gib']:.0f} | {p['max_batch']:,} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  config = config_lib.base_config()
  rows, plans = [], []
  models = [m for m in args.models.split(",") if m]
  rules_list = [r for r in args.rules.split(",") if r]
  presets = [p for p in args.presets.split(",") if p]
  for model in models:
    enc = flops_lib.encoder_shape(model, dtype=args.dtype)
    for rules in rules_list:
      batch = args.batch_size or BENCH_BATCH.get(rules, 64)
      for preset in presets:
        for program in [p for p in args.programs.split(",") if p]:
          row = lowering.lower(program, preset, enc,
                               lowering.Shapes(batch, args.seq_len, 16), config, rules)
          row["model"] = model
          rows.append(row)
          status = "ok" if row["status"] == "lowered" else row["error"]
          print(f"[{model} {rules} {preset} {program}] {status} ({row['seconds']} s)", flush=True)
        plans.append({"model": model, **lowering.memory_plan(enc, preset, rules, batch,
                                                             args.seq_len, config=config)})
  check = None
  if not args.no_xla_check:
    check = xla_check(args.xla_check_model, args.dtype, BENCH_BATCH["fsdp"], args.seq_len)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                          capture_output=True, text=True).stdout.strip()
  stamp = datetime.date.today().isoformat()
  parts = [f"Lowered with `python launch/lowering.py {' '.join(argv or sys.argv[1:])}` on "
           f"{stamp}, commit {commit}, jax {jax.__version__} ({len(rows)} lowerings, "
           f"{sum(r['status'] != 'lowered' for r in rows)} failed).", ""]
  for model in models:
    for rules in rules_list:
      mine = [r for r in rows if r["model"] == model and r["rules"] == rules]
      parts += [f"**{model}, {args.dtype}, rules `{rules}`, global batch "
                f"{args.batch_size or BENCH_BATCH.get(rules, 64)} x {args.seq_len} tokens**", "",
                lowering.table_markdown(mine), ""]
  parts += ["**Memory plan of the finetune step (per device, analytic)**", "",
            plan_markdown(plans), ""]
  if check:
    x, pl = check["xla"], check["plan"]
    parts += [f"**The plan against XLA** ({check['model']}, {check['dtype']}, batch "
              f"{check['batch_size']} x {check['seq_len']}, {check['mesh']}): XLA's memory analysis "
              f"{_mib(x['total_bytes'])} MiB per device (arguments {_mib(x['argument_bytes'])}, "
              f"temporaries {_mib(x['temp_bytes'])}, outputs {_mib(x['output_bytes'])}, aliased "
              f"{_mib(x['alias_bytes'])}), the plan {_mib(pl['total_bytes'])} MiB: ratio "
              f"plan / XLA = {check['ratio']}.", ""]
  text = "\n".join(parts)
  (out / "lowering.md").write_text(text)
  (out / "lowering.json").write_text(json.dumps({"rows": rows, "plans": plans, "xla_check": check},
                                                indent=1, default=str))
  print(text)
  return 1 if any(r["status"] != "lowered" for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
