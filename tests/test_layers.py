"""The layer contract of `tkre_jax`: no module imports a module of a higher layer.

Layers, high to low:

  tkre_jax.main > tkre_jax.stages
    > {tkre_jax.llm (the generate library), tkre_jax.infer (trained models for users),
       tkre_jax.benchmarking (bench timing, FLOPs, peaks, report)}
    > tkre_jax.tasks (per-task models and losses) > tkre_jax.train (the training engine)
    > tkre_jax.data > {tkre_jax.config, tkre_jax.model, tkre_jax.parallel, tkre_jax.eval, tkre_jax.text}

A module may import its own package and any lower layer. Packages of the same layer do not import
each other (`llm`, `infer` and `benchmarking` are independent; so are `config`, `model`,
`parallel` and `eval`),
except that everyone may import `tkre_jax.text`, the bottom of the bottom layer, which imports
nothing from `tkre_jax`. Imports inside functions count the same as module-level ones.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
from typing import Optional

PACKAGE = "tkre_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent

# Top-level package or module under `tkre_jax` -> layer (higher imports lower).
LAYERS = {
    "main": 6,
    "stages": 5,
    "llm": 4, "infer": 4, "benchmarking": 4,
    "tasks": 3,
    "train": 2,
    "data": 1,
    "config": 0, "model": 0, "parallel": 0, "eval": 0, "text": 0, "progress": 0,
}
# Importable by every layer (it imports nothing from tkre_jax).
SHARED_BOTTOM = "text"

# Known violations, as (file, imported package); keep it empty.
ALLOWED: set = set()


def _unit(module: str) -> Optional[str]:
  """`tkre_jax.data.corpus` -> `data`; None for the bare package `tkre_jax`."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  rel = path.relative_to(root).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
  """Every `tkre_jax...` module imported anywhere in `tree`, as (line, module name)."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend((node.lineno, a.name) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if target == PACKAGE:  # `from tkre_jax import config` imports tkre_jax.config
        out.extend((node.lineno, f"{PACKAGE}.{a.name}") for a in node.names)
      else:
        out.append((node.lineno, target))
  return [(line, m) for line, m in out if m == PACKAGE or m.startswith(PACKAGE + ".")]


def find_violations(root: pathlib.Path = ROOT) -> list[tuple[str, int, str, str]]:
  """Checks every module under `root/tkre_jax`.

  Returns:
    `(file relative to root, line, importing module, imported module)` for each import of a
    higher layer, of another package of the same layer, or of an unknown package; and for each
    module that lies in no layer (`imported module` is then empty).
  """
  found = []
  for path in sorted((root / PACKAGE).rglob("*.py")):
    rel = path.relative_to(root).as_posix()
    module = _module_name(path, root)
    unit = _unit(module)
    if unit is None:
      continue  # tkre_jax/__init__.py
    if unit not in LAYERS:
      found.append((rel, 1, module, ""))
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for line, imported in _imports(tree, module, path.name == "__init__.py"):
      target = _unit(imported)
      if target is None or target == unit or target == SHARED_BOTTOM:
        continue
      if target not in LAYERS or LAYERS[target] >= LAYERS[unit]:
        found.append((rel, line, module, imported))
  return found


def _describe(v: tuple[str, int, str, str]) -> str:
  rel, line, module, imported = v
  if not imported:
    return f"{rel}: {module} is in no layer (add it to LAYERS in tests/test_layers.py)"
  unit, target = _unit(module), _unit(imported)
  if target not in LAYERS:
    why = f"{target!r} is in no layer"
  elif LAYERS[target] > LAYERS[unit]:
    why = f"layer {target!r} is above {unit!r}"
  else:
    why = f"{target!r} and {unit!r} are independent packages of the same layer"
  return f"{rel}:{line}: {module} imports {imported} ({why})"


def _matches(v: tuple[str, int, str, str], entry: tuple[str, str]) -> bool:
  rel, _, _, imported = v
  file, package = entry
  return rel == file and (imported == package or imported.startswith(package + "."))


def test_no_upward_imports():
  violations = [_describe(v) for v in find_violations()
                if not any(_matches(v, entry) for entry in ALLOWED)]
  assert not violations, "imports against the layer contract:\n" + "\n".join(violations)


def _plant(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    p = root / PACKAGE / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text), encoding="utf-8")
  return root


def test_checker_catches_planted_upward_imports(tmp_path):
  root = _plant(tmp_path, {
      "__init__.py": "",
      "text.py": "import re\n",
      "config.py": "from tkre_jax import text\n",
      "data/__init__.py": "",
      "data/corpus.py": """\
          from tkre_jax.data import schema
          from tkre_jax import config as config_lib
          from tkre_jax.text import normalize_text

          def f():
            from tkre_jax.llm.validate import word_ngrams
            return word_ngrams
          """,
      "data/schema.py": "from . import corpus\nfrom ..stages import run\n",
      "eval/metrics.py": "import tkre_jax.model.encoder\n",
      "llm/stage.py": "from tkre_jax.infer import extractor\nfrom tkre_jax.data import corpus\n",
      "tasks/losses.py": "from tkre_jax.data.features import SPAN_CONTEXT\nfrom tkre_jax.train import step\n",
      "train/trainer.py": "from tkre_jax.train import optim\nfrom tkre_jax.tasks import losses\n",
      "stages/__init__.py": "from tkre_jax import main\n",
      "misc/util.py": "x = 1\n",
  })
  got = [_describe(v) for v in find_violations(root)]
  assert got == [
      "tkre_jax/data/corpus.py:6: tkre_jax.data.corpus imports tkre_jax.llm.validate "
      "(layer 'llm' is above 'data')",
      "tkre_jax/data/schema.py:2: tkre_jax.data.schema imports tkre_jax.stages "
      "(layer 'stages' is above 'data')",
      "tkre_jax/eval/metrics.py:1: tkre_jax.eval.metrics imports tkre_jax.model.encoder "
      "('model' and 'eval' are independent packages of the same layer)",
      "tkre_jax/llm/stage.py:1: tkre_jax.llm.stage imports tkre_jax.infer "
      "('infer' and 'llm' are independent packages of the same layer)",
      "tkre_jax/misc/util.py: tkre_jax.misc.util is in no layer (add it to LAYERS in "
      "tests/test_layers.py)",
      "tkre_jax/stages/__init__.py:1: tkre_jax.stages imports tkre_jax.main "
      "(layer 'main' is above 'stages')",
      "tkre_jax/train/trainer.py:2: tkre_jax.train.trainer imports tkre_jax.tasks "
      "(layer 'tasks' is above 'train')",
  ]


def test_text_imports_nothing_from_the_package():
  tree = ast.parse((ROOT / PACKAGE / "text.py").read_text(encoding="utf-8"))
  assert _imports(tree, f"{PACKAGE}.text", False) == []
