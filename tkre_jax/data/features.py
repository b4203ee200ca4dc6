"""From `RelationInstance`s to fixed-length, span-annotated model inputs.

Each instance is rendered with entity markers with punctuation (Zhou and Chen, 2022, "An Improved
Baseline for Sentence-level Relation Extraction", the marker style TKRE fine-tunes with):

  typed:   `@ * person * Bill Gates @ founded # ^ organization ^ Microsoft #`
  untyped: `@ Bill Gates @ founded # Microsoft #`

The marked words are joined with single spaces and tokenized by a Hugging Face fast tokenizer with
character offsets; every sub-word token inherits the role of the word it comes from. The roles are
the `span_ids` of docs/architecture.md:

  0 SPAN_NEVER    padding, [CLS]/[SEP], entity markers and the type words inside them
  1 SPAN_CONTEXT  other sentence tokens
  2 SPAN_SUBJECT  subject entity tokens
  3 SPAN_OBJECT   object entity tokens
  4 SPAN_RELATION tokens strictly between the two entities (the "relation span" of TKRE's MSLM)

Truncation never cuts an entity: the window always holds both marked entities; when they are too far
apart, tokens are removed from the middle of the relation span and the instance is counted.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from tkre_jax.data.schema import DataError, RelationInstance
from tkre_jax.progress import Progress

# `span_ids` values (the one definition; `tasks.masking` and `tasks.losses` import them).
SPAN_NEVER = 0
SPAN_CONTEXT = 1
SPAN_SUBJECT = 2
SPAN_OBJECT = 3
SPAN_RELATION = 4
NUM_SPAN_KINDS = 5

SUBJ_MARKER, SUBJ_TYPE_MARKER = "@", "*"
OBJ_MARKER, OBJ_TYPE_MARKER = "#", "^"

FEATURE_KEYS = ("input_ids", "attention_mask", "span_ids", "subj_pos", "obj_pos", "label")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """How instances become model inputs.

  Attributes:
    max_seq_len: total length in tokens, [CLS] and [SEP] included.
    typed_markers: put the entity types inside the markers when an instance has them.
  """
  max_seq_len: int = 128
  typed_markers: bool = True

  def __post_init__(self):
    if self.max_seq_len < 16:
      raise ValueError(f"max_seq_len must be >= 16, got {self.max_seq_len}")


@dataclasses.dataclass
class FeatureStats:
  """Counts gathered while featurizing a split (reported in meta.json)."""
  num_instances: int = 0
  num_truncated: int = 0          # context cut at the sides
  num_relation_span_cut: int = 0  # tokens removed from the middle of the relation span
  max_tokens_seen: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _type_words(entity_type: Optional[str]) -> list[str]:
  return entity_type.replace("_", " ").lower().split() if entity_type else []


def marked_words(inst: RelationInstance, typed: bool = True) -> tuple[list[str], list[int]]:
  """Inserts entity markers into the word sequence.

  Returns:
    (words, roles): the marked word list and one role (a SPAN_* value) per word. The first `@` word
    is the subject start marker, the first `#` word after the sentence's subject/object ordering is
    the object start marker (positions are found by `marker_word_positions`).
  """
  s0, s1 = inst.subj
  o0, o1 = inst.obj
  lo, hi = (s1, o0) if s0 < o0 else (o1, s0)  # strictly-between region, in word indices

  def entity(is_subj: bool) -> tuple[list[str], list[int]]:
    start, end = inst.subj if is_subj else inst.obj
    marker, type_marker = (SUBJ_MARKER, SUBJ_TYPE_MARKER) if is_subj else (OBJ_MARKER, OBJ_TYPE_MARKER)
    etype = inst.subj_type if is_subj else inst.obj_type
    role = SPAN_SUBJECT if is_subj else SPAN_OBJECT
    words = [marker]
    if typed and etype:
      words += [type_marker, *_type_words(etype), type_marker]
    roles = [SPAN_NEVER] * len(words)
    words += list(inst.tokens[start:end])
    roles += [role] * (end - start)
    words.append(marker)
    roles.append(SPAN_NEVER)
    return words, roles

  words: list[str] = []
  roles: list[int] = []
  i = 0
  n = len(inst.tokens)
  while i < n:
    if i == s0:
      w, r = entity(True)
      i = s1
    elif i == o0:
      w, r = entity(False)
      i = o1
    else:
      w = [inst.tokens[i]]
      r = [SPAN_RELATION if lo <= i < hi else SPAN_CONTEXT]
      i += 1
    words += w
    roles += r
  return words, roles


def _word_char_starts(words: Sequence[str]) -> np.ndarray:
  starts = np.zeros(len(words), dtype=np.int64)
  pos = 0
  for i, w in enumerate(words):
    starts[i] = pos
    pos += len(w) + 1
  return starts


class Featurizer:
  """Tokenizes, marks, annotates and truncates instances.

  Args:
    tokenizer: a Hugging Face *fast* tokenizer (it must return offset mappings).
    label_map: relation name -> class id.
    config: `FeatureConfig`.

  Raises:
    ValueError: the tokenizer is not a fast tokenizer.
  """

  def __init__(self, tokenizer, label_map: Mapping[str, int], config: FeatureConfig = FeatureConfig()):
    if not getattr(tokenizer, "is_fast", False):
      raise ValueError("Featurizer needs a fast tokenizer (character offsets); got "
                       f"{type(tokenizer).__name__}")
    self.tokenizer = tokenizer
    self.label_map = dict(label_map)
    self.config = config
    self.cls_id = tokenizer.cls_token_id
    self.sep_id = tokenizer.sep_token_id
    self.pad_id = tokenizer.pad_token_id

  def __call__(self, instances: Sequence[RelationInstance], *, allow_unknown_labels: bool = False,
               stats: Optional[FeatureStats] = None, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Featurizes `instances`.

    Returns:
      dict with `input_ids`, `attention_mask`, `span_ids`: int32[n, max_seq_len]; `subj_pos`,
      `obj_pos` (indices of the `@` and `#` start markers), `label`: int32[n] (-1 for a relation
      missing from the label map when `allow_unknown_labels`).

    Raises:
      DataError: a relation missing from the label map (unless allowed), an entity that tokenizes to
        nothing, or entities so long that they cannot fit in `max_seq_len` together.
    """
    stats = stats if stats is not None else FeatureStats()
    n = len(instances)
    L = self.config.max_seq_len
    out = {
        "input_ids": np.full((n, L), self.pad_id, np.int32),
        "attention_mask": np.zeros((n, L), np.int32),
        "span_ids": np.zeros((n, L), np.int32),
        "subj_pos": np.zeros((n,), np.int32),
        "obj_pos": np.zeros((n,), np.int32),
        "label": np.zeros((n,), np.int32),
    }
    with Progress(n, "featurize", "instance", enabled=n > batch_size) as bar:
      for b in range(0, n, batch_size):
        chunk = instances[b:b + batch_size]
        marked = [marked_words(inst, self.config.typed_markers) for inst in chunk]
        texts = [" ".join(words) for words, _ in marked]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False)
        for j, inst in enumerate(chunk):
          i = b + j
          ids, roles, subj_pos, obj_pos = self._one(inst, marked[j], enc["input_ids"][j],
                                                     enc["offset_mapping"][j], stats)
          out["input_ids"][i, :len(ids)] = ids
          out["attention_mask"][i, :len(ids)] = 1
          out["span_ids"][i, :len(ids)] = roles
          out["subj_pos"][i] = subj_pos
          out["obj_pos"][i] = obj_pos
          label = self.label_map.get(inst.relation)
          if label is None:
            if not allow_unknown_labels:
              raise DataError(f"{inst.source or '<instance>'}: relation {inst.relation!r} is "
                              f"not in the label map ({len(self.label_map)} relations)")
            label = -1
          out["label"][i] = label
        bar.update(len(chunk))
    stats.num_instances += n
    return out

  def _one(self, inst, marked, ids, offsets, stats):
    words, word_roles = marked
    where = inst.source or "<instance>"
    starts = _word_char_starts(words)
    tok_starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    word_of_tok = np.searchsorted(starts, tok_starts, side="right") - 1
    roles = np.asarray(word_roles, np.int32)[word_of_tok]
    ids = np.asarray(ids, np.int32)

    # Marker word indices: the subject `@` and object `#` opening markers.
    subj_open = _find_marker(words, word_roles, SUBJ_MARKER, SPAN_SUBJECT)
    obj_open = _find_marker(words, word_roles, OBJ_MARKER, SPAN_OBJECT)
    subj_close = _find_close(words, word_roles, subj_open, SUBJ_MARKER)
    obj_close = _find_close(words, word_roles, obj_open, OBJ_MARKER)
    first_tok = {w: t for t, w in reversed(list(enumerate(word_of_tok)))}
    for name, role in (("subject", SPAN_SUBJECT), ("object", SPAN_OBJECT)):
      if not np.any(roles == role):
        raise DataError(f"{where}: the {name} entity produces no tokens")
    s_tok, o_tok = first_tok[subj_open], first_tok[obj_open]
    s_end, o_end = first_tok[subj_close] + 1, first_tok[obj_close] + 1

    budget = self.config.max_seq_len - 2
    stats.max_tokens_seen = max(stats.max_tokens_seen, len(ids) + 2)
    if len(ids) > budget:
      win_lo, win_hi = min(s_tok, o_tok), max(s_end, o_end)
      keep = np.ones(len(ids), bool)
      if win_hi - win_lo > budget:
        # Remove tokens from the middle of the relation span until the window fits.
        excess = (win_hi - win_lo) - budget
        between = np.nonzero(roles[win_lo:win_hi] == SPAN_RELATION)[0] + win_lo
        if len(between) < excess:
          raise DataError(f"{where}: the two entities need {win_hi - win_lo} tokens with markers, "
                          f"more than max_seq_len - 2 = {budget}")
        mid = len(between) // 2
        cut = between[mid - excess // 2: mid - excess // 2 + excess]
        keep[cut] = False
        stats.num_relation_span_cut += 1
        keep[:win_lo] = False
        keep[win_hi:] = False
      else:
        spare = budget - (win_hi - win_lo)
        lo = max(0, min(win_lo - spare // 2, len(ids) - budget))
        keep[:lo] = False
        keep[lo + budget:] = False
      stats.num_truncated += 1
      new_index = np.cumsum(keep) - 1
      s_tok, o_tok = int(new_index[s_tok]), int(new_index[o_tok])
      ids, roles = ids[keep], roles[keep]
    ids = np.concatenate([[self.cls_id], ids, [self.sep_id]]).astype(np.int32)
    roles = np.concatenate([[SPAN_NEVER], roles, [SPAN_NEVER]]).astype(np.int32)
    return ids, roles, s_tok + 1, o_tok + 1


def _find_marker(words, roles, marker, entity_role) -> int:
  for i in range(len(words) - 1):
    if words[i] == marker and roles[i] == SPAN_NEVER:
      # The opening marker is followed (after optional type words) by an entity token.
      j = i + 1
      while j < len(words) and roles[j] == SPAN_NEVER and words[j] != marker:
        j += 1
      if j < len(words) and roles[j] == entity_role:
        return i
  raise AssertionError(f"opening marker {marker!r} not found")  # marked_words always inserts it


def _find_close(words, roles, open_idx, marker) -> int:
  for i in range(open_idx + 1, len(words)):
    if words[i] == marker and roles[i] == SPAN_NEVER:
      j = i - 1
      if roles[j] in (SPAN_SUBJECT, SPAN_OBJECT):
        return i
  raise AssertionError(f"closing marker {marker!r} not found")


def decode_spans(tokenizer, features: Mapping[str, np.ndarray], row: int) -> dict[str, str]:
  """Human-readable view of one featurized row (for tests and debugging)."""
  ids = features["input_ids"][row]
  spans = features["span_ids"][row]
  out = {}
  for name, role in (("subject", SPAN_SUBJECT), ("object", SPAN_OBJECT), ("relation", SPAN_RELATION)):
    out[name] = tokenizer.decode(ids[spans == role].tolist())
  out["text"] = tokenizer.decode(ids[features["attention_mask"][row] == 1].tolist())
  return out
