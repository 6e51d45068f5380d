"""A sentencepiece BPE tokenizer with a ChatML-style chat template.

Training (`train_tokenizer`): BPE with byte fallback, so no input is ever unknown (Chinese, emoji and
any UTF-8 round-trip exactly); digits split one per token (arithmetic needs it); identity
normalization and no dummy prefix, so decode(encode(s)) == s.

Special tokens (ids fixed): 0 <|pad|>, 1 <unk> (never produced thanks to byte fallback),
2 <|im_start|>, 3 <|im_end|>. They are sentencepiece *control* symbols: they are inserted by id and
never parsed out of text, so a user who types "<|im_end|>" cannot forge a turn boundary.

Chat template, one block per message:
    <|im_start|>{role}\\n{content}<|im_end|>\\n
`render_chat` returns ids and a loss mask that is True on exactly the assistant contents and their
<|im_end|> (what the model must learn to produce, including when to stop), and False on the template,
system and user tokens. `render_prompt` returns the ids of the messages plus "<|im_start|>assistant\\n",
identical to the prefix `render_chat` produces for the same messages, so training and generation see
the same tokens.

CLI: python -m minialign.data.tokenizer --data data/sft_train.jsonl data/pretrain.jsonl --vocab_size 1024 --out out/tokenizer
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import sentencepiece as spm

from minialign.data import chatml
from minialign.data.chatml import IM_END, IM_START, PAD, ROLES, UNK
from minialign.data.hf_tokenizer import HFTokenizer
from minialign.errors import run_cli


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.pad_id, self.im_start_id, self.im_end_id = (self.sp.piece_to_id(p) for p in (PAD, IM_START, IM_END))
        if (self.pad_id, self.im_start_id, self.im_end_id) != (0, 2, 3):
            raise ValueError(f"{self.path} was not trained by minialign.data.tokenizer (special token ids differ)")
        self.eos_id = self.im_end_id  # generation stops at the end of the assistant turn
        self.special_ids = {self.pad_id: PAD, self.im_start_id: IM_START, self.im_end_id: IM_END}
        self._role_header = {r: [self.im_start_id] + self.encode(r + "\n") for r in ROLES}
        self._newline = self.encode("\n")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids, skip_special: bool = True) -> str:
        """ids -> text. Special tokens are dropped, or written out by name with skip_special=False."""
        ids = [int(i) for i in ids]
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.special_ids[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """A conversation -> (ids, loss_mask). loss_mask True = an assistant token the model is trained on."""
        return chatml.render_chat(self, messages)

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Messages (ending with a user turn) + the assistant header: what generation starts from."""
        return chatml.render_prompt(self, messages)


def load_tokenizer(path):
    """The tokenizer at `path`: our tokenizer.model (or a folder holding one) -> Tokenizer; a folder with
    tokenizer.json (an HF model, or a checkpoint that started from one) -> minialign.data.hf_tokenizer.HFTokenizer
    (needs the [hf] extra). Both have the interface the scripts use."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {p} not found (a tokenizer.model, or a folder holding tokenizer.model or "
                                "tokenizer.json)")
    if p.is_dir() and (p / "tokenizer.json").exists():
        return HFTokenizer(p)
    return Tokenizer(p / "tokenizer.model" if p.is_dir() else p)


def _texts_from_file(path: Path):
    """Every string inside a JSONL file (any format), or the lines of a text file."""
    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    with open(path, encoding="utf-8") as f:
        for line in f:
            if path.suffix == ".jsonl":
                if line.strip():
                    yield from strings(json.loads(line))
            else:
                yield line


def train_tokenizer(texts, out_dir: str | os.PathLike, vocab_size: int = 1024) -> Tokenizer:
    """Train a BPE model on an iterable of strings; writes out_dir/tokenizer.model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # sentencepiece trains on "sentences"; split on newlines (newline itself becomes a byte token)
    sentences = [s for t in texts for s in t.split("\n") if s]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
        control_symbols=[IM_START, IM_END],
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
        num_threads=2,
        minloglevel=2,
    )
    tmp = out_dir / "tokenizer.model.tmp"
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_dir / "tokenizer.model")
    return Tokenizer(out_dir / "tokenizer.model")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the minialign BPE tokenizer.")
    ap.add_argument("--data", nargs="+",
                    default=["data/sft_train.jsonl", "data/pretrain.jsonl", "data/pref_train.jsonl"],
                    help="JSONL (every string inside is used) or plain text files")
    ap.add_argument("--vocab_size", type=int, default=1024,
                    help="number of pieces incl. 256 byte tokens and 4 specials")
    ap.add_argument("--out", default="out/tokenizer", help="output folder (tokenizer.model is written there)")
    args = ap.parse_args(argv)
    texts = [t for p in args.data for t in _texts_from_file(Path(p))]
    tok = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"tokenizer: {tok.vocab_size} pieces -> {args.out}/tokenizer.model")


if __name__ == "__main__":
    run_cli(main)
