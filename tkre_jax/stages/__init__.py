"""The pipeline stages, one module each; `run` dispatches on the stage name.

    generate -> prepare -> mslm -> scl -> finetune -> eval      (and bench; predict and export
                                                                use a finetune workdir)
    episodic (prototypical training on training relations) -> episodes (N-way K-shot evaluation)
    sacon (relation-aware pre-training on training relations) -> any of the above (--init_from)
    learning_order (FineCL: first epoch each training row is learned -> per-row weights for
                    finetune and scl)

A stage reads the config, writes into its own workdir (`summary.json`, `metrics.jsonl`,
checkpoints) and reaches an earlier stage only through that stage's workdir (`--init_from`,
`config.data.prepared_dir`), never through its code.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Optional

import ml_collections

from tkre_jax import config as config_lib

# stage name -> module of this package that holds its `run(config, workdir, **kwargs) -> dict`.
STAGE_MODULES = {
    "generate": "generate",
    "prepare": "prepare",
    "mslm": "pretrain",
    "scl": "pretrain",
    "finetune": "finetune",
    "eval": "evaluate",
    "bench": "bench",
    "predict": "predict",
    "export": "export",
    "episodic": "episodic",
    "episodes": "episodes",
    "sacon": "sacon",
    "learning_order": "learning_order",
}


def run(stage: str, config: ml_collections.ConfigDict, workdir: Optional[pathlib.Path],
        **kwargs) -> dict:
  """Runs one stage and returns its summary (also written to `<workdir>/summary.json`; predict
  and export take no workdir: they write `--output`).

  The config is checked first (`config.validate(config, stage)`: the fields this stage reads).

  Raises:
    ValueError: an unknown stage, one not available in this build, or a bad config value (naming
      the field).
  """
  if stage not in config_lib.STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(config_lib.STAGES)}")
  if stage not in STAGE_MODULES:
    raise ValueError(f"stage {stage!r} is not implemented yet; available: {', '.join(STAGE_MODULES)}")
  config_lib.validate(config, stage)
  module = importlib.import_module(f"{__name__}.{STAGE_MODULES[stage]}")
  return module.run(stage, config, pathlib.Path(workdir) if workdir else None, **kwargs)
