"""Property-based tests (hypothesis) of caption cleaning and the tokeniser: what must hold for
every caption, not only the examples in test_vocab.py and test_prepare.py.

The degenerate-caption rule is checked against an independent restatement of its definition:
a token repeated 3+ times in a row, or (captions of 4+ tokens) one word making up half or more.
"""

from __future__ import annotations

import random
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from prepare.dataset import caption_problem, degenerate_reason, prepare
from store.manifest import read_manifest
from store.text import SPECIALS, Vocabulary, normalize_caption, tokenize

EXAMPLES = settings(max_examples=200, deadline=None)

# text with the characters captions really contain: letters of several scripts, digits,
# apostrophes (straight and curly), hyphens, underscores, punctuation, every kind of space
caption_text = st.text(
    alphabet=st.one_of(
        st.characters(categories=["L", "N", "P", "Z", "S", "M"]),
        st.sampled_from(list("aAbBzZ09'’-_ \t\n.,;!?\"()éÉßİıǅﬁＤ")),
    ),
    max_size=80,
)
words = st.from_regex(r"[a-z0-9]+(?:['-][a-z0-9]+)?", fullmatch=True)
separators = st.sampled_from(
    [" ", "  ", "\t", "\n", ", ", ". ", "! ", " ... ", " (", ") ", "; ", ' "', '" ', " - ", " _ "]
)


def is_degenerate(tokens: list[str]) -> bool:
    """The rule prepare applies (a token three times in a row, or one word making up half a caption
    of 4 or more), written independently of prepare.dataset."""
    three_in_a_row = any(tokens[i] == tokens[i + 1] == tokens[i + 2] for i in range(len(tokens) - 2))
    dominant = len(tokens) >= 4 and 2 * max(Counter(tokens).values()) >= len(tokens)
    return three_in_a_row or dominant


# --- the tokeniser -----------------------------------------------------------------------------


@EXAMPLES
@given(caption_text)
def test_tokens_are_nonempty_lowercase_words_without_whitespace(text):
    for token in tokenize(text):
        assert token and token == token.lower()
        assert not any(c.isspace() for c in token)
        assert token[0].isalnum() and token[-1].isalnum()  # punctuation only inside ...
        assert all(c.isalnum() or c in "'-" for c in token)  # ... and only ' and -


@EXAMPLES
@given(caption_text)
def test_cleaning_is_idempotent(text):
    cleaned = normalize_caption(text)
    assert normalize_caption(cleaned) == cleaned
    assert tokenize(cleaned) == tokenize(text)
    assert cleaned == " ".join(tokenize(text)) and "  " not in cleaned
    assert cleaned == cleaned.strip()


@EXAMPLES
@given(caption_text)
def test_compatibility_forms_give_the_same_tokens(text):
    """Full-width letters, ligatures, superscripts: typed differently, the same words."""
    assert tokenize(unicodedata.normalize("NFKC", text)) == tokenize(text)
    assert tokenize(unicodedata.normalize("NFD", text)) == tokenize(text)


@EXAMPLES
@given(st.lists(words, max_size=12), st.lists(separators, min_size=13, max_size=13), st.booleans())
def test_words_survive_any_punctuation_and_case(word_list, seps, shout):
    text = "".join(sep + word for sep, word in zip(seps, word_list, strict=False)) + seps[-1]
    assert tokenize(text.upper() if shout else text) == word_list


# --- the degenerate rule and caption_problem ---------------------------------------------------

small_vocabulary = st.lists(st.sampled_from(["a", "dog", "kettle", "the", "red"]), max_size=12)


@EXAMPLES
@given(small_vocabulary)
def test_degenerate_reason_matches_its_definition(tokens):
    reason = degenerate_reason(tokens)
    assert (reason is not None) == is_degenerate(tokens)
    if reason:
        word = reason.split("'")[1]
        assert word in tokens  # the reason names the offending word


@EXAMPLES
@given(small_vocabulary, st.integers(min_value=1, max_value=10))
def test_caption_problem_rules_and_their_order(tokens, max_length):
    problem = caption_problem(tokens, max_length)
    if not tokens:
        expected = "empty"
    elif is_degenerate(tokens):
        expected = "degenerate"
    elif len(tokens) > max_length:
        expected = "too_long"
    else:
        expected = None
    assert (problem[0] if problem else None) == expected


@EXAMPLES
@given(small_vocabulary)
def test_degenerate_rule_is_stable_under_renaming_words(tokens):
    """Only the pattern of repeats matters, not which words repeat."""
    rename = {"a": "x1", "dog": "x2", "kettle": "x3", "the": "x4", "red": "x5"}
    renamed = [rename[t] for t in tokens]
    assert (degenerate_reason(tokens) is None) == (degenerate_reason(renamed) is None)


# --- the vocabulary ----------------------------------------------------------------------------


@EXAMPLES
@given(st.lists(caption_text, min_size=1, max_size=8), st.integers(min_value=1, max_value=3), st.data())
def test_encode_decode_round_trip_for_known_words(texts, min_count, data):
    token_lists = [tokenize(t) for t in texts]
    vocab = Vocabulary.build(token_lists, min_count=min_count)
    counts = Counter(t for tokens in token_lists for t in tokens)

    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    assert len(set(vocab.itos)) == len(vocab)
    assert set(vocab.itos[len(SPECIALS) :]) == {w for w, c in counts.items() if c >= min_count}

    known = vocab.itos[len(SPECIALS) :]
    sentence = data.draw(st.lists(st.sampled_from(known), max_size=10)) if known else []
    ids = vocab.encode(sentence)
    assert all(len(SPECIALS) <= i < len(vocab) for i in ids)
    assert vocab.decode([vocab.start_id, *ids, vocab.end_id, *ids]) == sentence
    assert vocab.decode(ids + [vocab.pad_id] * 3) == sentence

    rare = [w for w, c in counts.items() if c < min_count]
    assert vocab.encode(rare) == [vocab.unk_id] * len(rare)


@settings(max_examples=50, deadline=None)
@given(st.lists(caption_text, min_size=1, max_size=6))
def test_vocabulary_file_round_trip(texts):
    vocab = Vocabulary.build([tokenize(t) for t in texts], min_count=1)
    with tempfile.TemporaryDirectory() as folder:
        vocab.save(Path(folder) / "vocab.json")
        assert Vocabulary.load(Path(folder) / "vocab.json") == vocab


# --- the same rules, end to end through prepare ------------------------------------------------


def test_prepare_keeps_exactly_the_captions_the_rules_allow(tmp_path, tiny_images, write_csv):
    """300 random captions through `prepare`: every kept caption is cleaned, idempotent, not
    degenerate and short enough; every dropped one is dropped for the rule that applies."""
    rng = random.Random(8)
    pool = ["a", "dog", "Dog,", "kettle", "the", "red!", "t-shirt", "man's", "  ", "...", "café"]
    names = [f"img{i}.png" for i in range(30)]
    tiny_images(tmp_path / "data", names)
    rows, raw = [["image", "caption"]], []
    for i in range(300):
        caption = " ".join(rng.choice(pool) for _ in range(rng.randint(0, 9)))
        raw.append((names[i % 30], caption))
        rows.append([names[i % 30], caption])
    write_csv(tmp_path / "data" / "captions.csv", rows)
    report = prepare(tmp_path / "data", tmp_path / "work", min_word_count=1, max_length=7)

    kept = {(r.id, c) for r in read_manifest(tmp_path / "work") for c in r.captions}
    dropped = Counter(e["rule"] for e in report["dropped_captions"])
    expected_kept, expected_dropped = set(), Counter()
    for image, caption in raw:
        tokens = tokenize(caption)
        rule = (
            "empty"
            if not tokens
            else "degenerate"
            if is_degenerate(tokens)
            else "too_long"
            if len(tokens) > 7
            else None
        )
        if rule is None and (image, " ".join(tokens)) in expected_kept:
            rule = "duplicate"
        if rule:
            expected_dropped[rule] += 1
        else:
            expected_kept.add((image, " ".join(tokens)))
    # images left without any caption are dropped whole, with their (zero) captions
    no_caption = {e["image"] for e in report["dropped_images"] if e["rule"] == "no_caption"}
    assert kept == {(i, c) for i, c in expected_kept if i not in no_caption}
    assert dropped == expected_dropped and sum(dropped.values()) > 50  # the sample has teeth
    for _, caption in kept:
        assert normalize_caption(caption) == caption and len(caption.split()) <= 7
