"""The configuration every stage reads: one `ml_collections.ConfigDict` built by `base_config()`.

Config files in `configs/` start from `base_config()` and override what they need; any field can be
overridden on the command line (`--config.train.learning_rate=3e-5`). `validate(config)` checks the
values that would otherwise fail late.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("generate", "prepare", "mslm", "scl", "finetune", "eval", "bench", "predict", "export",
          "episodic", "episodes")


def default_data_dir() -> pathlib.Path:
  """`$TKRE_DATA_DIR` if set, else `../shared/data` beside the checkout."""
  env = os.environ.get("TKRE_DATA_DIR")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (FewRel val_wiki 16-way 8-shot, all-MiniLM-L6-v2, CPU)."""
  c = ml_collections.ConfigDict()
  c.seed = 42  # every random choice (sampling, init, dropout, masking, data order) derives from it

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "fewrel"      # fewrel | tacred (TACRED-format files: TACRED, Wiki80, TKRE release)
  c.data.data_dir = ""           # '' -> $TKRE_DATA_DIR or ../shared/data
  # FewRel: relation-keyed JSON + the canonical split file (train = first K of the train pool).
  c.data.fewrel_file = "fewrel/val_wiki.json"
  c.data.split_file = "fewrel/val_wiki_split.json"
  c.data.schema_file = "fewrel/pid2name.json"  # relation id -> [name, description]; '' for none
  # TACRED format: train/dev/test files (relative to data_dir or absolute); test may be ''.
  c.data.train_file = ""
  c.data.dev_file = ""
  c.data.test_file = ""
  c.data.k = 8                   # K: training instances per relation
  c.data.sample_train = False    # TACRED format: draw K per relation (seeded) from train_file
  c.data.max_seq_len = 128       # tokens, [CLS]/[SEP] included
  c.data.typed_markers = True    # entity types inside the markers when the data has types
  c.data.num_shards = 2          # TFRecord shards per split, at least (at most 4,096 rows a shard)
  c.data.prepared_dir = ""       # where prepare wrote the TFRecords; '' -> <workdir> for prepare
  # LLM knowledge for the pre-training corpus (relative to data_dir or absolute; '' for none).
  c.data.edkg_file = "fewrel_llm/edkg_val_wiki_16x8.jsonl"
  c.data.scdg_file = "fewrel_llm/scdg_val_wiki_16x16.jsonl"
  # Pre-training corpus (split `corpus`: K-shot train + EDKG + SCDG, see tkre_jax/data/corpus.py):
  # auto: built when the LLM files above exist (skipped with a warning when none does) | require | off
  c.data.corpus = "auto"
  c.data.corpus_leak_ngram = "drop"  # LLM text sharing an n-gram with dev/test: drop | keep | fail
  # SCDG augmentation of the fine-tuning `train` split (tkre_jax/data/augment.py): the first
  # augment_k valid, leakage-free, non-duplicate instances per relation of data.scdg_file, after
  # the gold rows. 0: off (the plain fine-tuning baseline); TKRE runs use 8 (the reference's add_k).
  c.data.augment_k = 0
  # Unlabelled text for the MSLM head warm-up (split `unlabelled`, see config.mslm.head_warmup_*):
  # FewRel-format sentences of relations disjoint from the task's (FewRel 1.0 train relations for
  # val_wiki); built when the file exists ('' for none). At most unlabelled_rows rows.
  c.data.unlabelled_file = "fewrel_train_partial/train_wiki_partial.json"
  c.data.unlabelled_rows = 2048

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.hf_dir = ""            # HF checkpoint dir (config.json + model.safetensors); '' -> MiniLM
  c.model.dtype = "float32"      # compute dtype: float32 | bfloat16
  c.model.dropout = 0.1          # classifier dropout
  # self-attention: auto (jax.nn.dot_product_attention, cuDNN on GPUs, unless attention-probability
  # dropout is active: then the explicit formula) | dot_product (always; training skips attention-
  # probability dropout) | explicit (the HF formula); see tkre_jax/model/encoder.py
  c.model.attention_impl = "auto"

  # ---------------------------------------------------------------- fine-tuning
  c.train = ml_collections.ConfigDict()
  c.train.learning_rate = 1e-4   # peak; 10% linear warm-up then linear decay to 0
  c.train.warmup_frac = 0.1
  c.train.epochs = 30
  c.train.batch_size = 16        # global batch, sequences
  c.train.eval_batch_size = 64
  c.train.weight_decay = 0.01
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-6
  c.train.grad_clip = 1.0        # global-norm clipping
  c.train.eval_every_epochs = 3  # dev evaluation (model selection) period; the last epoch always
  c.train.select_metric = "micro_f1"
  c.train.length_multiple = 32   # sequence axis cut to a multiple of this per batch (0: never cut)
  c.train.log_every_steps = 10
  c.train.final_eval_splits = "dev,test"  # splits the selected model is scored on at the end of finetune
  c.train.checkpoint_every_seconds = 300  # resume checkpoint at most this often (wall time; 0: off)
  c.train.checkpoint_every_steps = 0      # ... and/or every this many steps (0: off); always at the end

  # ---------------------------------------------------------------- pre-training stage 1: MSLM
  # Masked Span Language Modeling on the `corpus` split (tkre_jax/tasks/mslm_scl.py).
  c.mslm = ml_collections.ConfigDict()
  c.mslm.split = "corpus"        # prepared split to pre-train on
  c.mslm.steps = 64              # optimizer steps: ~2 passes over the FewRel 8-shot corpus (505
                                 # sequences) at batch 16; ~2.4 s/step for MiniLM-L6 on 2 CPU cores
  c.mslm.batch_size = 16         # global batch, sequences
  c.mslm.learning_rate = 5e-5    # peak; linear warm-up then linear decay to 0
  c.mslm.warmup_frac = 0.1
  c.mslm.weight_decay = 0.01
  c.mslm.adam_b1 = 0.9
  c.mslm.adam_b2 = 0.999
  c.mslm.adam_eps = 1e-6
  c.mslm.grad_clip = 1.0         # global-norm clipping
  c.mslm.max_predictions = 32    # static prediction slots per sequence (selected tokens beyond: unmasked)
  c.mslm.prob_relation = 0.8     # masking probability inside the relation span (TKRE)
  c.mslm.prob_entity = 0.5       # ... on subject / object entity tokens
  c.mslm.prob_context = 0.2      # ... on other tokens (special tokens and markers: never)
  c.mslm.length_multiple = 64    # batches grouped by length bucket, sequence axis cut to a multiple
                                 # of this (0: random batches at max_seq_len); 64: 2 compiled shapes
  c.mslm.log_every_steps = 10
  # MLM-head warm-up: when the starting weights have no MLM head (all-MiniLM-L6-v2 ships none),
  # the head first trains alone (encoder frozen: every encoder parameter unchanged) on this split
  # for head_warmup_steps steps (its own workdir <mslm workdir>/head_warmup); 0: off. A missing
  # split skips it with a warning (recorded in the summary).
  c.mslm.head_warmup_steps = 100
  c.mslm.head_warmup_split = "unlabelled"
  c.mslm.head_warmup_learning_rate = 1e-3
  c.mslm.head_warmup_batch_size = 32
  c.mslm.eval_split = ""          # split whose masked-token accuracy is measured before/after ('')
  c.mslm.checkpoint_every_seconds = 300  # resume checkpoint at most this often (wall time; 0: off)
  c.mslm.checkpoint_every_steps = 0      # ... and/or every this many steps (0: off); always at the end

  # ---------------------------------------------------------------- pre-training stage 2: SCL
  # Span-level Contrastive Learning with MSLM kept on: lambda_mslm * L_mslm + lambda_scl * L_scl.
  # Masking (max_predictions, prob_*) is read from config.mslm.
  c.scl = ml_collections.ConfigDict()
  c.scl.split = "corpus"
  c.scl.steps = 48               # ~1.5 passes; ~3.7 s/step (MiniLM-L6, 2 CPU cores)
  c.scl.batch_size = 16
  c.scl.learning_rate = 5e-5
  c.scl.warmup_frac = 0.1
  c.scl.weight_decay = 0.01
  c.scl.adam_b1 = 0.9
  c.scl.adam_b2 = 0.999
  c.scl.adam_eps = 1e-6
  c.scl.grad_clip = 1.0
  c.scl.lambda_mslm = 1.0        # lambda1 (TKRE reference: 1)
  c.scl.lambda_scl = 1.0         # lambda2 (TKRE reference: 1)
  c.scl.tau = 0.1                # InfoNCE temperature (TKRE reference: 0.1)
  c.scl.proj_dim = 0             # span projection output size; 0: the encoder hidden size (reference)
  c.scl.neg_min_len = 1          # negative context span length range, tokens (reference: 1-3)
  c.scl.neg_max_len = 3
  c.scl.anchor_init = "text"     # text: encoder embedding of "name: description" (schema) | random
  c.scl.span_input = "masked"    # spans pooled from the masked pass (reference) | clean (2nd pass)
  c.scl.skip_no_relation = True  # no contrastive term for the no-relation class (TACRED); MSLM kept
  c.scl.length_multiple = 64
  c.scl.log_every_steps = 10
  c.scl.checkpoint_every_seconds = 300
  c.scl.checkpoint_every_steps = 0

  # ---------------------------------------------------------------- episodic protocol
  # FewRel's N-way K-shot protocol (docs/episodes.md): train on one set of relations (`episodic`),
  # classify episodes of disjoint relations by prototypes, no gradient step on them (`episodes`).
  # Files are FewRel-format (relation -> instances), relative to data_dir or absolute.
  c.episodes = ml_collections.ConfigDict()
  c.episodes.eval_file = "fewrel/val_wiki.json"
  c.episodes.train_file = "fewrel_train_partial/train_wiki_partial.json"
  c.episodes.settings = "5-1,5-5,10-1,10-5,5-0"  # N-K pairs; K = 0: zero-shot (description prototypes)
  c.episodes.q_query = 5          # queries per relation and episode
  c.episodes.num_episodes = 1000  # per setting; the list is written to <workdir>/episodes.json
  c.episodes.seed = 0             # episode sampling seed (independent of the training seed)
  c.episodes.nota_rate = 0.0      # fraction of queries that are none-of-the-above (FewRel 2.0)
  c.episodes.nota_threshold = ml_collections.config_dict.placeholder(float)  # best score below: NOTA
  c.episodes.metric = "euclidean"  # euclidean (-squared distance) | dot
  c.episodes.prototype = "support"  # support (mean of K) | description | mixed (K = 0: description)
  c.episodes.description_weight = 0.5  # mixed: (1 - w) * support mean + w * description
  c.episodes.batch_size = 64      # rows per embedding call
  c.episodes.length_multiple = 32

  # Episodic (prototypical) training on episodes of episodes.train_file (one episode a step).
  c.episodic = ml_collections.ConfigDict()
  c.episodic.n_way = 5
  c.episodic.k_shot = 5
  c.episodic.q_query = 5
  c.episodic.steps = 300         # 3-7 s/step for MiniLM-L6 on 2 contended CPU cores (50 rows a step)
  c.episodic.learning_rate = 5e-5
  c.episodic.warmup_frac = 0.1
  c.episodic.weight_decay = 0.01
  c.episodic.adam_b1 = 0.9
  c.episodic.adam_b2 = 0.999
  c.episodic.adam_eps = 1e-6
  c.episodic.grad_clip = 1.0
  c.episodic.length_multiple = 32
  c.episodic.log_every_steps = 10
  c.episodic.checkpoint_every_seconds = 300
  c.episodic.checkpoint_every_steps = 0

  # ---------------------------------------------------------------- generate (LLM knowledge)
  # EDKG explanations and SCDG synthetic instances from Claude (tkre_jax/stages/generate.py).
  c.generate = ml_collections.ConfigDict()
  c.generate.model = "claude-sonnet-5-5"       # Claude model id (the current Sonnet)
  # json_schema: structured outputs (`output_config.format`), works with current models | tool: a
  # forced tool whose input_schema is the answer's schema (models that accept a forced tool_choice,
  # e.g. claude-haiku-4-5)
  c.generate.structured_output = "json_schema"
  c.generate.temperature = ml_collections.config_dict.placeholder(float)  # None: model default
  c.generate.effort = "low"          # output_config.effort (low ... max); None: left out
  c.generate.max_tokens = 8192       # per request, thinking included
  c.generate.edkg = True             # which kinds to generate
  c.generate.scdg = True
  c.generate.scdg_per_relation = 16  # N: new SCDG instances per relation
  c.generate.k_demos = 8             # K: demonstrations per SCDG prompt (first K train instances)
  c.generate.entity_types = []       # allowed SCDG entity types; empty: no constraint
  c.generate.leakage_ngram = 8       # n of the shared word n-gram leakage check against dev/test
  c.generate.max_concurrency = 4     # parallel requests in live (non-batch) mode
  c.generate.max_requests = 0        # cap on paid requests in a run (0: none)
  c.generate.max_total_tokens = 0    # cap on tokens used in a run, input + output (0: none)
  # Retries of the anthropic SDK per request (408, 409, 429, 5xx, timeouts, connection errors;
  # exponential backoff from 0.5 s to 8 s, or the server's retry-after).
  c.generate.max_retries = 5
  c.generate.timeout_s = 300.0       # per request, seconds
  c.generate.poll_interval_s = 30.0  # seconds between Message Batch polls
  c.generate.batch_max_wait_s = 25 * 3600.0  # stop polling after this (s); a rerun resumes
  c.generate.cache_dir = ""          # response cache; '' -> <workdir>/cache
  # USD per million tokens (Anthropic list prices); Batch API requests cost batch_discount of these.
  c.generate.prices = ml_collections.ConfigDict({
      m: {"input_per_mtok": i, "output_per_mtok": o} for m, (i, o) in {
          "claude-sonnet-5-5": (2.0, 10.0), "claude-sonnet-5": (2.0, 10.0),
          "claude-opus-5-5": (4.0, 20.0), "claude-opus-5": (5.0, 25.0),
          "claude-fable-5-1": (10.0, 50.0), "claude-haiku-4-5": (1.0, 5.0),
          "claude-sonnet-4-6": (3.0, 15.0), "claude-sonnet-4-5": (3.0, 15.0)}.items()})
  c.generate.batch_discount = 0.5

  # ---------------------------------------------------------------- bench
  # Times the train step of mslm / scl / finetune and the eval forward pass on random weights of a
  # published encoder shape (tkre_jax/stages/bench.py); one JSON row per stage.
  c.bench = ml_collections.ConfigDict()
  c.bench.stage = "mslm,scl,finetune,eval"  # comma-separated: mslm | scl | finetune | eval
  c.bench.model = "minilm-l6"    # minilm-l6 | bert-base | roberta-base | roberta-large | tiny | hf
                                 # (hf: the shape of config.model.hf_dir, random weights)
  c.bench.batch_size = 16        # global batch, sequences
  c.bench.seq_len = 128          # tokens per sequence (synthetic batches: all real tokens)
  c.bench.steps = 20             # timed steps
  c.bench.warmup_steps = 3       # untimed steps after compilation
  c.bench.dtype = ""             # compute dtype float32 | bfloat16; '' -> config.model.dtype
  c.bench.data = "synthetic"     # synthetic batches | prepared: a batch of config.data.prepared_dir
  c.bench.split = "corpus"       # prepared split (train-step batch with data=prepared; input pipeline)
  c.bench.input_batches = 50     # batches the tf.data reader is timed over (0: not timed)
  c.bench.input_rows = 2048      # rows of the synthetic split the reader is timed on without data
  c.bench.num_labels = 16        # classifier classes / SCL relations of synthetic batches
  c.bench.peak_matmul_size = 2048  # CPU: the square matmul timed for the peak FLOP/s
  c.bench.output = ""            # folder of the JSON rows; '' -> <workdir>/rows

  # ---------------------------------------------------------------- fault injection (tests)
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_step = -1       # training stages: the batch weights of this step (1-based) become NaN

  # ---------------------------------------------------------------- sharding
  c.mesh = ml_collections.ConfigDict()
  c.mesh.rules = "dp"            # logical-axis rules: dp | fsdp | fsdp_tp

  return c


def load_config_file(name: str):
  """The module of `configs/<name>.py` (config files build on each other through this).

  Raises:
    FileNotFoundError: no such config file.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = REPO_ROOT / "configs" / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"tkre_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_config_arg(arg: str, defaults: dict[str, str], where: str) -> dict[str, str]:
  """`"k=8,split_seed=42"` (the text after `:` in `--config=FILE:ARG`) over `defaults`.

  Raises:
    ValueError: a part without `=`, or a key not in `defaults` (the message lists the known keys).
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"{where}: unknown config argument {part!r} (known: "
                       + ", ".join(f"{k}=..." for k in defaults) + ")")
    out[key] = value
  return out


def resolve_path(config: ml_collections.ConfigDict, path: str) -> pathlib.Path:
  """A data path relative to `config.data.data_dir` (or the default data dir), or absolute."""
  p = pathlib.Path(os.path.expanduser(path))
  if p.is_absolute():
    return p
  base = pathlib.Path(config.data.data_dir) if config.data.data_dir else default_data_dir()
  return base / p


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that would otherwise fail late.

  Raises:
    ValueError: naming the field and the problem.
  """
  if config.data.dataset not in ("fewrel", "tacred"):
    raise ValueError(f"config.data.dataset must be 'fewrel' or 'tacred', got {config.data.dataset!r}")
  if config.data.k < 1:
    raise ValueError(f"config.data.k must be >= 1, got {config.data.k}")
  if config.data.augment_k < 0:
    raise ValueError(f"config.data.augment_k must be >= 0 (0: off), got {config.data.augment_k}")
  if config.train.batch_size < 1 or config.train.eval_batch_size < 1:
    raise ValueError("config.train.batch_size and eval_batch_size must be >= 1")
  if not 0 <= config.train.warmup_frac < 1:
    raise ValueError(f"config.train.warmup_frac must be in [0, 1), got {config.train.warmup_frac}")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  ep = config.get("episodes")
  if ep is not None:
    if ep.metric not in ("euclidean", "dot"):
      raise ValueError(f"config.episodes.metric must be euclidean or dot, got {ep.metric!r}")
    if ep.prototype not in ("support", "description", "mixed"):
      raise ValueError("config.episodes.prototype must be support, description or mixed, got "
                       f"{ep.prototype!r}")
    if not 0.0 <= ep.nota_rate < 1.0:
      raise ValueError(f"config.episodes.nota_rate must be in [0, 1), got {ep.nota_rate}")
  if config.train.length_multiple and config.data.max_seq_len % config.train.length_multiple:
    raise ValueError(f"config.data.max_seq_len ({config.data.max_seq_len}) must be a multiple of "
                     f"config.train.length_multiple ({config.train.length_multiple})")
