"""Shared fixtures: a tiny tokenizer trained once per session, and tiny model configs.

Everything here is sized so the whole suite runs in seconds on a 2-core CPU.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minialign.data.tokenizer import train_tokenizer
from minialign.models.decoder import CausalLM, model_config

# One intra-op thread: these models are far too small to gain from two, and on a shared 2-core machine
# a second OpenMP thread that has to wait for a core made every tiny forward ~500x slower (0.25 s vs 0.5 ms).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]  # the repository: the train_*.py scripts live here
sys.path.insert(0, str(ROOT))  # so tests can import the scripts (for their config checks and loss functions)


def run(args, cwd=ROOT, env_extra=None, timeout=240, check=True):
    """Run a command (a script in a subprocess) the way a user would, one OpenMP thread; assert it succeeded.

    Returns the CompletedProcess (stdout/stderr as text). check=False returns failures too, for tests
    of refused flags and bad input.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc

TOKENIZER_VOCAB = 400  # requested size; the corpus below supports all of it

_WORDS = ("the cat sat on a mat and the dog ran to help you with that please compute what is "
          "answer work it out happy thanks sure here how can I not able assist since could hurt "
          "someone anything else fun fact about penguins drink salt water").split()


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """A few hundred short English strings with numbers and punctuation (deterministic)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        texts.append(f"{words.capitalize()} {rng.randint(0, 999)} + {rng.randint(0, 99)}.")
    return texts


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return train_tokenizer(tiny_corpus(), tmp_path_factory.mktemp("tokenizer"), vocab_size=TOKENIZER_VOCAB)


def tiny_config(vocab_size: int = 96, **overrides):
    """The "cpu" preset shrunk: 2 layers, dim 64, 4 query heads sharing 2 KV heads (GQA)."""
    return model_config("cpu", **{"vocab_size": vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **overrides})


# the three architectures every model-level invariant is checked on
ARCHS = {
    "dense": {},
    "qk_norm": {"qk_norm": True},
    "moe": {"n_experts": 4, "n_experts_per_tok": 2},
}


def left_padded_prompts(lengths=(6, 4, 2), vocab_size: int = 96, seed: int = 20, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded with pad_id: ids (B, P) long, mask (B, P) bool."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[b, P - n:] = True
    return ids, mask


def tiny_model(seed: int = 0, vocab_size: int = 96, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny_config(vocab_size, **overrides)).eval()


@pytest.fixture
def model_cfg(tok):
    """A tiny model config whose vocabulary matches the session tokenizer."""
    return tiny_config(tok.vocab_size)


# The tiny RL problem with a known optimum, shared by the GRPO and PPO convergence tests.
class DigitTok:
    """Stands in for the tokenizer over an 8-token vocabulary: pad 0, <|im_end|> 3, text = the digits."""
    pad_id, eos_id = 0, 3

    def decode(self, ids):
        return " ".join(str(i) for i in ids if i not in (0, 3))


def answer_seven(prompts, completions, finished, **fields):
    """The known optimum: reply exactly "7" and stop (tokens [7, <|im_end|>]); anything else scores 0."""
    return [float(c == "7" and f) for c, f in zip(completions, finished)]
