r"""TACRED (Zhang et al., 2017) in the GenPT / KnowPrompt low-resource layout, for users who hold the licensed data
(LDC2018T24). Under `config.data.data_dir` (default ../shared/data):

    tacred/k-shot/{K}-{seed}/train.json   K instances per relation, `no_relation` included
    tacred/k-shot/{K}-{seed}/dev.json     the k-shot dev set: model selection
    tacred/test.json                        the full test set: the reported numbers

TACRED-format JSON lists (`token`, `subj_start`, `subj_end`, `obj_start`, `obj_end`, inclusive,
`subj_type`, `obj_type`, `relation`); typed entity markers (`@ * person * ... @`); micro-F1 leaves
`no_relation` out. No relation schema: anchors and LLM prompts use the label words. LLM knowledge:
run `generate` on the prepared inputs and pass its files, e.g.

  python -m tkre_jax.main --stage=generate --workdir=runs/tacred-8-42/generate \
      --config=configs/tacred.py:k=8,split_seed=42
  python -m tkre_jax.main --stage=prepare --workdir=runs/tacred-8-42/prepared \
      --config=configs/tacred.py:k=8,split_seed=42 --config.data.augment_k=8 \
      --config.data.edkg_file=$PWD/runs/tacred-8-42/generate/edkg.jsonl \
      --config.data.scdg_file=$PWD/runs/tacred-8-42/generate/scdg.jsonl

Arguments: `k`, `split_seed` (the k-shot sampling seed of the folder name), `root` (the folder
under data_dir, default `tacred`). The MLM-head warm-up reads the `corpus` split (no unlabelled
text in this layout).
"""

from tkre_jax.config import base_config, parse_config_arg


def get_config(arg: str = "", root: str = "tacred"):
  """The config; `root` is the default data folder (configs/tacrev.py and retacred.py pass theirs)."""
  opts = parse_config_arg(arg, {"k": "8", "split_seed": "42", "root": root}, f"configs/{root}.py")
  config = base_config()
  shot = f"{opts['root']}/k-shot/{opts['k']}-{opts['split_seed']}"
  config.data.dataset = "tacred"
  config.data.k = int(opts["k"])
  config.data.train_file = f"{shot}/train.json"
  config.data.dev_file = f"{shot}/dev.json"
  config.data.test_file = f"{opts['root']}/test.json"
  config.data.schema_file = ""
  config.data.typed_markers = True
  config.data.edkg_file = ""   # the generate stage's edkg.jsonl / scdg.jsonl (see above)
  config.data.scdg_file = ""
  config.data.unlabelled_file = ""
  config.mslm.head_warmup_split = "corpus"
  return config
