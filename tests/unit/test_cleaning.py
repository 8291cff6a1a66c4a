"""Each cleaning step on crafted inputs: normalisation, quality filters, PII, duplicates, split."""

from __future__ import annotations

import pytest
from prose import prose

from genloop.training.cleaning import (
    REPEATED_LINES,
    TOO_LONG,
    TOO_MANY_SYMBOLS,
    TOO_SHORT,
    TRAIN,
    VALIDATION,
    clean,
    content_hash,
    minhash_signatures,
    normalise,
    quality_drop_reason,
    repeated_line_share,
    scrub_pii,
    shingles,
    split_of,
    symbol_share,
)
from genloop.training.config import DataConfig

# --- normalisation ----------------------------------------------------------------------------


def test_normalise_composes_unicode_to_nfc():
    assert normalise("cafe\u0301") == "caf\u00e9"


def test_normalise_collapses_inner_whitespace_and_strips_line_ends():
    assert normalise("a  b\t\tc \u00a0 d   \nnext\t \n") == "a b c d\nnext"


def test_normalise_keeps_newlines_and_indentation_of_code():
    code = "def f(x):\n    if x:\n        return  1\n    return 2\n"
    assert normalise(code) == "def f(x):\n    if x:\n        return 1\n    return 2"


def test_normalise_allows_at_most_one_blank_line_and_unifies_newlines():
    assert normalise("one\r\n\r\n\r\n\r\ntwo\r\rthree\n \n\t\nfour") == "one\n\ntwo\n\nthree\n\nfour"


def test_normalise_strips_both_ends():
    assert normalise("\n\n  hello world  \n\n") == "hello world"


# --- quality filters --------------------------------------------------------------------------


CONFIG = DataConfig(min_chars=20, max_chars=200, max_symbol_share=0.3, max_repeated_line_share=0.5)


def test_good_document_passes_every_filter():
    assert quality_drop_reason("A perfectly ordinary sentence, with punctuation (and brackets).", CONFIG) is None


def test_too_short():
    assert quality_drop_reason("tiny text", CONFIG) == TOO_SHORT
    assert quality_drop_reason("x" * 20, CONFIG) is None  # the bound itself is allowed


def test_too_long():
    assert quality_drop_reason("word " * 60, CONFIG) == TOO_LONG
    assert quality_drop_reason("y" * 200, CONFIG) is None


def test_too_many_symbols_counts_symbols_and_controls_not_punctuation():
    assert symbol_share("a.b,c;d!") == 0.0
    assert symbol_share("ab\x00\x01") == 0.5
    assert symbol_share("line\nline\tx") == 0.0
    assert quality_drop_reason("$$$ ^^^ ~~~ <<< >>> ||| +++ === some words at the end", CONFIG) == TOO_MANY_SYMBOLS
    assert quality_drop_reason("Prices: 3 + 4 = 7 dollars, which is a fair price.", CONFIG) is None


def test_repeated_lines():
    boilerplate = "\n".join(["Subscribe to our newsletter"] * 3 + ["One real sentence here."])
    assert repeated_line_share(boilerplate) == 0.75
    assert quality_drop_reason(boilerplate, CONFIG) == REPEATED_LINES
    # Blank lines do not count, and indentation makes lines different.
    assert repeated_line_share("a\n\n\nb\n\n") == 0.0
    assert repeated_line_share("if x:\n    return\nelse:\n        return") == 0.0


def test_filters_report_the_first_failing_reason():
    assert quality_drop_reason("$$", CONFIG) == TOO_SHORT


# --- PII --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane.doe+news@example.co.uk now", "mail <EMAIL> now"),
        ("call +1 (555) 123-4567.", "call <PHONE>."),
        ("call 555-123-4567 or (555) 123 4567", "call <PHONE> or <PHONE>"),
        ("London +44 20 7946 0958 or 020 7946 0958", "London <PHONE> or <PHONE>"),
        ("host 192.168.1.10 replied", "host <IP> replied"),
        ("ends with 10.0.0.1.", "ends with <IP>."),
        ("v6 2001:db8::8a2e:370:7334 and fe80::1 up", "v6 <IP> and <IP> up"),
        ("full 2001:0db8:0000:0000:0000:ff00:0042:8329", "full <IP>"),
    ],
)
def test_scrub_pii_replaces(text, expected):
    assert scrub_pii(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11 and Ray 2.60.0 were released",
        "pi is 3.14159 and e is 2.71828",
        "on 2024-05-01 at 12:30:45 there were 12345 visitors",
        "1,000,000 people and 100 000 cars",
        "a slice x[1::2] and a dict {a: b}",
        "version 1.2.3.4.5 is not an address",
        "@property\ndef name(self): ...",
        "ISBN 978-3-16-148410-0",
    ],
)
def test_scrub_pii_leaves_ordinary_numbers_alone(text):
    assert scrub_pii(text) == text


def test_clean_scrubs_only_when_configured():
    text = "Write to someone@example.org about the server at 10.1.2.3 please."
    assert clean(text, DataConfig(scrub_pii=False))[0] == text
    scrubbed, _ = clean(text, DataConfig(scrub_pii=True))
    assert scrubbed == "Write to <EMAIL> about the server at <IP> please."


# --- identity and duplicates ------------------------------------------------------------------


def test_content_hash_is_sha256_of_normalised_text():
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash(normalise("two  spaces\r\n")) == content_hash(normalise("two spaces"))


def test_signatures_are_deterministic_and_case_insensitive():
    first, again, upper = minhash_signatures([prose(7), prose(7), prose(7).upper()], 64, 5)
    assert (first == again).all() and (first == upper).all()
    assert len(first) == 64


def test_short_document_is_one_shingle():
    assert shingles("Only three words", 5) == {b"only three words"}
    assert len(shingles("a b c d e f", 5)) == 2


# --- split ------------------------------------------------------------------------------------


def test_split_is_a_function_of_the_hash():
    assert split_of("0" * 64, 0.1) == VALIDATION
    assert split_of("f" * 64, 0.1) == TRAIN
    hashes = [content_hash(f"document {i}") for i in range(4000)]
    first = [split_of(h, 0.1) for h in hashes]
    assert first == [split_of(h, 0.1) for h in reversed(hashes)][::-1]
    share = first.count(VALIDATION) / len(first)
    assert 0.08 < share < 0.12


def test_raising_the_fraction_only_moves_documents_into_validation():
    hashes = [content_hash(f"doc {i}") for i in range(1000)]
    small = {h for h in hashes if split_of(h, 0.1) == VALIDATION}
    large = {h for h in hashes if split_of(h, 0.2) == VALIDATION}
    assert small < large
