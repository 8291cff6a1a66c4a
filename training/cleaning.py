"""Text cleaning: pure per-document functions (deduplication across documents is ``training.dedup``).

Everything here is deterministic and free of I/O, so the Ray Data workers that run these functions
in ``map_batches`` compute exactly the same thing on every node and every run. That determinism is
what lets an unchanged input reproduce the same dataset hash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
from datasketch import MinHash

from genloop.training.config import DataConfig

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
TOO_MANY_SYMBOLS = "too_many_symbols"
REPEATED_LINES = "repeated_lines"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
#: Every reason a document can be dropped for, in the order the checks run.
DROP_REASONS = (TOO_SHORT, TOO_LONG, TOO_MANY_SYMBOLS, REPEATED_LINES, EXACT_DUPLICATE, NEAR_DUPLICATE)

TRAIN: Literal["train"] = "train"
VALIDATION: Literal["validation"] = "validation"

# Fixed so that signatures computed in different worker processes, on different days, compare.
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"

# --- normalisation ----------------------------------------------------------------------------

# Whitespace (not newlines) that follows a visible character: collapsing only these keeps the
# leading indentation, which carries meaning in code (Python blocks, nested lists).
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC, unified newlines, single inner spaces, no trailing spaces, at most one blank line.

    Newlines survive because code and poetry carry meaning in their line structure; the same
    text typed on two systems (CRLF vs LF, composed vs decomposed accents) becomes one string,
    so exact deduplication sees it as one document.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_INNER_SPACE.sub(" ", line).rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


# --- PII scrubbing ----------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
# Candidates only; ipaddress decides. The dot in the lookahead keeps "::ffff:1.2.3.4" whole.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:.])")
# International numbers start with "+"; national ones need the area-exchange-line shape
# (555-123-4567, (555) 123 4567, 020 7946 0958), so dates, versions and plain counts never match.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5}"
    r"|(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{4}"
    r")(?![\w-]|\.\d)"
)


def _ipv6_or_keep(match: re.Match[str]) -> str:
    candidate = match.group(0)
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return candidate
    groups = [g for g in candidate.split(":") if g]
    # Short forms such as "::1" or slice syntax "x[1::2]" are valid addresses but no one's data.
    if len(groups) >= 3 or any(len(g) == 4 for g in groups):
        return "<IP>"
    return candidate


def _phone_or_keep(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    return "<PHONE>" if 7 <= digits <= 15 else match.group(0)


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers with placeholders.

    E-mails go first (they contain dots and digits), IPv4 before IPv6 (mapped addresses),
    phones last; a model trained on the result cannot regurgitate someone's contact details.
    """
    text = _EMAIL.sub("<EMAIL>", text)
    text = _IPV4.sub("<IP>", text)
    text = _IPV6.sub(_ipv6_or_keep, text)
    return _PHONE.sub(_phone_or_keep, text)


# --- quality filters --------------------------------------------------------------------------


def symbol_share(text: str) -> float:
    """Share of characters that are symbols (Unicode S*) or invisible controls (C*, bar tab/newline).

    Binary junk decoded as text, ASCII art and emoji spam score high; prose and code score low,
    because punctuation (P*) does not count.
    """
    if not text:
        return 0.0
    odd = sum(1 for c in text if c not in "\n\t" and unicodedata.category(c)[0] in "SC")
    return odd / len(text)


def repeated_line_share(text: str) -> float:
    """Share of non-blank lines whose exact text occurs more than once in the document.

    Boilerplate ("Share this", menus, log spam) repeats whole lines; lines keep their
    indentation, so code's recurring "return" at different depths is not mistaken for it.
    """
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    counts = Counter(lines)
    return sum(n for n in counts.values() if n > 1) / len(lines)


def quality_drop_reason(text: str, data: DataConfig) -> str | None:
    """The first quality filter the (normalised) document fails, or None when it passes them all."""
    if len(text) < data.min_chars:
        return TOO_SHORT
    if len(text) > data.max_chars:
        return TOO_LONG
    if symbol_share(text) > data.max_symbol_share:
        return TOO_MANY_SYMBOLS
    if repeated_line_share(text) > data.max_repeated_line_share:
        return REPEATED_LINES
    return None


def clean(text: str, data: DataConfig) -> tuple[str, str | None]:
    """Normalise (and scrub, if configured) one document; also say why to drop it, if so.

    Scrubbing happens before hashing, so the content hash and the near-duplicate signature
    describe exactly the text that ends up in the dataset.
    """
    text = normalise(text)
    if data.scrub_pii:
        text = scrub_pii(text)
    return text, quality_drop_reason(text, data)


# --- identity and split -----------------------------------------------------------------------


def content_hash(text: str) -> str:
    """sha256 of the cleaned text: the document's identity across sources and versions."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(doc_hash: str, validation_fraction: float) -> Literal["train", "validation"]:
    """Train or validation, decided by the content hash alone.

    A document therefore lands on the same side in every dataset version, so a model is never
    validated on text an earlier version trained on.
    """
    return VALIDATION if int(doc_hash[:8], 16) / 2**32 < validation_fraction else TRAIN


GATE: Literal["gate"] = "gate"
SELECTION: Literal["selection"] = "selection"
HeldOutPart = Literal["gate", "selection"]
# A third of the validation split is the selection part: a training run's validation (early
# stopping, the checkpoint it keeps) needs a few dozen blocks; the gate's sets are the rest.
SELECTION_SHARE = 1 / 3


def held_out_part(doc_hash: str) -> HeldOutPart:
    """Which part of the validation split a document is in: "gate", what the evaluation gate scores,
    or "selection", what training and search choose checkpoints and settings on.

    Disjoint, so the gate's verdict stays a test on text nothing was chosen on; decided by the
    content hash alone (bits ``split_of`` does not read), so a document is in the same part in
    every dataset version and every lineage.
    """
    return SELECTION if int(doc_hash[8:16], 16) / 2**32 < SELECTION_SHARE else GATE


# --- near duplicates --------------------------------------------------------------------------


def shingles(text: str, shingle_words: int) -> set[bytes]:
    """Lower-cased word n-grams; a document shorter than n words is one shingle."""
    words = text.lower().split()
    if len(words) <= shingle_words:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + shingle_words]).encode("utf-8") for i in range(len(words) - shingle_words + 1)}


def minhash_signatures(texts: Sequence[str], num_perm: int, shingle_words: int) -> list[np.ndarray]:
    """MinHash signatures (uint32 arrays of length num_perm); bulk reuses the permutations."""
    sets = [sorted(shingles(t, shingle_words)) for t in texts]
    sketches = MinHash.generator(sets, num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    return [m.hashvalues for m in sketches]
