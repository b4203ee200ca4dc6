r"""TKRE pre-training on the 64 FewRel 1.0 training relations, for the episodic protocol
(docs/episodes.md): learn on the training relations, evaluate N-way K-shot episodes of the 16
disjoint val_wiki relations.

The pre-training text is the gold rows of the training relations (no LLM files: the episodic
protocol has no seed examples of the evaluation relations to explain): the first 32 instances of
each relation (`train`, 2,048 rows), 16 more per relation as `dev`, by position
(`configs/fewrel_train64_split.json`). MSLM and SCL read the `train` split; the MLM-head warm-up
reads it too. Any FewRel-format file with at least 48 instances per relation runs with
`--config.data.fewrel_file=FILE` (`pid2name.json` optional: `--config.data.schema_file=''`).

  C=configs/fewrel_train64.py; W=runs/episodes/tkre
  python -m tkre_jax.main --stage=prepare --workdir=$W/prepared --config=$C
  python -m tkre_jax.main --stage=mslm --workdir=$W/mslm --config=$C --config.data.prepared_dir=$W/prepared
  python -m tkre_jax.main --stage=scl --workdir=$W/scl --init_from=$W/mslm --config=$C \
      --config.data.prepared_dir=$W/prepared
  python -m tkre_jax.main --stage=episodic --workdir=$W/episodic --init_from=$W/scl --config=$C
  python -m tkre_jax.main --stage=episodes --workdir=$W/eval --init_from=$W/episodic --config=$C
"""

from tkre_jax.config import REPO_ROOT, base_config


def get_config():
  config = base_config()
  config.data.dataset = "fewrel"
  config.data.fewrel_file = "fewrel_train_partial/train_wiki_partial.json"
  config.data.split_file = str(REPO_ROOT / "configs" / "fewrel_train64_split.json")
  config.data.k = 32
  config.data.edkg_file = ""
  config.data.scdg_file = ""
  config.data.corpus = "off"
  config.data.unlabelled_file = ""
  config.mslm.split = "train"
  config.mslm.head_warmup_split = "train"
  config.scl.split = "train"
  return config
