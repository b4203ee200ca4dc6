"""launch/ablation.py builds the grid of docs/ablation.md: which stages each variant runs, on which
prepared data, and which runs the variants share (dry run: commands only); its table reads test
scores, or dev scores for choosing settings."""

from __future__ import annotations

import json
import re

from tests.helpers import load_script

ablation = load_script("launch/ablation.py")


def _commands(capsys, *argv) -> list[str]:
  assert ablation.main(["--dry_run", *argv]) == 0
  return [line.strip() for line in capsys.readouterr().out.splitlines() if " -m tkre_jax.main " in line]


def test_default_grid(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}")
  ft = [c for c in cmds if "--stage=finetune" in c]
  # FewRel K=8: 5 variants x 3 seeds; K=16: 2 x 3; Wiki80 K=8: 2 x 3
  names = sorted({re.search(r"--workdir=\S+/(\S+-s\d+/ft_\w+)", c).group(1) for c in ft})
  assert len(names) == 15 + 6 + 6
  assert {n.split("/")[1] for n in names if n.startswith("fewrel-k8")} == {
      "ft_baseline", "ft_augment", "ft_mslm_scl", "ft_tkre", "ft_scl"}
  assert {n.split("/")[1] for n in names if not n.startswith("fewrel-k8")} == {"ft_baseline", "ft_tkre"}
  # TKRE fine-tunes on the augmented data from the SCL run that +MSLM+SCL shares
  tkre = next(c for c in ft if "fewrel-k8-s42/ft_tkre" in c)
  assert "fewrel-k8/prepared_aug " in tkre + " " and "--init_from=" in tkre and tkre.endswith("s42/scl")
  assert re.search(r"prepared_dir=\S+/fewrel-k8/prepared( |$)", next(
      c for c in ft if "fewrel-k8-s42/ft_mslm_scl" in c))
  aug = {c for c in cmds if "--stage=prepare " in c and "fewrel-k8/prepared_aug " in c}
  assert len(aug) == 1 and "--config.data.augment_k=8" in aug.pop()  # one command for all seeds
  # Wiki80: no model selection (fixed epochs); FewRel: selection on dev
  assert all(f"eval_every_epochs={ablation.FIXED_EPOCHS}" in c for c in ft if "wiki80" in c)
  assert not any("eval_every_epochs" in c for c in ft if "fewrel" in c)


def test_variants_flag_overrides_the_grid(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}", "--datasets=fewrel", "--ks=16", "--seeds=42",
                   "--variants=augment", "--augment_k=4")
  assert [c.split("--stage=")[1].split()[0] for c in cmds] == ["prepare", "finetune"]
  assert "--config.data.augment_k=4" in cmds[0] and cmds[0].count("prepared_aug") == 1


def _finished(out, name: str, dev: float, test: float) -> None:
  """A finished fine-tuning workdir as the finetune stage leaves it (summary.json metrics)."""
  d = out / name
  d.mkdir(parents=True)
  metrics = {split: {"accuracy": v, "micro_f1": v, "macro_f1": v - 0.01}
             for split, v in (("dev", dev), ("test", test))}
  (d / "summary.json").write_text(json.dumps({"metrics": metrics}))


def test_report_reads_test_by_default_and_dev_on_request(capsys, tmp_path):
  _finished(tmp_path, "fewrel-k8-s13/ft_tkre", dev=0.80, test=0.70)
  _finished(tmp_path, "fewrel-k8-s42/ft_tkre", dev=0.84, test=0.74)
  base = [f"--out={tmp_path}", "--datasets=fewrel", "--ks=8", "--seeds=13,42", "--variants=tkre",
          "--report_only"]
  for extra, split, accuracy in (([], "test", "72.0 ± 2.8"), (["--report_split=dev"], "dev",
                                                              "82.0 ± 2.8")):
    doc = tmp_path / f"doc_{split}.md"
    assert ablation.main([*base, *extra, f"--doc={doc}"]) == 0
    capsys.readouterr()
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| TKRE"))
    assert row.split(" | ")[1:4] == ["2 (13,42)", accuracy, accuracy]
    assert f"| {split} micro-F1 | {split} accuracy |" in doc.read_text()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["split"] == split and rows[0]["seeds"] == [13, 42]


def test_relation_aware_rows_share_one_pretraining_run(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}", "--datasets=fewrel", "--ks=8", "--seeds=13,42",
                   "--variants=sacon_aug,sacon_tkre_labels,episodic,sacon_aug_predicate",
                   "--sacon_steps=50")
  sacon = [c for c in cmds if "--stage=sacon" in c]
  # printed once per variant and seed that needs it, always the same command and workdir
  assert len(set(sacon)) == 1 and f"--workdir={tmp_path}/sacon " in sacon[0] + " "
  assert "--config.sacon.steps=50" in sacon[0] and "--config.seed=42" in sacon[0]
  assert "--config=" not in sacon[0] and "--config.data.k" not in sacon[0]
  ft = {re.search(r"/(ft_\w+) ", c).group(1): c for c in cmds
        if "--stage=finetune" in c and "-s13/" in c}
  assert ft["ft_sacon_aug"].endswith(f"--init_from={tmp_path}/sacon")
  assert "prepared_aug" in ft["ft_sacon_aug"]
  assert "--config.model.head" not in ft["ft_sacon_aug"]
  predicate = ft["ft_sacon_aug_predicate"]
  assert "prepared_aug" in predicate and f"--init_from={tmp_path}/sacon" in predicate
  assert "--config.model.head=predicate" in predicate and "head_init" not in predicate
  labels = ft["ft_sacon_tkre_labels"]
  assert f"--init_from={tmp_path}/fewrel-k8-s13/scl_from_sacon" in labels
  assert "--config.train.head_init=labels" in labels
  assert f"--config.train.label_encoder_from={tmp_path}/sacon" in labels
  mslm = next(c for c in cmds if "--stage=mslm" in c and "-s13/" in c)
  assert mslm.endswith(f"--init_from={tmp_path}/sacon")
  assert ft["ft_episodic"].endswith(f"--init_from={tmp_path}/episodic")


def test_a_given_sacon_workdir_is_used_and_must_be_finished(capsys, tmp_path):
  given = tmp_path / "my_sacon"
  given.mkdir()
  args = [f"--out={tmp_path / 'out'}", "--datasets=fewrel", "--ks=8", "--seeds=13",
          "--variants=sacon", f"--sacon_from={given}", "--dry_run"]
  assert ablation.main(args) == 1  # not finished: no summary.json
  assert "no finished sacon run" in capsys.readouterr().err
  (given / "summary.json").write_text(json.dumps({"seconds": {"total": 1234.5}}))
  assert ablation.main(args) == 0
  out = capsys.readouterr().out
  assert "--stage=sacon" not in out and f"--init_from={given}" in out


def test_learning_order_and_predicate_variants(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}", "--datasets=fewrel", "--ks=8", "--seeds=13,42",
                   "--variants=tkre_lo_ft,tkre_lo_drop,tkre_lo_scl,tkre_both,baseline_predicate",
                   "--both_lo_use=scl")
  # one prepare_lo (K-shot + all 16 SCDG per relation) for every seed; one learning order per seed
  lo_prep = {c for c in cmds if "--stage=prepare " in c and "prepared_lo " in c}
  assert len(lo_prep) == 1 and "--config.data.augment_k=16" in lo_prep.pop()
  lo = [c for c in cmds if "--stage=learning_order" in c]
  assert len({c for c in lo}) == 2 and all("prepared_dir=" in c and "prepared_lo" in c for c in lo)
  ft = {re.search(r"s42/(ft_\w+)", c).group(1): c for c in cmds
        if "--stage=finetune" in c and "-s42/" in c}
  assert "learning_order_use=weight" in ft["ft_tkre_lo_ft"]
  assert "learning_order_use=drop_unlearned" in ft["ft_tkre_lo_drop"]
  assert "learning_order_from" not in ft["ft_tkre_lo_scl"] and ft["ft_tkre_lo_scl"].endswith("scl_lo")
  # tkre_both with --both_lo_use=scl: the weighted SCL run, then the predicate head
  assert ft["ft_tkre_both"].endswith("--config.model.head=predicate")
  assert "s42/scl_lo " in ft["ft_tkre_both"] + " "
  assert "model.head=predicate" in ft["ft_baseline_predicate"]
  assert "--init_from" not in ft["ft_baseline_predicate"]
  scl_lo = [c for c in cmds if "--stage=scl" in c and "s42/scl_lo " in c + " "]
  assert len(set(scl_lo)) == 1 and "scl.learning_order_from=" in scl_lo[0]


def test_semeval_rows_and_the_infonce_variant(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}", "--datasets=semeval", "--ks=8", "--seeds=13")
  ft = [c for c in cmds if "--stage=finetune" in c]
  assert sorted(re.search(r"semeval-k8-s13/(ft_\w+)", c).group(1) for c in ft) == [
      "ft_augment", "ft_baseline", "ft_tkre", "ft_tkre_infonce"]
  # the split is the seed's, with its LLM files (configs/semeval.py); k-shot dev after fixed epochs
  assert all("configs/semeval.py:k=8,split_seed=13" in c for c in cmds)
  assert all(f"eval_every_epochs={ablation.FIXED_EPOCHS}" in c for c in ft)
  scl = [c for c in cmds if "--stage=scl" in c]
  ref = next(c for c in scl if c.split("--workdir=")[1].split()[0].endswith("/scl"))
  ours = next(c for c in scl if "scl_infonce" in c)
  assert "objective" not in ref  # the authors' SCL is the default
  assert all(f in ours for f in ("--config.scl.objective=infonce", "--config.scl.anchor_init=text",
                                 "--config.scl.skip_no_relation=True"))
  # both TKRE rows share the MSLM run and differ in the SCL run they fine-tune from
  assert ("--init_from=" + ours.split("--workdir=")[1].split()[0]) in next(
      c for c in ft if "ft_tkre_infonce" in c)


def test_paired_table_gives_per_seed_differences():
  paired = load_script("launch/paired_table.py")
  rows = [{"dataset": "semeval", "k": 8, "variant": "baseline", "seeds": [13, 42],
           "micro_f1": [0.50, 0.60], "macro_f1": [0.40, 0.50]},
          {"dataset": "semeval", "k": 8, "variant": "tkre", "seeds": [42],
           "micro_f1": [0.75], "macro_f1": [0.70]}]
  out = paired.table(rows, "semeval", 8, "baseline", ["tkre"], "micro_f1", "macro_f1").splitlines()
  assert out[2] == "| baseline | 50.00 (40.00) | 60.00 (50.00) | 55.00 (45.00) | – |"
  assert out[3] == "| tkre | – | 75.00 (70.00), +15.00 | 75.00 (70.00) | +15.00 |"


def test_inverse_variants_fine_tune_on_their_own_prepared_sets(capsys, tmp_path):
  cmds = _commands(capsys, f"--out={tmp_path}", "--datasets=semeval", "--ks=8", "--seeds=42",
                   "--variants=baseline,baseline_inv,tkre,tkre_inv")
  prep = {c.split("--workdir=")[1].split()[0].rsplit("/", 1)[1]: c for c in cmds
          if "--stage=prepare" in c}
  assert set(prep) == {"prepared", "prepared_inv", "prepared_aug", "prepared_aug_inv"}
  assert "--config.data.inverse_augment=True" in prep["prepared_inv"]
  assert "--config.data.augment_k=0" in prep["prepared_inv"]
  assert "--config.data.inverse_augment=True" in prep["prepared_aug_inv"]
  assert "--config.data.augment_k=8" in prep["prepared_aug_inv"]
  assert "inverse_augment" not in prep["prepared"] + prep["prepared_aug"]
  ft = {re.search(r"s42/(ft_\w+)", c).group(1): c for c in cmds if "--stage=finetune" in c}
  assert ft["ft_baseline_inv"].count("prepared_dir=") == 1 and "/prepared_inv" in ft["ft_baseline_inv"]
  assert "/prepared_aug_inv" in ft["ft_tkre_inv"]
  # TKRE with copies fine-tunes from the same SCL run as TKRE (one mslm and one scl run)
  init = lambda c: c.split("--init_from=")[1].split()[0]  # noqa: E731
  assert init(ft["ft_tkre_inv"]) == init(ft["ft_tkre"])
  for stage in ("scl", "mslm"):  # printed once per variant by the dry run, one workdir
    assert len({c for c in cmds if f"--stage={stage}" in c}) == 1
