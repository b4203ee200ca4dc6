r"""Re-TACRED (Stoica et al., 2021: re-annotated TACRED, 40 relations): configs/tacred.py with the
data folder `retacred/` (TACRED from the LDC, LDC2018T24, with the Re-TACRED patch):

    retacred/k-shot/{K}-{seed}/train.json, retacred/k-shot/{K}-{seed}/dev.json, retacred/test.json

  python -m tkre_jax.main --stage=prepare --workdir=runs/retacred-8-42/prepared \
      --config=configs/retacred.py:k=8,split_seed=42 --config.data.augment_k=8 \
      --config.data.scdg_file=$PWD/runs/retacred-8-42/generate/scdg.jsonl \
      --config.data.edkg_file=$PWD/runs/retacred-8-42/generate/edkg.jsonl

Arguments and everything else as in configs/tacred.py.
"""

from tkre_jax.config import load_config_file


def get_config(arg: str = ""):
  return load_config_file("tacred").get_config(arg, root="retacred")
