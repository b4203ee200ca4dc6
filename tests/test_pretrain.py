"""The mslm and scl stages: pure step builders, losses that go down on the real FewRel corpus (tiny
encoder with the MiniLM tokenizer, a 2-device CPU mesh), the init_from chain mslm -> scl -> finetune,
anchors from relation descriptions, and clear errors. (Resuming: test_trainer.py, on the tiny set-up;
test_resume_continues_exactly moved there.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import require
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.parallel.mesh import make_mesh
from tkre_jax.tasks import mslm_scl
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import runtime

# Results here are losses that go down, runs compared with runs compiled the same way, the jit step
# against its pmap form: none depends on XLA's optimisations, which make the compiles slow.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


# ------------------------------------------------------------------------------------------------
# Pure steps on a tiny model without a mesh


def synthetic_batch(batch=12, seq_len=24, vocab=128, num_relations=4, real=8, seed=0):
  """`real` random rows (subject at 2-3, relation span 4-6, object 7-8) and `batch - real` padding
  rows as `pipeline.iterate_batches` makes them (weight 0, a lone attended [CLS])."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(12, seq_len + 1, batch)
  mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, vocab, (batch, seq_len)).astype(np.int32) * mask
  span = np.ones((batch, seq_len), np.int32)
  span[:, 0] = 0
  span[:, 2:4] = 2   # subject
  span[:, 4:7] = 4   # relation span
  span[:, 7:9] = 3   # object
  span[np.arange(batch), lengths - 1] = 0
  span *= mask
  out = {"input_ids": ids, "attention_mask": mask, "span_ids": span,
         "subj_pos": np.full(batch, 1, np.int32), "obj_pos": np.full(batch, 6, np.int32),
         "label": (np.arange(batch) % num_relations).astype(np.int32),
         "weight": (np.arange(batch) < real).astype(np.float32)}
  for k in out:
    if k != "weight":
      out[k][real:] = 0
  out["attention_mask"][real:, 0] = 1
  return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,objective", [("mslm", "reference"), ("scl", "reference"),
                                             ("scl", "infonce")])
def test_step_builders_learn_and_are_deterministic(stage, objective):
  model = mslm_scl.build_pretrain_model(EncoderConfig.tiny(), seed=0,
                                        num_relations=4 if stage == "scl" else 0)
  assert model.shardings is None
  assert ("projection" in model.params) == (stage == "scl")
  cfg = mslm_scl.PretrainStepConfig(mask_token_id=3, max_predictions=8, objective=objective)
  tx = optax.adam(3e-3)
  make = mslm_scl.make_scl_step if stage == "scl" else mslm_scl.make_mslm_step
  step = jax.jit(make(model.graphdef, tx, cfg))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch().items()}
  key = jax.random.key(0)

  def run(n, b=batch):
    params, opt_state = model.params, tx.init(model.params)
    out = []
    for i in range(n):
      params, opt_state, m = step(params, opt_state, b, jax.random.fold_in(key, i))
      out.append(jax.device_get(m))
    return params, out

  params, ms = run(12)
  losses = [float(m["loss"]) for m in ms]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  assert ms[0]["num_predictions"] > 0
  _, ms2 = run(3)
  _, ms3 = run(3)
  assert [float(m["loss"]) for m in ms2] == [float(m["loss"]) for m in ms3]
  if stage == "scl":
    assert np.mean([float(m["scl_loss"]) for m in ms[-5:]]) < float(ms[0]["scl_loss"])
    # The 4 padding rows count nowhere; an empty relation span falls back to the entities.
    assert float(ms[0]["scl_rows"]) == 8 and float(ms[0]["scl_fallback_rows"]) == 0
    b2 = dict(batch)
    b2["span_ids"] = batch["span_ids"].at[0, 4:7].set(1)
    _, ms4 = run(1, b2)
    assert float(ms4[0]["scl_fallback_rows"]) == 1 and float(ms4[0]["scl_rows"]) == 8


@pytest.mark.slow
@pytest.mark.multidevice
def test_pmap_axis_name_normalises_over_the_global_batch():
  """With every real token masked (probabilities 1, P >= seq_len) and no dropout the step is
  deterministic: pmap over 2 devices (axis_name) gives the jit step's loss and parameters."""
  cfg_enc = EncoderConfig.tiny(hidden_dropout=0.0, attention_dropout=0.0)
  model = mslm_scl.build_pretrain_model(cfg_enc, seed=1)
  cfg = mslm_scl.PretrainStepConfig(mask_token_id=3, max_predictions=24,
                                    probs=(0.0, 1.0, 1.0, 1.0))
  tx = optax.sgd(0.1)
  batch = synthetic_batch(batch=8, real=6)
  key = jax.random.key(0)
  p1, _, m1 = jax.jit(mslm_scl.make_mslm_step(model.graphdef, tx, cfg))(
      model.params, tx.init(model.params), batch, key)
  step = jax.pmap(mslm_scl.make_mslm_step(model.graphdef, tx, cfg, axis_name="d"), axis_name="d",
                  devices=jax.devices()[:2])
  rep = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)  # noqa: E731
  split = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in batch.items()}
  p2, _, m2 = step(rep(model.params), rep(tx.init(model.params)), split,
                   jax.random.split(key, 2))
  np.testing.assert_allclose(float(m2["loss"][0]), float(m1["loss"]), rtol=1e-5)
  assert float(m2["num_predictions"][0]) == float(m1["num_predictions"])
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(y[0]), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_relation_texts():
  texts, counts = mslm_scl.relation_texts(
      {"P177": 0, "org:founded_by": 1, "P999": 2, "place served by transport hub": 3},
      {"P177": ("crosses", "obstacle (body of water, road, ...) which this bridge crosses over")})
  assert texts == ["crosses: obstacle (body of water, road, ...) which this bridge crosses over",
                   "org founded by", None, "place served by transport hub"]
  assert counts == {"schema": 1, "label_words": 2, "random": 1}


def test_step_config_validation():
  with pytest.raises(ValueError, match="tau"):
    mslm_scl.PretrainStepConfig(mask_token_id=3, tau=0.0)
  with pytest.raises(ValueError, match="span_input"):
    mslm_scl.PretrainStepConfig(mask_token_id=3, span_input="both")
  c = config_lib.base_config()
  c.scl.neg_min_len = 4
  with pytest.raises(ValueError, match="neg_min_len"):
    config_lib.validate(c, "scl")
  c = config_lib.base_config()
  c.mslm.prob_relation = 1.5
  with pytest.raises(ValueError, match="prob_relation"):
    config_lib.validate(c, "mslm")
  with pytest.raises(ValueError, match="no mask token"):
    mslm_scl.step_config(config_lib.base_config(), {"special_ids": {"mask": None}, "label_map": {}})


# ------------------------------------------------------------------------------------------------
# Stages on the real FewRel corpus with a tiny encoder


@pytest.fixture(scope="module")
def fewrel_prepared(shared_data, tiny_hf_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrain")
  c = config_lib.base_config()
  c.data.data_dir = str(shared_data)
  require(shared_data / c.data.fewrel_file)
  require(shared_data / c.data.edkg_file)
  c.model.hf_dir = str(tiny_hf_dir)
  c.data.corpus = "require"
  c.data.unlabelled_file = ""    # the MLM-head warm-up is tested in test_head_warmup.py
  c.mslm.head_warmup_steps = 0
  # The canonical train pool with small dev / test ranges: prepare featurizes 2 x 64 evaluation
  # instances instead of 10,688 (the corpus is checked against them; test_corpus.py checks the
  # real split). SCDG sentences sharing an 8-gram with the full test set stay in here.
  split = root / "split.json"
  split.write_text(json.dumps({"train_pool": [0, 32], "dev": [32, 36], "test": [100, 104]}))
  c.data.split_file = str(split)
  prep = stages.run("prepare", c, root / "prepared")
  assert prep["splits"]["corpus"] == 512 and prep["splits"]["test"] == 64
  c.data.prepared_dir = str(root / "prepared")
  for s in ("mslm", "scl"):
    c[s].batch_size = 8
    c[s].optim.learning_rate = 2e-3
    c[s].optim.warmup_frac = 0.1
    c[s].length_multiple = 0       # one compiled shape: faster tests
    c[s].log_every_steps = 10
  c.mslm.steps = 50
  c.scl.steps = 50
  c.scl.optim.learning_rate = 5e-3
  c.mslm.max_predictions = 8
  return root, c


@pytest.fixture(scope="module")
def mesh():
  # Two of the eight fake devices: the batch is still split (sharded steps, global-batch losses)
  # and the tests run several times faster on a 2-core machine than on all eight.
  return make_mesh("cpu", devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def mslm_run(fewrel_prepared, mesh):
  root, c = fewrel_prepared
  summary = stages.run("mslm", c, root / "mslm", mesh=mesh)
  return root, c, summary


@pytest.fixture(scope="module")
def scl_run(mslm_run, mesh):
  root, c, _ = mslm_run
  summary = stages.run("scl", c, root / "scl", mesh=mesh, init_from=str(root / "mslm"))
  return root, c, summary


def _rows(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_mslm_loss_decreases_on_fewrel_corpus(mslm_run):
  root, _, s = mslm_run
  assert s["stage"] == "mslm" and s["steps"] == 50 and s["num_sequences"] == 512
  assert s["corpus"]["by_kind"] == {"gold": 128, "edkg": 128, "scdg": 256}
  rows = _rows(root / "mslm" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
  assert rows[-1]["mlm_accuracy"] > rows[0]["mlm_accuracy"]
  assert all(r["num_predictions"] > 0 for r in rows)
  assert (root / "mslm" / "best").is_dir() and (root / "mslm" / "checkpoints").is_dir()
  assert json.load(open(root / "mslm" / "summary.json"))["last_logged"]["loss"] == rows[-1]["loss"]


@pytest.mark.slow
def test_scl_loss_decreases_with_the_reference_objective(scl_run):
  root, _, s = scl_run
  assert s["stage"] == "scl" and s["loaded"] == ["encoder", "mlm_head"]
  # the authors' anchors: a learned embedding, no text (anchor_init="text" is an option)
  assert s["anchors_init"] == {"schema": 0, "label_words": 0, "random": 16}
  rows = _rows(root / "scl" / "metrics.jsonl")
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
  for r in rows:
    assert r["loss"] == pytest.approx(r["mslm_loss"] + r["scl_loss"], rel=1e-4)
    assert r["scl_rows"] > 0


@pytest.mark.slow
def test_scl_lowers_the_contrastive_loss_on_fixed_batches(scl_run, mesh):
  """The SCL loss of the parameters SCL started from (the MSLM encoder, random anchors of the
  same seed, rebuilt exactly) against the trained ones, on the same 8 corpus batches with the same keys. (The
  logged window means of a random 2-layer encoder are too noisy for this: batches of 8 rows.)"""
  from tkre_jax.data import pipeline
  from tkre_jax.stages import pretrain as pretrain_stage
  from tkre_jax.train import loading
  from tkre_jax.train import workdir as workdir_lib
  root, c, _ = scl_run
  _, meta = loading.prepared(c)
  cfg = mslm_scl.step_config(c, meta, "scl")
  model = mslm_scl.build_pretrain_model(loading.encoder_config(c), num_relations=16, seed=c.seed,
                                        mesh=mesh)
  loading.init_weights(c, model, str(root / "mslm"), workdir_lib.read(root / "scl"))
  pretrain_stage.init_anchors(c, model, meta["label_map"], loading.data_tokenizer(meta, c))
  start = nnx.to_pure_dict(model.params)
  trained, _ = ckpt_lib.restore_param_tree(root / "scl")
  loss_fn = jax.jit(mslm_scl.scl_loss(model.graphdef, cfg), static_argnums=3)
  batches = pipeline.pretrain_batches(c.data.prepared_dir, "corpus", global_batch_size=8,
                                      seed=123, length_multiple=0)

  def mean_scl(params):
    return np.mean([float(loss_fn(params, b, jax.random.key(i), lambda x: x)[1]["scl_loss"])
                    for i, b in enumerate(fixed)])

  fixed = [next(batches) for _ in range(8)]
  before, after = mean_scl(start), mean_scl(trained)
  assert after < before - 0.05, (before, after)


@pytest.mark.slow
def test_init_from_loads_the_previous_stage(scl_run, mesh):
  root, c, _ = scl_run
  mslm_tree, _ = ckpt_lib.restore_param_tree(root / "mslm")
  assert set(mslm_tree) == {"encoder", "mlm_head"}
  # scl --init_from=mslm: the new model starts from exactly the MSLM encoder and MLM head.
  from tkre_jax.train import loading
  from tkre_jax.tasks import classifier
  from tkre_jax.train import workdir as workdir_lib
  model = mslm_scl.build_pretrain_model(loading.encoder_config(c), num_relations=16, seed=7,
                                        mesh=mesh)
  source, loaded = loading.init_weights(c, model, str(root / "mslm"), workdir_lib.read(root / "scl"))
  assert loaded == ["encoder", "mlm_head"] and "mslm" in source
  for name in ("encoder", "mlm_head"):
    got = jax.tree.leaves(nnx.to_pure_dict(model.params[name]))
    want = jax.tree.leaves(mslm_tree[name])
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), b)
  # SCL changed them, and finetune --init_from=scl restores the SCL encoder.
  scl_tree, _ = ckpt_lib.restore_param_tree(root / "scl")
  assert set(scl_tree) == {"encoder", "mlm_head", "projection", "anchors"}
  a = scl_tree["encoder"]["word_embeddings"]
  assert not np.array_equal(a, mslm_tree["encoder"]["word_embeddings"])
  enc = loading.restore_encoder(root / "scl")
  ft = classifier.build_model(loading.encoder_config(c), 16, 0.1, 0, mesh, "dp")
  runtime.put_subtree(ft.params, ("encoder",), enc, ft.shardings)
  got = jax.tree.leaves(nnx.to_pure_dict(ft.params["encoder"]))
  want = jax.tree.leaves(scl_tree["encoder"])
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.slow
def test_missing_corpus_split_is_a_clear_error(fewrel_prepared, mesh, tmp_path):
  _, c = fewrel_prepared
  c = c.copy_and_resolve_references()
  c.mslm.split = "pretraining"
  with pytest.raises(KeyError, match="no split 'pretraining'"):
    stages.run("mslm", c, tmp_path / "m", mesh=mesh)
  c.mslm.split = "corpus"
  c.mslm.batch_size = 7
  with pytest.raises(ValueError, match="multiple of the data-parallel size"):
    stages.run("mslm", c, tmp_path / "m2", mesh=mesh)
