"""Degeneracy measures of sampled text: how repetitive, how varied (Li et al. 2016; Welleck et al. 2019).

Over the whitespace-separated words of each completion (lower-cased):
    distinct_n  = |unique n-grams over ALL samples| / |n-grams over all samples|   (Li et al. 2016, distinct-1/2;
                  low = every sample says the same thing)
    repeat_3    = mean over samples of the fraction of a sample's 3-grams that already occurred earlier in that
                  sample (Welleck et al. 2019's seq-rep-n with n = 3, per sample; high = "the best of the best of
                  the best"); samples with no 3-gram count 0
Simplified: words, not tokenizer tokens, so the numbers do not depend on the tokenizer.
"""

from __future__ import annotations


def ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the texts (0.0 when there is no n-gram)."""
    grams = [g for t in texts for g in ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeat_rate(text: str, n: int = 3) -> float:
    """Fraction of the text's n-grams that repeat an earlier n-gram of the same text (0.0 without n-grams)."""
    grams = ngrams(text.lower().split(), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def degeneracy(texts: list[str]) -> dict:
    """{distinct_1, distinct_2, repeat_3} of a checkpoint's samples (see the module docstring)."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repeat_3": sum(repeat_rate(t, 3) for t in texts) / len(texts) if texts else 0.0}
