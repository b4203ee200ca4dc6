"""tkre_jax/config (defaults, checks): one optimizer shape for every training section, defaults in one place, one
validation entry point that names the field, and run.json configs of both layouts restore."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tkre_jax import config as config_lib
from tkre_jax.train import optim

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIM_KEYS = {"learning_rate", "warmup_frac", "weight_decay", "b1", "b2", "eps", "grad_clip"}
LOOP = {"log_every_steps": 10, "checkpoint_every_seconds": 300, "checkpoint_every_steps": 0}


def test_every_training_section_has_the_same_optim_shape_and_loop_fields():
  c = config_lib.base_config()
  assert config_lib.TRAINING_SECTIONS == ("train", "mslm", "scl", "episodic", "sacon")
  for name in config_lib.TRAINING_SECTIONS:
    assert set(c[name].optim.keys()) == OPTIM_KEYS, name
    assert {k: c[name][k] for k in LOOP} == LOOP, name
  assert set(config_lib.optim_config(1.0).keys()) == OPTIM_KEYS


def test_defaults_are_the_values_of_before():
  c = config_lib.base_config()
  peaks = {name: c[name].optim.learning_rate for name in config_lib.TRAINING_SECTIONS}
  assert peaks == {"train": 1e-4, "mslm": 5e-5, "scl": 5e-5, "episodic": 5e-5, "sacon": 3e-5}
  for name in config_lib.TRAINING_SECTIONS:
    o = c[name].optim
    assert (o.warmup_frac, o.weight_decay, o.b1, o.b2, o.eps, o.grad_clip) == (
        0.1, 0.01, 0.9, 0.999, 1e-6, 1.0), name
  assert c.mslm.head_warmup_learning_rate == 1e-3


def test_optim_config_overrides_and_refuses_unknown_fields():
  o = config_lib.optim_config(3e-5, grad_clip=0.0, b2=0.98)
  assert (o.learning_rate, o.grad_clip, o.b2, o.b1) == (3e-5, 0.0, 0.98, 0.9)
  with pytest.raises(KeyError, match="adam_b1"):
    config_lib.optim_config(1e-4, adam_b1=0.8)


def test_adamw_reads_the_optim_sub_config():
  c = config_lib.base_config()
  c.train.optim.update(learning_rate=2e-3, warmup_frac=0.25)
  _, schedule = optim.adamw(c.train.optim, total_steps=8)
  # 2 warm-up steps to the peak, then linear decay to 0 over the other 6
  assert [round(float(schedule(s)), 8) for s in (0, 1, 2, 5, 8)] == [0.0, 1e-3, 2e-3, 1e-3, 0.0]


def test_the_old_flat_paths_are_an_error_where_they_are_set():
  c = config_lib.base_config()
  with pytest.raises(AttributeError, match="learning_rate"):
    c.train.learning_rate = 3e-5
  with pytest.raises(KeyError, match="adam_b1"):
    c.mslm.update(adam_b1=0.8)
  assert config_lib.renamed_path("scl.adam_eps") == "scl.optim.eps"
  assert config_lib.renamed_path("train.learning_rate") == "train.optim.learning_rate"
  assert config_lib.renamed_path("train.optim.learning_rate") is None
  assert config_lib.renamed_path("mslm.head_warmup_learning_rate") is None


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_command_line_names_a_renamed_flag():
  # A real process: main refuses the old path while absl parses sys.argv, before main() runs.
  proc = subprocess.run([sys.executable, "-m", "tkre_jax.main", "--stage=finetune",
                         "--workdir=unused", "--config.mslm.adam_b2=0.98"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "--config.mslm.adam_b2 is now --config.mslm.optim.b2" in proc.stderr


def test_every_stage_has_its_sections():
  assert set(config_lib.STAGE_SECTIONS) == set(config_lib.STAGES)
  c = config_lib.base_config()
  config_lib.validate(c)
  for stage in config_lib.STAGES:
    config_lib.validate(c, stage)
  with pytest.raises(ValueError, match="unknown stage 'nope'"):
    config_lib.validate(c, "nope")


# (field path, bad value, stage whose check reads it, the message)
BAD_VALUES = [
    ("scl.tau", 0.0, "scl", "config.scl.tau must be > 0, got 0.0"),
    ("train.optim.learning_rate", 0.0, "finetune",
     "config.train.optim.learning_rate must be > 0, got 0.0"),
    ("mslm.optim.warmup_frac", 1.0, "mslm", "config.mslm.optim.warmup_frac must be in [0, 1), got 1.0"),
    ("scl.optim.weight_decay", -0.1, "scl", "config.scl.optim.weight_decay must be >= 0, got -0.1"),
    ("episodic.optim.b1", 1.0, "episodic", "config.episodic.optim.b1 must be in [0, 1), got 1.0"),
    ("train.optim.b2", -0.5, "finetune", "config.train.optim.b2 must be in [0, 1), got -0.5"),
    ("mslm.optim.eps", 0.0, "mslm", "config.mslm.optim.eps must be > 0, got 0.0"),
    ("scl.optim.grad_clip", -1.0, "scl", "config.scl.optim.grad_clip must be >= 0 (0: off), got -1.0"),
    ("train.log_every_steps", 0, "finetune", "config.train.log_every_steps must be an int >= 1, got 0"),
    ("episodic.checkpoint_every_steps", -1, "episodic",
     "config.episodic.checkpoint_every_steps must be an int >= 0 (0: off), got -1"),
    ("mslm.checkpoint_every_seconds", -5, "mslm",
     "config.mslm.checkpoint_every_seconds must be >= 0 (0: off), got -5"),
    ("train.batch_size", 0, "finetune", "config.train.batch_size must be an int >= 1, got 0"),
    ("train.eval_batch_size", 0, "finetune",
     "config.train.eval_batch_size must be an int >= 1, got 0"),
    ("train.length_multiple", 48, "finetune",
     "config.data.max_seq_len (128) must be a multiple of config.train.length_multiple (48)"),
    ("mslm.steps", 0, "mslm", "config.mslm.steps must be an int >= 1, got 0"),
    ("mslm.head_warmup_learning_rate", 0.0, "mslm",
     "config.mslm.head_warmup_learning_rate must be > 0, got 0.0"),
    ("mslm.head_warmup_batch_size", 0, "mslm",
     "config.mslm.head_warmup_batch_size must be an int >= 1, got 0"),
    ("mslm.prob_relation", 1.5, "scl", "config.mslm.prob_relation must be in [0, 1], got 1.5"),
    ("mslm.max_predictions", 0, "scl", "config.mslm.max_predictions must be an int >= 1, got 0"),
    ("scl.neg_min_len", 4, "scl",
     "config.scl.neg_min_len must satisfy 1 <= neg_min_len <= neg_max_len (3), got 4"),
    ("scl.span_input", "both", "scl",
     "config.scl.span_input must be one of ('masked', 'clean'), got 'both'"),
    ("scl.anchor_init", "zeros", "scl",
     "config.scl.anchor_init must be one of ('text', 'random'), got 'zeros'"),
    ("episodic.n_way", 0, "episodic", "config.episodic.n_way must be an int >= 1, got 0"),
    ("episodes.metric", "cosine", "episodes",
     "config.episodes.metric must be one of ('euclidean', 'dot'), got 'cosine'"),
    ("episodes.nota_rate", 1.0, "episodes", "config.episodes.nota_rate must be in [0, 1), got 1.0"),
    ("generate.structured_output", "xml", "generate",
     "config.generate.structured_output must be one of ('tool', 'json_schema'), got 'xml'"),
    ("generate.leakage_ngram", 0, "generate",
     "config.generate.leakage_ngram must be a positive int, got 0"),
    ("generate.max_retries", -1, "generate", "config.generate.max_retries must be an int >= 0, got -1"),
    ("bench.stage", "mslm,predict", "bench",
     "config.bench.stage must list stages of ('mslm', 'scl', 'finetune', 'eval', "
     "'finetune_predicate', 'eval_predicate'), got 'mslm,predict'"),
    ("bench.seq_len", 8, "bench", "config.bench.seq_len must be >= 16 for synthetic batches, got 8"),
    ("model.head", "mlp", "finetune",
     "config.model.head must be one of ('linear', 'predicate'), got 'mlp'"),
    ("model.predicate_alpha", 1.5, "finetune", "config.model.predicate_alpha must be in [0, 1], got 1.5"),
    ("model.predicate_train_relations", -1, "finetune",
     "config.model.predicate_train_relations must be an int >= 0, got -1"),
    ("model.predicate_fusion_layers", -1, "finetune",
     "config.model.predicate_fusion_layers must be an int >= 0, got -1"),
    ("train.learning_order_use", "both", "finetune",
     "config.train.learning_order_use must be one of ('weight', 'drop_unlearned'), got 'both'"),
    ("learning_order.cap_epoch", 0, "learning_order",
     "config.learning_order.cap_epoch must be an int >= 1, got 0"),
    ("bench.dtype", "float16", "bench",
     "config.bench.dtype must be one of ('', 'float32', 'bfloat16'), got 'float16'"),
    ("data.dataset", "semeval", "prepare",
     "config.data.dataset must be 'fewrel' or 'tacred', got 'semeval'"),
    ("data.augment_k", -1, "eval", "config.data.augment_k must be >= 0 (0: off), got -1"),
    ("model.dtype", "float16", "predict", "config.model.dtype must be float32 or bfloat16, got 'float16'"),
]


@pytest.mark.parametrize("path,value,stage,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_validate_names_the_field(path, value, stage, message):
  c = config_lib.base_config()
  c.update_from_flattened_dict({path: value})
  for which in (stage, None):  # the stage's check, and the check of every section
    with pytest.raises(ValueError) as e:
      config_lib.validate(c, which)
    assert str(e.value) == message


def test_a_stage_checks_only_the_sections_it_reads():
  c = config_lib.base_config()
  c.scl.tau = 0.0
  c.bench.steps = 0
  config_lib.validate(c, "finetune")
  config_lib.validate(c, "mslm")
  with pytest.raises(ValueError, match="config.scl.tau"):
    config_lib.validate(c, "scl")
  with pytest.raises(ValueError, match="config.bench.steps"):
    config_lib.validate(c, "bench")


def _old_layout(config) -> dict:
  """A config dict as run.json held it before `optim`: flat optimizer fields, adam_* names."""
  d = json.loads(config.to_json())
  for name in config_lib.TRAINING_SECTIONS:
    o = d[name].pop("optim")
    d[name].update(learning_rate=o["learning_rate"], warmup_frac=o["warmup_frac"],
                   weight_decay=o["weight_decay"], adam_b1=o["b1"], adam_b2=o["b2"],
                   adam_eps=o["eps"], grad_clip=o["grad_clip"])
  return d


def test_saved_configs_of_both_layouts_restore():
  c = config_lib.base_config()
  c.train.optim.learning_rate = 3e-5
  c.scl.optim.eps = 1e-8
  new = config_lib.from_saved(json.loads(c.to_json()))
  assert new.to_dict() == c.to_dict()
  old = config_lib.from_saved(_old_layout(c))
  assert old.to_dict() == c.to_dict()
  assert (old.train.optim.learning_rate, old.scl.optim.eps, old.mslm.optim.b2) == (3e-5, 1e-8, 0.999)
  config_lib.validate(old)
  # a run.json of before the episodic section: nothing to convert there
  d = _old_layout(c)
  del d["episodic"]
  assert config_lib.from_saved(d).train.optim.learning_rate == 3e-5


def test_saved_configs_that_cannot_be_read_are_named():
  with pytest.raises(ValueError, match="not a tkre_jax config"):
    config_lib.from_saved({"model": {}})
  d = json.loads(config_lib.base_config().to_json())
  d["mslm"]["adam_b1"] = 0.9
  with pytest.raises(ValueError, match=r"config.mslm has both 'optim' and the old flat optimizer "
                                       r"fields \['adam_b1'\]"):
    config_lib.from_saved(d)
