"""Made-up prose for the cleaning and deduplication tests: random words from a small vocabulary, so two
documents share shingles only where a test makes them."""

from __future__ import annotations

import random

VOCAB = (
    "river stone window garden letter morning silver engine harbour market candle forest paper "
    "winter bridge yellow orchard signal travel quiet planet copper meadow lantern basket voice "
    "summer valley thunder pocket mirror castle ribbon desert anchor violet harvest shadow"
).split()


def prose(seed: int, words: int = 80, end: str = ".") -> str:
    """``words`` words drawn by ``seed``, ending with ``end``."""
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words)) + end
