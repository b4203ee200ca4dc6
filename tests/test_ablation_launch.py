"""launch/ablation.py builds the grid of docs/ablation.md: which stages each variant runs, on which
prepared data, and which runs the variants share (dry run: commands only)."""

from __future__ import annotations

import importlib.util
import re
import sys

from tkre_jax import config as config_lib

spec = importlib.util.spec_from_file_location("ablation", config_lib.REPO_ROOT / "launch" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
sys.modules["ablation"] = ablation  # dataclasses look the module up
spec.loader.exec_module(ablation)


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
