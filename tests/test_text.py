"""Tests for `tkre_jax.text`: normalisation, n-grams, entity search, the leakage index and the
no-relation finder."""

from __future__ import annotations

import pytest

from tkre_jax.text import (LeakageIndex, Mention, best_pair, find_entity_pair, find_mentions,
                           find_no_relation, normalize_text, word_ngrams)

# ------------------------------------------------------------------------------------------
# Normalisation and n-grams


@pytest.mark.parametrize("text,expected", [
    ("  A\t b \n", "a b"),
    ("Paris, France.", "paris , france ."),
    ("Paris , France .", "paris , france ."),
    ("Columbia's  SCHOOL", "columbia ' s school"),
    ("June 3,1931", "june 3 , 1931"),
    ("e.g. (x)", "e . g . ( x )"),
    ("", ""),
    (" \t\n", ""),
    ("Zürich ÉCOLE", "zürich école"),
])
def test_normalize_text(text, expected):
  assert normalize_text(text) == expected


def test_normalize_text_makes_tokenized_and_raw_sentences_equal():
  raw = "Tower Bridge crosses the River Thames in London, England."
  tokenized = "Tower Bridge crosses the River Thames in London , England ."
  assert normalize_text(raw) == normalize_text(tokenized)
  assert normalize_text(raw) != normalize_text("Tower Bridge crosses the Thames in London.")


def test_word_ngrams():
  assert word_ngrams("A b, c. D", 2) == {("a", "b"), ("b", "c"), ("c", "d")}
  assert word_ngrams("A b, c. D", 4) == {("a", "b", "c", "d")}
  assert word_ngrams("A b, c. D", 5) == set()
  assert word_ngrams("x x x", 2) == {("x", "x")}
  assert word_ngrams("", 1) == set()
  for bad in (0, -1, True, 2.0):
    with pytest.raises(ValueError, match="n-gram length must be a positive integer"):
      word_ngrams("a b", bad)


# ------------------------------------------------------------------------------------------
# Entity search


def test_find_mentions_verbatim_repeats_and_overlaps():
  text = "Ohio and ohio; Ohioan. OhioOhio"
  assert find_mentions(text, "Ohio") == [Mention(0, 4, True), Mention(15, 19, False),
                                         Mention(23, 27, False), Mention(27, 31, False)]
  # Overlapping occurrences are all reported.
  assert find_mentions("aaaa", "aa") == [Mention(0, 2, False), Mention(1, 3, False),
                                         Mention(2, 4, False)]
  # Punctuation next to a word is a word boundary; a regex character is matched literally.
  assert find_mentions("(C++) and C++.", "C++") == [Mention(1, 4, True), Mention(10, 13, True)]
  assert find_mentions("Ohio", "Texas") == []
  assert find_mentions("a  b", " ") == []  # a blank entity is never found


def test_find_mentions_loose():
  text = "COLUMBIA'S SCHOOL opened on June 3, 1931; columbia 's\nschool too."
  assert find_mentions(text, "Columbia 's school", loose=True) == [
      Mention(0, 17, True), Mention(42, 60, True)]
  assert find_mentions(text, "June 3 , 1931", loose=True) == [Mention(28, 40, True)]
  # Two words need whitespace between them: "New York" does not match "NewYork".
  assert find_mentions("NewYork, New  York", "New York", loose=True) == [Mention(9, 18, True)]
  assert find_mentions("Ohio", "Ohio", loose=False) == find_mentions("ohio", "Ohio", loose=True)
  assert find_mentions("ohio", "Ohio") == []


def test_best_pair_prefers_whole_words_then_closest_then_earliest():
  text = "Martin met a party guest; art loves Martin."
  subs, objs = find_mentions(text, "art", loose=True), find_mentions(text, "Martin", loose=True)
  assert [m.whole_word for m in subs] == [False, False, True, False]
  assert best_pair(subs, objs) == (Mention(26, 29, True), Mention(36, 42, True))
  # Equal gaps: the earliest start wins.
  text = "B A B"
  assert best_pair(find_mentions(text, "A"), find_mentions(text, "B")) == (
      Mention(2, 3, True), Mention(0, 1, True))
  # Same string for both: two distinct occurrences are needed.
  one = find_mentions("Only Ohio here.", "Ohio")
  assert best_pair(one, one) is None
  two = find_mentions("Ohio is a state; the Ohio river.", "Ohio")
  assert best_pair(two, two) == (Mention(0, 4, True), Mention(21, 25, True))
  assert best_pair([], two) is None


def test_find_entity_pair():
  assert find_entity_pair("In New York City.", "New York City", "New York") is None
  assert find_entity_pair("Parisians live in France.", "Paris", "France") == (
      Mention(0, 5, False), Mention(18, 24, True))
  assert find_entity_pair("Ohio and Texas.", "Ohio", "  ") is None
  assert find_entity_pair("", "Ohio", "Texas") is None


# ------------------------------------------------------------------------------------------
# Leakage index


def test_leakage_index_equal_names_the_first_source():
  index = LeakageIndex(["Paris is in France .", "paris is in  FRANCE.", "Bill Gates founded it ."],
                       sources=["dev:0", "dev:1", ""])
  assert index.size == 3 and index.n is None
  assert index.equal("PARIS is\tin\n france.") == "dev:0"
  assert index.equal("Bill Gates founded it.") == "eval[2]"
  assert index.equal("Paris is in France") is None
  assert LeakageIndex(["a b"]).equal("A  B") == "eval[0]"
  with pytest.raises(ValueError, match="built without n-grams"):
    index.shared_ngrams("Paris is in France")
  with pytest.raises(ValueError, match="2 sources for 3 texts"):
    LeakageIndex(["a", "b", "c"], sources=["x", "y"])
  with pytest.raises(ValueError, match="n-gram length must be a positive integer, got 0"):
    LeakageIndex(["a"], 0)


def test_leakage_index_ngram_hits():
  index = LeakageIndex(["a b c d e f g h i j", "k l m n"], 4)
  assert index.shared_ngrams("x a b c d y") == {("a", "b", "c", "d")}
  assert index.shared_ngrams("x A, b. c d e y") == {("a", "b", "c", "d"), ("b", "c", "d", "e")}
  assert index.shared_ngrams("x a b c d e y", exclude={("a", "b", "c", "d")}) == {
      ("b", "c", "d", "e")}
  assert index.shared_ngrams("a b c x d e f") == set()
  assert index.shared_ngrams("j k l m") == set()  # n-grams never span two indexed texts


def test_leakage_index_check():
  index = LeakageIndex(["a b c d e f g h i j"], 4)
  assert index.check("A  B c d e f g h i J") == (
      "leak_equal", "text equals a dev/test text (case and whitespace normalised)")
  assert index.check("x a b c d e y") == (
      "leak_ngram", "shares 2 4-gram(s) with dev/test text, e.g. 'a b c d'")
  assert index.check("x a b c d y", ignore="a b c d") is None
  assert index.check("x a b c d e y", ignore="a b c d")[0] == "leak_ngram"
  assert index.check("a b c x d e f") is None


# ------------------------------------------------------------------------------------------
# No-relation class


def test_find_no_relation():
  assert find_no_relation(["per:age", "no_relation"]) == "no_relation"
  assert find_no_relation(["NA", "P1"]) == "NA"
  assert find_no_relation(["Cause-Effect", "other"]) == "other"
  assert find_no_relation({"P1": 0, "No_Relation": 1}) == "No_Relation"
  assert find_no_relation(["NA", "NA"]) == "NA"
  assert find_no_relation(["P177", "P364", "not_na"]) is None
  assert find_no_relation([]) is None
  with pytest.raises(ValueError,
                     match=r"ambiguous no-relation class: labels \['NA', 'no_relation'\]"):
    find_no_relation(["NA", "no_relation"])
