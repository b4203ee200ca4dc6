"""benchmarks/torch_reference.py without torch: the same shapes as ours, the same masked batch, a
clear install hint when torch is missing, and rows of another shape refused."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.helpers import load_script
from tkre_jax import config as config_lib
from tkre_jax.benchmarking import flops as flops_lib


def _module():
  return load_script("benchmarks/torch_reference.py")


def test_shapes_match_ours():
  ref = _module()
  for name, hf in ref.SHAPES.items():
    ours = flops_lib.encoder_shape(name)
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads,
            ours.intermediate_size, ours.max_position_embeddings) == (
                hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"],
                hf["num_attention_heads"], hf["intermediate_size"], hf["max_position_embeddings"])
  assert ref.MASK_ID == flops_lib.MASK_TOKEN_IDS["minilm-l6"]


def test_masked_batch():
  b = _module().synthetic_mlm_batch(4, 16, 100, slots=5)
  assert b["positions"].shape == (4, 5) and b["full_labels"].shape == (4, 16)
  assert ((b["positions"] >= 1) & (b["positions"] <= 14)).all()
  assert (b["full_labels"] != -100).sum() == 20
  np.testing.assert_array_equal(np.take_along_axis(b["full_labels"], b["positions"], 1), b["labels"])
  np.testing.assert_array_equal(np.take_along_axis(b["input_ids"], b["positions"], 1), 103)


def test_without_torch_it_says_how_to_install(tmp_path, capsys):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed in this environment")
  # The script's main() in this process (an exception would fail the test with its traceback).
  assert _module().main([f"--ours={tmp_path / 'row.json'}"]) == 2
  err = capsys.readouterr().err
  assert 'pip install -e ".[torch]"' in err and "Traceback" not in err


def test_a_row_of_another_shape_is_refused():
  ref = _module()
  with pytest.raises(ValueError, match=r"row.json: a row of .* = \('mslm', 'tiny', 8, 32"):
    ref.check_row({"stage": "mslm", "model": "tiny", "batch_size": 8, "seq_len": 32,
                   "dtype": "float32"}, "minilm-l6", 16, 128, "row.json")
  ref.check_row(json.loads((config_lib.REPO_ROOT / "benchmarks" / "rows" /
                            "cpux1-dp_mslm_minilm-l6_float32_b16x128.json").read_text()),
                "minilm-l6", 16, 128, "sample row")
