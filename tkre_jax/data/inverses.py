"""Relation inverses: which label holds when the subject and object of an instance trade places.

mother(s, o) is child(o, s); spouse(s, o) is spouse(o, s) (symmetric); SemEval's X(e1,e2) on (s, o) is
X(e2,e1) on (o, s). An inverse is only ever DECLARED, never guessed from data: by a built-in table of
a data set's documented label semantics (`config.data.inverse_map="auto"`), or by a JSON file of the
user's. A relation without a declared inverse, or whose inverse is not in the label set, has none.

* `auto`: SemEval-2010's directed labels (`Name(e1,e2)` <-> `Name(e2,e1)`, from the label text),
  TACRED's (`TACRED_INVERSES`) and Wikidata's (`WIKIDATA_INVERSES`: property pairs Wikidata itself
  declares with "inverse property" (P1696), and properties it declares symmetric (P1696 to itself)).
* a file: `{"relation": "its inverse" | "symmetric", ...}`, e.g. `{"P25": "P40", "P26": "symmetric"}`.
  One direction per entry: mother -> child does not make child -> mother (a child's inverse is a
  parent, mother or father).

Users: prepare's swapped evaluation splits (`<split>_swap`, the direction metric) and its inverse
augmentation (`config.data.inverse_augment`), both through `swap`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping, Optional, Sequence

from tkre_jax.data.schema import DataError, RelationInstance

SYMMETRIC = "symmetric"
AUTO = "auto"
SWAP_SUFFIX = "_swap"      # prepared split of the swapped evaluation rows: dev_swap, test_swap
SWAP_SOURCE = "~swap"      # appended to a swapped row's source

# TACRED (Zhang et al. 2017) label semantics: per:parents(s, o) = o is a parent of s.
TACRED_INVERSES = {
    "per:parents": "per:children", "per:children": "per:parents",
    "org:parents": "org:subsidiaries", "org:subsidiaries": "org:parents",
    "per:spouse": SYMMETRIC, "per:siblings": SYMMETRIC, "per:other_family": SYMMETRIC,
}
# Wikidata properties (FewRel / Wiki80 labels) with an inverse Wikidata declares (P1696), or that it
# declares symmetric. FewRel's head is the item, the tail the value: P25 mother(s, o) = o is s's
# mother, so the swapped pair is P40 child(o, s). P40's own inverse is "parent" (P22 or P25), which
# is none of them: it has no entry.
WIKIDATA_INVERSES = {
    "P22": "P40", "P25": "P40",                 # father, mother -> child
    "P26": SYMMETRIC, "P3373": SYMMETRIC,       # spouse, sibling
    "P47": SYMMETRIC, "P530": SYMMETRIC,        # shares border with, diplomatic relation
    "P155": "P156", "P156": "P155",             # follows <-> followed by
    "P361": "P527", "P527": "P361",             # part of <-> has part
    "P1365": "P1366", "P1366": "P1365",         # replaces <-> replaced by
    "P150": "P131",                             # contains admin. entity -> located in admin. entity
    "P355": "P749", "P749": "P355",             # subsidiary <-> parent organization
}
_DIRECTED = re.compile(r"^(?P<name>.+)\((?P<a>e[12]),(?P<b>e[12])\)$")


def directed_inverse(label: str) -> Optional[str]:
  """`Cause-Effect(e1,e2)` -> `Cause-Effect(e2,e1)` (SemEval-2010's directed labels); None for a
  label without that form (`Other`)."""
  m = _DIRECTED.match(label)
  if not m or m["a"] == m["b"]:
    return None
  return f"{m['name']}({m['b']},{m['a']})"


def builtin_inverse(label: str) -> Optional[str]:
  """The inverse `auto` declares for `label` (a label, `SYMMETRIC`, or None)."""
  return directed_inverse(label) or TACRED_INVERSES.get(label) or WIKIDATA_INVERSES.get(label)


def read_inverse_file(path) -> dict[str, str]:
  """Reads a JSON inverse map `{relation: inverse | "symmetric"}`.

  Raises:
    FileNotFoundError: no such file.
    DataError: not a JSON object of strings (the message names the file and the entry).
  """
  try:
    with open(path, encoding="utf-8-sig") as fh:
      doc = json.load(fh)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not JSON ({e})") from e
  if not isinstance(doc, dict):
    raise DataError(f"{path}: an inverse map is a JSON object {{relation: inverse | "
                    f"\"symmetric\"}}, got {type(doc).__name__}")
  for key, value in doc.items():
    if not isinstance(value, str) or not value:
      raise DataError(f"{path}: entry {key!r}: the inverse must be a relation name or "
                      f"\"symmetric\", got {value!r}")
  return dict(doc)


def resolve(label_map: Mapping[str, int], declared: Mapping[str, str] | str) -> dict[str, str]:
  """relation -> its inverse relation, for the relations of `label_map` whose declared inverse is
  also in it (`SYMMETRIC` becomes the relation itself).

  Args:
    label_map: the task's labels.
    declared: `AUTO` (the built-in tables), `""` (none), or a mapping as `read_inverse_file`'s.
  """
  out = {}
  for rel in label_map:
    inv = builtin_inverse(rel) if declared == AUTO else (dict(declared or {}).get(rel)
                                                         if declared else None)
    if inv == SYMMETRIC:
      inv = rel
    if inv is not None and inv in label_map:
      out[rel] = inv
  return out


def swap(inst: RelationInstance, inverse: str) -> RelationInstance:
  """The instance with subject and object traded (spans and types) and the relation `inverse`;
  the tokens are the same, so the relation span between the entities is too. The source gets
  `SWAP_SOURCE` appended; the kind stays."""
  return dataclasses.replace(inst, subj=inst.obj, obj=inst.subj, subj_type=inst.obj_type,
                             obj_type=inst.subj_type, relation=inverse,
                             source=f"{inst.source}{SWAP_SOURCE}")


def swapped(instances: Sequence[RelationInstance],
            inverses: Mapping[str, str]) -> list[RelationInstance]:
  """The swapped copy of every instance whose relation has an inverse, in order."""
  return [swap(i, inverses[i.relation]) for i in instances if i.relation in inverses]


def instance_key(inst: RelationInstance) -> tuple:
  """What makes two instances the same row: the tokens, both spans and the relation."""
  return (inst.tokens, inst.subj, inst.obj, inst.relation)


def inverse_copies(train: Sequence[RelationInstance], inverses: Mapping[str, str],
                   eval_instances: Sequence[RelationInstance] = ()
                   ) -> tuple[list[RelationInstance], dict]:
  """The swapped training copies of inverse augmentation, with the duplicate and leakage rules.

  A copy equal (tokens, spans) to a training row or to another copy is skipped (a symmetric
  relation's copy of a pair annotated both ways, say); a copy whose (tokens, spans) is a dev/test
  instance's is skipped too (it would put an evaluation pair into training).

  Returns:
    `(copies, report)`; the report counts `copies` and the skipped rows per reason, and copies per
    relation (of the copy) and per kind (gold, scdg).
  """
  seen = {(i.tokens, i.subj, i.obj) for i in train}
  held_out = {(i.tokens, i.subj, i.obj) for i in eval_instances}
  out, report = [], {"copies": 0, "duplicate_skipped": 0, "eval_pair_skipped": 0,
                     "by_relation": {}, "by_kind": {}}
  for copy in swapped(train, inverses):
    key = (copy.tokens, copy.subj, copy.obj)
    if key in held_out:
      report["eval_pair_skipped"] += 1
      continue
    if key in seen:
      report["duplicate_skipped"] += 1
      continue
    seen.add(key)
    out.append(copy)
    report["copies"] += 1
    report["by_relation"][copy.relation] = report["by_relation"].get(copy.relation, 0) + 1
    report["by_kind"][copy.kind] = report["by_kind"].get(copy.kind, 0) + 1
  return out, report
