"""The episodic protocol: the seeded N-way K-shot sampler (deterministic, queries never in their own
support, NOTA queries from outside relations, train / eval relations disjoint), the prototype
classifier on a hand-built case, zero-shot (description) and mixed prototypes, NOTA thresholds, the
prototypical loss against a numpy reference, and the episodic + episodes stages on 8 fake CPU
devices with a tiny encoder (the loss decreases; the summary's accuracies are the ones recomputed
from the written episode list).
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import minilm_dir
from tkre_jax import config as config_lib
from tkre_jax import stages
from tkre_jax.data import episode_sampler as episodes_lib
from tkre_jax.data import readers
from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.eval import prototypes as proto_lib
from tkre_jax.parallel.mesh import make_mesh
from tkre_jax.tasks import losses


def _inst(rel: str, i: int) -> RelationInstance:
  return RelationInstance(tokens=("w", str(i), "x", "y"), subj=(0, 1), obj=(2, 3), relation=rel,
                          source=f"{rel}[{i}]")


def _pool(num_rel=6, per_rel=(10, 12, 9, 11, 10, 8)):
  return episodes_lib.flatten({f"P{r}": [_inst(f"P{r}", i) for i in range(per_rel[r])]
                               for r in range(num_rel)})


# ------------------------------------------------------------------------------------ sampler

def test_same_seed_same_episodes_and_golden_first_episode():
  pool = _pool()
  spec = episodes_lib.EpisodeSpec(3, 2, 2)
  a = episodes_lib.sample_episodes(pool, spec, 50, seed=7)
  b = episodes_lib.sample_episodes(pool, spec, 50, seed=7)
  c = episodes_lib.sample_episodes(pool, spec, 50, seed=8)
  for f in ("relations", "support", "query", "query_labels"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert not np.array_equal(a.support, c.support)
  # PCG64 streams are fixed across machines: the first episode of seed 7, written down once.
  assert a.relations[0].tolist() == GOLDEN_RELATIONS
  assert a.support[0].tolist() == GOLDEN_SUPPORT
  assert a.query[0].tolist() == GOLDEN_QUERY


GOLDEN_RELATIONS = [3, 4, 5]
GOLDEN_SUPPORT = [[33, 31], [42, 50], [59, 54]]
GOLDEN_QUERY = [37, 38, 46, 48, 58, 56]


def test_query_never_in_own_support_and_labels_match_relations():
  pool = _pool()
  spec = episodes_lib.EpisodeSpec(4, 3, 3)
  eps = episodes_lib.sample_episodes(pool, spec, 200, seed=1)
  assert eps.support.shape == (200, 4, 3) and eps.query.shape == (200, 12)
  for e in range(200):
    sup, qry = set(eps.support[e].ravel().tolist()), eps.query[e].tolist()
    assert len(sup) == 12 and len(set(qry)) == 12 and not sup & set(qry)
    assert len(set(eps.relations[e].tolist())) == 4
    for i, r in enumerate(eps.relations[e]):
      rel = pool.relations[r]
      assert all(pool.instances[p].relation == rel for p in eps.support[e, i])
    for p, lab in zip(qry, eps.query_labels[e]):
      assert pool.instances[p].relation == pool.relations[eps.relations[e, lab]]


def test_nota_queries_come_from_other_relations():
  pool = _pool()
  spec = episodes_lib.EpisodeSpec(3, 1, 2, nota_rate=0.5)
  assert spec.num_nota == 6  # half of 3*2 + 6 queries
  eps = episodes_lib.sample_episodes(pool, spec, 100, seed=3)
  assert eps.query.shape == (100, 12)
  assert (eps.query_labels == 3).sum() == 600
  for e in range(100):
    chosen = {pool.relations[r] for r in eps.relations[e]}
    for p, lab in zip(eps.query[e], eps.query_labels[e]):
      assert (pool.instances[p].relation in chosen) == (lab < 3)


def test_sampler_errors_name_the_problem():
  pool = _pool()
  with pytest.raises(DataError, match="need 7 relations, the data has 6"):
    episodes_lib.sample_episodes(pool, episodes_lib.EpisodeSpec(7, 1, 1), 1, seed=0)
  with pytest.raises(DataError, match=r"too few in 'P2' \(9\), 'P5' \(8\)"):
    episodes_lib.sample_episodes(pool, episodes_lib.EpisodeSpec(2, 5, 5), 1, seed=0)
  with pytest.raises(ValueError, match="not N-K"):
    episodes_lib.parse_settings("5-1,5x5", 5)
  with pytest.raises(ValueError, match="nota_rate"):
    episodes_lib.EpisodeSpec(5, 1, 1, nota_rate=1.0)


def test_train_and_eval_relations_disjoint_check():
  episodes_lib.check_disjoint(["P1", "P2"], ["P3"])
  with pytest.raises(DataError, match="share 1 relation.*P2"):
    episodes_lib.check_disjoint(["P1", "P2"], ["P2", "P3"])


def test_episode_file_round_trip(tmp_path):
  pool = _pool()
  eps = [episodes_lib.sample_episodes(pool, s, 5, seed=0)
         for s in episodes_lib.parse_settings("3-1,2-0", 2, 0.25)]
  episodes_lib.write_episodes(tmp_path / "e.json", "pool.json", pool.relations, eps, 0)
  head, back = episodes_lib.read_episodes(tmp_path / "e.json")
  assert head["relations"] == list(pool.relations) and len(back) == 2
  for a, b in zip(eps, back):
    assert a.spec == b.spec
    np.testing.assert_array_equal(a.query, b.query)
    np.testing.assert_array_equal(a.support, b.support)


# ------------------------------------------------------------------------------------ prototypes

def test_prototype_classifier_exact_on_toy_case():
  # Two classes in 2-D: support means (1, 0) and (0, 3).
  emb = np.array([[2, 0], [0, 0], [0, 2], [0, 4],      # support: class 0 x2, class 1 x2
                  [0.9, 0.1], [0, 2.4], [1.4, 1.6]], np.float32)  # queries
  support = np.array([[[0, 1], [2, 3]]])
  query = np.array([[4, 5, 6]])
  protos = proto_lib.prototypes(emb[support])
  np.testing.assert_allclose(protos, [[[1, 0], [0, 3]]])
  s = proto_lib.scores(emb[query], protos, "euclidean")
  # -||q - p||^2 by hand
  np.testing.assert_allclose(s[0], [[-0.02, -9.22], [-6.76, -0.36], [-2.72, -3.92]], atol=1e-5)
  np.testing.assert_allclose(proto_lib.scores(emb[query], protos, "dot")[0],
                             [[0.9, 0.3], [0, 7.2], [1.4, 4.8]], atol=1e-5)
  # Euclidean puts the third query in class 0, dot product in class 1.
  acc_e = proto_lib.episode_accuracy(emb, support, query, np.array([[0, 1, 0]]), metric="euclidean")
  acc_d = proto_lib.episode_accuracy(emb, support, query, np.array([[0, 1, 0]]), metric="dot")
  np.testing.assert_allclose(acc_e, [1.0])
  np.testing.assert_allclose(acc_d, [2 / 3])
  mean, half = proto_lib.mean_ci95(np.array([0.5, 1.0, 0.75, 0.75]))
  assert mean == pytest.approx(0.75)
  assert half == pytest.approx(1.96 * np.std([0.5, 1.0, 0.75, 0.75], ddof=1) / 2)


def test_nota_threshold_and_zero_shot_and_mixed_prototypes():
  q = np.array([[[1.0, 0.0], [10.0, 10.0]]], np.float32)
  desc = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  sup = np.array([[[[3.0, 0.0]], [[0.0, 5.0]]]], np.float32)     # [1, N=2, K=1, 2]
  # zero-shot: K = 0 uses the descriptions whatever the mode
  np.testing.assert_allclose(proto_lib.prototypes(sup[:, :, :0], desc), desc)
  np.testing.assert_allclose(proto_lib.prototypes(None, desc, mode="support"), desc)
  np.testing.assert_allclose(proto_lib.prototypes(sup, desc, mode="mixed", description_weight=0.25),
                             [[[2.5, 0.0], [0.0, 4.0]]])
  np.testing.assert_allclose(proto_lib.prototypes(sup, desc, mode="description"), desc)
  with pytest.raises(ValueError, match="need the description"):
    proto_lib.prototypes(sup[:, :, :0], None)
  s = proto_lib.scores(q, desc, "euclidean")  # q0 at distance 0 of class 0; q1 far from both
  np.testing.assert_array_equal(proto_lib.predict(s), [[0, 0]])
  np.testing.assert_array_equal(proto_lib.predict(s, nota_threshold=-50.0), [[0, 2]])
  emb = np.concatenate([q[0], sup[0, :, 0]])
  acc = proto_lib.episode_accuracy(emb, np.zeros((1, 2, 0), np.int64), np.array([[0, 1]]),
                                   np.array([[0, 2]]), descriptions=desc, nota_threshold=-50.0)
  np.testing.assert_allclose(acc, [1.0])


def test_description_instance_marks_name_as_the_relation_words():
  inst = episodes_lib.description_instance("P26", "spouse", "the subject has the object as spouse")
  assert inst.subj_text == "subject" and inst.obj_text == "object"
  assert inst.tokens[1:2] == ("spouse",)
  out = episodes_lib.description_instances(["P26", "org:founded_by"],
                                           {"P26": ("spouse", "married to")})
  assert out[1].tokens[:4] == ("subject", "org", "founded", "by")
  with pytest.raises(DataError, match="empty name"):
    episodes_lib.description_instance("P1", "  ")


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_prototypical_loss_matches_numpy_reference(metric):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(9, 4)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0], np.int32)
  is_query = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0], np.int32)
  weight = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)   # last row: padding
  s, w, correct = losses.prototypical_loss(jnp.asarray(emb), jnp.asarray(labels),
                                           jnp.asarray(is_query), jnp.asarray(weight), 2, metric)
  protos = np.stack([emb[[0, 1]].mean(0), emb[[2, 3]].mean(0)])
  logits = proto_lib.scores(emb[4:8], protos, metric)
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  ref = -logp[np.arange(4), labels[4:8]].sum()
  assert float(w) == 4.0
  assert float(s) == pytest.approx(ref, rel=1e-5)
  assert float(correct) == float((logits.argmax(1) == labels[4:8]).sum())


# ------------------------------------------------------------------------------------ stages

def _fewrel_file(path, relations, per_relation=12, start=0):
  data = {}
  for r in relations:
    data[r] = [{"tokens": ["The", "entity", f"a{r}{i}", "relates", "to", f"b{r}{i}", "via",
                           r.lower(), "words", "."][:10],
                "h": [f"a{r}{i}", "", [[2]]], "t": [f"b{r}{i}", "", [[5]]]}
               for i in range(start, start + per_relation)]
  path.write_text(json.dumps(data))
  return path


@pytest.fixture(scope="module")
def tiny_setup(tiny_hf_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("episodes")
  hf = tiny_hf_dir
  train = _fewrel_file(root / "train.json", [f"P{i}" for i in range(100, 106)])
  evalf = _fewrel_file(root / "eval.json", ["P26", "P17", "P19", "P27"], per_relation=8)
  (root / "pid2name.json").write_text(json.dumps({
      "P26": ["spouse", "married"], "P17": ["country", "sovereign state"],
      "P19": ["place of birth", "where born"], "P27": ["country of citizenship", "citizen of"]}))
  c = config_lib.base_config()
  c.model.hf_dir = str(hf)
  c.data.max_seq_len = 32
  c.data.schema_file = str(root / "pid2name.json")
  c.episodes.train_file = str(train)
  c.episodes.eval_file = str(evalf)
  c.episodes.settings = "3-1,2-2,3-0"
  c.episodes.q_query = 2
  c.episodes.num_episodes = 20
  c.episodes.batch_size = 8
  c.episodic.n_way, c.episodic.k_shot, c.episodic.q_query = 3, 2, 2
  c.episodic.steps = 32
  c.episodic.optim.learning_rate = 1e-3
  c.episodic.log_every_steps = 16
  c.episodic.checkpoint_every_seconds = 0
  return root, c


@pytest.mark.slow
@pytest.mark.multidevice
def test_episodic_then_episodes_on_8_devices(tiny_setup):
  root, c = tiny_setup
  mesh = make_mesh("cpu")
  assert mesh.devices.size == 8
  tr = stages.run("episodic", c, root / "episodic", mesh=mesh)
  assert tr["train_relations"] == 6 and tr["eval_relations_disjoint"] == 4
  rec = [json.loads(x) for x in open(root / "episodic" / "metrics.jsonl")]
  first, last = rec[0]["loss"], rec[-1]["loss"]  # means over steps 1-16 and 17-32
  assert last < first, (first, last)  # training on these episodes lowers the loss
  ev = stages.run("episodes", c, root / "eval", mesh=mesh, init_from=str(root / "episodic"))
  assert set(ev["metrics"]) == {"3-way 1-shot", "2-way 2-shot", "3-way 0-shot"}
  assert ev["instances_embedded"] <= 32 and "episodic" in ev["encoder_from"]
  for v in ev["metrics"].values():
    assert v["episodes"] == 20 and 0.0 <= v["accuracy"] <= 100.0 and v["ci95"] >= 0.0
  per_ep = json.loads((root / "eval" / "episode_accuracy.json").read_text())
  for name, v in ev["metrics"].items():
    assert len(per_ep[name]) == 20
    assert 100 * np.mean(per_ep[name]) == pytest.approx(v["accuracy"], abs=0.006)
  head, eps = episodes_lib.read_episodes(root / "eval" / "episodes.json")
  assert [e.spec.name for e in eps] == list(ev["metrics"])
  # The written list is the seeded sample (setting i uses seed episodes.seed + i).
  pool = episodes_lib.flatten(readers.read_fewrel(c.episodes.eval_file))
  again = episodes_lib.sample_episodes(pool, eps[1].spec, 20, seed=c.episodes.seed + 1)
  np.testing.assert_array_equal(again.query, eps[1].query)
  np.testing.assert_array_equal(again.support, eps[1].support)


def test_episodic_refuses_shared_relations(tiny_setup, tmp_path):
  conf = copy.deepcopy(tiny_setup[1])
  conf.episodes.eval_file = str(_fewrel_file(tmp_path / "eval.json", ["P100", "P26"]))
  with pytest.raises(DataError, match="share 1 relation.*P100"):
    stages.run("episodic", conf, tmp_path / "run", mesh=make_mesh("cpu"))
  assert not (tmp_path / "run").exists()


def test_prototype_classifier_python_api(tiny_setup):
  from tkre_jax.infer.prototype_classifier import PrototypeClassifier
  root, c = tiny_setup
  clf = PrototypeClassifier.from_workdir("", mesh=make_mesh("cpu"), config=c)
  support = {"founded": [{"text": "Bill Gates founded Microsoft .", "subject": "Bill Gates",
                          "object": "Microsoft"}],
             "born in": [{"text": "Ada was born in London .", "subject": "Ada",
                          "object": "London"}]}
  queries = [{"text": "Bill Gates founded Microsoft .", "subject": "Bill Gates",
              "object": "Microsoft"},
             {"text": "Ada was born in London .", "subject": "Ada", "object": "London"}]
  out = clf.classify(support, queries)
  # A query identical to a support record is at distance 0 of its prototype.
  assert [o["relation"] for o in out] == ["founded", "born in"]
  assert out[0]["score"] == pytest.approx(0.0, abs=1e-3)
  zs = clf.classify({"founded": [], "born in": []}, queries,
                    descriptions={"founded": "founded: created", "born in": "born in: birth"})
  assert all(o["relation"] in ("founded", "born in") for o in zs)
  assert clf.classify(support, queries, nota_threshold=1.0)[0]["relation"] is None
  with pytest.raises(DataError, match="query record 0: .*does not occur"):
    clf.classify(support, [{"text": "x y", "subject": "Apple", "object": "y"}])
  with pytest.raises(DataError, match="no description"):
    clf.classify({"founded": []}, queries)


def test_training_batches_are_one_episode_a_step_and_resume_exactly():
  from tkre_jax.tasks.prototypical import episode_batches
  pool = _pool()
  n = len(pool.instances)
  arrays = {"input_ids": np.arange(n * 8, dtype=np.int32).reshape(n, 8),
            "attention_mask": np.ones((n, 8), np.int32), "span_ids": np.zeros((n, 8), np.int32),
            "subj_pos": np.arange(n, dtype=np.int32), "obj_pos": np.zeros(n, np.int32)}
  spec = episodes_lib.EpisodeSpec(3, 2, 1)
  it = episode_batches(arrays, pool, spec, seed=5, start_step=0, rows=16, length_multiple=0,
                       max_seq_len=8)
  batches = [next(it) for _ in range(4)]
  b = batches[0]
  assert b["input_ids"].shape == (16, 8)
  np.testing.assert_array_equal(b["is_query"], [0] * 6 + [1] * 3 + [0] * 7)
  np.testing.assert_array_equal(b["label"][:9], [0, 0, 1, 1, 2, 2, 0, 1, 2])
  np.testing.assert_array_equal(b["weight"], [1] * 9 + [0] * 7)
  rows = b["subj_pos"][:9]  # pool positions of the episode's rows
  assert len(set(rows.tolist())) == 9
  for lab, p in zip(b["label"][:9], rows):  # each label is one relation, support and query
    assert pool.instances[p].relation == pool.instances[rows[2 * lab]].relation
  resumed = next(episode_batches(arrays, pool, spec, seed=5, start_step=3, rows=16,
                                 length_multiple=0, max_seq_len=8))
  for k in b:
    np.testing.assert_array_equal(resumed[k], batches[3][k])
  assert not np.array_equal(batches[0]["subj_pos"], batches[1]["subj_pos"])
  with pytest.raises(ValueError, match="cannot hold"):
    next(episode_batches(arrays, pool, spec, seed=5, start_step=0, rows=8, length_multiple=0,
                         max_seq_len=8))


def test_cli_bad_setting_is_one_error_line(tmp_path, main_cli):
  code, _, err = main_cli("--stage=episodes", f"--workdir={tmp_path / 'run'}",
                          "--config.episodes.settings=5-1,5x5")
  assert code == 2
  assert "error: episode setting '5x5' is not N-K (e.g. 5-1 for 5-way 1-shot)" in err
  assert "Traceback" not in err and not (tmp_path / "run").exists()
