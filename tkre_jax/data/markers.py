"""The marker format of every prepared row (TKRE fine-tunes with entity markers, `data.features`).

A prepared dataset uses ONE marker format for all its splits: typed markers
(`@ * person * Bill Gates @`) only when the K-shot training rows carry entity types (TACRED,
Wiki80) and `config.data.typed_markers` is on; otherwise untyped markers (`@ Bill Gates @`) for
every row, including LLM rows that carry types (FewRel's SCDG instances have LLM-chosen types that
its gold rows lack). With typed markers, a non-gold row lacking a type gets one (`fill_types`), so
pre-training never learns a marker format that fine-tuning and evaluation do not see.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from tkre_jax.data.schema import RelationInstance
from tkre_jax.text import normalize_text


def gold_has_types(train: Sequence[RelationInstance]) -> bool:
  """Whether the K-shot training instances carry entity types (TACRED, Wiki80: yes; FewRel: no).

  The marker format of every prepared row follows this (`config.data.typed_markers` permitting):
  typed markers only when the fine-tuning rows have types, so that pre-training never learns
  type words that fine-tuning and evaluation do not see.
  """
  return any(inst.subj_type or inst.obj_type for inst in train)


def fill_types(instances: Sequence[RelationInstance], train: Sequence[RelationInstance],
               edkg_seeds: Optional[dict] = None) -> tuple[list[RelationInstance], dict[str, int]]:
  """Gives typed markers to non-gold rows that lack a type, for data whose gold rows are typed.

  An EDKG row takes the types of the training instance it explains (same normalised text as the
  record's `context`, same subject and object); any other row lacking a type (or an EDKG row whose
  seed is not found) takes the most frequent (subject type, object type) pair of its relation
  among the training instances. Rows that already have both types are left as they are.

  Returns:
    `(instances, counts)` with counts `from_seed`, `from_relation`, `untyped` (no typed training
    instance of that relation either).
  """
  seeds: dict[tuple, tuple] = {}
  by_rel: dict[str, dict[tuple, int]] = {}
  for inst in train:
    if inst.subj_type and inst.obj_type:
      types = (inst.subj_type, inst.obj_type)
      seeds.setdefault((normalize_text(inst.text), *(normalize_text(inst.subj_text), normalize_text(inst.obj_text))), types)
      counts_rel = by_rel.setdefault(inst.relation, {})
      counts_rel[types] = counts_rel.get(types, 0) + 1
  majority = {rel: max(c.items(), key=lambda kv: kv[1])[0] for rel, c in by_rel.items()}
  counts = {"from_seed": 0, "from_relation": 0, "untyped": 0}
  out = []
  for inst in instances:
    if inst.kind == "gold" or (inst.subj_type and inst.obj_type):
      out.append(inst)
      continue
    seed = (edkg_seeds or {}).get(inst.source) if inst.kind == "edkg" else None
    types = None
    if seed is not None and seed[0] is not None:
      types = seeds.get((normalize_text(seed[0]), normalize_text(seed[1]), normalize_text(seed[2])))
    if types is not None:
      counts["from_seed"] += 1
    elif inst.relation in majority:
      types = majority[inst.relation]
      counts["from_relation"] += 1
    else:
      counts["untyped"] += 1
      out.append(inst)
      continue
    out.append(dataclasses.replace(inst, subj_type=inst.subj_type or types[0],
                                   obj_type=inst.obj_type or types[1]))
  return out, counts


def use_typed_markers(typed_markers: bool, train: Sequence[RelationInstance]) -> bool:
  """The marker format of a prepared dataset: typed when configured and the gold rows have types."""
  return bool(typed_markers) and gold_has_types(train)
