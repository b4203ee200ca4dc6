r"""SemEval-2010 Task 8 in the low-resource protocol of the TKRE paper: `semeval/k-shot/{K}-{seed}/`
train and dev sets (K instances per label each), model selection and metrics on the k-shot
`dev.json` (the official test set is not distributed with this data: report k-shot dev).

  python -m tkre_jax.main --stage=prepare --workdir=runs/semeval-8-42/prepared \
      --config=configs/semeval.py:k=8,split_seed=42 --config.data.corpus=require

19 labels: 9 relation types in two directions, `Cause-Effect(e1,e2)` and `Cause-Effect(e2,e1)`
being two classes, and `Other`, the no-relation class: micro-F1 leaves it out (found by name, see
`tkre_jax.text.find_no_relation`), accuracy and macro-F1 count it. The subject is always e1 (the
entity mentioned first). SemEval has no entity types: the markers are untyped (`@ ... @`,
`# ... #`), also for the SCDG rows, whose LLM types are coarse (OBJECT, EVENT, ...).

LLM knowledge: `semeval_llm/{edkg,scdg}_semeval_8-{seed}*.jsonl`, written from the split's K = 8
training rows only. A seed's K = 16 and K = 32 training sets contain its K = 8 set, so the files of
`split_seed` serve every K; `llm_seed` picks another seed's files, and splits without files
(21, 100) get none: run `generate` on them, or pass the files. The leakage rules are FewRel's: LLM
text sharing an 8-gram with dev is dropped (`config.data.corpus_leak_ngram`, and the SCDG rows of
`augment_k`). The MLM-head warm-up reads the `corpus` split (no unlabelled SemEval text here).

Arguments: `k` (8, 16, 32), `split_seed` (13, 21, 42, 87, 100), `llm_seed` (default: split_seed).
"""

from tkre_jax.config import base_config, parse_config_arg

LLM_SEEDS = ("13", "42", "87")  # the splits semeval_llm/ holds files for


def get_config(arg: str = ""):
  opts = parse_config_arg(arg, {"k": "8", "split_seed": "42", "llm_seed": ""},
                          "configs/semeval.py")
  config = base_config()
  shot = f"semeval/k-shot/{opts['k']}-{opts['split_seed']}"
  config.data.dataset = "tacred"
  config.data.k = int(opts["k"])
  config.data.train_file = f"{shot}/train.json"
  config.data.dev_file = f"{shot}/dev.json"
  config.data.test_file = ""
  config.data.schema_file = ""
  config.data.typed_markers = False
  llm = opts["llm_seed"] or opts["split_seed"]
  has_llm = llm in LLM_SEEDS
  config.data.edkg_file = f"semeval_llm/edkg_semeval_8-{llm}.jsonl" if has_llm else ""
  config.data.scdg_file = f"semeval_llm/scdg_semeval_8-{llm}_18x16.jsonl" if has_llm else ""
  config.data.unlabelled_file = ""
  config.mslm.head_warmup_split = "corpus"
  return config
