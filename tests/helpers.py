"""Shared test helpers: a tiny HF-format encoder directory with the MiniLM tokenizer, and a tiny
FewRel-format data folder cut from the real val_wiki file."""

from __future__ import annotations

import json
import pathlib
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# The stage tests (prepare -> mslm / scl / finetune / eval / predict runs) use a mesh of this many of
# conftest's 8 fake CPU devices: the batch is still split over a data axis, and on a 2-core machine
# a run is several times cheaper than on all eight. The 8-device layouts are tested by
# test_sharded_steps.py, test_mesh.py, test_main_mesh.py and the episodes stages.
STAGE_DEVICES = 2


def stage_mesh():
  """The `--mesh=cpu` mesh of a machine with `STAGE_DEVICES` devices (the first of this process's)."""
  import jax  # pylint: disable=import-outside-toplevel
  from tkre_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  return make_mesh("cpu", devices=jax.devices()[:STAGE_DEVICES])


def subprocess_env() -> dict:
  """The environment of a Python process a test starts: this one's, which conftest set up (8 CPU
  devices, the session's persistent compilation cache), and JAX's optimisation switch as it is set
  here now (`fewer_compiler_optimizations`): the process compiles what this one compiled and finds
  it in the cache (the cache key includes the device topology, hence 8 devices there too)."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  if "jax" in sys.modules:
    fewer = sys.modules["jax"].config.values["jax_disable_most_optimizations"]
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true" if fewer else "false"
  return env


def main_command(args: list[str], devices: int | None = None, step_sleep: float = 0.0) -> list[str]:
  """The command `python -m tkre_jax.main ARGS`, run in `subprocess_env()`. With `devices`, main's
  mesh is made of the first `devices` of the process's devices (what `stage_mesh()` and
  `main_cli(..., devices=N)` run here); with `step_sleep`, every train step is slowed by that many
  seconds (so a test can kill the run between two checkpoints; it touches no number the run
  computes)."""
  import sys  # pylint: disable=import-outside-toplevel
  if not devices and not step_sleep:
    return [sys.executable, "-m", "tkre_jax.main", *args]
  script = []
  if devices:
    script.append("import jax; from tkre_jax.parallel import mesh; make = mesh.make_mesh; "
                  "mesh.make_mesh = lambda spec, devices=None: "
                  f"make(spec, devices or jax.devices()[:{int(devices)}])")
  if step_sleep:
    script.append("import time; from tkre_jax.train import trainer; check = trainer._check_finite; "
                  f"trainer._check_finite = lambda *a: (time.sleep({float(step_sleep)}), "
                  "check(*a))[1]")
  script.append("from tkre_jax import main; main.run()")
  return [sys.executable, "-c", "; ".join(script), *args]


def minilm_dir() -> pathlib.Path:
  import pytest
  try:
    from tkre_jax.model.hf_import import default_model_dir
    return default_model_dir()
  except Exception as e:  # package missing
    pytest.skip(f"all-MiniLM-L6-v2 not installed: {e}")


def make_tiny_hf_dir(path: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
  """A 2-layer, hidden-32 BERT with random weights and the real MiniLM tokenizer (vocab 30522)."""
  from flax import nnx
  from tkre_jax.model.encoder import Encoder, EncoderConfig
  from tkre_jax.model.hf_import import export_hf
  src = minilm_dir()
  cfg = EncoderConfig.tiny(vocab_size=30522, max_position_embeddings=512, pad_token_id=0, **overrides)
  export_hf(cfg, Encoder(cfg, rngs=nnx.Rngs(seed)), path)
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copy(src / name, path / name)
  return path


def make_tiny_fewrel(shared_data: pathlib.Path, path: pathlib.Path, relations: int = 4,
                     per_relation: int = 12, train: int = 4, dev: int = 4) -> pathlib.Path:
  """A FewRel-format folder: the first `per_relation` instances of the first `relations` relations
  of val_wiki, a split file (train_pool [0, train), dev [train, train+dev), test the rest), and
  pid2name.json."""
  src = json.load(open(shared_data / "fewrel" / "val_wiki.json"))
  rels = list(src)[:relations]
  (path / "fewrel").mkdir(parents=True, exist_ok=True)
  json.dump({r: src[r][:per_relation] for r in rels}, open(path / "fewrel" / "val_wiki.json", "w"))
  json.dump({"train_pool": [0, train], "dev": [train, train + dev], "test": [train + dev, per_relation]},
            open(path / "fewrel" / "val_wiki_split.json", "w"))
  pid = json.load(open(shared_data / "fewrel" / "pid2name.json"))
  json.dump({r: pid[r] for r in rels}, open(path / "fewrel" / "pid2name.json", "w"))
  return path


def load_script(relative_path: str):
  """Imports a repository script that is not a package module (e.g. `benchmarks/cpu_ceiling.py`),
  registered in `sys.modules` under its file stem (dataclasses look their module up there)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tkre_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = config_lib.REPO_ROOT / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module
  spec.loader.exec_module(module)
  return module


def tiny_base_config(data_dir: pathlib.Path, hf_dir: pathlib.Path,
                     prepared_dir: pathlib.Path | None = None):
  """The stage tests' config (conftest's `tiny_config`): FewRel at `data_dir` with K = 4 and 64
  tokens, the tiny encoder at `hf_dir`, finetuning in batches of 8 (2 steps an epoch on 16 train
  rows) at learning rate 1e-2, evaluation in batches of 16, every step logged."""
  from tkre_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.data.update(data_dir=str(data_dir), k=4, max_seq_len=64,
                prepared_dir=str(prepared_dir) if prepared_dir else "")
  c.model.hf_dir = str(hf_dir)
  c.train.update(batch_size=8, eval_batch_size=16, optim=dict(learning_rate=1e-2), log_every_steps=1)
  return c


def run_main(args: list[str], monkeypatch, capsys, caplog,
             devices: int | None = None) -> tuple[int, str, str]:
  """`python -m tkre_jax.main ARGS`, in this process: absl parses the flags from ARGS (the
  `--config.*` overrides included) and `main()` runs as `app.run` would run it; with `devices`, as
  on a machine with that many devices (main's mesh is made of the first `devices` of this process's:
  what `stage_mesh()` and `subprocess_env(devices)` run). Returns the exit code (0, or `sys.exit`'s),
  stdout, and stderr followed by the log messages. The flags and absl's verbosity are restored
  afterwards."""
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  import tkre_jax.main as main_lib  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  argv = ["tkre_jax.main", *args]
  if not any(a.startswith("--config=") for a in args):
    argv.insert(1, f"--config={main_lib._DEFAULT_CONFIG}")  # pylint: disable=protected-access
  if not any(a.startswith("--host_malloc") for a in args):
    argv.insert(1, "--host_malloc=default")  # this test process keeps its allocator as it is

  def reset():
    # The --config.* overrides are flags the --config flag defines while it is parsed (it reads
    # sys.argv for them); a second parse would define them twice.
    for name in [n for n in fv if n.startswith("config.")]:
      delattr(fv, name)
    fv.unparse_flags()

  reset()
  monkeypatch.setattr(sys, "argv", argv)
  from tkre_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  make_mesh = mesh_lib.make_mesh
  if devices:
    import jax  # pylint: disable=import-outside-toplevel
    mesh_lib.make_mesh = lambda spec, devs=None: make_mesh(spec, devs or jax.devices()[:devices])
  verbosity = logging.get_verbosity()
  capsys.readouterr()
  code = 0
  try:
    with caplog.at_level(std_logging.INFO):
      caplog.clear()
      fv(argv)
      try:
        main_lib.main(argv[:1])
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
      messages = "\n".join(caplog.messages)
  finally:
    mesh_lib.make_mesh = make_mesh
    logging.set_verbosity(verbosity)
    logging.get_absl_handler().removeFilter(main_lib._quiet_libraries)  # pylint: disable=protected-access
    reset()
  out, err = capsys.readouterr()
  return code, out, err + messages
