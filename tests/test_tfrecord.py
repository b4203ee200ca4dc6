"""TFRecord round trip, atomic writes, the batch iterators."""

import json

import numpy as np
import pytest

from tkre_jax.data import tfrecord


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


def test_round_trip_multi_shard(tmp_path):
  feats = fake_features(23)
  rels = [f"R{i % 7}" for i in range(23)]
  srcs = [f"f.json:{i}" for i in range(23)]
  out = tmp_path / "prep"
  with tfrecord.PreparedWriter(out) as w:
    w.add_split("train", feats, rels, srcs, num_shards=3)
    w.meta.update(max_seq_len=16, label_map={f"R{i}": i for i in range(7)})
  meta = tfrecord.read_meta(out)
  assert meta["splits"]["train"]["num_examples"] == 23
  assert len(meta["splits"]["train"]["files"]) == 3
  back = tfrecord.load_arrays(out, "train")
  for k, v in feats.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert list(back["relation"]) == rels and list(back["source"]) == srcs
  # Streaming pipeline: fixed batch shape, all rows seen once per pass.
  it = tfrecord.stream_batches(tfrecord.split_files(out, "train"), 16, 5, seed=1, repeat=False)
  batches = list(it)
  assert len(batches) == 4 and all(b["input_ids"].shape == (5, 16) for b in batches)
  seen = np.concatenate([b["label"] for b in batches])
  assert len(seen) == 20


def test_failed_write_leaves_nothing(tmp_path):
  out = tmp_path / "prep"
  with pytest.raises(RuntimeError):
    with tfrecord.PreparedWriter(out) as w:
      w.add_split("train", fake_features(5), ["R"] * 5, ["s"] * 5)
      raise RuntimeError("boom")
  assert not out.exists()
  assert list(tmp_path.iterdir()) == []


def test_overwrite_and_exists(tmp_path):
  out = tmp_path / "prep"
  for n in (3, 4):
    with tfrecord.PreparedWriter(out, overwrite=True) as w:
      w.add_split("dev", fake_features(n), ["R"] * n, ["s"] * n)
      w.meta["max_seq_len"] = 16
  assert tfrecord.read_meta(out)["splits"]["dev"]["num_examples"] == 4
  with pytest.raises(FileExistsError):
    with tfrecord.PreparedWriter(out, overwrite=False):
      pass
  with pytest.raises(FileNotFoundError, match="run `--stage=prepare` first"):
    tfrecord.read_meta(tmp_path / "nothing")


def test_iterate_batches_padding_and_buckets():
  feats = fake_features(10, L=64)
  feats["attention_mask"][:, 40:] = 0
  batches = list(tfrecord.iterate_batches(feats, 4, length_multiple=16, sort_by_length=True))
  assert len(batches) == 3
  assert [b["weight"].sum() for b in batches] == [4, 4, 2]
  last = batches[-1]
  assert list(last["index"][2:]) == [-1, -1] and last["attention_mask"][2:, 0].tolist() == [1, 1]
  assert all(b["input_ids"].shape[1] in (16, 32, 48) for b in batches)
  idx = np.concatenate([b["index"] for b in batches])
  assert sorted(idx[idx >= 0].tolist()) == list(range(10))
  # Shuffling is a seeded permutation.
  a = np.concatenate([b["index"] for b in tfrecord.iterate_batches(feats, 4, shuffle=True, seed=3)])
  b = np.concatenate([b["index"] for b in tfrecord.iterate_batches(feats, 4, shuffle=True, seed=3)])
  c = np.concatenate([b["index"] for b in tfrecord.iterate_batches(feats, 4, shuffle=True, seed=4)])
  assert (a == b).all() and not (a == c).all()
