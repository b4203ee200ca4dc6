"""MSLM head warm-up, the max_predictions cap report, and no weight decay on the SCL anchors.

The warm-up runs in the shared trainer with the encoder frozen: every encoder parameter stays
bit-identical, the MLM loss on a fixed-mask evaluation split goes down, and MSLM then starts from
the warmed-up head; a warm-up killed after a checkpoint and rerun ends where an uninterrupted one
does (the run of the first test is the uninterrupted one; the kill test's rerun runs main in this
process, test_trainer.py says why).
"""

from __future__ import annotations

import json
import signal

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import STAGE_DEVICES, make_tiny_fewrel, stage_mesh
from tests.test_trainer import (assert_same_params, command, config_with, kill_after_checkpoint,
                                main_args)
from tkre_jax import stages
from tkre_jax.model import hf_import
from tkre_jax.model.encoder_config import EncoderConfig
from tkre_jax.stages import pretrain as pretrain_stage
from tkre_jax.tasks import mslm_scl as pretrain_lib
from tkre_jax.train import checkpoint as ckpt_lib
from tkre_jax.train import optim


# Each test compares runs made with the same compiler settings (killed ones included, see
# helpers.subprocess_env): XLA's optimisations off make the compiles several times faster.
pytestmark = pytest.mark.usefixtures("fewer_compiler_optimizations")


@pytest.fixture(scope="module")
def warm(shared_data, tiny_hf_dir, tmp_path_factory):
  """Tiny FewRel (4 relations) with the FewRel train-relation text as the `unlabelled` split."""
  root = tmp_path_factory.mktemp("warmup")
  data_dir = make_tiny_fewrel(shared_data, root / "data", relations=4, per_relation=12, train=4, dev=4)
  (data_dir / "fewrel_train_partial").mkdir()
  src = json.load(open(shared_data / "fewrel_train_partial" / "train_wiki_partial.json"))
  json.dump({r: v[:20] for r, v in list(src.items())[:8]},
            open(data_dir / "fewrel_train_partial" / "train_wiki_partial.json", "w"))
  overrides = {
      "data.data_dir": str(data_dir), "data.k": 4, "data.max_seq_len": 64,
      "data.unlabelled_rows": 128, "model.hf_dir": str(tiny_hf_dir),
      "data.prepared_dir": str(root / "prepared"),
      "mslm.split": "train", "mslm.steps": 4, "mslm.batch_size": 8, "mslm.log_every_steps": 1,
      "mslm.optim.learning_rate": 2e-3, "mslm.max_predictions": 8, "mslm.eval_split": "dev",
      "mslm.head_warmup_steps": 12, "mslm.head_warmup_batch_size": 8,
      "mslm.head_warmup_learning_rate": 1e-2,
      "mslm.checkpoint_every_seconds": 0, "mslm.checkpoint_every_steps": 5,
  }
  stages.run("prepare", config_with(overrides), root / "prepared")
  return root, overrides


@pytest.fixture(scope="module")
def warm_mslm(warm):
  """The mslm stage with the head warm-up, uninterrupted (in this process): workdir and summary."""
  root, overrides = warm
  workdir = root / "mslm"
  return workdir, stages.run("mslm", config_with(overrides), workdir, mesh=stage_mesh())


@pytest.mark.slow
def test_warmup_freezes_the_encoder_and_lowers_the_mlm_loss(warm, warm_mslm):
  root, overrides = warm
  meta = json.load(open(root / "prepared" / "meta.json"))
  assert meta["unlabelled"]["built"] and meta["unlabelled"]["rows"] == 128
  assert meta["unlabelled"]["relations"] == 8
  workdir, summary = warm_mslm
  w = summary["head_warmup"]
  assert w["ran"] and w["steps"] == 12 and w["split"] == "unlabelled"
  ev = summary["mlm_eval"]
  assert set(ev) == {"start", "after_warmup", "after_mslm"}
  assert ev["after_warmup"]["mlm_loss"] < ev["start"]["mlm_loss"] - 0.05
  assert ev["start"]["num_predictions"] == ev["after_warmup"]["num_predictions"] > 0  # same masks
  # every encoder parameter of the warmed-up model equals the HF checkpoint's
  _, encoder, mlm = hf_import.load_hf_encoder(overrides["model.hf_dir"])
  assert not mlm  # the tiny checkpoint, like MiniLM, has no MLM head
  start = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
  tree, _ = ckpt_lib.restore_param_tree(workdir / pretrain_stage.WARMUP_DIR)
  enc_a = jax.tree_util.tree_leaves_with_path(start)
  enc_b = jax.tree_util.tree_leaves_with_path(tree["encoder"])
  assert len(enc_a) == len(enc_b) > 10
  for (path, a), (_, b) in zip(enc_a, enc_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert summary["loaded"] == ["encoder", "mlm_head"] and "warmed up for 12 steps" in \
      summary["weights_from"]
  cap = summary["max_predictions_cap"]
  assert cap["selected"] > 0 and 0 <= cap["dropped_share"] < 1


@pytest.mark.subprocess
def test_warmup_resumes_exactly_after_a_kill(warm, warm_mslm, main_cli):
  root, overrides = warm
  straight, killed = warm_mslm[0], root / "w_killed"
  code = kill_after_checkpoint(command("mslm", killed, overrides, slow=True),
                               killed / pretrain_stage.WARMUP_DIR, 5)
  assert code == -signal.SIGKILL
  code, _, err = main_cli(*main_args("mslm", killed, overrides),  # the same command again
                          devices=STAGE_DEVICES)
  assert code == 0, err[-3000:]
  assert_same_params(straight / pretrain_stage.WARMUP_DIR, killed / pretrain_stage.WARMUP_DIR)
  assert_same_params(straight, killed)


@pytest.mark.slow
def test_warmup_is_skipped_when_the_start_has_an_mlm_head(warm, warm_mslm):
  """From the warmed-up mslm run, which has an MLM head."""
  root, overrides = warm
  o = {**overrides, "mslm.eval_split": "", "mslm.head_warmup_steps": 3}
  s = stages.run("mslm", config_with(o), root / "m1", mesh=stage_mesh(),
                 init_from=str(warm_mslm[0]))
  assert s["head_warmup"] == {"ran": False, "reason": "the starting weights have an MLM head"}
  assert not (root / "m1" / pretrain_stage.WARMUP_DIR).exists()


@pytest.mark.slow
def test_frozen_subtrees_get_no_update_and_anchors_no_decay():
  model = pretrain_lib.build_pretrain_model(EncoderConfig.tiny(), num_relations=3)
  mask = optim.decay_mask(model.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  anchors = [v for k, v in flat.items() if "anchors" in k]
  assert anchors == [False]
  assert any(v for k, v in flat.items() if "encoder" in k)  # matrices elsewhere still decay
  cfg = config_with({"train.optim.weight_decay": 0.5, "train.optim.warmup_frac": 0.0})
  tx, _ = optim.adamw(cfg.train.optim, 10, frozen=("encoder",))
  params = model.params
  state = tx.init(params)
  grads = jax.tree.map(lambda x: np.ones_like(x), params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(new)):
    same = np.array_equal(np.asarray(a), np.asarray(b))
    assert same == ("'encoder'" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
  # anchors: with zero gradients only weight decay could move them; it does not
  tx2, _ = optim.adamw(cfg.train.optim, 10)
  zeros = jax.tree.map(lambda x: np.zeros_like(x), params)
  upd, _ = tx2.update(zeros, tx2.init(params), params)
  moved = {jax.tree_util.keystr(p): bool(np.any(np.asarray(u) != 0))
           for p, u in jax.tree_util.tree_leaves_with_path(upd)}
  assert [v for k, v in moved.items() if "anchors" in k] == [False]


def test_cap_report_warns_above_ten_percent(caplog):
  hist = [{"num_selected": 100.0, "num_dropped": 15.0, "steps_in_window": 2},
          {"num_selected": 100.0, "num_dropped": 5.0, "steps_in_window": 2}]
  with caplog.at_level("WARNING"):
    rep = pretrain_stage.cap_report(hist, 32)
  assert rep == {"max_predictions": 32, "selected": 400, "dropped": 40, "dropped_share": 0.1}
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
  hist[0]["num_dropped"] = 25.0
  with caplog.at_level("WARNING"):
    rep = pretrain_stage.cap_report(hist, 32)
  assert rep["dropped_share"] == pytest.approx(0.15)
  assert any("effective masking rate is 15.0% below" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_frozen_encoder_loss_has_no_encoder_gradient():
  """The warm-up loss is a function of the MLM head alone: every encoder gradient, the tied
  decoder's word embeddings included, is exactly zero, and the head's is not."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = pretrain_lib.build_pretrain_model(EncoderConfig.tiny())
  cfg = pretrain_lib.PretrainStepConfig(mask_token_id=4, max_predictions=8, freeze_encoder=True)
  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(5, 100, (4, 16)), jnp.int32),
           "attention_mask": jnp.ones((4, 16), jnp.int32),
           "span_ids": jnp.asarray(np.tile(np.r_[0, [1] * 14, 0], (4, 1)), jnp.int32),
           "weight": jnp.ones((4,), jnp.float32)}
  loss_fn = pretrain_lib.mslm_loss(model.graphdef, cfg)
  grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), lambda x: x)[0])(model.params)
  flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  enc = {k: g for k, g in flat.items() if "'encoder'" in k}
  assert enc and all(not g.any() for g in enc.values()), [k for k, g in enc.items() if g.any()]
  assert any(g.any() for k, g in flat.items() if "'mlm_head'" in k)
