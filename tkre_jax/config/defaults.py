"""The defaults (`base_config()`, the one place they live), config files and `--config` arguments,
paths, and `from_saved` (the config of a `run.json`, older layouts converted). The package docstring
(`tkre_jax.config`) describes the whole."""

from __future__ import annotations

import copy
import os
import pathlib
from typing import Any, Mapping, Optional

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ("generate", "prepare", "mslm", "scl", "finetune", "eval", "bench", "predict", "export",
          "episodic", "episodes", "sacon", "learning_order")


def default_data_dir() -> pathlib.Path:
  """`$TKRE_DATA_DIR` if set, else `../shared/data` beside the checkout."""
  env = os.environ.get("TKRE_DATA_DIR")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


# The optimizer fields of every training section (`config.<section>.optim`), with their defaults.
# AdamW (optax names) with global-norm clipping; the learning rate rises linearly from 0 to
# `learning_rate` over the first `warmup_frac` of the steps, then decays linearly to 0.
OPTIM_DEFAULTS = {
    "learning_rate": None,  # peak learning rate: every section sets its own
    "warmup_frac": 0.1,     # share of the steps spent warming up
    "weight_decay": 0.01,   # decoupled weight decay (matrices only, see train/optim.decay_mask)
    "b1": 0.9,              # Adam beta1
    "b2": 0.999,            # Adam beta2
    "eps": 1e-6,            # Adam epsilon
    "grad_clip": 1.0,       # global-norm gradient clipping (0: off)
}
# The loop cadence of every training section (fields of the section itself).
LOOP_DEFAULTS = {
    "log_every_steps": 10,           # metrics.jsonl / TensorBoard window
    "checkpoint_every_seconds": 300,  # resume checkpoint at most this often (wall time; 0: off)
    "checkpoint_every_steps": 0,      # ... and/or every this many steps (0: off); always at the end
}
TRAINING_SECTIONS = ("train", "mslm", "scl", "episodic", "sacon")


def optim_config(learning_rate: float, **overrides) -> ml_collections.ConfigDict:
  """The optimizer sub-config of a training section: `OPTIM_DEFAULTS` with the peak
  `learning_rate` and `overrides` (read by `tkre_jax.train.optim.adamw`).

  Raises:
    KeyError: an override that is not an optimizer field.
  """
  unknown = sorted(set(overrides) - set(OPTIM_DEFAULTS))
  if unknown:
    raise KeyError(f"optim_config: unknown field(s) {unknown}; fields: {sorted(OPTIM_DEFAULTS)}")
  return ml_collections.ConfigDict({**OPTIM_DEFAULTS, **overrides,
                                    "learning_rate": float(learning_rate)})


def training_section(learning_rate: float, **optim_overrides) -> ml_collections.ConfigDict:
  """The fields every training section shares: `optim` (`optim_config`) and the loop cadence
  (`LOOP_DEFAULTS`); the section adds its own fields (steps or epochs, batch size, ...)."""
  section = ml_collections.ConfigDict(dict(LOOP_DEFAULTS))
  section.optim = optim_config(learning_rate, **optim_overrides)
  return section


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
  # Relation inverses (tkre_jax/data/inverses.py): auto (the built-in tables: SemEval's directed
  # labels, TACRED's and Wikidata's declared inverse / symmetric properties) | '' (none) | a JSON
  # file {relation: inverse | "symmetric"}. With inverses in the label set, prepare also writes
  # `dev_swap` / `test_swap` (subject and object traded, gold the inverse): eval's direction metric.
  c.data.inverse_map = "auto"
  # Inverse augmentation: each training row (gold and SCDG) whose relation has an inverse in the
  # label set gains a swapped copy (duplicates and dev/test pairs skipped; counted in meta.json)
  c.data.inverse_augment = False
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
  # Relation head of finetune / eval / predict: linear (the TKRE reference MLP on the entity start
  # markers) | predicate (the instance-adapted predicate head, arXiv 2503.17799: each relation's
  # template filled with the instance's entities, read by a predicate encoder, scored by cosine;
  # trained with the linear head: alpha * CE(linear) + (1 - alpha) * CE(predicate); predicts with
  # the predicate scores). Templates: tkre_jax/data/templates.py (schema name + description, or
  # the schema entry's third string, or template_file's {relation: template}).
  c.model.head = "linear"
  # source: BEFRE's head (one LayerNorm + dropout shared by the instance and predicate sides, the
  # linear classifier on that projection) | split: a LayerNorm per side, no dropout, the linear
  # head (the TKRE MLP) on the raw marker states (this project's earlier head); docs/fidelity.md
  c.model.predicate_head_form = "source"
  c.model.predicate_encoder = "separate"   # separate (own weights, same start) | shared
  c.model.predicate_alpha = 0.5
  c.model.predicate_temperature = 0.07     # t starts at log(1 / this)
  c.model.predicate_train_relations = 0    # templates per row in training (0: all R; else gold + n-1)
  # full: every filled template encoded whole (BEFRE's description encoder; the default) | cached:
  # the template's literal tokens encoded once per relation without seeing the entities, the
  # markers and entity tokens of each instance attending to them (4 + 2 * template_entity_len
  # tokens per instance and relation; cheaper, not BEFRE's: docs/fidelity.md)
  c.model.predicate_template_pass = "full"
  # cached pass only: the top layers in which the instance tokens attend to the template (0:
  # all). Below the depth, the lower layers read "@ subject @ # object #" once per row. 1 makes
  # FewRel test's predicate eval ~3x and a 16-template train step ~4x cheaper than 0 on this CPU
  # (docs/ablation.md); the full pass always fuses all layers
  c.model.predicate_fusion_layers = 1
  c.model.template_file = ""               # JSON {relation: template}, overrides the schema's
  c.model.template_max_len = 64            # tokens per filled template
  c.model.template_entity_len = 8          # tokens kept per entity in a template (cached: its slots)

  # ---------------------------------------------------------------- fine-tuning
  c.train = training_section(learning_rate=1e-4)
  c.train.epochs = 30
  c.train.batch_size = 16        # global batch, sequences
  c.train.eval_batch_size = 64
  c.train.eval_every_epochs = 3  # dev evaluation (model selection) period; the last epoch always
  c.train.select_metric = "micro_f1"
  c.train.length_multiple = 32   # sequence axis cut to a multiple of this per batch (0: never cut)
  c.train.final_eval_splits = "dev,test"  # splits the selected model is scored on at the end of finetune
  # Classifier output rows at the start: random | labels (the SaCon label encoder's embeddings of
  # each relation's "name [SEP] description", projected by the head's first layer; needs a sacon
  # workdir: label_encoder_from, else --init_from)
  c.train.head_init = "random"
  c.train.label_encoder_from = ""
  # FineCL learning-order weights (a `--stage=learning_order` workdir; '' off): `weight` multiplies
  # each training row's cross-entropy by its weight exp(f(k)) in [1, e] (0 for never-learned rows;
  # rows the table lacks: e), the loss a weighted mean | `drop_unlearned` drops the SCDG rows the
  # classifier never learned, the rest unweighted
  c.train.learning_order_from = ""
  c.train.learning_order_use = "weight"

  # ---------------------------------------------------------------- pre-training stage 1: MSLM
  # Masked Span Language Modeling on the `corpus` split (tkre_jax/tasks/mslm_scl.py).
  c.mslm = training_section(learning_rate=5e-5)
  c.mslm.split = "corpus"        # prepared split to pre-train on
  c.mslm.steps = 64              # optimizer steps: ~2 passes over the FewRel 8-shot corpus (505
                                 # sequences) at batch 16; ~2.4 s/step for MiniLM-L6 on 2 CPU cores
  c.mslm.batch_size = 16         # global batch, sequences
  c.mslm.max_predictions = 32    # static prediction slots per sequence (selected tokens beyond: unmasked)
  c.mslm.prob_relation = 0.8     # masking probability inside the relation span (TKRE)
  c.mslm.prob_entity = 0.5       # ... on subject / object entity tokens
  c.mslm.prob_context = 0.2      # ... on other tokens (special tokens and markers: never)
  c.mslm.length_multiple = 64    # batches grouped by length bucket, sequence axis cut to a multiple
                                 # of this (0: random batches at max_seq_len); 64: 2 compiled shapes
  # MLM-head warm-up: when the starting weights have no MLM head (all-MiniLM-L6-v2 ships none),
  # the head first trains alone (encoder frozen: every encoder parameter unchanged) on this split
  # for head_warmup_steps steps (its own workdir <mslm workdir>/head_warmup); 0: off. A missing
  # split skips it with a warning (recorded in the summary). Its optimizer is config.mslm.optim with
  # the peak learning rate head_warmup_learning_rate (and its batch head_warmup_batch_size).
  c.mslm.head_warmup_steps = 100
  c.mslm.head_warmup_split = "unlabelled"
  c.mslm.head_warmup_learning_rate = 1e-3
  c.mslm.head_warmup_batch_size = 32
  c.mslm.eval_split = ""          # split whose masked-token accuracy is measured before/after ('')

  # ---------------------------------------------------------------- pre-training stage 2: SCL
  # Span-level Contrastive Learning with MSLM kept on: lambda_mslm * L_mslm + lambda_scl * L_scl.
  # Masking (max_predictions, prob_*) is read from config.mslm.
  c.scl = training_section(learning_rate=5e-5)
  c.scl.split = "corpus"
  c.scl.steps = 48               # ~1.5 passes; ~3.7 s/step (MiniLM-L6, 2 CPU cores)
  c.scl.batch_size = 16
  c.scl.lambda_mslm = 1.0        # lambda1 (TKRE reference: 1)
  c.scl.lambda_scl = 1.0         # lambda2 (TKRE reference: 1)
  # The contrastive term (docs/fidelity.md): reference: the authors' per-row 2-way cross-entropy,
  # anchor vs its own relation span and its own negative span (UESTC-GQJ/TKRE cl_model.py) |
  # infonce: this project's bidirectional InfoNCE (in-batch spans of other relations as negatives,
  # and each span against all R anchors; with anchor_init=text it was the TKRE default before)
  c.scl.objective = "reference"
  c.scl.tau = 0.1                # temperature (TKRE reference: 0.1)
  c.scl.proj_dim = 0             # span projection output size; 0: the encoder hidden size (reference)
  c.scl.neg_min_len = 1          # negative context span length range, tokens (reference: 1-3)
  c.scl.neg_max_len = 3
  c.scl.anchor_init = "random"   # random: a learned embedding, normal(0, 0.02) (reference) | text:
                                 # the encoder's embedding of "name: description" (schema)
  c.scl.span_input = "masked"    # spans pooled from the masked pass (reference) | clean (2nd pass)
  # True: no contrastive term for the no-relation class (TACRED, SemEval's Other); MSLM kept.
  # False (reference): no-relation rows contrast their span with an anchor of their own
  c.scl.skip_no_relation = False
  c.scl.length_multiple = 64
  # FineCL learning-order weights in the contrastive term (a `--stage=learning_order` workdir; ''
  # off): a row's term times its weight, and its exp-term as another relation's negative too
  c.scl.learning_order_from = ""

  # ---------------------------------------------------------------- FineCL learning order
  # `--stage=learning_order`: fine-tuning's classifier and optimizer (config.train) trained for
  # `epochs` epochs on the prepared `split`; each row's first epoch k predicted right gives its
  # weight exp(f(k)) (FineCL, arXiv 2205.12491; tkre_jax/data/row_weights.py, docs/fidelity.md)
  c.learning_order = ml_collections.ConfigDict()
  c.learning_order.split = "train"
  c.learning_order.epochs = 15         # FineCL's stage 1 runs 15 (this project used 10 before)
  c.learning_order.cap_epoch = 5       # FineCL's K
  # source: FineCL's Scheduler (min / max over the uncapped epochs, epochs >= cap -> f = 0) |
  # capped: min(k, cap) first, then normalised over the capped range (the earlier default)
  c.learning_order.schedule = "source"
  # batch: a row counts as right when the training batch's forward pass predicts it (FineCL's
  # default, batch-based order) | full_pass: every row scored without dropout after each epoch
  c.learning_order.signal = "batch"

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
  # Where description (zero-shot / mixed) representations come from: marker (the pseudo-sentence
  # "subject <name> object : <description>" through the evaluated encoder) | label_encoder (the
  # SaCon label encoder of label_encoder_from, else --init_from: a sacon workdir; instance
  # representations are then L2-normalised, the geometry SaCon trained)
  c.episodes.descriptions = "marker"
  c.episodes.label_encoder_from = ""
  c.episodes.batch_size = 64      # rows per embedding call
  c.episodes.length_multiple = 32

  # Episodic (prototypical) training on episodes of episodes.train_file (one episode a step).
  c.episodic = training_section(learning_rate=5e-5)
  c.episodic.n_way = 5
  c.episodic.k_shot = 5
  c.episodic.q_query = 5
  c.episodic.steps = 300         # 3-7 s/step for MiniLM-L6 on 2 contended CPU cores (50 rows a step)
  c.episodic.length_multiple = 32

  # ---------------------------------------------------------------- relation-aware pre-training
  # SaCon (Symmetric anchored Contrastive pre-training, arXiv 2312.12021; tkre_jax/tasks/label_contrastive.py)
  # on labelled sentences of relations DISJOINT from the evaluated ones (FewRel 1.0's 64 training
  # relations): a sentence encoder and a label encoder ("[CLS] name [SEP] description" from
  # schema_file), entity blanking, the symmetric anchored loss and MLM on both encoders.
  c.sacon = training_section(learning_rate=3e-5)
  c.sacon.train_file = "fewrel_train_partial/train_wiki_partial.json"  # FewRel format
  c.sacon.schema_file = "fewrel/pid2name.json"  # relation -> [name, description] (all 100 FewRel)
  c.sacon.steps = 1000           # optimizer steps: 32,000 sentence views (1.6 passes), ~2.1 s/step here
  c.sacon.relations_per_batch = 16   # U distinct labels a batch (the negatives of each sentence)
  c.sacon.sentences_per_relation = 2  # positives of each label in the label-anchored loss
  # Each entity mention -> the tokenizer's [UNK] with this probability, decided once (seeded).
  # SaCon's 0.7 (the default: the method as its authors run it). 0.0 was better on dev here
  # (FewRel K = 8, 3 seeds: 82.45 against 81.74; test 81.14 against 80.35; docs/ablation.md,
  # "SaCon's options"): the named option of README's best recipe.
  c.sacon.blank_prob = 0.7
  c.sacon.label_encoder = "separate"  # separate: own weights (SaCon) | shared: the sentence encoder
  c.sacon.temperature = 0.07     # exp(t) scales the cosine logits; t learnable, init log(1/0.07)
  c.sacon.lambda_mlm = 1.0       # L = lambda_mlm * (MLM(E_s) + MLM(E_l)) + (L_sent + L_label) / 2
  c.sacon.mlm_prob = 0.15        # BERT masking (80% [MASK] / 10% random / 10% kept); markers never
  c.sacon.max_predictions = 20   # static prediction slots per sentence
  c.sacon.label_max_len = 64     # label text tokens, [CLS] and [SEP]s included
  c.sacon.label_max_predictions = 12
  c.sacon.length_multiple = 32
  # MLM-head warm-up when the starting weights have no MLM head (all-MiniLM-L6-v2): the heads train
  # alone (encoders frozen) for head_warmup_steps at head_warmup_learning_rate, in
  # <workdir>/head_warmup; 0: off (random heads).
  c.sacon.head_warmup_steps = 100
  c.sacon.head_warmup_learning_rate = 1e-3

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
  c.bench.stage = "mslm,scl,finetune,eval"  # comma-separated: mslm | scl | finetune | eval |
                                            # finetune_predicate | eval_predicate
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

  # Locked: a misspelt or renamed field (e.g. the pre-`optim` `config.train.learning_rate`) is an
  # error where it is set instead of a new field nothing reads. Values stay assignable.
  c.lock()
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


# ---------------------------------------------------------------------------------------------------
# Saved configs (run.json)
# ---------------------------------------------------------------------------------------------------

# The flat optimizer fields of a training section before `optim` (run.json files written before
# the one optimizer shape) -> their `optim` field.
_OLD_OPTIM_FIELDS = {"learning_rate": "learning_rate", "warmup_frac": "warmup_frac",
                     "weight_decay": "weight_decay", "adam_b1": "b1", "adam_b2": "b2",
                     "adam_eps": "eps", "grad_clip": "grad_clip"}


def renamed_path(path: str) -> Optional[str]:
  """The current path of a config path that moved into `optim` (`"train.adam_eps"` ->
  `"train.optim.eps"`), or None when `path` did not move."""
  section, _, field = path.partition(".")
  if section in TRAINING_SECTIONS and field in _OLD_OPTIM_FIELDS:
    return f"{section}.optim.{_OLD_OPTIM_FIELDS[field]}"
  return None


def from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a stage recorded in its `run.json` (`"config"`), as a ConfigDict.

  Configs written before the `optim` sub-config (flat `learning_rate`, `adam_b1`, ... in each
  training section) are converted to today's layout, values unchanged.

  Raises:
    ValueError: `saved` is not a config dict, or a training section mixes both layouts.
  """
  if not isinstance(saved, Mapping) or not isinstance(saved.get("train"), Mapping):
    raise ValueError("run.json: 'config' is not a tkre_jax config (no 'train' section)")
  out = copy.deepcopy(dict(saved))
  for name in TRAINING_SECTIONS:
    # Sections added after a run was written are absent from its run.json: nothing to convert.
    sec = out.get(name)
    if not isinstance(sec, Mapping):
      continue
    old = [f for f in _OLD_OPTIM_FIELDS if f in sec]
    if old and "optim" in sec:
      raise ValueError(f"run.json: config.{name} has both 'optim' and the old flat optimizer "
                       f"fields {old}")
    if old:
      sec = dict(sec)
      sec["optim"] = {_OLD_OPTIM_FIELDS[f]: sec.pop(f) for f in old}
      out[name] = sec
  return ml_collections.ConfigDict(out)


# ---------------------------------------------------------------------------------------------------
