"""Hugging Face tokenizers behind minialign's Tokenizer interface, and our tokenizer written out for HF.

`HFTokenizer(folder)` reads tokenizer.json (the `tokenizers` library) and the chat template
(tokenizer_config.json's chat_template, or chat_template.jinja / chat_template.json beside it) and
offers what the scripts use from `minialign.data.tokenizer.Tokenizer`: vocab_size, pad_id, eos_id,
im_start_id, im_end_id, special_ids, encode, decode, render_chat (ids + assistant-only loss mask),
render_prompt, and the `_role_header` / `_newline` pieces data.py slices responses with.

Only ChatML templates are supported, one block per message:
    <|im_start|>{role}\\n{content}<|im_end|>\\n            generation prompt: <|im_start|>assistant\\n
optionally with a default system message injected when the conversation has none (Qwen2.5: "You are
Qwen, created by Alibaba Cloud. ...", SmolLM2: "You are a helpful AI assistant named SmolLM, ...").
This is VERIFIED at load time, not assumed: the template is rendered with jinja2 (the way transformers'
apply_chat_template does) on probe conversations, and both the text and the token ids (the rendered
text encoded whole, as transformers does) must equal ours, else the folder is refused with an error
naming tokenizer_config.json's chat_template; on ordinary text the header and the content must not
merge either (a reply encoded after its prompt must equal the whole encoding), else it is refused. Templates that do more (Qwen3's <think> handling, Llama
3 headers, tool calls) are refused rather than half supported.

How ids are made, and where they can differ from apply_chat_template(tokenize=True):
  - render_chat encodes the rendered conversation the way transformers does: the text between two
    structural special tokens is encoded in one piece, [<|im_start|>] + encode(role + "\\n" + content) +
    [<|im_end|>] + encode("\\n") per message (transformers splits the rendered text at the special tokens
    first and encodes each span alone, so this IS its whole-text encoding). The loss mask comes from the
    character offsets of that encoding: a token is an assistant token when it holds a character of the
    content (so a token a byte-level pre-tokenizer joins from the header's "\\n" and a content that starts
    with a newline, Qwen2.5's "\\n\\n", is trained, as transformers' return_assistant_tokens_mask does).
  - render_prompt = the messages + [<|im_start|>] + encode("assistant\\n"): apply_chat_template's
    generation prompt. A response appended to it (DPO, the RM, RL sampling; minialign.data.batching) is
    encode(content) + [<|im_end|>], encoded apart from the prompt as TRL does. So render_prompt(messages)
    is a prefix of render_chat(messages + reply) except when the reply STARTS with whitespace the
    pre-tokenizer joins with the header's "\\n": then the SFT ids (apply_chat_template's) and the ids a
    sampled reply would have differ in that one token, as they do in transformers.
  - special-token strings typed inside content (a user writing "<|im_end|>") stay plain text here,
    as in our sentencepiece tokenizer; transformers would parse them into the special token.
  - padding and truncation saved in tokenizer.json (transformers re-saves can write `"padding":
    {"strategy": {"Fixed": 256}}`) are switched off on load: transformers ignores them too.
  - the default system message is injected before a conversation that starts with a user turn. A list
    that starts with an assistant turn is a continuation (data.py renders responses that way) and is
    rendered without it; HF's templates would inject it there too.
The mask is True on exactly each assistant content and its <|im_end|>; eos_id = <|im_end|>.

Writing our sentencepiece tokenizer.model for HF (`write_hf_tokenizer`): a tokenizer.json with the same
vocabulary and ids (BPE merges recovered from the piece scores, as transformers' SpmConverter does,
byte fallback, " " -> "\u2581", no dummy prefix), a tokenizer_config.json (PreTrainedTokenizerFast,
eos <|im_end|>, pad <|pad|>, no BOS, the plain ChatML chat_template) and a copy of tokenizer.model.
What round-trips: encode/decode and rendered chats give the same ids in sentencepiece, in HFTokenizer
and in transformers' AutoTokenizer + apply_chat_template (tested on English, Chinese, digits, emoji),
except special-token strings typed in text, which only transformers parses.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

from minialign.data import chatml
from minialign.data.chatml import ROLES

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# the plain ChatML template (no default system message), written with our exported tokenizer
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# files that make up an HF tokenizer; copied as they are when exporting
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "generation_config.json")

# probe conversations for the load-time check: ordinary text (English, Chinese, digits, punctuation)
_PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 + 30? Answer: quickly!"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "你好，世界。请用中文回答。"},
    {"role": "assistant", "content": "好的，没问题。"},
]


def _token_content(t):
    return t.get("content") if isinstance(t, dict) else t


def read_chat_template(folder) -> str | None:
    """An HF tokenizer folder's chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if not (folder / "tokenizer_config.json").exists():
        return None
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, **special_tokens) -> str:
    """Render a chat template with jinja2 the way transformers' apply_chat_template does (sandboxed,
    trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception, strftime_now)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, documents=None, **special_tokens)


def chatml_text(messages: list[dict], add_generation_prompt: bool = False, default_system: str | None = None) -> str:
    """Our rendering as text: what a ChatML template must produce for the same messages."""
    if default_system is not None and messages and messages[0]["role"] == "user":
        messages = [{"role": "system", "content": default_system}] + list(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class HFTokenizer:
    """A ChatML tokenizer.json folder behind the interface of minialign.data.tokenizer.Tokenizer."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as _Tokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        self.path = str(folder)
        self.tk = _Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tk.no_padding()  # a saved "padding" / "truncation" would pad every encode (transformers ignores them)
        self.tk.no_truncation()
        self.tk.post_processor = None  # we never add special tokens; it would only trim offsets (render_chat's mask)
        self.tk.encode_special_tokens = True  # special-token strings in text stay text (see the module docstring)
        tcfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
        self.im_start_id, self.im_end_id = self.tk.token_to_id(IM_START), self.tk.token_to_id(IM_END)
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError(f"{folder}/tokenizer.json has no {IM_START} / {IM_END} tokens: only ChatML chat templates "
                             "are supported (tokenizer_config.json's chat_template)")
        self.eos_id = self.im_end_id  # generation stops at the end of the assistant turn
        pad = _token_content(tcfg.get("pad_token"))
        pad_id = self.tk.token_to_id(pad) if pad else None
        if pad_id is None:
            pad_id = self.tk.token_to_id("<|endoftext|>")
        self.pad_id = pad_id if pad_id is not None else self.im_end_id  # pads are masked out everywhere
        self.special_ids = {i: t.content for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self._role_header = {r: [self.im_start_id] + self.encode(r + "\n") for r in ROLES}
        self._newline = self.encode("\n")
        self.chat_template = read_chat_template(folder)
        self.default_system = None
        specials = {k: _token_content(tcfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._check_chatml(folder, specials)

    def _check_chatml(self, folder: Path, specials: dict):
        """Render the template on probe conversations; set its default system message (or None)."""
        where = f"{folder}/tokenizer_config.json's chat_template"
        if not self.chat_template:
            raise ValueError(f"{where} is missing: a ChatML template is needed to render conversations")

        def render(messages, gen):
            try:
                return render_template(self.chat_template, messages, gen, **specials)
            except Exception as e:  # a template that refuses our probe is not one we can reproduce
                raise ValueError(f"{where} failed on a plain conversation ({e}); only ChatML is supported") from e

        user_only, plain = render(_PROBE[1:2], False), chatml_text(_PROBE[1:2])
        head = re.fullmatch(re.escape(f"{IM_START}system\n") + "(.*?)" + re.escape(f"{IM_END}\n"),
                            user_only[: len(user_only) - len(plain)], flags=re.S)
        if user_only != plain and user_only.endswith(plain) and head:
            self.default_system = head.group(1)  # injected when a conversation has no system message
        for messages, gen in [(_PROBE, False), (_PROBE[:4], True), (_PROBE[1:3], False), (_PROBE[1:2], True)]:
            text = render(messages, gen)
            want = chatml_text(messages, gen, self.default_system)
            if text != want:
                raise ValueError(f"{where} is not the ChatML template minialign renders: for {messages} it gives "
                                 f"{text!r}, expected {want!r}")
            ids = self.render_prompt(messages) if gen else self.render_chat(messages)[0]
            self.tk.encode_special_tokens = False  # parse specials, as transformers does on the rendered text
            whole = self.tk.encode(text, add_special_tokens=False).ids
            self.tk.encode_special_tokens = True
            if ids != whole:
                raise ValueError(f"{folder}/tokenizer.json encodes the rendered ChatML text differently from one "
                                 "span per special token (for example a special token with lstrip/rstrip): our ids "
                                 "would differ from apply_chat_template")
            injected = ([{"role": "system", "content": self.default_system}] if self.default_system is not None
                        and messages[0]["role"] == "user" else []) + list(messages)
            pieces = chatml.render_chat(self, injected)[0] + (self._role_header["assistant"] if gen else [])
            if pieces != whole:  # header, content and reply encoded apart (minialign.data.batching's responses)
                raise ValueError(f"{folder}/tokenizer.json merges text across ChatML boundaries (for example a "
                                 "prepended dummy prefix): a response encoded after its prompt (DPO, the reward "
                                 "model, RL) would differ from apply_chat_template")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """ids -> text. Special tokens are dropped, or written out by name with skip_special=False."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """A conversation -> (ids, loss_mask): the ChatML layout of minialign.data.chatml, after the template's
        default system message when it injects one, with each "role\\n" + content span encoded in one piece as
        apply_chat_template does; loss_mask True on the tokens holding an assistant content's characters and
        on its <|im_end|> (see the module docstring)."""
        if self.default_system is not None and messages and messages[0]["role"] == "user":
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        ids, mask = [], []
        for m in messages:
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
            head = role + "\n"
            span = self.tk.encode(head + content, add_special_tokens=False)  # the span between two special tokens
            trained = role == "assistant"
            in_content = [end > len(head) for _, end in span.offsets]  # holds a character of the content
            ids += [self.im_start_id] + span.ids + [self.im_end_id] + self._newline
            mask += [False] + [trained and c for c in in_content] + [trained] + [False] * len(self._newline)
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Messages (ending with a user turn) + the assistant header: what generation starts from."""
        return chatml.render_prompt(self, messages)


def write_hf_tokenizer(sp_model_file, out_folder, model_max_length: int = 2048) -> Path:
    """Our sentencepiece tokenizer.model -> out_folder/{tokenizer.json, tokenizer_config.json, tokenizer.model}.

    BPE merges are recovered from the piece scores as transformers' SpmConverter does: for each piece,
    every split into two pieces of the vocabulary is a merge, ranked by the piece's score (sentencepiece
    BPE merges the adjacent pair whose merged piece scores highest), ties by the ids of the two halves.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    from minialign.data.chatml import PAD, UNK

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i):
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(((sp.GetScore(i), vocab[a], vocab[b], a, b) for a, b in local), key=lambda m: m[1:3])
    merges = [(a, b) for _, _, _, a, b in sorted(merges, key=lambda m: -m[0])]  # stable: ties keep id order
    tk = Tokenizer(models.BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")  # sentencepiece's whitespace escape; no dummy prefix
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.IsControl(i) or sp.IsUnknown(i)]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": IM_END, "pad_token": PAD,
        "unk_token": UNK, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {str(vocab[s]): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                                 "rstrip": False, "single_word": False} for s in specials},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    if Path(sp_model_file).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(sp_model_file, out / "tokenizer.model")
    return out


def copy_tokenizer_files(src_folder, out_folder) -> list[str]:
    """Copy an HF folder's tokenizer files (TOKENIZER_FILES that exist) into out_folder; returns their names."""
    src, out = Path(src_folder), Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in TOKENIZER_FILES if (src / n).exists()]
    for n in names:
        if (src / n).resolve() != (out / n).resolve():
            shutil.copyfile(src / n, out / n)
    return names


def export_tokenizer(source, out_folder, model_max_length: int = 2048) -> dict:
    """Write the tokenizer for an exported model; returns the bos/eos/pad token ids for its config.json.

    source: an HFTokenizer or an HF tokenizer folder (files copied), or our Tokenizer / its tokenizer.model
    / a folder holding one (converted by write_hf_tokenizer).
    """
    from tokenizers import Tokenizer

    src = Path(getattr(source, "path", source))
    out = Path(out_folder)
    if src.is_dir() and (src / "tokenizer.json").exists():
        copy_tokenizer_files(src, out)
    elif src.is_dir() and (src / "tokenizer.model").exists():
        write_hf_tokenizer(src / "tokenizer.model", out, model_max_length)
    elif src.is_file() and src.suffix == ".model":
        write_hf_tokenizer(src, out, model_max_length)
    else:
        raise FileNotFoundError(f"no tokenizer at {src}: expected an HF folder with tokenizer.json, or tokenizer.model")
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    tcfg = json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").exists() else {}
    ids = {}
    for key in ("bos", "eos", "pad"):
        name = _token_content(tcfg.get(f"{key}_token"))
        if key == "eos" and tk.token_to_id(IM_END) is not None:
            name = IM_END  # our generation stops at the end of the assistant turn
        if name and tk.token_to_id(name) is not None:
            ids[f"{key}_token_id"] = tk.token_to_id(name)
    return ids
