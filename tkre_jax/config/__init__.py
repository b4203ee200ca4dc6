"""The configuration every stage reads: one `ml_collections.ConfigDict` built by `base_config()`.

Config files in `configs/` start from `base_config()` and override what they need; any field can be
overridden on the command line (`--config.train.optim.learning_rate=3e-5`). Every training section
(`train`, `mslm`, `scl`, `episodic`, `sacon`) starts from `training_section(learning_rate)`: the same
optimizer sub-config `optim` (`optim_config`, read by `tkre_jax.train.optim.adamw`) and the same loop
cadence fields. `base_config()` is the one place defaults live: code reads fields directly, never
`config.x.get(field, default)`. `validate(config, stage)` holds every value check; `stages.run`
calls it with the stage before the stage starts. `from_saved` rebuilds the config of a `run.json`.

Two modules, one API (import `tkre_jax.config`, not its modules):
- `defaults`: `base_config`, config files and `--config` arguments, paths, `from_saved`;
- `checks`: `validate`, `bench_stages` and the allowed values of enumerated fields.
"""

from tkre_jax.config.checks import (DATASETS, DTYPES, ANCHOR_INITS, SPAN_INPUTS, EPISODE_METRICS,
    PROTOTYPES, DESCRIPTION_SOURCES, STRUCTURED_OUTPUT_MODES, BENCH_STAGES, BENCH_DATA_SOURCES,
    STAGE_SECTIONS, RELATION_HEADS, PREDICATE_ENCODERS, TEMPLATE_PASSES, HEAD_INITS,
    LEARNING_ORDER_USES, SACON_LABEL_ENCODERS, SCL_OBJECTIVES, bench_stages, validate)
from tkre_jax.config.defaults import (REPO_ROOT, STAGES, OPTIM_DEFAULTS, LOOP_DEFAULTS,
    TRAINING_SECTIONS, default_data_dir, optim_config, training_section, base_config,
    load_config_file, parse_config_arg, resolve_path, renamed_path, from_saved)

__all__ = [
    "ANCHOR_INITS", "BENCH_DATA_SOURCES", "BENCH_STAGES", "DATASETS", "DESCRIPTION_SOURCES",
    "DTYPES", "EPISODE_METRICS", "HEAD_INITS", "LEARNING_ORDER_USES", "LOOP_DEFAULTS",
    "OPTIM_DEFAULTS", "PREDICATE_ENCODERS", "PROTOTYPES", "RELATION_HEADS", "REPO_ROOT",
    "SACON_LABEL_ENCODERS", "SCL_OBJECTIVES", "SPAN_INPUTS", "STAGES", "STAGE_SECTIONS",
    "STRUCTURED_OUTPUT_MODES", "TEMPLATE_PASSES", "TRAINING_SECTIONS", "base_config",
    "bench_stages", "default_data_dir", "from_saved", "load_config_file", "optim_config",
    "parse_config_arg", "renamed_path", "resolve_path", "training_section", "validate",
]
