"""The bench report: the committed sample rows -> a markdown table and a PNG; bad rows are named."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from tkre_jax.benchmarking import compare

ROWS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rows"


def _sample_files() -> list[pathlib.Path]:
  files = sorted(ROWS.glob("*.json"))
  assert len(files) >= 4, f"sample rows missing in {ROWS}"
  return files


def test_report_renders_the_sample_rows(tmp_path):
  files = _sample_files()
  result = compare.report([str(ROWS)], tmp_path / "out")
  assert result["rows"] == len(files)
  md = (tmp_path / "out" / "bench_report.md").read_text()
  table = [line for line in md.splitlines() if line.startswith("| ")]
  assert len(table) == 1 + len(files)  # header + one line per row
  rows = [json.loads(f.read_text()) for f in files]
  for r in rows:  # every row's stage, throughput and MFU appear as the table prints them
    line = next(x for x in table[1:] if f"| {r['stage']} | {r['dtype']} |" in x
                and f"{r['tokens_per_second']:,.0f}" in x and f"{100 * r['mfu']:.1f}%" in x)
    assert f"{r['batch_size']}x{r['seq_len']}" in line
  png = tmp_path / "out" / "bench_report.png"
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  img = matplotlib.image.imread(png)
  assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
  assert np.std(img[..., :3]) > 0.05  # not a blank canvas


def test_newest_row_of_a_kind_wins_and_bad_rows_are_named(tmp_path):
  src = _sample_files()[0]
  row = json.loads(src.read_text())
  (tmp_path / "a.json").write_text(json.dumps({**row, "time": "2000-01-01T00:00:00+00:00"}))
  newer = {**row, "time": "2100-01-01T00:00:00+00:00", "tokens_per_second": 12345.0}
  (tmp_path / "b.json").write_text(json.dumps(newer))
  (got,) = compare.read_rows(compare.expand([str(tmp_path)]))
  assert got["tokens_per_second"] == 12345.0 and got["_file"].endswith("b.json")
  bad = tmp_path / "bad" / "x.json"
  bad.parent.mkdir()
  bad.write_text(json.dumps({"stage": "mslm"}))
  with pytest.raises(compare.RowError, match=r"x.json: not a bench row, missing model"):
    compare.read_rows([bad])
  assert compare.main([str(bad), f"--out={tmp_path / 'o'}"]) == 2
  with pytest.raises(FileNotFoundError, match="no such bench row"):
    compare.expand([str(tmp_path / "nope")])


def test_command_line(tmp_path, capsys):
  shutil.copytree(ROWS, tmp_path / "rows")
  assert compare.main([str(p) for p in sorted((tmp_path / "rows").glob("*.json"))]
                           + [f"--out={tmp_path / 'r'}"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["rows"] == len(_sample_files()) and pathlib.Path(out["png"]).is_file()


def test_mesh_text():
  assert compare.mesh_text({"data": 1, "fsdp": 8, "tensor": 1}) == "fsdp:8"
  assert compare.mesh_text({"data": 2, "fsdp": 2, "tensor": 2}) == "data:2,fsdp:2,tensor:2"
  assert compare.mesh_text({"data": 1, "fsdp": 1, "tensor": 1}) == "1"
