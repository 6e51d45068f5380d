"""The ChatML layout both tokenizers render (minialign.data.tokenizer, minialign.data.hf_tokenizer).

    <|im_start|>{role}\n{content}<|im_end|>\n      for each message; the loss mask is True on an assistant's
                                                  content and its <|im_end|>, False elsewhere

`tok` is either tokenizer: it gives encode(text), im_end_id, _role_header[role] (<|im_start|> + "role\n") and
_newline. Special-token text typed inside content is encoded as text, never as the special token.
"""

from __future__ import annotations

PAD, UNK, IM_START, IM_END = "<|pad|>", "<unk>", "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


def render_chat(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation -> (ids, loss_mask). loss_mask True = an assistant token the model is trained on."""
    ids, mask = [], []
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        header = tok._role_header[role]
        body = tok.encode(content) + [tok.im_end_id]
        trained = role == "assistant"
        ids += header + body + tok._newline
        mask += [False] * len(header) + [trained] * len(body) + [False] * len(tok._newline)
    return ids, mask


def render_prompt(tok, messages: list[dict]) -> list[int]:
    """Messages (ending with a user turn) + the assistant header: what generation starts from."""
    ids, _ = tok.render_chat(messages)
    return ids + tok._role_header["assistant"]
