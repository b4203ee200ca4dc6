"""The prepared directory (TFDS round trip, atomic writes, refusing foreign folders) and the
in-memory batch iterator."""

import json

import numpy as np
import pytest

from tkre_jax.data import dataset, pipeline


def fake_features(n, L=16, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, L + 1, n)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  return {
      "input_ids": (rng.integers(1, 1000, (n, L)) * mask).astype(np.int32),
      "attention_mask": mask,
      "span_ids": (rng.integers(0, 5, (n, L)) * mask).astype(np.int32),
      "subj_pos": rng.integers(0, 4, n).astype(np.int32),
      "obj_pos": rng.integers(0, 4, n).astype(np.int32),
      "label": rng.integers(0, 7, n).astype(np.int32),
  }


def _write(out, n, split="train", num_shards=1, **kw):
  with dataset.PreparedWriter(out, **kw) as w:
    w.add_split(split, fake_features(n), [f"R{i % 7}" for i in range(n)],
                [f"f.json:{i}" for i in range(n)], num_shards=num_shards, stats={"rows": n})
    w.meta.update(max_seq_len=16, label_map={f"R{i}": i for i in range(7)})


def test_round_trip_multi_shard(tmp_path):
  out = tmp_path / "prep"
  _write(out, 23, num_shards=3)
  meta = dataset.read_meta(out)
  assert meta["format"] == dataset.FORMAT and meta["splits"] == {"train": {"stats": {"rows": 23}}}
  assert dataset.split_sizes(out) == {"train": 23}
  assert sorted(p.name for p in out.glob("tkre_prepared-train.tfrecord-*")) == [
      f"tkre_prepared-train.tfrecord-0000{i}-of-00003" for i in range(3)]
  back = dataset.load_arrays(out, "train")
  feats = fake_features(23)
  for k, v in feats.items():
    assert back[k].dtype == np.int32
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert list(back["relation"]) == [f"R{i % 7}" for i in range(23)]
  assert list(back["source"]) == [f"f.json:{i}" for i in range(23)]
  np.testing.assert_array_equal(dataset.read_lengths(out, "train"), feats["attention_mask"].sum(1))
  with pytest.raises(KeyError, match="no split 'dev'; available: \\['train'\\]"):
    dataset.load_arrays(out, "dev")


def test_shards_are_capped_and_contiguous(tmp_path, monkeypatch):
  monkeypatch.setattr(dataset, "ROWS_PER_SHARD", 4)
  out = tmp_path / "prep"
  _write(out, 10, num_shards=1)
  import tensorflow_datasets as tfds
  info = tfds.builder_from_directory(str(out)).info.splits["train"]
  assert info.shard_lengths == [3, 4, 3]  # ceil(10 / 4) = 3 shards, written in order
  np.testing.assert_array_equal(dataset.load_arrays(out, "train")["label"], fake_features(10)["label"])


def test_bad_split_arrays_are_refused(tmp_path):
  feats = fake_features(5)
  feats["label"] = feats["label"][:4]
  with pytest.raises(ValueError, match="split train: label has shape \\(4,\\), expected \\(5,\\)"):
    with dataset.PreparedWriter(tmp_path / "prep") as w:
      w.add_split("train", feats, ["R"] * 5, ["s"] * 5)
  assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
  out = tmp_path / "prep"
  with pytest.raises(RuntimeError):
    with dataset.PreparedWriter(out) as w:
      w.add_split("train", fake_features(5), ["R"] * 5, ["s"] * 5)
      raise RuntimeError("boom")
  assert not out.exists()
  assert list(tmp_path.iterdir()) == []


def test_overwrite_and_exists(tmp_path):
  out = tmp_path / "prep"
  for n in (3, 4):
    _write(out, n, split="dev", overwrite=True)
  (out / "summary.json").write_text("{}")  # the stage's summary is ours too
  _write(out, 6, split="dev", overwrite=True)
  assert dataset.split_sizes(out) == {"dev": 6} and not (out / "summary.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]  # no temp or old sibling left
  with pytest.raises(FileExistsError, match="prepared directory already"):
    with dataset.PreparedWriter(out, overwrite=False):
      pass
  with pytest.raises(FileNotFoundError, match="run `--stage=prepare` first"):
    dataset.read_meta(tmp_path / "nothing")


def test_empty_folder_is_used(tmp_path):
  out = tmp_path / "prep"
  out.mkdir()
  _write(out, 3)
  assert dataset.split_sizes(out) == {"train": 3}


@pytest.mark.parametrize("with_meta", [False, True])
def test_foreign_files_are_refused_and_kept(tmp_path, with_meta):
  out = tmp_path / "prep"
  if with_meta:  # a prepared directory in which the user kept a file of their own
    _write(out, 3)
  else:
    out.mkdir()
  (out / "notes.txt").write_text("mine")
  before = sorted(p.name for p in out.iterdir())
  what = "holds files prepare did not write" if with_meta else "is not a prepared directory"
  with pytest.raises(dataset.ForeignFilesError, match=f"{what} \\(notes.txt\\)"):
    _write(out, 5, overwrite=True)
  assert (out / "notes.txt").read_text() == "mine"
  assert sorted(p.name for p in out.iterdir()) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]
  (tmp_path / "afile").write_text("x")
  with pytest.raises(dataset.ForeignFilesError, match="is a file, not a folder"):
    _write(tmp_path / "afile", 2, overwrite=True)
  assert (tmp_path / "afile").read_text() == "x"


def test_older_format_is_replaced_but_not_read(tmp_path):
  out = tmp_path / "prep"
  out.mkdir()
  (out / "train-00000-of-00001.tfrecord").write_bytes(b"")
  (out / "meta.json").write_text(json.dumps(
      {"splits": {"train": {"files": ["train-00000-of-00001.tfrecord"], "num_examples": 0}}}))
  with pytest.raises(ValueError, match="written by an older prepare"):
    dataset.read_meta(out)
  _write(out, 4, overwrite=True)
  assert not (out / "train-00000-of-00001.tfrecord").exists()
  assert dataset.split_sizes(out) == {"train": 4}


def test_iterate_batches_padding_and_buckets():
  feats = fake_features(10, L=64)
  feats["attention_mask"][:, 40:] = 0
  batches = list(pipeline.iterate_batches(feats, 4, length_multiple=16, sort_by_length=True))
  assert len(batches) == 3
  assert [b["weight"].sum() for b in batches] == [4, 4, 2]
  last = batches[-1]
  assert list(last["index"][2:]) == [-1, -1] and last["attention_mask"][2:, 0].tolist() == [1, 1]
  assert all(b["input_ids"].shape[1] in (16, 32, 48) for b in batches)
  idx = np.concatenate([b["index"] for b in batches])
  assert sorted(idx[idx >= 0].tolist()) == list(range(10))
  # Shuffling is a seeded permutation.
  a = np.concatenate([b["index"] for b in pipeline.iterate_batches(feats, 4, shuffle=True, seed=3)])
  b = np.concatenate([b["index"] for b in pipeline.iterate_batches(feats, 4, shuffle=True, seed=3)])
  c = np.concatenate([b["index"] for b in pipeline.iterate_batches(feats, 4, shuffle=True, seed=4)])
  assert (a == b).all() and not (a == c).all()
