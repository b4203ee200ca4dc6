r"""Entry point: `python -m tkre_jax.main --stage=STAGE --mesh=MESH --config=configs/FILE.py --workdir=DIR`.

Examples (FewRel val_wiki, 16-way 8-shot, on this machine's CPU):

  python -m tkre_jax.main --stage=prepare  --workdir=runs/fewrel/prepared
  python -m tkre_jax.main --stage=finetune --workdir=runs/fewrel/finetune \
      --config.data.prepared_dir=runs/fewrel/prepared
  python -m tkre_jax.main --stage=eval --workdir=runs/fewrel/eval --init_from=runs/fewrel/finetune \
      --config.data.prepared_dir=runs/fewrel/prepared

  python -m tkre_jax.main --stage=predict --init_from=runs/fewrel/finetune --input=in.jsonl \
      --output=out.jsonl
  python -m tkre_jax.main --stage=export --init_from=runs/fewrel/finetune --output=runs/fewrel/hf

FewRel's episodic protocol (docs/episodes.md): prototypical training on the training relations, then
N-way K-shot episodes of the disjoint val_wiki relations (no --init_from: the raw encoder):

  python -m tkre_jax.main --stage=episodic --workdir=runs/episodes/episodic
  python -m tkre_jax.main --stage=episodes --workdir=runs/episodes/eval --init_from=runs/episodes/episodic

Relation-aware pre-training (SaCon) on the 64 training relations, then any stage from it:

  python -m tkre_jax.main --stage=sacon --workdir=runs/sacon
  python -m tkre_jax.main --stage=finetune --workdir=runs/fewrel/ft_sacon --init_from=runs/sacon \
      --config.data.prepared_dir=runs/fewrel/prepared

Any config field can be overridden: `--config.train.optim.learning_rate=3e-5 --config.data.k=16`.

Several processes (hosts): the same command on each. Cloud TPU VMs, SLURM and Open MPI are detected;
elsewhere (e.g. two CPU processes on one machine) name the coordinator, the count and the index:

  python -m tkre_jax.main --stage=mslm --mesh=fsdp:4 ... --coordinator_address=127.0.0.1:8476 \
      --num_processes=2 --process_id=0      # and --process_id=1 in the second process

Stages run as separate processes can share compiled programs through JAX's persistent compilation
cache: `--compilation_cache_dir=DIR` (default `$TKRE_COMPILATION_CACHE`; off when neither is set),
as `launch/quickstart.sh` does with `<workdir>/jax_cache`. Each stage's `summary.json` gets a
`process` entry: start-up seconds, compilations, their seconds, and the cache hits.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

_T_PROCESS = time.time()  # start-up is measured from here (the interpreter's own start is ~0.05 s)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tkre_jax import config as config_lib  # noqa: E402
from tkre_jax.parallel import host_memory  # noqa: E402  (no JAX import: tuned before JAX starts)

_DEFAULT_CONFIG = str(config_lib.REPO_ROOT / "configs" / "fewrel_16way.py")

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", None, list(config_lib.STAGES), "Pipeline stage to run.")
flags.DEFINE_string("workdir", None, "This stage's output directory (summary.json, metrics.jsonl, "
                    "checkpoints); optional for predict and export.")
flags.DEFINE_string("mesh", "cpu", "Mesh preset (cpu, gpu, gpu-8, tpu-v4-8, tpu-v4-32, tpu-v5e-8, "
                    "tpu-v5p-8, tpu-v6e-8) or explicit axes, e.g. data:2,fsdp:2,tensor:2.")
flags.DEFINE_string("init_from", "", "Workdir of the previous stage whose checkpoint starts this one "
                    "(eval: the finetune workdir to evaluate; episodes: any stage's workdir, or "
                    "none for the raw encoder).")
flags.DEFINE_enum("llm", "live", ["live", "replay"], "generate: call the API, or replay cached / "
                  "pre-generated files only.")
flags.DEFINE_bool("llm_batch", False, "generate: submit through the Message Batches API.")
flags.DEFINE_enum("parallelism", "jit", ["jit", "pmap"], "jit with shardings, or the pmap "
                  "data-parallel path (finetune only; needs --config.mesh.rules=dp).")
flags.DEFINE_string("input", "", "predict: JSON lines of {text, subject, object} records, or a "
                    "TACRED / Wiki80 / FewRel file.")
flags.DEFINE_string("output", "", "predict: the output JSON-lines file; export: the HF folder.")
flags.DEFINE_integer("top_k", 3, "predict: relations listed per record with their probabilities.")
flags.DEFINE_float("threshold", None, "predict: below this probability the no-relation class is "
                   "returned (needs one in the label map).")


def _refuse_renamed_config_flags(argv) -> None:
  """Exits with status 2 naming the new path of a `--config.<section>.<field>` flag that moved into
  `optim` (ml_collections would fail on it with a traceback while the flag is defined, below)."""
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].partition("=")[0]
      new = config_lib.renamed_path(path)
      if new:
        print(f"error: --config.{path} is now --config.{new} (the optimizer fields of every training "
              "section are in its `optim` sub-config)", file=sys.stderr)
        sys.exit(2)


_refuse_renamed_config_flags(sys.argv)

# Multi-process runs (tkre_jax.parallel.mesh.maybe_initialize_distributed): Cloud TPU VMs, SLURM and
# Open MPI are detected without flags; elsewhere (several CPU / GPU processes) give all three.
flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0's coordinator "
                    "service, the same on every process (e.g. 10.0.0.2:8476); also read from "
                    "$JAX_COORDINATOR_ADDRESS. Not needed on Cloud TPU VMs.")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes (hosts).")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, "
                     "num_processes); process 0 runs the coordinator and writes the logs.")

flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache folder, "
                    "shared by the stage processes (compiled programs are loaded, not recompiled; "
                    "results are bit for bit the same). Default: $TKRE_COMPILATION_CACHE; '' or "
                    "unset: off.")
flags.DEFINE_enum("host_malloc", "auto", list(host_memory.MODES), "glibc allocator: tuned "
                  "keeps XLA:CPU's freed step buffers in the process (no mmap, no trim, one arena; "
                  "same numbers, fewer page faults: tkre_jax/parallel/host_memory.py); auto: tuned "
                  "for CPU runs, glibc's defaults on accelerator hosts.")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (get_config()).",
                                lock_config=True)
flags.mark_flags_as_required(["stage"])
_NO_WORKDIR_STAGES = ("predict", "export")  # they write --output; --workdir gets a summary if given

# Stages whose loss the pmap path cannot split into per-device (sum, weight) pairs.
_JIT_ONLY_STAGES = {
    "mslm": "the pre-training steps draw their masks for the global batch and have no pmap form",
    "scl": "the SCL in-batch negatives span the global batch, which a per-device loss cannot see",
    "bench": "bench times the jit steps",
    "episodic": "the prototypes of an episode are means over the global batch",
    "sacon": "the anchored contrastive loss compares every sentence with every label of the global batch",
    "episodes": "the evaluation embeds with the jit step",
    "learning_order": "its per-epoch scoring runs the jit prediction step",
}


# Errors a user can fix (bad data, config, flags, mesh, missing or mismatched files, a diverged run):
# one line and exit status 2; `--verbosity=1` shows the traceback as well. Anything else is a bug
# and keeps Python's traceback.
KNOWN_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError, FloatingPointError, ModuleNotFoundError)
EXIT_USER_ERROR = 2


_PY_WARNING = 30  # the standard library's logging.WARNING (absl's constants are verbosities)


def _quiet_libraries(record) -> bool:
  """Orbax logs every manager option and TFDS every dataset it opens at INFO, and TFDS warns about its
  own deprecated fields: keep their other warnings and errors, drop that chatter."""
  if "/orbax/" in record.pathname:
    return record.levelno >= _PY_WARNING and "read only" not in record.getMessage()
  if "/tensorflow_datasets/" in record.pathname:
    return record.levelno >= _PY_WARNING and "is deprecated" not in record.getMessage()
  return True


def _known_errors() -> tuple:
  from tkre_jax.llm.client import GenerateError  # pylint: disable=import-outside-toplevel
  return KNOWN_ERRORS + (GenerateError,)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  if FLAGS.verbosity < 1:
    print("(run with --verbosity=1 for the traceback)", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def main(argv):
  del argv
  # Before anything starts JAX's backend and its threads.
  _TIMES["host_malloc"] = host_memory.tune_malloc(FLAGS.host_malloc, mesh_spec=FLAGS.mesh)
  if FLAGS.verbosity < 1:
    logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().use_absl_log_file = False
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    summary = _run_stage()
  except _known_errors() as e:
    if FLAGS.verbosity >= 1:
      logging.exception("%s failed", FLAGS.stage)
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    _fail(text)
  from tkre_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  _record_process(summary)
  if mesh_lib.is_primary():
    print(json.dumps({"stage": FLAGS.stage, "workdir": FLAGS.workdir,
                      **{k: summary[k] for k in ("metrics", "splits", "records", "output", "bench",
                                                      "rows_dir", "seconds")
                         if k in summary}},
                     indent=2))


_TIMES: dict = {}


def _run_stage() -> dict:
  import importlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  from tkre_jax import stages  # pylint: disable=import-outside-toplevel
  from tkre_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from tkre_jax.train import compile_cache  # pylint: disable=import-outside-toplevel

  compile_cache.track()
  compile_cache.enable(FLAGS.compilation_cache_dir if FLAGS.compilation_cache_dir is not None
                       else compile_cache.default_dir())
  # The stage's module and what it imports (TensorFlow, transformers, Orbax): part of start-up.
  if FLAGS.stage in stages.STAGE_MODULES:
    importlib.import_module(f"{stages.__name__}.{stages.STAGE_MODULES[FLAGS.stage]}")
  config = FLAGS.config
  if not FLAGS.workdir and FLAGS.stage not in _NO_WORKDIR_STAGES:
    raise ValueError(f"--stage={FLAGS.stage} needs --workdir=DIR")
  if FLAGS.parallelism == "pmap" and FLAGS.stage in _JIT_ONLY_STAGES:
    raise ValueError(f"--parallelism=pmap is not available for --stage={FLAGS.stage}: "
                     f"{_JIT_ONLY_STAGES[FLAGS.stage]}; use --parallelism=jit (the default)")
  mesh = None
  if FLAGS.stage not in ("prepare", "generate"):
    # Multi-host: jax.distributed must start before anything touches a JAX backend.
    mesh_lib.maybe_initialize_distributed(**_distributed_args())
    try:
      mesh = mesh_lib.make_mesh(FLAGS.mesh)
    except mesh_lib.MeshError as e:  # fail before any data is read, with what was found
      raise mesh_lib.MeshError(f"--mesh={FLAGS.mesh}: {e}\nmesh presets:\n"
                               f"{mesh_lib.describe_presets()}") from None
    logging.info("mesh %s: %s; process %d of %d, %d local / %d global devices", FLAGS.mesh,
                 dict(mesh.shape), jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
  _TIMES["stage_start"] = time.time()
  return stages.run(FLAGS.stage, config, pathlib.Path(FLAGS.workdir) if FLAGS.workdir else None,
                    mesh=mesh, init_from=FLAGS.init_from, llm=FLAGS.llm, llm_batch=FLAGS.llm_batch,
                    parallelism=FLAGS.parallelism, input_path=FLAGS.input,
                    output_path=FLAGS.output, top_k=FLAGS.top_k, threshold=FLAGS.threshold)


def _distributed_args() -> dict:
  """`maybe_initialize_distributed` arguments of the --coordinator_address / --num_processes /
  --process_id flags: none when no flag is given (detection from the environment), else the given
  ones and force=True (JAX fills the rest in from a known cluster environment, or says which is
  missing)."""
  given = {k: v for k, v in (("coordinator_address", FLAGS.coordinator_address or None),
                             ("num_processes", FLAGS.num_processes),
                             ("process_id", FLAGS.process_id)) if v is not None}
  return {"force": True, **given} if given else {}


def _record_process(summary: dict) -> None:
  """Logs this process's start-up and compilation time and adds them to `<workdir>/summary.json`
  (key `process`): `startup_seconds` (imports, JAX backend, mesh: up to the stage's first line),
  `stage_seconds` (the stage itself), `compiles`, `compile_seconds` (XLA compilation or loading from
  the persistent cache), `trace_seconds` (tracing and lowering), `cache_hits`, `cache`."""
  from tkre_jax.train import compile_cache, runtime  # pylint: disable=import-outside-toplevel
  now = time.time()
  start = _TIMES.get("stage_start", now)
  process = {"startup_seconds": round(start - _T_PROCESS, 1), "stage_seconds": round(now - start, 1),
             **compile_cache.stats(), "host_malloc": _TIMES.get("host_malloc")}
  summary["process"] = process
  logging.info("%s: start-up %.1f s, stage %.1f s; %d XLA compilations in %.1f s (%d from the "
               "persistent compilation cache%s), tracing and lowering %.1f s", FLAGS.stage,
               process["startup_seconds"], process["stage_seconds"], process["compiles"],
               process["compile_seconds"], process["cache_hits"],
               f" {process['cache']}" if process["cache"] else ": off", process["trace_seconds"])
  path = pathlib.Path(FLAGS.workdir) / "summary.json" if FLAGS.workdir else None
  if path is not None and path.is_file():
    with open(path) as f:
      on_disk = json.load(f)
    runtime.write_summary(path.parent, {**on_disk, "process": process})


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
