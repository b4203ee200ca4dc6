"""The instance-adapted predicate head: template tables, templates filled inside the step (string
and span entities, typed markers, object-first templates, truncation), the scores against a
direct computation, negative sampling, and finetune -> eval / predict / export with it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tkre_jax import stages
from tkre_jax.data import features as features_lib
from tkre_jax.data import predict_input, readers
from tkre_jax.data import templates as templates_lib
from tkre_jax.model import hub, predicate
from tkre_jax.tasks import classifier
from tests.helpers import stage_mesh

LABELS = {"P40": 0, "P25": 1, "org:founded_by": 2}
SCHEMA = {"P40": ("child", "subject has object as child"),
          "P25": ("mother", "female parent", "{object} is the mother of {subject}")}
RECORDS = [  # the subject / object as strings and as character spans
    {"text": "Marie Curie was the mother of Irène Joliot-Curie .", "subject": "Marie Curie",
     "object": "Irène Joliot-Curie", "relation": "P40"},
    {"text": "Marie Curie was the mother of Irène Joliot-Curie .", "subject": {"start": 30, "end": 48},
     "object": {"start": 0, "end": 11}, "relation": "P25"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dir):
  return hub.load_tokenizer(tiny_hf_dir)


def _rows(tokenizer, typed=False, records=RECORDS):
  insts = [predict_input.record_instance(r) for r in records]
  feat = features_lib.Featurizer(tokenizer, LABELS, features_lib.FeatureConfig(max_seq_len=48,
                                                                               typed_markers=typed))
  return feat(insts)


def _decode(tokenizer, ids, mask):
  return tokenizer.decode([int(t) for t, m in zip(ids, mask) if m])


def test_template_table_sources_and_errors(tokenizer):
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=48, entity_len=8)
  assert table.texts == ("@ subject @ child # object # : subject has object as child",
                         "# object # is the mother of @ subject @",
                         "@ subject @ org founded by # object # :")
  assert table.subject_first == (True, False, True)
  assert templates_lib.TemplateTable.from_json(json.loads(json.dumps(table.to_json()))) == table
  with pytest.raises(ValueError, match="relation 'P40'.*\\{subject\\} and \\{object\\} once"):
    templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, templates={"P40": "{subject} x"})
  with pytest.raises(ValueError, match="unknown: \\['relation'\\]"):
    templates_lib.build_table(LABELS, tokenizer, templates={"P40": "{subject} {relation} {object}"})
  with pytest.raises(ValueError, match="does not fit config.model.template_max_len=20"):
    templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=20, entity_len=8)


def test_schema_entries_may_carry_a_template(tmp_path):
  path = tmp_path / "pid2name.json"
  path.write_text(json.dumps({"P25": ["mother", "female parent", "{object} is {subject}'s mother"],
                              "P40": ["child", "subject has object as child"]}))
  assert readers.read_pid2name(path) == {"P25": ("mother", "female parent"),
                                         "P40": ("child", "subject has object as child")}
  assert readers.read_pid2name_templates(path) == {"P25": "{object} is {subject}'s mother"}
  path.write_text(json.dumps({"P25": ["mother"]}))
  with pytest.raises(readers.DataError, match="'P25'.*\\[name, description\\]"):
    readers.read_pid2name(path)


@pytest.mark.parametrize("typed", [False, True])
def test_templates_are_filled_with_each_rows_entities_and_markers(tokenizer, typed):
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=48, entity_len=8)
  rows = _rows(tokenizer, typed)
  rel = jnp.asarray([[0, 1, 2], [0, 1, 2]], jnp.int32)
  out = jax.jit(predicate.fill_templates, static_argnums=3)(
      jnp.asarray(rows["input_ids"]), jnp.asarray(rows["span_ids"]), rel, table)
  ids, mask = np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])
  got = [[_decode(tokenizer, ids[b, r], mask[b, r]) for r in range(3)] for b in range(2)]
  assert got[0] == [
      "[CLS] @ marie curie @ child # irene joliot - curie # : subject has object as child [SEP]",
      "[CLS] # irene joliot - curie # is the mother of @ marie curie @ [SEP]",
      "[CLS] @ marie curie @ org founded by # irene joliot - curie # : [SEP]"]
  # the span record names Irène as the subject and Marie as the object
  assert got[1][0] == ("[CLS] @ irene joliot - curie @ child # marie curie # : subject has object "
                       "as child [SEP]")
  for b in range(2):
    for r in range(3):
      toks = ids[b, r]
      assert toks[out["subj_pos"][b, r]] == table.subj_marker_id
      assert toks[out["obj_pos"][b, r]] == table.obj_marker_id
      assert mask[b, r].sum() == len(tokenizer(got[b][r], add_special_tokens=False)["input_ids"])
  # object first: the object's marker comes first in the template
  assert out["obj_pos"][0, 1] == 1 and out["subj_pos"][0, 1] > out["obj_pos"][0, 1]


def test_the_last_piece_is_cut_to_fit_and_entities_to_entity_len(tokenizer):
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=16, entity_len=3)
  rows = _rows(tokenizer)
  out = predicate.fill_templates(jnp.asarray(rows["input_ids"]), jnp.asarray(rows["span_ids"]),
                                 jnp.asarray([[0], [0]], jnp.int32), table)
  text = _decode(tokenizer, np.asarray(out["input_ids"][0, 0]), np.asarray(
      out["attention_mask"][0, 0]))
  assert text == "[CLS] @ marie curie @ child # irene jolio # : subject has [SEP]"  # 3 pieces each
  assert int(out["attention_mask"][0, 0].sum()) == 16


def test_negative_sampling_keeps_the_gold_relation_first():
  labels = jnp.asarray([3, 0, 7, 7], jnp.int32)
  rel = np.asarray(predicate.sample_relations(jax.random.key(0), labels, 8, 4))
  assert rel.shape == (4, 4) and rel[:, 0].tolist() == [3, 0, 7, 7]
  assert all(len(set(r)) == 4 for r in rel.tolist())
  other = np.asarray(predicate.sample_relations(jax.random.key(1), labels, 8, 4))
  assert not np.array_equal(rel[:, 1:], other[:, 1:])
  with pytest.raises(ValueError, match="n must be in"):
    predicate.sample_relations(jax.random.key(0), labels, 8, 9)


def _layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _ce(logits, label):
  z = np.asarray(logits, np.float64)
  z = z - z.max()
  return float(np.log(np.exp(z).sum()) - z[label])


@pytest.mark.parametrize("shared,form", [(False, "source"), (True, "source"), (False, "split")])
def test_predicate_scores_match_a_direct_computation(tiny_hf_dir, tokenizer, shared, form):
  """The scores and (source form) the training loss alpha * CE(C x) + (1 - alpha) * CE(s) of
  BEFRE's `forward`, recomputed in numpy from each filled template tokenized whole."""
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=48, entity_len=8)
  enc_cfg = hub.encoder_config(tiny_hf_dir, "float32")
  opts = {"table": table, "shared_encoder": shared, "temperature": 0.1, "train_relations": 0,
          "alpha": 0.3, "template_pass": "full", "head_form": form}
  model = classifier.classifier_builder(enc_cfg, 3, 0.1, 3, opts)()
  rows = _rows(tokenizer)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  scores = np.asarray(model(batch))
  assert scores.shape == (2, 3)
  head_params = nnx.to_pure_dict(nnx.state(model.predicate_head, nnx.Param))
  if form == "source":
    # one LayerNorm shared by both sides, and the linear classifier on the instance side
    assert set(head_params) == {"instance", "predicate", "norm", "classifier", "log_scale"}
    ln_x = ln_d = head_params["norm"]
  else:
    ln_x, ln_d = head_params["instance_norm"], head_params["predicate_norm"]
  want_loss = 0.0
  # direct: each template tokenized whole by the tokenizer, encoded alone, numpy head
  head = head_params
  eps = enc_cfg.layer_norm_eps
  hidden = np.asarray(model.encoder(batch["input_ids"], batch["attention_mask"]))
  tpl_encoder = model.encoder if shared else model.predicate_encoder
  subj = ["marie curie", "irène joliot-curie"]
  obj = ["irène joliot-curie", "marie curie"]
  texts = ["@ {s} @ child # {o} # : subject has object as child", "# {o} # is the mother of @ {s} @",
           "@ {s} @ org founded by # {o} # :"]
  t = np.exp(float(head["log_scale"]))
  for b in range(2):
    h_pair = np.concatenate([hidden[b, rows["subj_pos"][b]], hidden[b, rows["obj_pos"][b]]])
    x = _layer_norm(h_pair @ head["instance"]["kernel"] + head["instance"]["bias"],
                    ln_x["scale"], ln_x["bias"], eps)
    row_scores = []
    for r, pattern in enumerate(texts):
      ids = tokenizer(pattern.format(s=subj[b], o=obj[b]))["input_ids"]
      g = np.asarray(tpl_encoder(jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)))[0]
      at = ids.index(table.subj_marker_id)
      ht = ids.index(table.obj_marker_id)
      z = np.concatenate([g[at], g[ht], hidden[b, 0]])
      d = _layer_norm(z @ head["predicate"]["kernel"] + head["predicate"]["bias"],
                      ln_d["scale"], ln_d["bias"], eps)
      want = t * x @ d / (np.linalg.norm(x) * np.linalg.norm(d))
      np.testing.assert_allclose(scores[b, r], want, rtol=2e-4, atol=2e-4)
      row_scores.append(want)
    if form == "source":
      logits = x @ head["classifier"]["kernel"] + head["classifier"]["bias"]
      label = int(rows["label"][b])
      want_loss += 0.3 * _ce(logits, label) + 0.7 * _ce(row_scores, label)
  if form == "source":  # the loss without dropout, summed over the two rows
    graphdef, params = nnx.split(model, nnx.Param)
    batch["weight"] = jnp.ones((2,), jnp.float32)
    loss_sum, weight, _ = classifier.make_loss_sum_fn(graphdef)(params, batch, None)
    assert float(weight) == 2.0
    np.testing.assert_allclose(float(loss_sum), want_loss, rtol=2e-4)
    # with dropout (a key), the training scores differ from the deterministic ones
    _, s_drop, _ = model.outputs(batch, dropout_rng=jax.random.key(0))
    assert np.abs(np.asarray(s_drop) - scores).max() > 1e-3


@pytest.mark.slow
def test_predicate_head_finetune_eval_predict_and_export_round_trip(tiny_config, tmp_path):
  """At fusion_layers 1 (the default; a model built without it would use 0 and score otherwise,
  so the export must carry it). fusion_layers 0 is the same code path with another depth: the
  cached-pass test covers both."""
  from tkre_jax.data import dataset  # pylint: disable=import-outside-toplevel
  from tkre_jax.infer.extractor import RelationExtractor  # pylint: disable=import-outside-toplevel
  fusion_layers = 1
  c = tiny_config
  c.model.update(head="predicate", predicate_train_relations=2,
                 predicate_fusion_layers=fusion_layers)
  c.train.update(epochs=4, eval_every_epochs=2, checkpoint_every_seconds=0)
  s = stages.run("finetune", c, tmp_path / "ft", mesh=stage_mesh())
  rows = [json.loads(x) for x in open(tmp_path / "ft" / "metrics.jsonl")]
  train = [r for r in rows if "predicate_loss" in r]
  assert len(train) == 8 and all(r["linear_loss"] > 0 and r["predicate_loss"] > 0 for r in train)
  np.testing.assert_allclose([r["loss"] for r in train],
                             [0.5 * r["linear_loss"] + 0.5 * r["predicate_loss"] for r in train],
                             rtol=1e-5)
  info = json.loads((tmp_path / "ft" / "run.json").read_text())
  assert len(info["templates"]["texts"]) == 4
  e = stages.run("eval", c, tmp_path / "ft", mesh=stage_mesh())
  assert e["metrics"]["test"] == s["metrics"]["test"]
  stages.run("export", c, None, mesh=stage_mesh(), init_from=str(tmp_path / "ft"),
             output_path=str(tmp_path / "hf"))
  assert (tmp_path / "hf" / "predicate_encoder" / "model.safetensors").is_file()
  meta = json.loads((tmp_path / "hf" / "relation_head.json").read_text())
  assert meta["head"]["model"]["predicate_fusion_layers"] == fusion_layers
  test = dataset.load_arrays(c.data.prepared_dir, "test")
  a = RelationExtractor.from_workdir(tmp_path / "ft", mesh=stage_mesh())
  b = RelationExtractor.from_export(tmp_path / "hf", mesh=stage_mesh())
  la, lb = a.logits(test), b.logits(test)
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
  acc = float((la.argmax(-1) == test["label"]).mean())
  assert acc == pytest.approx(e["metrics"]["test"]["accuracy"])
  pred = a.predict([{"text": "Marie Curie was the mother of Irène Joliot-Curie .",
                     "subject": "Irène Joliot-Curie", "object": "Marie Curie"}], top_k=2)
  assert len(pred[0]["top_k"]) == 2 and pred[0]["relation"] in a.label_map


@pytest.mark.parametrize("fusion_layers", [0, 1])
def test_the_cached_pass_is_a_full_pass_whose_literal_tokens_do_not_see_the_entities(
    tiny_hf_dir, tokenizer, fusion_layers):
  """fusion_layers 0: one sequence per (row, relation) at the template's layout, where literal
  tokens see literal tokens and instance tokens see all. fusion_layers 1 (of the tiny encoder's
  2): in the lower layer the instance tokens, in "@ subject @ # object #" order at positions
  1..4 + 2E, see only each other."""
  from tkre_jax.model.encoder import Encoder  # pylint: disable=import-outside-toplevel
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=64, entity_len=6)
  enc = Encoder(hub.encoder_config(tiny_hf_dir, "float32"), rngs=nnx.Rngs(1))
  assert len(enc.layers) == 2
  rows = _rows(tokenizer)
  input_ids, span_ids = jnp.asarray(rows["input_ids"]), jnp.asarray(rows["span_ids"])
  rel = np.array([[0, 1, 2], [2, 0, 1]], np.int32)
  g_s, g_o = jax.jit(predicate.cached_template_states, static_argnums=(0, 4, 6))(
      enc, input_ids, span_ids, jnp.asarray(rel), table, None, fusion_layers)
  lay = predicate.cached_layout(table)
  ids, valid = predicate.instance_tokens(input_ids, span_ids, jnp.asarray(rel), table)
  c_ids, c_valid, c_pos = predicate.canonical_instance_tokens(input_ids, span_ids, table)
  full = predicate.fill_templates(input_ids, span_ids, jnp.asarray(rel), table)
  E = table.entity_len
  unfused = 0 if fusion_layers == 0 else len(enc.layers) - fusion_layers
  for b in range(2):
    for j, r in enumerate(rel[b]):
      n_static = int(lay["static_mask"][r].sum())
      s_tok, s_pos = lay["static_ids"][r][:n_static], lay["static_pos"][r][:n_static]
      if fusion_layers == 0:
        ok = np.asarray(valid[b, j])
        i_tok, i_pos = np.asarray(ids[b, j])[ok], lay["inst_pos"][r][ok]
        # the same tokens, in the same order, as the full pass's filled template
        order = np.argsort(np.concatenate([s_pos, i_pos]))
        want_text = _decode(tokenizer, np.asarray(full["input_ids"][b, j]),
                            np.asarray(full["attention_mask"][b, j]))
        assert _decode(tokenizer, np.concatenate([s_tok, i_tok])[order],
                       np.ones(len(order), bool)) == want_text
        first = table.subject_first[r]
      else:
        ok = np.asarray(c_valid[b])
        i_tok, i_pos = np.asarray(c_ids[b])[ok], np.asarray(c_pos[b])[ok]
        first = True
      # the two start markers' indices among the kept instance tokens
      m1 = n_static
      m2 = n_static + int(ok[:E + 2].sum())
      tok = np.concatenate([s_tok, i_tok])[None]
      pos = np.concatenate([s_pos, i_pos])[None]
      inst = np.arange(tok.shape[1]) >= n_static
      own = inst[:, None] == inst[None, :]
      fused = ~inst[None, :] | (inst[:, None] & inst[None, :])
      x = enc.embed(jnp.asarray(tok), jnp.asarray(pos))
      for i, layer in enumerate(enc.layers):
        see = own if i < unfused else fused
        bias = jnp.asarray(np.where(see, 0.0, np.finfo(np.float32).min)[None, None], jnp.float32)
        x = layer(x, bias)
      x = np.asarray(x[0], np.float32)
      np.testing.assert_allclose(np.asarray(g_s[b, j]), x[m1 if first else m2], rtol=1e-4,
                                 atol=1e-4)
      np.testing.assert_allclose(np.asarray(g_o[b, j]), x[m2 if first else m1], rtol=1e-4,
                                 atol=1e-4)
  assert np.abs(np.asarray(g_s[0, 0]) - np.asarray(g_s[1, 1])).max() > 1e-3


def test_fusion_layers_beyond_the_depth_is_refused(tiny_hf_dir, tokenizer):
  table = templates_lib.build_table(LABELS, tokenizer, schema=SCHEMA, max_len=48, entity_len=4)
  opts = {"table": table, "template_pass": "cached", "fusion_layers": 3}
  with pytest.raises(ValueError, match=r"fusion_layers must be in \[0, 2\].*got 3"):
    classifier.classifier_builder(hub.encoder_config(tiny_hf_dir, "float32"), 3, 0.0, 3, opts)()
  # the full pass fuses every layer whatever is asked
  opts.update(template_pass="full", fusion_layers=1)
  model = classifier.classifier_builder(hub.encoder_config(tiny_hf_dir, "float32"), 3, 0.0, 3,
                                        opts)()
  assert model.fusion_layers == 0
