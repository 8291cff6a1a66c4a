"""Which held-out set live traffic looks like: a domain classifier over prompts.

The gate weighs a candidate's gains on its held-out sets by how much of what is served now
resembles each. A classifier is trained to tell the sets' texts apart (cut to prompt-like
prefixes, the shape of live prompts) and then labels each live prompt; the shares are the
weights. This is the same test Evidently's text drift runs (a domain classifier on TF-IDF),
pointed at attribution instead of detection. Character n-grams keep it independent of any
model's tokenizer and work for code as for prose; scikit-learn does the work.
"""

from __future__ import annotations

import random

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline


def prompt_prefixes(texts: list[str], words: tuple[int, int], seed: int) -> list[str]:
    """Each text cut to a random number of its first words, in [low, high]."""
    rng = random.Random(seed)
    return [" ".join(text.split()[: rng.randint(*words)]) for text in texts if text.split()]


def traffic_shares(sets: dict[str, list[str]], live: list[str], words: tuple[int, int],
                   seed: int) -> dict[str, float]:
    """Share of ``live`` prompts that look most like each set's texts (shares sum to 1); the sets'
    texts are cut to ``words`` (monitoring.drift_prefix_words) to look like prompts."""
    names = [name for name, texts in sets.items() if texts]
    if not live or len(names) < 2:
        return {name: 1.0 / len(names) for name in names} if names else {}
    texts, labels = [], []
    for label, name in enumerate(names):
        prefixes = prompt_prefixes(sets[name], words, seed)
        texts += prefixes
        labels += [label] * len(prefixes)
    classifier = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), max_features=50_000, sublinear_tf=True),
        LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed),
    )
    classifier.fit(texts, labels)
    predicted = classifier.predict(live).tolist()
    return {name: predicted.count(label) / len(live) for label, name in enumerate(names)}
