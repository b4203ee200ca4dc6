"""The prepare stage on a tiny FewRel folder: what it writes (a TFDS dataset + meta.json), that it
re-prepares its own output, and that it refuses, before creating anything, a folder holding
someone else's files or inputs that are missing."""

import json

import numpy as np
import pytest

from tests.helpers import make_tiny_fewrel, minilm_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import dataset


@pytest.fixture(scope="module")
def tiny_config(shared_data, tmp_path_factory):
  minilm_dir()  # the tokenizer; skips when absent
  root = tmp_path_factory.mktemp("prep_data")
  c = config_lib.base_config()
  c.data.data_dir = str(make_tiny_fewrel(shared_data, root / "data", relations=3, per_relation=8,
                                         train=2, dev=3))
  c.data.k = 2
  c.data.max_seq_len = 64
  return c


def test_prepare_writes_a_tfds_dataset_and_reprepares(tiny_config, tmp_path):
  import tensorflow_datasets as tfds
  out = tmp_path / "prepared"
  first = stages.run("prepare", tiny_config, out)
  assert first["splits"] == {"train": 6, "dev": 9, "test": 9}
  b = tfds.builder_from_directory(str(out))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 6, "dev": 9, "test": 9}
  rows = list(b.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())
  arrays = dataset.load_arrays(out, "train")
  assert [r["source"].decode() for r in rows] == list(arrays["source"])
  np.testing.assert_array_equal(np.stack([r["input_ids"] for r in rows]), arrays["input_ids"])
  assert arrays["input_ids"].shape == (6, 64)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["format"] == dataset.FORMAT and len(meta["label_map"]) == 3
  assert set(meta["splits"]) == {"train", "dev", "test"}
  assert all(set(s) == {"stats", "num_relations", "by_kind"} for s in meta["splits"].values())
  assert meta["splits"]["train"]["by_kind"] == {"gold": 6}
  assert (out / "summary.json").is_file()
  # Prepare again into its own output (summary.json included): replaced, nothing else left.
  tiny_config.data.max_seq_len = 32
  try:
    again = stages.run("prepare", tiny_config, out)
  finally:
    tiny_config.data.max_seq_len = 64
  assert again["splits"] == first["splits"]
  assert dataset.load_arrays(out, "dev")["input_ids"].shape == (9, 32)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_prepare_refuses_a_folder_with_a_foreign_file(tiny_config, tmp_path):
  out = tmp_path / "work"
  out.mkdir()
  (out / "results.csv").write_text("keep me")
  with pytest.raises(dataset.ForeignFilesError, match="results.csv"):
    stages.run("prepare", tiny_config, out)
  assert [p.name for p in out.iterdir()] == ["results.csv"]
  assert (out / "results.csv").read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_missing_inputs_create_nothing(tiny_config, tmp_path):
  c = tiny_config.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path / "no_data")
  with pytest.raises(FileNotFoundError, match="FewRel file not found"):
    stages.run("prepare", c, tmp_path / "runs" / "prepared")
  assert list(tmp_path.iterdir()) == []
