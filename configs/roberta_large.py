r"""The paper's encoder, RoBERTa-large, for accelerators: the fine-tuning recipe of the TKRE
reference's `run_roberta.sh` (learning rate 3e-5, batch 4, 10 epochs) on top of a data-set config.

  python -m tkre_jax.main --stage=finetune --mesh=gpu --workdir=runs/tacred-rl/finetune \
      --config=configs/roberta_large.py:base=tacred,k=8,split_seed=42,hf_dir=~/models/roberta-large \
      --config.data.prepared_dir=runs/tacred-rl/prepared

`hf_dir` is a local RoBERTa-large checkpoint folder (`config.json`, `model.safetensors`, tokenizer
files, e.g. `roberta-large` from the Hugging Face hub); prepare the data with the same config so
the tokenizer matches. `base` is a config file of this folder (fewrel_16way, wiki80, tacred,
tacrev, retacred) and the other arguments are passed on to it. RoBERTa-large ships an MLM head
(`lm_head.*`), so MSLM needs no head warm-up. 24 layers of hidden size 1024 need an accelerator;
on a CPU use all-MiniLM-L6-v2 (the default).
"""

from tkre_jax.config import load_config_file

BASES = ("fewrel_16way", "wiki80", "tacred", "tacrev", "retacred")


def get_config(arg: str = ""):
  parts = [p for p in (arg or "").split(",") if p]
  own = {"base": "fewrel_16way", "hf_dir": "~/models/roberta-large"}
  rest = []
  for part in parts:
    key, _, value = part.partition("=")
    if key in own:
      own[key] = value
    else:
      rest.append(part)
  if own["base"] not in BASES:
    raise ValueError(f"configs/roberta_large.py: base must be one of {BASES}, got {own['base']!r}")
  config = load_config_file(own["base"]).get_config(",".join(rest))
  config.model.hf_dir = own["hf_dir"]
  config.train.optim.learning_rate = 3e-5   # run_roberta.sh
  config.train.batch_size = 4
  config.train.epochs = 10
  config.train.eval_every_epochs = 1
  config.train.eval_batch_size = 32
  return config
