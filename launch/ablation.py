r"""TKRE ablation: baseline, +augment, +MSLM+SCL, TKRE (MSLM+SCL+augment), +SCL only (and +MSLM), on
FewRel 16-way and Wiki80.

Every stage runs as its own process (`python -m tkre_jax.main --stage=...`), one workdir per stage:

    <out>/<dataset>-k<K>[-split<S>]/prepared      K-shot set (+ corpus, unlabelled warm-up text)
    <out>/<dataset>-k<K>[-split<S>]/prepared_aug  K-shot set + augment_k SCDG per relation
    <out>/<dataset>-k<K>-s<seed>/{mslm,scl,scl_only,ft_<variant>}

    baseline   prepare -> finetune
    augment    prepare_aug -> finetune
    mslm       prepare -> mslm -> finetune (init_from mslm)
    scl        prepare -> scl_only (from the HF encoder) -> finetune (init_from scl_only)
    mslm_scl   prepare -> mslm -> scl (init_from mslm) -> finetune (init_from scl)
    tkre       the mslm_scl pre-training runs -> finetune on prepared_aug (init_from scl)

    FineCL learning order (prepare_lo: K-shot + every SCDG row; learning_order per seed on it):
    tkre_lo_ft    tkre, finetune with config.train.learning_order_use=weight
    tkre_lo_drop  tkre, finetune with the never-learned SCDG rows dropped
    tkre_lo_scl   tkre with the weights in SCL's contrastive term (scl_lo)
    Predicate head (config.model.head=predicate): tkre_predicate, baseline_predicate, and
    tkre_both (the learning-order use of --both_lo_use + the predicate head)

Pre-training always reads `prepared` (its corpus is built from the gold rows, the same either way),
so +MSLM+SCL and TKRE share their mslm and scl runs and differ only in the fine-tuning set.

Grid (defaults): FewRel val_wiki 16-way, canonical split, seeds {13, 42, 87}: every variant but
+MSLM at K = 8, baseline and TKRE at K = 16; TEST metrics of the model selected on dev. Wiki80
`k-shot/8-{13,42,87}` (the seed is both the split and the training seed), baseline and TKRE, LLM
data `wiki80_llm/`: no model selection (fixed epochs, dev scored once after the last epoch), so
the k-shot DEV numbers are unseen by selection.

Resumable: a stage whose workdir holds a `summary.json` written with the same arguments is skipped
(its wall time is read back from `ablation_stage.json`); a workdir written with other arguments is
an error (use another --out). Compiled executables are shared between runs through a persistent JAX
compilation cache (`<out>/jax_cache`). At the end the results table (mean +- sample std over seeds
of micro-F1 and accuracy, wall time of each stage) replaces the results section of --doc
(docs/ablation.md) and is written to `<out>/results.md` and `<out>/results.json`.

Examples (more in docs/ablation.md): the full grid, `python launch/ablation.py --out=runs/ablation`;
only the table from finished runs, `... --report_only`; a smoke test with a tiny random encoder,
`... --tiny_encoder --finetune_epochs=1 --mslm_steps=4 --scl_steps=4
--set=config.mslm.head_warmup_steps=4 --datasets=fewrel --ks=8 --seeds=42 --doc=/tmp/doc.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "augment", "mslm", "scl", "mslm_scl", "tkre", "episodic", "episodic_aug",
            "sacon", "sacon_aug", "sacon_tkre", "sacon_aug_labels", "sacon_tkre_labels",
            "tkre_lo_ft", "tkre_lo_drop", "tkre_lo_scl", "tkre_predicate", "baseline_predicate",
            "tkre_both", "sacon_aug_predicate", "tkre_infonce", "baseline_inv", "augment_inv",
            "tkre_inv", "sacon_aug_inv")
VARIANT_NAMES = {"baseline": "baseline (fine-tuning only)", "augment": "+augment (K-shot + SCDG)",
                 "mslm": "+MSLM", "scl": "+SCL only", "mslm_scl": "+MSLM+SCL (no augment)",
                 "tkre": "TKRE (MSLM+SCL+augment)",
                 "episodic": "episodic (64 rel.) -> fine-tuning",
                 "episodic_aug": "episodic (64 rel.) -> fine-tuning + augment",
                 "sacon": "sacon -> fine-tuning", "sacon_aug": "sacon -> fine-tuning + augment",
                 "sacon_tkre": "sacon -> TKRE (MSLM+SCL+augment)",
                 "sacon_aug_labels": "sacon -> fine-tuning + augment, head_init=labels",
                 "sacon_tkre_labels": "sacon -> TKRE, head_init=labels",
                 "tkre_lo_ft": "TKRE + FineCL weights in fine-tuning",
                 "tkre_lo_drop": "TKRE, never-learned SCDG rows dropped",
                 "tkre_lo_scl": "TKRE + FineCL weights in SCL",
                 "tkre_predicate": "TKRE + predicate head",
                 "baseline_predicate": "baseline + predicate head",
                 "tkre_both": "TKRE + FineCL weights + predicate head",
                 "sacon_aug_predicate": "sacon -> fine-tuning + augment, predicate head",
                 "tkre_infonce": "TKRE, SCL = bidirectional InfoNCE, text anchors (ours)",
                 "baseline_inv": "baseline + inverse copies",
                 "augment_inv": "+augment + inverse copies",
                 "tkre_inv": "TKRE + inverse copies",
                 "sacon_aug_inv": "sacon -> fine-tuning + augment + inverse copies"}
# FineCL learning order and the predicate head on top of a base variant:
# variant -> (base variant, learning-order use or None, predicate head). tkre_both takes its
# learning-order use from --both_lo_use (the best of the three, chosen on dev).
EXTENSIONS = {"tkre_lo_ft": ("tkre", "weight", False), "tkre_lo_drop": ("tkre", "drop_unlearned", False),
              "tkre_lo_scl": ("tkre", "scl", False), "tkre_predicate": ("tkre", None, True),
              "baseline_predicate": ("baseline", None, True), "tkre_both": ("tkre", "both", True)}
LO_STAGES = ("prepare_lo", "learning_order")
# TKRE with another SCL form than the authors' (config.scl defaults): variant -> (the scl workdir
# name, the scl flags). tkre_infonce is the project's bidirectional InfoNCE with in-batch negatives
# and anchors from the label text, the TKRE rows of docs/ablation.md before the reference objective.
SCL_FORMS = {"tkre_infonce": ("scl_infonce", ["--config.scl.objective=infonce",
                                              "--config.scl.anchor_init=text",
                                              "--config.scl.skip_no_relation=True"])}
# Relation-aware pre-training on the 64 FewRel 1.0 training relations (sacon, episodic): ONE run
# each, shared by every seed and K (it does not depend on the K-shot split): <out>/sacon,
# <out>/episodic, or the workdir given by --sacon_from / --episodic_from.
PRETRAIN_STAGES = ("sacon", "episodic")
VARIANT_STAGES = {"baseline": ("prepare", "finetune"), "augment": ("prepare_aug", "finetune"),
                  "mslm": ("prepare", "mslm", "finetune"),
                  "scl": ("prepare", "scl", "finetune"),
                  "mslm_scl": ("prepare", "mslm", "scl", "finetune"),
                  "tkre": ("prepare", "prepare_aug", "mslm", "scl", "finetune"),
                  "episodic": ("episodic", "prepare", "finetune"),
                  "episodic_aug": ("episodic", "prepare_aug", "finetune"),
                  "sacon": ("sacon", "prepare", "finetune"),
                  "sacon_aug": ("sacon", "prepare_aug", "finetune"),
                  "sacon_tkre": ("sacon", "prepare", "prepare_aug", "mslm", "scl", "finetune"),
                  "sacon_aug_labels": ("sacon", "prepare_aug", "finetune"),
                  "sacon_aug_predicate": ("sacon", "prepare_aug", "finetune"),
                  "sacon_tkre_labels": ("sacon", "prepare", "prepare_aug", "mslm", "scl",
                                        "finetune"),
                  "baseline_predicate": ("prepare", "finetune"),
                  "tkre_predicate": ("prepare", "prepare_aug", "mslm", "scl", "finetune")}
VARIANT_STAGES.update({v: VARIANT_STAGES["tkre"] for v in SCL_FORMS})
# Inverse augmentation (config.data.inverse_augment): the variant of the key, fine-tuned on the
# same set plus the swapped copies of its rows whose relation has an inverse (prepare_inv: the
# K-shot set; prepare_aug_inv: K-shot + SCDG); pre-training reads `prepared` as before.
INVERSE_OF = {"baseline_inv": "baseline", "augment_inv": "augment", "tkre_inv": "tkre",
              "sacon_aug_inv": "sacon_aug"}
INVERSE_PREPARE = {"prepare": "prepare_inv", "prepare_aug": "prepare_aug_inv"}
for _v, _base in INVERSE_OF.items():
  _stages = list(VARIANT_STAGES[_base])
  if "prepare_aug" in _stages:
    _stages[_stages.index("prepare_aug")] = "prepare_aug_inv"
  else:
    _stages.insert(_stages.index("finetune"), "prepare_inv")
  VARIANT_STAGES[_v] = tuple(_stages)
for _v, (_base, _lo, _) in EXTENSIONS.items():
  if _lo:
    VARIANT_STAGES[_v] = (*LO_STAGES, "prepare", "prepare_aug", "mslm", "scl", "finetune")
GRID_VARIANTS = ("baseline", "augment", "mslm_scl", "tkre", "scl")
DATASETS = {
    # name: (config file, {K: default variants}, default seeds, metrics split)
    "fewrel": ("configs/fewrel_16way.py", {8: GRID_VARIANTS, 16: ("baseline", "tkre")},
               (13, 42, 87), "test"),
    "wiki80": ("configs/wiki80.py", {8: ("baseline", "tkre")}, (13, 42, 87), "dev"),
    # SemEval-2010 k-shot splits (the seed is both the split and the training seed; LLM files of
    # splits 13 / 42 / 87): k-shot dev metrics after the fixed epochs, as Wiki80
    "semeval": ("configs/semeval.py", {8: ("baseline", "augment", "tkre", "tkre_infonce"),
                                       16: ("baseline", "augment", "tkre"),
                                       32: ("baseline", "augment", "tkre")}, (13, 42, 87), "dev"),
}
PREPARE_STAGES = ("prepare", "prepare_aug", "prepare_lo", "prepare_inv", "prepare_aug_inv")
FIXED_EPOCHS = 10 ** 6  # eval_every_epochs that never comes: dev scored once, after the last epoch


def markers(section: str) -> tuple[str, str]:
  """The comment lines that delimit a results section of --doc."""
  return f"<!-- ablation:{section}:begin -->", f"<!-- ablation:{section}:end -->"


@dataclasses.dataclass(frozen=True)
class Run:
  dataset: str
  k: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.dataset}-k{self.k}-s{self.seed}"

  @property
  def prepared_name(self) -> str:
    # FewRel's canonical split does not depend on the seed: one prepared dir per K.
    return f"{self.dataset}-k{self.k}" + ("" if self.dataset == "fewrel" else f"-split{self.seed}")

  def config_flag(self) -> str:
    cfg = DATASETS[self.dataset][0]
    arg = f"k={self.k}" if self.dataset == "fewrel" else f"k={self.k},split_seed={self.seed}"
    return f"--config={REPO_ROOT / cfg}:{arg}"


class StageFailed(RuntimeError):
  pass


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="root folder of all runs")
  p.add_argument("--datasets", default="fewrel,wiki80", help="comma list of fewrel, wiki80, semeval")
  p.add_argument("--ks", default="", help="K values for every dataset (default: fewrel 8,16; "
                 "wiki80 8)")
  p.add_argument("--seeds", default="", help="seeds for every dataset (default: 13,42,87)")
  p.add_argument("--variants", default="", help=f"comma list of {VARIANTS} for every (dataset, K) "
                 "(default: the grid of the module docstring)")
  p.add_argument("--augment_k", type=int, default=8, help="config.data.augment_k of prepared_aug")
  p.add_argument("--finetune_epochs", type=int, default=None, help="config.train.epochs")
  p.add_argument("--mslm_steps", type=int, default=None, help="config.mslm.steps")
  p.add_argument("--scl_steps", type=int, default=None, help="config.scl.steps")
  p.add_argument("--sacon_steps", type=int, default=None, help="config.sacon.steps")
  p.add_argument("--episodic_steps", type=int, default=None, help="config.episodic.steps")
  p.add_argument("--lo_augment_k", type=int, default=16, help="SCDG rows per relation in the "
                 "learning-order run's training set (prepare_lo): all of the 16 of fewrel_llm")
  p.add_argument("--both_lo_use", default="scl", choices=("weight", "drop_unlearned", "scl"),
                 help="the learning-order use of tkre_both (the best of tkre_lo_* on dev: scl, "
                 "docs/ablation.md)")
  p.add_argument("--pretrain_seed", type=int, default=42, help="config.seed of the shared sacon "
                 "and episodic runs")
  p.add_argument("--sacon_from", default="", help="a finished sacon workdir to start from instead "
                 "of running <out>/sacon")
  p.add_argument("--episodic_from", default="", help="a finished episodic workdir to start from "
                 "instead of running <out>/episodic")
  p.add_argument("--section", default="results", help="the results section of --doc to replace "
                 "(<!-- ablation:SECTION:begin/end -->)")
  p.add_argument("--mesh", default="cpu", help="--mesh of tkre_jax.main")
  p.add_argument("--hf_dir", default="", help="config.model.hf_dir (default all-MiniLM-L6-v2)")
  p.add_argument("--tiny_encoder", action="store_true", help="smoke test: a tiny random BERT with "
                 "the MiniLM tokenizer (numbers are meaningless)")
  p.add_argument("--set", action="append", default=[], metavar="config.FIELD=VALUE",
                 help="extra config override for every stage (repeatable)")
  p.add_argument("--doc", default=str(REPO_ROOT / "docs" / "ablation.md"),
                 help="markdown file whose results section is replaced ('' for none)")
  p.add_argument("--report_only", action="store_true", help="only rebuild the table")
  p.add_argument("--report_split", default="", choices=("", "dev", "test"),
                 help="the split whose metrics the table gives (default: the dataset's, FewRel "
                 "test and Wiki80 dev); dev for choosing settings without reading test")
  p.add_argument("--keep_going", action="store_true", help="continue after a failed stage")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = p.parse_args(argv)
  args.datasets = [d for d in args.datasets.split(",") if d]
  for d in args.datasets:
    if d not in DATASETS:
      p.error(f"unknown dataset {d!r}; expected {sorted(DATASETS)}")
  args.variants = [v for v in args.variants.split(",") if v] or None
  for v in args.variants or ():
    if v not in VARIANTS:
      p.error(f"unknown variant {v!r}; expected {VARIANTS}")
  for s in args.set:
    if not s.startswith("config.") or "=" not in s:
      p.error(f"--set takes config.FIELD=VALUE, got {s!r}")
  return args


def grid(args) -> list[Run]:
  runs = []
  for d in args.datasets:
    _, ks, seeds, _ = DATASETS[d]
    for k in (_ints(args.ks) if args.ks else ks):
      for s in (_ints(args.seeds) if args.seeds else seeds):
        runs.append(Run(d, k, s))
  return runs


def variants_of(args, dataset: str, k: int) -> list[str]:
  """--variants, else the grid's variants of (dataset, K) (every grid variant for another K)."""
  return list(args.variants or DATASETS[dataset][1].get(k, GRID_VARIANTS))


# ------------------------------------------------------------------------------------------------
# Running stages


def stage_overrides(args, run: Run, hf_dir: str, stage: str) -> list[str]:
  """The config flags one stage depends on (so that changing e.g. --finetune_epochs does not
  invalidate finished pre-training runs)."""
  o = [run.config_flag()]
  if stage not in PREPARE_STAGES or run.dataset != "fewrel":
    # FewRel: a seed-free split, one prepared dir for every seed
    o.append(f"--config.seed={run.seed}")
  if hf_dir:
    o.append(f"--config.model.hf_dir={hf_dir}")
  if stage in PRETRAIN_STAGES:  # shared by every run: no K, no split, the pre-training seed
    o = [f"--config.seed={args.pretrain_seed}"]
    if hf_dir:
      o.append(f"--config.model.hf_dir={hf_dir}")
    steps = args.sacon_steps if stage == "sacon" else args.episodic_steps
    if steps is not None:
      o.append(f"--config.{stage}.steps={steps}")
    return o + [f"--mesh={args.mesh}"] + [f"--{s}" for s in args.set]
  if stage == "finetune" and args.finetune_epochs is not None:
    o.append(f"--config.train.epochs={args.finetune_epochs}")
  if stage == "finetune" and DATASETS[run.dataset][3] == "dev":
    o.append(f"--config.train.eval_every_epochs={FIXED_EPOCHS}")
  if stage == "mslm" and args.mslm_steps is not None:
    o.append(f"--config.mslm.steps={args.mslm_steps}")
  if stage == "scl" and args.scl_steps is not None:
    o.append(f"--config.scl.steps={args.scl_steps}")
  if stage == "prepare":
    o.append("--config.data.corpus=require")
  elif stage in ("prepare_inv", "prepare_aug_inv"):  # a fine-tuning set with inverse copies
    k = args.augment_k if stage == "prepare_aug_inv" else 0
    o += [f"--config.data.augment_k={k}", "--config.data.corpus=off",
          "--config.data.unlabelled_file=", "--config.data.inverse_augment=True"]
  elif stage == "prepare_aug":  # the fine-tuning set only
    o += [f"--config.data.augment_k={args.augment_k}", "--config.data.corpus=off",
          "--config.data.unlabelled_file="]
  elif stage == "prepare_lo":  # the learning-order run's set: K-shot + every SCDG row
    o += [f"--config.data.augment_k={args.lo_augment_k}", "--config.data.corpus=off",
          "--config.data.unlabelled_file="]
  else:
    o.append(f"--mesh={args.mesh}")
  o += [f"--{s}" for s in args.set]
  return o


def run_stage(stage: str, workdir: pathlib.Path, flags: list[str], args, env) -> float:
  """Runs one stage unless its workdir already finished with the same flags; returns wall seconds.

  Raises:
    StageFailed: non-zero exit (the log is `<workdir>.log`), or a finished workdir written with
      other flags.
  """
  main_stage = "prepare" if stage in PREPARE_STAGES else stage
  cmd = [sys.executable, "-m", "tkre_jax.main", f"--stage={main_stage}", f"--workdir={workdir}",
         *flags]
  record = workdir / "ablation_stage.json"
  summary = workdir / "summary.json"
  if summary.is_file() and record.is_file():
    done = json.loads(record.read_text())
    if done.get("cmd")[1:] != cmd[1:]:
      raise StageFailed(f"{workdir} was written by another command:\n  {' '.join(done['cmd'])}\n"
                        f"now:\n  {' '.join(cmd)}\nuse another --out or delete the workdir")
    print(f"  skip {stage:8s} {workdir} (done, {done['wall_seconds']:.0f} s)", flush=True)
    return float(done["wall_seconds"])
  print(f"  run  {stage:8s} {workdir}", flush=True)
  if args.dry_run:
    print("       " + " ".join(cmd))
    return float("nan")
  workdir.parent.mkdir(parents=True, exist_ok=True)
  log_path = workdir.with_name(workdir.name + ".log")
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - t0
  if proc.returncode != 0:
    tail = log_path.read_text()[-3000:]
    raise StageFailed(f"stage {stage} failed (exit {proc.returncode}) in {workdir}; log {log_path}:"
                      f"\n{tail}")
  if not summary.is_file():
    raise StageFailed(f"stage {stage} wrote no {summary}")
  record.write_text(json.dumps({"cmd": cmd, "wall_seconds": round(wall, 1),
                                "finished": datetime.datetime.now().isoformat(timespec="seconds")},
                               indent=2))
  print(f"       {wall:.0f} s", flush=True)
  return wall


def pretrain_dir(out: pathlib.Path, args, stage: str) -> pathlib.Path:
  """The shared sacon / episodic workdir: --sacon_from / --episodic_from, else <out>/<stage>."""
  given = args.sacon_from if stage == "sacon" else args.episodic_from
  return pathlib.Path(given).resolve() if given else out / stage


def pretrain_wall(workdir: pathlib.Path) -> Optional[float]:
  """Wall seconds of a shared pre-training run: the launcher's record, else its summary's."""
  w = _wall(workdir / "ablation_stage.json")
  if w is None and (workdir / "summary.json").is_file():
    w = json.loads((workdir / "summary.json").read_text()).get("seconds", {}).get("total")
  return w


def run_pretrain(stage: str, out: pathlib.Path, args, env, hf_dir: str, run: "Run") -> float:
  """The shared sacon / episodic run (run once; a --*_from workdir must be finished)."""
  workdir = pretrain_dir(out, args, stage)
  given = args.sacon_from if stage == "sacon" else args.episodic_from
  if given:
    if not (workdir / "summary.json").is_file():
      raise StageFailed(f"--{stage}_from={given}: no finished {stage} run there (no summary.json)")
    print(f"  use  {stage:8s} {workdir} (given)", flush=True)
    return pretrain_wall(workdir) or float("nan")
  return run_stage(stage, workdir, stage_overrides(args, run, hf_dir, stage), args, env)


def run_variant(run: Run, variant: str, out: pathlib.Path, args, env, hf_dir: str) -> dict:
  """Runs (or skips) the stages of one variant; returns {stage: wall seconds}."""
  flags = lambda stage: stage_overrides(args, run, hf_dir, stage)  # noqa: E731
  prepared = out / run.prepared_name / "prepared"
  rdir = out / run.name
  walls = {}
  ft_name = f"ft_{variant}"
  inverse = variant in INVERSE_OF
  variant = INVERSE_OF.get(variant, variant)  # the stages of the variant it adds copies to
  aug_stage = "prepare_aug_inv" if inverse else "prepare_aug"
  aug = out / run.prepared_name / ("prepared_aug_inv" if inverse else "prepared_aug")
  start = ""  # the relation-aware pre-training the variant starts from
  for stage in PRETRAIN_STAGES:
    if stage in VARIANT_STAGES[variant]:
      walls[stage] = run_pretrain(stage, out, args, env, hf_dir, run)
      start = str(pretrain_dir(out, args, stage))
  augmented = "prepare_aug" in VARIANT_STAGES[variant]
  tkre_chain = "mslm" in VARIANT_STAGES[variant] and "scl" in VARIANT_STAGES[variant]
  if start:
    data = [f"--config.data.prepared_dir={prepared}"]
    ft_data = data
    if "prepare" in VARIANT_STAGES[variant]:
      walls["prepare"] = run_stage("prepare", prepared, flags("prepare"), args, env)
    if augmented:
      walls[aug_stage] = run_stage(aug_stage, aug, flags(aug_stage), args, env)
      ft_data = [f"--config.data.prepared_dir={aug}"]
    ft_init = start
    pre = pathlib.Path(start).name
    if tkre_chain:  # TKRE's pre-training on top of the relation-aware encoder
      walls["mslm"] = run_stage("mslm", rdir / f"mslm_from_{pre}",
                                flags("mslm") + data + [f"--init_from={start}"], args, env)
      walls["scl"] = run_stage("scl", rdir / f"scl_from_{pre}",
                               flags("scl") + data + [f"--init_from={rdir / f'mslm_from_{pre}'}"],
                               args, env)
      ft_init = str(rdir / f"scl_from_{pre}")
    ft_flags = flags("finetune") + ft_data + [f"--init_from={ft_init}"]
    if variant.endswith("_labels"):
      ft_flags.append(f"--config.train.head_init=labels")
      ft_flags.append(f"--config.train.label_encoder_from={start}")
    if variant.endswith("_predicate"):
      ft_flags.append("--config.model.head=predicate")
    walls["finetune"] = run_stage("finetune", rdir / ft_name, ft_flags, args, env)
    return walls
  base, lo_use, predicate = EXTENSIONS.get(variant, (variant, None, False))
  ft_extra, scl_extra, scl_dir = [], [], "scl"
  if variant in SCL_FORMS:
    base = "tkre"
    scl_dir, scl_extra = SCL_FORMS[variant][0], list(SCL_FORMS[variant][1])
  if lo_use == "both":
    lo_use = args.both_lo_use
  if lo_use:  # FineCL: the learning order of this seed's classifier on K-shot + every SCDG row
    lo_data = out / run.prepared_name / "prepared_lo"
    walls["prepare_lo"] = run_stage("prepare_lo", lo_data, flags("prepare_lo"), args, env)
    walls["learning_order"] = run_stage(
        "learning_order", rdir / "learning_order",
        flags("learning_order") + [f"--config.data.prepared_dir={lo_data}"], args, env)
    if lo_use == "scl":
      scl_extra = [f"--config.scl.learning_order_from={rdir / 'learning_order'}"]
      scl_dir = "scl_lo"
    else:
      ft_extra = [f"--config.train.learning_order_from={rdir / 'learning_order'}",
                  f"--config.train.learning_order_use={lo_use}"]
  if predicate:
    ft_extra.append("--config.model.head=predicate")
  if base != "augment":
    walls["prepare"] = run_stage("prepare", prepared, flags("prepare"), args, env)
  data = [f"--config.data.prepared_dir={prepared}"]
  ft_data = data
  if base in ("augment", "tkre"):
    walls[aug_stage] = run_stage(aug_stage, aug, flags(aug_stage), args, env)
    ft_data = [f"--config.data.prepared_dir={aug}"]
  elif inverse:  # the baseline's K-shot set with the inverse copies
    inv = out / run.prepared_name / "prepared_inv"
    walls["prepare_inv"] = run_stage("prepare_inv", inv, flags("prepare_inv"), args, env)
    ft_data = [f"--config.data.prepared_dir={inv}"]
  ft_init = ""
  if base in ("mslm", "mslm_scl", "tkre"):
    walls["mslm"] = run_stage("mslm", rdir / "mslm", flags("mslm") + data, args, env)
    ft_init = str(rdir / "mslm")
  if base == "scl":
    walls["scl"] = run_stage("scl", rdir / "scl_only", flags("scl") + data, args, env)
    ft_init = str(rdir / "scl_only")
  if base in ("mslm_scl", "tkre"):
    walls["scl"] = run_stage("scl", rdir / scl_dir,
                             flags("scl") + data + [f"--init_from={rdir / 'mslm'}"] + scl_extra,
                             args, env)
    ft_init = str(rdir / scl_dir)
  ft_flags = (flags("finetune") + ft_data + ([f"--init_from={ft_init}"] if ft_init else [])
              + ft_extra)
  walls["finetune"] = run_stage("finetune", rdir / ft_name, ft_flags, args, env)
  return walls


def make_tiny_encoder(path: pathlib.Path) -> pathlib.Path:
  """A 2-layer, hidden-32 BERT with random weights and the MiniLM tokenizer (smoke tests only)."""
  if (path / "model.safetensors").is_file():
    return path
  sys.path.insert(0, str(REPO_ROOT))
  from flax import nnx
  from tkre_jax.model.encoder import Encoder, EncoderConfig
  from tkre_jax.model.hf_import import default_model_dir, export_hf
  src = default_model_dir()
  cfg = EncoderConfig.tiny(vocab_size=30522, max_position_embeddings=512, pad_token_id=0)
  export_hf(cfg, Encoder(cfg, rngs=nnx.Rngs(0)), path)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (src / name).is_file():
      shutil.copy(src / name, path / name)
  return path


# ------------------------------------------------------------------------------------------------
# The table


def _mean_std(values: list[float]) -> tuple[float, float]:
  if not values:
    return float("nan"), float("nan")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], scale: float = 100.0) -> str:
  if not values:
    return "–"
  m, s = _mean_std([v * scale for v in values])
  return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def _wall(record: pathlib.Path) -> Optional[float]:
  if record.is_file():
    return float(json.loads(record.read_text())["wall_seconds"])
  return None


def collect(out: pathlib.Path, runs: list[Run], args) -> list[dict]:
  """One row per (dataset, K, variant): metrics and stage wall times of every finished seed."""
  rows = []
  for (dataset, k) in dict.fromkeys((r.dataset, r.k) for r in runs):
    split = args.report_split or DATASETS[dataset][3]
    seeds = [r.seed for r in runs if (r.dataset, r.k) == (dataset, k)]
    for variant in variants_of(args, dataset, k):
      row = {"dataset": dataset, "k": k, "variant": variant, "split": split, "seeds": [],
             "micro_f1": [], "accuracy": [], "macro_f1": [], "swap_accuracy": [],
             "direction_errors": [],
             "wall": {s: [] for s in VARIANT_STAGES[variant]}, "pipeline_wall": []}
      for seed in seeds:
        run = Run(dataset, k, seed)
        ft = out / run.name / f"ft_{variant}" / "summary.json"
        if not ft.is_file():
          continue
        metrics = json.loads(ft.read_text())["metrics"].get(split)
        if not metrics:
          continue
        row["seeds"].append(seed)
        for m in ("micro_f1", "accuracy", "macro_f1"):
          row[m].append(float(metrics[m]))
        direction = metrics.get("direction")  # relation inverses in the label set
        if direction and direction.get("swap_accuracy") is not None:
          row["swap_accuracy"].append(float(direction["swap_accuracy"]))
          row["direction_errors"].append(float(direction["direction_errors"]))
        pre = next((s for s in PRETRAIN_STAGES if s in VARIANT_STAGES[variant]), "")
        pre_name = pretrain_dir(out, args, pre).name if pre else ""
        lo_use = EXTENSIONS.get(variant, ("", None, False))[1]
        lo_scl = lo_use == "scl" or (lo_use == "both" and args.both_lo_use == "scl")
        dirs = {"prepare": out / run.prepared_name / "prepared",
                "prepare_aug": out / run.prepared_name / "prepared_aug",
                "prepare_inv": out / run.prepared_name / "prepared_inv",
                "prepare_aug_inv": out / run.prepared_name / "prepared_aug_inv",
                "prepare_lo": out / run.prepared_name / "prepared_lo",
                "learning_order": out / run.name / "learning_order",
                "mslm": out / run.name / (f"mslm_from_{pre_name}" if pre else "mslm"),
                "scl": out / run.name / ("scl_only" if variant == "scl" else
                                         SCL_FORMS[variant][0] if variant in SCL_FORMS else
                                         f"scl_from_{pre_name}" if pre else
                                         "scl_lo" if lo_scl else "scl"),
                "finetune": out / run.name / f"ft_{variant}"}
        total = 0.0
        for stage in VARIANT_STAGES[variant]:
          w = (pretrain_wall(pretrain_dir(out, args, stage)) if stage in PRETRAIN_STAGES
               else _wall(dirs[stage] / "ablation_stage.json"))
          if w is not None:
            row["wall"][stage].append(w)
            total += w
        row["pipeline_wall"].append(total)
      rows.append(row)
  return rows


def _secs(values: list[float]) -> str:
  return f"{statistics.fmean(values):.0f}" if values else "–"


def _prep_secs(wall: dict) -> str:
  """prepare (+ prepare_aug) seconds, mean over seeds."""
  parts = [statistics.fmean(wall[s]) for s in PREPARE_STAGES
           if wall.get(s)]
  return f"{sum(parts):.0f}" if parts else "–"


def table(rows: list[dict]) -> str:
  lines = []
  for (dataset, k) in dict.fromkeys((r["dataset"], r["k"]) for r in rows):
    group = [r for r in rows if (r["dataset"], r["k"]) == (dataset, k)]
    split = group[0]["split"]
    title = (f"FewRel val_wiki 16-way, K = {k} (canonical split, {split} metrics at the best dev "
             "epoch" + ("; the selection score itself, for comparing settings" if split == "dev"
                        else "") + ")"
             if dataset == "fewrel" else
             f"SemEval-2010, K = {k} (k-shot/{k}-<seed> splits, k-shot dev metrics after a fixed "
             "number of epochs: no model selection; micro-F1 without `Other`)"
             if dataset == "semeval" else
             f"Wiki80, K = {k} (k-shot/{k}-<seed> splits, k-shot dev metrics after a fixed number "
             "of epochs: no model selection)")
    with_lo = any(r["wall"].get("learning_order") for r in group)
    # the direction metric, where the rows have one (relation inverses in the label set)
    with_dir = any(r.get("swap_accuracy") for r in group)
    lines += [f"**{title}**", "",
              f"| variant | seeds | {split} micro-F1 | {split} accuracy | {split} macro-F1 | "
              + ("swap accuracy | direction-only errors | " if with_dir else "") + "prepare s "
              "| sacon / episodic s | " + ("learning order s | " if with_lo else "")
              + "mslm s | scl s | finetune s | pipeline s |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_lo else "")
              + ("---|---|" if with_dir else "")]
    for r in group:
      w = r["wall"]
      lines.append(
          f"| {VARIANT_NAMES[r['variant']]} | {len(r['seeds'])} ({','.join(map(str, r['seeds']))}) "
          f"| {_fmt(r['micro_f1'])} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} "
          + (f"| {_fmt(r.get('swap_accuracy', []))} | {_fmt(r.get('direction_errors', []), 1.0)} "
             if with_dir else "")
          + f"| {_prep_secs(w)} | {_secs(w.get('sacon', []) or w.get('episodic', []))} "
          + (f"| {_secs(w.get('learning_order', []))} " if with_lo else "")
          + f"| {_secs(w.get('mslm', []))} | {_secs(w.get('scl', []))} "
          f"| {_secs(w.get('finetune', []))} | {_secs(r['pipeline_wall'])} |")
    lines.append("")
  return "\n".join(lines)


def write_report(args, out: pathlib.Path, rows: list[dict], settings: dict) -> str:
  BEGIN, END = markers(args.section)  # pylint: disable=invalid-name
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  cmd = " ".join(["python", "launch/ablation.py", *sys.argv[1:]])
  body = "\n".join([
      BEGIN,
      f"Results of `{cmd}` ({stamp}, {platform.node() or 'this machine'}, "
      f"{os.cpu_count()} CPUs). Settings: {json.dumps(settings, sort_keys=True)}.",
      "Scores in %, mean ± sample standard deviation over the seeds listed (one seed: no ±); wall "
      "times in seconds "
      "(mean over seeds, each stage a separate process: start-up and compilation included; the "
      "`prepare` and pre-training runs are shared between variants and counted in each pipeline; "
      "`prepare s` includes `prepare_aug` for the augmented variants; the one sacon / episodic run "
      "is shared by every seed and K and counted in each pipeline).",
      "" if not args.tiny_encoder else
      "**Smoke run with a tiny random encoder: the scores are meaningless.**",
      "",
      table(rows),
      END,
  ])
  suffix = "" if args.section == "results" else f"_{args.section}"
  (out / f"results{suffix}.md").write_text(body + "\n")
  (out / f"results{suffix}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
  if args.doc:
    doc = pathlib.Path(args.doc)
    text = doc.read_text() if doc.is_file() else "# TKRE ablation\n\n## Results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
      text = text[:text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
      text = text.rstrip("\n") + "\n\n## Results\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
  return body


def main(argv=None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  runs = grid(args)
  hf_dir = args.hf_dir
  if args.tiny_encoder and not args.report_only:
    hf_dir = str(make_tiny_encoder(out / "tiny_encoder"))
  elif args.tiny_encoder:
    hf_dir = str(out / "tiny_encoder")
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  failures = []
  if not args.report_only:
    print(f"ablation: {len(runs)} (dataset, K, seed) runs -> {out}")
    for run in runs:
      for variant in variants_of(args, run.dataset, run.k):
        print(f"[{run.name}] {variant}", flush=True)
        try:
          run_variant(run, variant, out, args, env, hf_dir)
        except StageFailed as e:
          print(f"FAILED: {e}", file=sys.stderr, flush=True)
          failures.append(f"{run.name} {variant}")
          if not args.keep_going:
            break
      if failures and not args.keep_going:
        break
  if args.dry_run:
    return 1 if failures else 0
  settings = {"finetune_epochs": args.finetune_epochs, "mslm_steps": args.mslm_steps,
              "scl_steps": args.scl_steps, "hf_dir": hf_dir or "all-MiniLM-L6-v2",
              **({"sacon_steps": args.sacon_steps, "sacon_from": args.sacon_from,
                  "episodic_steps": args.episodic_steps, "episodic_from": args.episodic_from,
                  "pretrain_seed": args.pretrain_seed}
                 if any(set(VARIANT_STAGES[v]) & set(PRETRAIN_STAGES)
                        for r in runs for v in variants_of(args, r.dataset, r.k)) else {}),
              "augment_k": args.augment_k,
              "extra": args.set, "mesh": args.mesh}
  rows = collect(out, runs, args)
  print(write_report(args, out, rows, settings))
  if failures:
    print(f"{len(failures)} failed: {', '.join(failures)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
