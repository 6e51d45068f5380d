"""The IMDb experiment's SECOND sentiment judge: a binarized multinomial naive Bayes over unigrams, calibrated.

It is of another kind than the true reward (minialign.algorithms.classifier: hashed uni+bigram logistic regression
trained by gradient descent), trained on the same train split and NEVER used for training: it only scores
evaluated checkpoints, so a method that over-optimizes the first judge's quirks shows a gap between the two.

Model (Wang & Manning 2012, "Baselines and Bigrams", binarized MNB): each review is the SET of its words
(classifier.words, the same word splitter); with Laplace smoothing α = 1 over the vocabulary V (words seen in
>= min_count train reviews),
    log P(w | c) = log (count_c(w) + 1) - log (Σ_w' count_c(w') + |V|)
    logit(x)     = log P(+)/P(-) + Σ_{w ∈ set(x) ∩ V} [log P(w | +) - log P(w | -)]
Naive Bayes is overconfident (its logits are sums of many correlated terms), so the probability is calibrated
with one scale and bias (Platt 1999) fit on 10% of the train split held out from the counts:
    P(positive | x) = σ(a · logit(x) + b)
Saved as JSON (weights by word), loaded without pickle.

Measured on the real aclImdb (trained on the 25,000 train reviews, min_count 2: 45,526 words, 2.9 s on one core;
calibration a = 0.187, b = 0.207): test-split accuracy 0.8359 on full reviews, 0.7402 on each test review's first
40 words (the true reward: 0.7548 there). On those 25,000 openings the two judges agree on the label 80.5% of the
time, Pearson r 0.763 between their probabilities: related, not the same judge. Less accurate than the true reward
(0.896 on full reviews), so read its numbers as a check of the trend, not as a better reward.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from minialign.algorithms.classifier import words

KIND = "minialign.experiments.imdb.naive_bayes/binarized-mnb"


class NaiveBayes:
    def __init__(self, weights: dict[str, float], prior_logit: float, scale: float = 1.0, bias: float = 0.0):
        self.weights, self.prior_logit, self.scale, self.bias = weights, prior_logit, scale, bias

    def logits(self, texts: list[str]) -> torch.Tensor:
        """(N,) float64 uncalibrated NB log-odds of positive."""
        w = self.weights
        return torch.tensor([self.prior_logit + sum(w.get(t, 0.0) for t in set(words(x))) for x in texts],
                            dtype=torch.float64)

    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """(N,) float64 calibrated P(positive | text)."""
        return torch.sigmoid(self.scale * self.logits(texts) + self.bias)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """A text judge (minialign.evaluation.evaluate.text_judge): P(positive | prefix + continuation), as the
        true reward reads the review."""
        return self.predict_proba([p + c for p, c in zip(prompts, completions)]).tolist()


def train_naive_bayes(texts: list[str], labels: list[int], min_count: int = 2, calib_every: int = 10) -> NaiveBayes:
    """Counts on 9 of every 10 reviews, the calibration (a, b) on the 10th (a deterministic split)."""
    fit = [i for i in range(len(texts)) if i % calib_every]
    calib = [i for i in range(len(texts)) if not i % calib_every] or fit
    counts = {0: Counter(), 1: Counter()}
    docs = Counter()
    for i in fit:
        ws = set(words(texts[i]))
        counts[labels[i]].update(ws)
        docs[labels[i]] += 1
    df = counts[0] + counts[1]
    vocab = [w for w, n in df.items() if n >= min_count]
    tot = {c: sum(counts[c][w] for w in vocab) + len(vocab) for c in (0, 1)}
    weights = {w: math.log((counts[1][w] + 1) / tot[1]) - math.log((counts[0][w] + 1) / tot[0]) for w in vocab}
    nb = NaiveBayes(weights, math.log(max(docs[1], 1) / max(docs[0], 1)))
    z = nb.logits([texts[i] for i in calib])  # (M,)
    y = torch.tensor([float(labels[i]) for i in calib], dtype=torch.float64)
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], y)
        loss.backward()
        return loss
    opt.step(closure)
    nb.scale, nb.bias = float(ab[0].detach()), float(ab[1].detach())
    return nb


def evaluate_naive_bayes(nb: NaiveBayes, texts: list[str], labels: list[int]) -> dict:
    p = nb.predict_proba(texts)
    y = torch.tensor(labels, dtype=torch.float64)
    return {"accuracy": float(((p > 0.5).double() == y).double().mean()), "n": len(texts),
            "mean_p_positive": float(p.mean())}


def save_naive_bayes(nb: NaiveBayes, path: str | Path, info: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"kind": KIND, "prior_logit": nb.prior_logit, "scale": nb.scale, "bias": nb.bias,
                               "info": info or {}, "weights": nb.weights}), encoding="utf-8")
    tmp.replace(path)


def load_naive_bayes(path: str | Path) -> NaiveBayes:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if d.get("kind") != KIND:
        raise ValueError(f"{path} is not a naive Bayes judge file (kind {d.get('kind')!r}, expected {KIND!r})")
    return NaiveBayes(d["weights"], d["prior_logit"], d["scale"], d["bias"])
