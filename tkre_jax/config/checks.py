"""`validate(config, stage)`: every value check of the configuration, and the allowed values of its
enumerated fields (the modules that act on them import these through `tkre_jax.config`)."""

from __future__ import annotations

from typing import Optional

import ml_collections

# Allowed values of enumerated fields (the modules that act on them import these).
DATASETS = ("fewrel", "tacred")
DTYPES = ("float32", "bfloat16")
ANCHOR_INITS = ("text", "random")                   # config.scl.anchor_init
SCL_OBJECTIVES = ("reference", "infonce")           # config.scl.objective
SPAN_INPUTS = ("masked", "clean")                   # config.scl.span_input
EPISODE_METRICS = ("euclidean", "dot")              # config.episodes.metric
PROTOTYPES = ("support", "description", "mixed")    # config.episodes.prototype
DESCRIPTION_SOURCES = ("marker", "label_encoder")   # config.episodes.descriptions
STRUCTURED_OUTPUT_MODES = ("tool", "json_schema")   # config.generate.structured_output
# config.bench.stage (comma-separated); the *_predicate kinds: the classifier with the predicate
# head (config.model.head=predicate options), on synthetic templates
BENCH_STAGES = ("mslm", "scl", "finetune", "eval", "finetune_predicate", "eval_predicate")
BENCH_DATA_SOURCES = ("synthetic", "prepared")      # config.bench.data

# The sections each stage reads besides `data` and `model` (always checked). eval,
# predict and export restore a finetune workdir's own config, so they read no section of the
# command's.
STAGE_SECTIONS = {
    "generate": ("generate",),
    "prepare": (),
    "mslm": ("mslm",),
    "scl": ("scl",),
    "finetune": ("train",),
    "eval": (),
    "bench": ("bench",),
    "predict": (),
    "export": (),
    "episodic": ("episodic", "episodes"),
    "episodes": ("episodes",),
    "sacon": ("sacon",),
    "learning_order": ("train", "learning_order"),
}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
  """`need(ok, field, what)` raises `ValueError("config.<section>.<field> <what>, got <value>")`."""

  def __init__(self, config: ml_collections.ConfigDict, section: str):
    self.config, self.section = config, section
    self.values = config
    for part in section.split("."):
      self.values = self.values[part]

  def need(self, ok: bool, field: str, what: str) -> None:
    if not ok:
      raise ValueError(f"config.{self.section}.{field} {what}, got {self.values[field]!r}")

  def one_of(self, field: str, allowed: tuple) -> None:
    self.need(self.values[field] in allowed, field, f"must be one of {allowed}")

  def int_at_least(self, field: str, low: int) -> None:
    self.need(_is_int(self.values[field]) and self.values[field] >= low, field,
              f"must be an int >= {low}")

  def multiple_of_length(self, field: str = "length_multiple") -> None:
    """`config.data.max_seq_len` must be a multiple of `<section>.length_multiple` (0: never cut)."""
    self.int_at_least(field, 0)
    m, max_len = self.values[field], self.config.data.max_seq_len
    if m and max_len % m:
      raise ValueError(f"config.data.max_seq_len ({max_len}) must be a multiple of "
                       f"config.{self.section}.{field} ({m})")


def _check_data(config) -> None:
  c = _Checker(config, "data")
  c.need(config.data.dataset in DATASETS, "dataset", "must be 'fewrel' or 'tacred'")
  c.need(config.data.k >= 1, "k", "must be >= 1")
  c.need(config.data.augment_k >= 0, "augment_k", "must be >= 0 (0: off)")


RELATION_HEADS = ("linear", "predicate")           # config.model.head
PREDICATE_ENCODERS = ("separate", "shared")        # config.model.predicate_encoder
TEMPLATE_PASSES = ("cached", "full")                # config.model.predicate_template_pass
PREDICATE_HEAD_FORMS = ("source", "split")          # config.model.predicate_head_form


def _check_model(config) -> None:
  c = _Checker(config, "model")
  m = c.values
  c.need(m.dtype in DTYPES, "dtype", "must be float32 or bfloat16")
  c.one_of("head", RELATION_HEADS)
  c.one_of("predicate_encoder", PREDICATE_ENCODERS)
  c.one_of("predicate_template_pass", TEMPLATE_PASSES)
  c.one_of("predicate_head_form", PREDICATE_HEAD_FORMS)
  c.need(_is_number(m.predicate_alpha) and 0 <= m.predicate_alpha <= 1, "predicate_alpha",
         "must be in [0, 1]")
  c.need(_is_number(m.predicate_temperature) and m.predicate_temperature > 0,
         "predicate_temperature", "must be > 0")
  c.int_at_least("predicate_train_relations", 0)
  c.int_at_least("predicate_fusion_layers", 0)
  c.int_at_least("template_entity_len", 1)
  c.int_at_least("template_max_len", 16)


def _check_optim(config, section: str) -> None:
  c = _Checker(config, f"{section}.optim")
  o = c.values
  c.need(_is_number(o.learning_rate) and o.learning_rate > 0, "learning_rate", "must be > 0")
  c.need(_is_number(o.warmup_frac) and 0 <= o.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
  c.need(_is_number(o.weight_decay) and o.weight_decay >= 0, "weight_decay", "must be >= 0")
  for f in ("b1", "b2"):
    c.need(_is_number(o[f]) and 0 <= o[f] < 1, f, "must be in [0, 1)")
  c.need(_is_number(o.eps) and o.eps > 0, "eps", "must be > 0")
  c.need(_is_number(o.grad_clip) and o.grad_clip >= 0, "grad_clip", "must be >= 0 (0: off)")


def _check_training_section(config, section: str) -> _Checker:
  """The fields of `training_section`: `optim` and the loop cadence."""
  _check_optim(config, section)
  c = _Checker(config, section)
  c.int_at_least("log_every_steps", 1)
  c.need(_is_number(c.values.checkpoint_every_seconds) and c.values.checkpoint_every_seconds >= 0,
         "checkpoint_every_seconds", "must be >= 0 (0: off)")
  c.need(_is_int(c.values.checkpoint_every_steps) and c.values.checkpoint_every_steps >= 0,
         "checkpoint_every_steps", "must be an int >= 0 (0: off)")
  return c


HEAD_INITS = ("random", "labels")                   # config.train.head_init
LEARNING_ORDER_USES = ("weight", "drop_unlearned")  # config.train.learning_order_use
LEARNING_ORDER_SCHEDULES = ("source", "capped")     # config.learning_order.schedule
LEARNING_ORDER_SIGNALS = ("batch", "full_pass")     # config.learning_order.signal


def _check_train(config) -> None:
  c = _check_training_section(config, "train")
  c.one_of("head_init", HEAD_INITS)
  c.one_of("learning_order_use", LEARNING_ORDER_USES)
  for f in ("epochs", "batch_size", "eval_batch_size", "eval_every_epochs"):
    c.int_at_least(f, 1)
  c.multiple_of_length()


def _check_masking(config) -> None:
  """The masking fields of `config.mslm` (read by both mslm and scl)."""
  c = _Checker(config, "mslm")
  c.int_at_least("max_predictions", 1)
  for f in ("prob_relation", "prob_entity", "prob_context"):
    c.need(_is_number(c.values[f]) and 0 <= c.values[f] <= 1, f, "must be in [0, 1]")


def _check_pretrain(config, stage: str) -> _Checker:
  c = _check_training_section(config, stage)
  c.int_at_least("steps", 1)
  c.int_at_least("batch_size", 1)
  c.multiple_of_length()
  _check_masking(config)
  return c


def _check_mslm(config) -> None:
  c = _check_pretrain(config, "mslm")
  c.int_at_least("head_warmup_steps", 0)
  c.need(_is_number(c.values.head_warmup_learning_rate) and c.values.head_warmup_learning_rate > 0,
         "head_warmup_learning_rate", "must be > 0")
  c.int_at_least("head_warmup_batch_size", 1)


def _check_scl(config) -> None:
  c = _check_pretrain(config, "scl")
  s = c.values
  c.need(s.tau > 0, "tau", "must be > 0")
  c.need(s.lambda_mslm >= 0, "lambda_mslm", "must be >= 0")
  c.need(s.lambda_scl >= 0, "lambda_scl", "must be >= 0")
  c.int_at_least("proj_dim", 0)
  c.need(_is_int(s.neg_min_len) and 1 <= s.neg_min_len <= s.neg_max_len, "neg_min_len",
         f"must satisfy 1 <= neg_min_len <= neg_max_len ({s.neg_max_len})")
  c.one_of("anchor_init", ANCHOR_INITS)
  c.one_of("objective", SCL_OBJECTIVES)
  c.one_of("span_input", SPAN_INPUTS)


def _check_episodic(config) -> None:
  c = _check_training_section(config, "episodic")
  for f in ("n_way", "k_shot", "q_query", "steps"):
    c.int_at_least(f, 1)
  c.int_at_least("length_multiple", 0)


SACON_LABEL_ENCODERS = ("separate", "shared")      # config.sacon.label_encoder


def _check_sacon(config) -> None:
  c = _check_training_section(config, "sacon")
  s = c.values
  for f in ("steps", "relations_per_batch", "sentences_per_relation", "max_predictions",
            "label_max_predictions"):
    c.int_at_least(f, 1)
  c.int_at_least("label_max_len", 8)
  c.int_at_least("head_warmup_steps", 0)
  c.multiple_of_length()
  for f in ("blank_prob", "mlm_prob"):
    c.need(_is_number(s[f]) and 0 <= s[f] <= 1, f, "must be in [0, 1]")
  c.need(_is_number(s.temperature) and s.temperature > 0, "temperature", "must be > 0")
  c.need(_is_number(s.lambda_mlm) and s.lambda_mlm >= 0, "lambda_mlm", "must be >= 0")
  c.need(_is_number(s.head_warmup_learning_rate) and s.head_warmup_learning_rate > 0,
         "head_warmup_learning_rate", "must be > 0")
  c.one_of("label_encoder", SACON_LABEL_ENCODERS)
  c.need(isinstance(s.train_file, str) and bool(s.train_file), "train_file", "must name a file")


def _check_learning_order(config) -> None:
  c = _Checker(config, "learning_order")
  c.int_at_least("epochs", 1)
  c.int_at_least("cap_epoch", 1)
  c.one_of("schedule", LEARNING_ORDER_SCHEDULES)
  c.one_of("signal", LEARNING_ORDER_SIGNALS)
  c.need(isinstance(c.values.split, str) and bool(c.values.split), "split", "must name a split")


def _check_episodes(config) -> None:
  c = _Checker(config, "episodes")
  c.one_of("metric", EPISODE_METRICS)
  c.one_of("prototype", PROTOTYPES)
  c.one_of("descriptions", DESCRIPTION_SOURCES)
  c.need(0.0 <= c.values.nota_rate < 1.0, "nota_rate", "must be in [0, 1)")


def _check_generate(config) -> None:
  c = _Checker(config, "generate")
  g = c.values
  c.need(isinstance(g.model, str) and bool(g.model.strip()), "model", "must be a model id")
  c.one_of("structured_output", STRUCTURED_OUTPUT_MODES)
  for f in ("max_tokens", "scdg_per_relation", "leakage_ngram", "max_concurrency"):
    c.need(_is_int(g[f]) and g[f] > 0, f, "must be a positive int")
  for f in ("k_demos", "max_requests", "max_total_tokens", "max_retries"):
    c.int_at_least(f, 0)
  for f in ("timeout_s", "poll_interval_s", "batch_max_wait_s", "batch_discount"):
    c.need(_is_number(g[f]) and g[f] >= 0, f, "must be a number >= 0")
  c.need(all(isinstance(t, str) and t.strip() for t in list(g.entity_types or [])), "entity_types",
         "must be a list of non-empty strings")
  c.need(isinstance(g.edkg, bool), "edkg", "must be a bool")
  c.need(isinstance(g.scdg, bool), "scdg", "must be a bool")
  c.need(g.edkg or g.scdg, "edkg", "and config.generate.scdg must not both be False")


def bench_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The stages of `config.bench.stage` ("mslm,scl,finetune,eval"), in order."""
  return [s.strip() for s in str(config.bench.stage).split(",") if s.strip()]


def _check_bench(config) -> None:
  c = _Checker(config, "bench")
  b = c.values
  stages = bench_stages(config)
  c.need(bool(stages) and all(s in BENCH_STAGES for s in stages), "stage",
         f"must list stages of {BENCH_STAGES}")
  for f in ("batch_size", "seq_len", "steps"):
    c.int_at_least(f, 1)
  for f in ("warmup_steps", "input_batches"):
    c.int_at_least(f, 0)
  c.int_at_least("num_labels", 2)
  c.one_of("data", BENCH_DATA_SOURCES)
  if b.data == "synthetic":
    c.need(b.seq_len >= 16, "seq_len", "must be >= 16 for synthetic batches")
  c.one_of("dtype", ("",) + DTYPES)


_SECTION_CHECKS = {
    "train": _check_train, "mslm": _check_mslm, "scl": _check_scl, "episodic": _check_episodic,
    "episodes": _check_episodes, "sacon": _check_sacon,
    "learning_order": _check_learning_order, "generate": _check_generate,
    "bench": _check_bench,
}


def validate(config: ml_collections.ConfigDict, stage: Optional[str] = None) -> None:
  """Checks the values a stage reads, before it starts (`stages.run` calls it): `data` and
  `model`, and the sections of `stage` (`STAGE_SECTIONS`); every section when `stage` is None.
  Checks that need the device mesh (batch sizes dividing the data-parallel size) stay in the
  stages.

  Raises:
    ValueError: an unknown stage, or a bad value; the message names the field
      (`config.scl.tau must be > 0, got 0.0`).
  """
  if stage is not None and stage not in STAGE_SECTIONS:
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SECTIONS)}")
  _check_data(config)
  _check_model(config)
  sections = STAGE_SECTIONS[stage] if stage is not None else tuple(_SECTION_CHECKS)
  for name in sections:
    _SECTION_CHECKS[name](config)
