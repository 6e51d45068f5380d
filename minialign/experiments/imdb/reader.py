"""The IMDb reviews (Maas et al. 2011, "Learning Word Vectors for Sentiment Analysis"): reader and prefixes.

Layout read (Stanford's aclImdb_v1.tar.gz, extracted or not):
    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt        one review per file, UTF-8
The label comes from the folder (pos = 1, neg = 0) and is checked against the rating in the file name
(pos: 7-10, neg: 1-4, as the dataset's README defines them); train/unsup (unlabeled), urls_*.txt, *.feat
and imdb.vocab are ignored. `read_imdb` takes the extracted aclImdb folder (or a folder holding it) or a
.tar / .tar.gz archive. A file under pos/ or neg/ whose name is not <id>_<rating>.txt, a rating that
contradicts its folder, bytes that are not UTF-8 or an empty review are errors naming the file
(archive:member for an archive). Reviews come back sorted by (split, label, id), whatever the order of
the files on disk.

Text: `clean_review` turns the reviews' HTML line breaks (<br />) into spaces and collapses whitespace.

Prefixes (Rafailov et al. 2023, Sec. 6.1: "x is a prefix of a movie review from the IMDb dataset"; App.
C.1: prefixes of length 2-8 tokens): `split_prefix(text, tok, k)` cuts a review after its first k tokens
of OUR tokenizer, so that prefix + rest == text exactly; `cut_continuation` shortens the rest to at most
`max_tokens` tokens, ending at a sentence end if one is late enough, else at a word boundary. The
experiment trains the SFT model on (prefix -> continuation) and samples continuations of held-out prefixes.

Simplified on purpose: no de-duplication of the few reviews that appear twice in the dataset.
"""

from __future__ import annotations

import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
LABELS = {"neg": 0, "pos": 1}
_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/([^/]+)$")
_NAME = re.compile(r"(\d+)_(\d+)\.txt")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class Review:
    text: str  # cleaned (clean_review)
    label: int  # 1 positive, 0 negative
    rating: int  # 1-10 from the file name
    split: str  # train | test
    id: int
    source: str  # where it came from: a file path, or archive:member


def clean_review(text: str) -> str:
    """HTML line breaks to spaces, whitespace runs to one space, stripped."""
    return _SPACE.sub(" ", _BREAK.sub(" ", text)).strip()


def _parse(split: str, folder: str, name: str, data: bytes, source: str) -> Review:
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"{source}: file name must be <id>_<rating>.txt (e.g. 0_9.txt), got {name!r}")
    rid, rating = int(m.group(1)), int(m.group(2))
    label = LABELS[folder]
    if not (7 <= rating <= 10 if label else 1 <= rating <= 4):
        raise ValueError(f"{source}: rating {rating} contradicts the folder {folder}/ (pos: 7-10, neg: 1-4)")
    try:
        text = clean_review(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text ({e})") from None
    if not text:
        raise ValueError(f"{source}: empty review")
    return Review(text, label, rating, split, rid, source)


def read_imdb(path: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, list[Review]]:
    """{split: reviews sorted by (label, id)} from an aclImdb folder or a .tar(.gz) archive of one.

    Raises FileNotFoundError when `path` does not exist, ValueError naming the file for a bad review,
    and ValueError when a requested split has no labeled review (the wrong folder was given)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IMDb data {path} not found (give the aclImdb folder or aclImdb_v1.tar.gz)")
    bad = set(splits) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)}; choose from {SPLITS}")
    out: dict[str, list[Review]] = {s: [] for s in splits}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            m = _MEMBER.search(f.relative_to(path).as_posix())
            if m and m.group(1) in out and f.is_file():
                out[m.group(1)].append(_parse(m.group(1), m.group(2), m.group(3), f.read_bytes(), str(f)))
    else:
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError as e:
            raise ValueError(f"{path}: neither a folder nor a readable .tar / .tar.gz archive ({e})") from None
        with archive:
            try:
                for member in archive:
                    m = _MEMBER.search(member.name)
                    if m and m.group(1) in out and member.isfile():
                        data = archive.extractfile(member).read()
                        out[m.group(1)].append(_parse(m.group(1), m.group(2), m.group(3), data,
                                                      f"{path}:{member.name}"))
            except (tarfile.TarError, EOFError, OSError) as e:  # a truncated or corrupt archive
                raise ValueError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from None
    for split, reviews in out.items():
        if not reviews:
            raise ValueError(f"{path}: no labeled reviews in {split}/pos or {split}/neg (expected the aclImdb layout "
                             f"aclImdb/{split}/{{pos,neg}}/<id>_<rating>.txt)")
        reviews.sort(key=lambda r: (r.label, r.id))
    return out


def split_prefix(text: str, tok, n_tokens: int) -> tuple[str, str] | None:
    """(prefix, rest) with prefix = the first n_tokens tokens of `text` decoded and prefix + rest == text; the
    cut moves back a token where decoding would split a character. None if `text` has <= n_tokens tokens."""
    ids = tok.encode(text)
    if len(ids) <= n_tokens:
        return None
    for k in range(n_tokens, 0, -1):
        prefix = tok.decode(ids[:k])
        if prefix and text.startswith(prefix):
            return prefix, text[len(prefix):]
    return None


def cut_continuation(rest: str, tok, max_tokens: int, min_fraction: float = 0.4) -> str:
    """The start of `rest` in at most max_tokens tokens: all of it if it fits, else up to its last sentence end
    (. ! ? then a space) if that keeps >= min_fraction of the characters, else up to its last space."""
    ids = tok.encode(rest)
    if len(ids) <= max_tokens:
        return rest
    k = max_tokens
    head = tok.decode(ids[:k])
    while k > 1 and not rest.startswith(head):  # a cut inside a multi-byte character
        k -= 1
        head = tok.decode(ids[:k])
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= min_fraction * len(head):
        return head[: ends[-1]]
    space = head.rstrip().rfind(" ")
    return head[:space].rstrip() if space > 0 else head


@dataclass
class Prefixed:
    prefix: str
    continuation: str  # cut_continuation of the rest ('' if none was asked for)
    review: Review


def sample_prefixes(reviews: list[Review], tok, seed: int, n: int = 0, min_tokens: int = 2, max_tokens: int = 8,
                    continuation_tokens: int = 0) -> list[Prefixed]:
    """One prefix of a uniform random length in [min_tokens, max_tokens] tokens per review, for n reviews drawn
    without replacement (0 = all, in a shuffled order), deterministic in `seed`. Reviews too short for their
    prefix (and one more token) are skipped. continuation_tokens > 0 also cuts each review's continuation."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    order = list(range(len(reviews)))
    rng.shuffle(order)
    out = []
    for i in order:
        k = rng.randint(min_tokens, max_tokens)
        cut = split_prefix(reviews[i].text, tok, k)
        if cut is None or not cut[1].strip():
            continue
        prefix, rest = cut
        cont = cut_continuation(rest, tok, continuation_tokens) if continuation_tokens else ""
        if continuation_tokens and not cont.strip():
            continue
        out.append(Prefixed(prefix, cont, reviews[i]))
        if n and len(out) == n:
            break
    return out
