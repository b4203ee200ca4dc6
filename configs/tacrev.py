r"""TACREV (Alt et al., 2020: TACRED with revised dev and test labels): configs/tacred.py with the
data folder `tacrev/` (TACRED from the LDC, LDC2018T24, with the TACREV patch):

    tacrev/k-shot/{K}-{seed}/train.json, tacrev/k-shot/{K}-{seed}/dev.json, tacrev/test.json

  python -m tkre_jax.main --stage=prepare --workdir=runs/tacrev-8-42/prepared \
      --config=configs/tacrev.py:k=8,split_seed=42 --config.data.augment_k=8 \
      --config.data.scdg_file=$PWD/runs/tacrev-8-42/generate/scdg.jsonl \
      --config.data.edkg_file=$PWD/runs/tacrev-8-42/generate/edkg.jsonl

Arguments and everything else as in configs/tacred.py.
"""

from tkre_jax.config import load_config_file


def get_config(arg: str = ""):
  return load_config_file("tacred").get_config(arg, root="tacrev")
