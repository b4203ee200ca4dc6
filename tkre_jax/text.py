"""Text utilities shared by `tkre_jax.data`, `tkre_jax.llm` and `tkre_jax.eval`.

This is the bottom of the package: it imports nothing from `tkre_jax`. It holds the one
implementation of

* text normalisation (`normalize_text`) and word n-grams (`word_ngrams`), the two views of a text
  that the leakage checks compare;
* entity search in free text (`find_mentions`, `best_pair`, `find_entity_pair`), used to place
  the subject and object of an LLM generation inside its text;
* the leakage index (`LeakageIndex`): evaluation (dev/test) texts indexed for the "equal text"
  and "shared n-gram" checks of the generate stage and of the pre-training corpus;
* the names of the "no relation" class (`NO_RELATION_NAMES`, `find_no_relation`).

Normalisation. A text is lower-cased and split into words (`\\w+`) and single punctuation marks;
the tokens are joined with one space. Whitespace differences vanish, and so does the question of
whether punctuation was split off: corpora are stored tokenized (`Paris , France .`) while an LLM
writes `Paris, France.`; both normalise to `paris , france .`, so a generated copy of a dev/test
sentence is caught either way.
"""

from __future__ import annotations

import re
from typing import Collection, Iterable, Mapping, NamedTuple, Optional, Union

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")

NO_RELATION_NAMES = ("no_relation", "na", "other")


# ------------------------------------------------------------------------------------------
# Normalisation and n-grams


def normalize_text(text: str) -> str:
  """Normalises a text for equality tests (see the module docstring).

  Returns:
    the lower-cased words and punctuation marks of `text`, joined with single spaces, e.g.
    `"  Paris,\\tFrance. "` -> `"paris , france ."`; `""` for a blank text.
  """
  return " ".join(_TOKEN.findall(text.lower()))


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
  """The word n-grams of `text`, lower-cased, punctuation ignored.

  Args:
    text: any text.
    n: n-gram length in words, >= 1.

  Returns:
    the set of `n`-tuples of consecutive words; empty when the text has fewer than `n` words.

  Raises:
    ValueError: `n` is not a positive integer.
  """
  _check_n(n)
  words = _WORD.findall(text.lower())
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _check_n(n: object) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n-gram length must be a positive integer, got {n!r}")


# ------------------------------------------------------------------------------------------
# Entity search


class Mention(NamedTuple):
  """One occurrence of an entity in a text.

  Attributes:
    start, end: end-exclusive character offsets.
    whole_word: the occurrence is not glued to letters/digits/underscores on either side (a
      boundary between a word character and punctuation counts as a word boundary).
  """
  start: int
  end: int
  whole_word: bool


def _is_word(c: str) -> bool:
  return c.isalnum() or c == "_"


def _whole_word(text: str, s: int, e: int) -> bool:
  left = s == 0 or not _is_word(text[s - 1]) or not _is_word(text[s])
  right = e == len(text) or not _is_word(text[e]) or not _is_word(text[e - 1])
  return left and right


def _loose_pattern(entity: str) -> str:
  """Regex for `entity` whose inner whitespace matches any whitespace, or none next to
  punctuation (so the TACRED-tokenized `June 3 , 1931` matches `June 3, 1931`)."""
  words = entity.split()
  parts = [re.escape(words[0])]
  for prev, word in zip(words, words[1:]):
    glue = r"\s+" if _is_word(prev[-1]) and _is_word(word[0]) else r"\s*"
    parts.append(glue + re.escape(word))
  return "".join(parts)


def find_mentions(text: str, entity: str, *, loose: bool = False) -> list[Mention]:
  """Every occurrence of `entity` in `text`, overlapping ones included, in order of start.

  Args:
    text: the text searched.
    entity: the entity string.
    loose: False (default): verbatim, case-sensitive. True: case-insensitive, and whitespace
      inside the entity matches any run of whitespace, or none next to punctuation
      (`Columbia 's` matches `Columbia's`).

  Returns:
    the `Mention`s; empty when `entity` is blank or does not occur.
  """
  if not entity.strip():
    return []
  body = _loose_pattern(entity) if loose else re.escape(entity)
  pattern = re.compile("(?=(" + body + "))", re.IGNORECASE if loose else 0)
  return [Mention(m.start(1), m.end(1), _whole_word(text, m.start(1), m.end(1)))
          for m in pattern.finditer(text)]


def best_pair(subjects: Iterable[Mention],
              objects: Iterable[Mention]) -> Optional[tuple[Mention, Mention]]:
  """Chooses a subject and an object mention that do not overlap.

  Among all non-overlapping pairs, picks the one with (1) the most whole-word mentions, then
  (2) the smallest gap between the two, then (3) the earliest start, then (4) the earliest
  subject start.

  Returns:
    `(subject_mention, object_mention)`, or None when there is no non-overlapping pair.
  """
  objects = list(objects)
  best, best_key = None, None
  for s in subjects:
    for o in objects:
      if s.start < o.end and o.start < s.end:
        continue
      key = (int(not s.whole_word) + int(not o.whole_word),
             max(o.start - s.end, s.start - o.end), min(s.start, o.start), s.start)
      if best_key is None or key < best_key:
        best, best_key = (s, o), key
  return best


def find_entity_pair(text: str, subject: str, obj: str) -> Optional[tuple[Mention, Mention]]:
  """Locates a subject and an object in `text`: `find_mentions(..., loose=True)` for both,
  then `best_pair`.

  Returns:
    `(subject_mention, object_mention)`, or None when either entity is blank or not found, or
    every pair overlaps.
  """
  return best_pair(find_mentions(text, subject, loose=True), find_mentions(text, obj, loose=True))


# ------------------------------------------------------------------------------------------
# Leakage


class LeakageIndex:
  """Evaluation (dev/test) texts indexed for the two leakage checks.

  * equal: a text equal to an evaluation text after `normalize_text` (`equal`);
  * shared n-gram: a text sharing a run of `n` consecutive words with an evaluation text
    (`word_ngrams`, punctuation ignored; `shared_ngrams`).

  Args:
    texts: the evaluation texts.
    n: n-gram length in words (>= 1), or None to index for the equality check only.
    sources: optional, one label per text (e.g. the instance's `source`), named by `equal`;
      a missing or empty label reads `eval[<index>]`.

  Attributes:
    n: the n-gram length (or None).
    size: the number of texts indexed.

  Raises:
    ValueError: `n` is not None or a positive integer; `sources` and `texts` differ in length.
  """

  def __init__(self, texts: Iterable[str], n: Optional[int] = None, *,
               sources: Optional[Iterable[Optional[str]]] = None):
    if n is not None:
      _check_n(n)
    texts = list(texts)
    labels = [None] * len(texts) if sources is None else list(sources)
    if len(labels) != len(texts):
      raise ValueError(f"LeakageIndex: {len(labels)} sources for {len(texts)} texts")
    self.n = n
    self.size = len(texts)
    self._texts: dict[str, str] = {}
    self._ngrams: set[tuple[str, ...]] = set()
    for i, (text, label) in enumerate(zip(texts, labels)):
      self._texts.setdefault(normalize_text(text), label or f"eval[{i}]")
      if n is not None:
        self._ngrams.update(word_ngrams(text, n))

  def equal(self, text: str) -> Optional[str]:
    """The label of the first evaluation text equal to `text` after normalisation, or None."""
    return self._texts.get(normalize_text(text))

  def shared_ngrams(self, text: str, *,
                    exclude: Collection[tuple[str, ...]] = ()) -> set[tuple[str, ...]]:
    """The n-grams of `text` that occur in an evaluation text, less those in `exclude`.

    Raises:
      ValueError: the index was built with `n=None`.
    """
    if self.n is None:
      raise ValueError("this LeakageIndex was built without n-grams (n=None)")
    grams = word_ngrams(text, self.n) & self._ngrams
    return grams - set(exclude) if exclude else grams

  def check(self, text: str, *, ignore: Optional[str] = None) -> Optional[tuple[str, str]]:
    """Both checks on one text.

    Args:
      text: the generated text.
      ignore: another text (e.g. an EDKG explanation's seed context) whose n-grams are not held
        against `text`.

    Returns:
      None when clean, else `(reason, detail)` with reason `leak_equal` or `leak_ngram`.
    """
    if self.equal(text) is not None:
      return "leak_equal", "text equals a dev/test text (case and whitespace normalised)"
    grams = self.shared_ngrams(
        text, exclude=word_ngrams(ignore, self.n) if ignore is not None else ())
    if grams:
      g = " ".join(sorted(grams)[0])
      return "leak_ngram", f"shares {len(grams)} {self.n}-gram(s) with dev/test text, e.g. {g!r}"
    return None


# ------------------------------------------------------------------------------------------
# The no-relation class


def find_no_relation(labels: Union[Iterable[str], Mapping[str, object]]) -> Optional[str]:
  """Finds the "no relation" class among label names by name, never by id.

  Matches `no_relation`, `NA` or `Other` (`NO_RELATION_NAMES`), case-insensitively.

  Args:
    labels: label names, or a label map (its keys).

  Returns:
    the label as spelled in `labels`, or None when there is none (e.g. FewRel, Wiki80).

  Raises:
    ValueError: more than one label matches (ambiguous).
  """
  found = list(dict.fromkeys(x for x in labels if x.lower() in NO_RELATION_NAMES))
  if len(found) > 1:
    raise ValueError(f"ambiguous no-relation class: labels {found} all match")
  return found[0] if found else None
