"""The tokeniser and the vocabulary: normalisation, counting, specials, encode/decode, save/load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.errors import UserError
from store.text import SPECIALS, Vocabulary, normalize_caption, tokenize


def test_normalize_lowercases_strips_punctuation_and_collapses_whitespace():
    assert normalize_caption("  A Dog,   running!\tOn the BEACH.  ") == "a dog running on the beach"


def test_tokenize_keeps_inner_apostrophes_and_hyphens():
    assert tokenize("The man\u2019s T-shirt isn't red") == ["the", "man's", "t-shirt", "isn't", "red"]


def test_tokenize_keeps_accented_and_non_latin_letters():
    assert tokenize("Un café, naïve Straße; собака_кот") == ["un", "café", "naïve", "straße", "собака", "кот"]


def test_tokenize_normalises_unicode_compatibility_forms():
    assert tokenize("ＤＯＧ ﬁsh") == ["dog", "fish"]  # full-width letters, ligature


def test_punctuation_only_caption_has_no_tokens():
    assert normalize_caption(" ... !? ") == ""


@given(st.text())
def test_normalize_is_idempotent(text):
    once = normalize_caption(text)
    assert normalize_caption(once) == once


def test_build_counts_words_and_applies_min_count():
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"], ["a", "dog"]], min_count=2)
    assert vocab.itos == [*SPECIALS, "a", "dog"]  # "cat" seen once


def test_build_orders_by_frequency_then_alphabetically():
    vocab = Vocabulary.build([["b", "a", "c", "c"]], min_count=1)
    assert vocab.itos[len(SPECIALS) :] == ["c", "a", "b"]


def test_encode_maps_unknown_words_to_unk_and_decode_stops_at_end():
    vocab = Vocabulary.build([["a", "dog"]], min_count=1)
    ids = vocab.encode(["a", "zebra", "dog"])
    assert ids == [vocab.stoi["a"], vocab.unk_id, vocab.stoi["dog"]]
    stream = [vocab.start_id, *ids, vocab.end_id, vocab.stoi["a"], vocab.pad_id]
    assert vocab.decode(stream) == ["a", "<unk>", "dog"]


def test_save_and_load_round_trip(tmp_path):
    vocab = Vocabulary.build([["ein", "hund", "über"]], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_load_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no vocabulary"):
        Vocabulary.load(tmp_path / "vocab.json")


def test_vocabulary_without_specials_first_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(["a", "<pad>"]))
    with pytest.raises(UserError, match="must start with"):
        Vocabulary.load(tmp_path / "vocab.json")
