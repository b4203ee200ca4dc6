r"""Wiki80 low-resource protocol: `k-shot/{K}-{seed}/train.json`, model selection and metrics on the
k-shot `dev.json` (the Wiki80 test set is not distributed with this data).

  python -m tkre_jax.main --stage=prepare --workdir=runs/wiki80-8-42/prepared \
      --config=configs/wiki80.py:k=8,split_seed=42

The MLM-head warm-up reads the `corpus` split: FewRel 1.0's train relations, the default warm-up
text, are Wiki80 relations (Wiki80 is built from FewRel), so their sentences are Wiki80 data.
"""

from tkre_jax.config import base_config, parse_config_arg


def get_config(arg: str = ""):
  opts = parse_config_arg(arg, {"k": "8", "split_seed": "42"}, "configs/wiki80.py")
  config = base_config()
  config.data.dataset = "tacred"
  config.data.k = int(opts["k"])
  config.data.train_file = f"wiki80/k-shot/{opts['k']}-{opts['split_seed']}/train.json"
  config.data.dev_file = f"wiki80/k-shot/{opts['k']}-{opts['split_seed']}/dev.json"
  config.data.test_file = ""
  config.data.schema_file = ""
  config.data.edkg_file = "wiki80_llm/edkg_wiki80_8-42_80x8.jsonl"
  config.data.scdg_file = "wiki80_llm/scdg_wiki80_8-42_80x16.jsonl"
  config.data.unlabelled_file = ""
  config.mslm.head_warmup_split = "corpus"
  return config
