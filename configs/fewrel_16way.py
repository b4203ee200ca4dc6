r"""FewRel 1.0 val_wiki, 16-way K-shot on the canonical split, all-MiniLM-L6-v2.

  python -m tkre_jax.main --stage=prepare --workdir=runs/fewrel/prepared \
      --config=configs/fewrel_16way.py --config.data.k=8

`get_config("k=16")` or `--config=configs/fewrel_16way.py:k=16` picks another K.
"""

from tkre_jax.config import base_config, parse_config_arg


def get_config(arg: str = ""):
  opts = parse_config_arg(arg, {"k": "8"}, "configs/fewrel_16way.py")
  config = base_config()
  config.data.dataset = "fewrel"
  config.data.k = int(opts["k"])
  return config
