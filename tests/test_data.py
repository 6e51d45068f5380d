"""Tests for minialign.data.batching: the truncation policy (every cut counted), collation, label alignment
and padding sides."""

import pytest
import torch

from minialign.data.batching import (collate_lm, collate_prompts, tokenize_preferences, tokenize_pretrain,
                                     tokenize_prompts, tokenize_sft)
from minialign.data.formats import PreferencePair, PromptRecord


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


LONG = "the cat sat on a mat and the dog ran to help " * 6


# ------------------------------------------------------------------------------------------ SFT

def test_tokenize_sft_keeps_short_conversations_whole(tok):
    conv = [user("hi"), assistant("hello")]
    stats = {}
    (ids, mask), = tokenize_sft([conv], tok, max_len=64, stats=stats)
    assert (ids, mask) == tok.render_chat(conv)
    assert stats == {"examples": 1}


def test_tokenize_sft_truncates_to_first_max_len_tokens(tok):
    conv = [user("hi"), assistant(LONG)]
    full_ids, full_mask = tok.render_chat(conv)
    max_len = 20
    assert len(full_ids) > max_len and any(full_mask[1:max_len])
    stats = {}
    (ids, mask), = tokenize_sft([conv], tok, max_len=max_len, stats=stats)
    assert ids == full_ids[:max_len] and mask == full_mask[:max_len]
    assert stats == {"truncated": 1, "examples": 1}


def test_tokenize_sft_drops_conversation_whose_prompt_fills_max_len(tok):
    keep = [user("hi"), assistant("hello")]
    drop = [user(LONG), assistant("ok")]
    prompt_len = len(tok.render_prompt(drop[:1]))
    stats = {}
    out = tokenize_sft([keep, drop], tok, max_len=prompt_len - 1, stats=stats)
    assert out == [tok.render_chat(keep)]
    assert stats == {"dropped_no_response_tokens": 1, "examples": 1}


def test_tokenize_pretrain_windows_cover_the_document(tok):
    text = LONG
    ids = tok.encode(text) + [tok.im_end_id]
    out = tokenize_pretrain([text], tok, max_len=16)
    # windows overlap by one token: window k starts where window k-1 ended, so the targets
    # (every token after each window's first) are exactly ids[1:], each predicted once
    targets = [i for chunk, _ in out for i in chunk[1:]]
    assert targets == ids[1:]
    assert all(out[k][0][0] == out[k - 1][0][-1] for k in range(1, len(out)))
    assert all(len(chunk) <= 16 and all(mask) for chunk, mask in out)
    assert out[0][0] == ids[:16]


# ---------------------------------------------------------------------------------- preferences

def test_tokenize_preferences_short_pair_is_untouched(tok):
    pair = PreferencePair([user("What is 2 + 3?")], [assistant("5")], [assistant("6, I think")], {"margin": 1.5})
    stats = {}
    (ex,) = tokenize_preferences([pair], tok, max_len=64, stats=stats)
    assert ex["prompt"] == tok.render_prompt(pair.prompt)
    # a response is its content + <|im_end|>: no assistant header (the prompt ends with it), no "\n"
    assert ex["chosen"] == tok.encode("5") + [tok.im_end_id]
    assert ex["rejected"] == tok.encode("6, I think") + [tok.im_end_id]
    assert ex["chosen"][0] != tok.im_start_id
    assert ex["margin"] == 1.5  # extra fields travel along
    assert stats == {"examples": 1}


def test_tokenize_preferences_long_prompt_keeps_its_end_and_responses_survive(tok):
    max_len = 32
    pair = PreferencePair([user(LONG)], [assistant(LONG)], [assistant("no")])
    full_prompt = tok.render_prompt(pair.prompt)
    assert len(full_prompt) > max_len // 2
    stats = {}
    (ex,) = tokenize_preferences([pair], tok, max_len=max_len, stats=stats)
    assert ex["prompt"] == full_prompt[-(max_len // 2):]  # the LAST tokens: ends with the assistant header
    assert ex["prompt"][-1:] == tok.encode("assistant\n")[-1:]
    budget = max_len - len(ex["prompt"])
    assert ex["chosen"] == (tok.encode(LONG) + [tok.im_end_id])[:budget]
    assert ex["rejected"] == tok.encode("no") + [tok.im_end_id]  # short one is not cut
    assert len(ex["prompt"]) + len(ex["chosen"]) == max_len
    assert stats == {"prompt_truncated": 1, "response_truncated": 1, "examples": 1}


def test_tokenize_preferences_responses_never_emptied(tok):
    pair = PreferencePair([user(LONG)], [assistant(LONG)], [assistant(LONG + "!")])
    for max_len in (8, 9, 17, 40):
        (ex,) = tokenize_preferences([pair], tok, max_len=max_len)
        assert len(ex["chosen"]) >= max_len // 2 and len(ex["rejected"]) >= max_len // 2
        assert len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) <= max_len


@pytest.mark.parametrize("max_prompt_len", [32, 40])
def test_tokenize_preferences_refuses_prompt_budget_that_leaves_no_response(tok, max_prompt_len):
    # max_prompt_len >= max_len would leave a budget <= 0: empty responses, or (negative budget)
    # responses cut from the END by Python's negative slicing
    pair = PreferencePair([user(LONG)], [assistant(LONG)], [assistant("no")])
    with pytest.raises(ValueError, match="max_prompt_len"):
        tokenize_preferences([pair], tok, max_len=32, max_prompt_len=max_prompt_len)


def test_tokenize_preferences_multi_turn_response(tok):
    chosen = [assistant("a"), user("more?"), assistant("b")]
    pair = PreferencePair([user("q")], chosen, [assistant("c")])
    (ex,) = tokenize_preferences([pair], tok, max_len=64)
    # prompt + chosen is exactly the rendered conversation without its final newline
    full, _ = tok.render_chat(pair.prompt + chosen)
    assert ex["prompt"] + ex["chosen"] == full[: -len(tok.encode("\n"))]
    assert ex["chosen"][-1] == tok.im_end_id


# ------------------------------------------------------------------------------------ collation

def test_collate_lm_shapes_labels_and_mask(tok):
    convs = [[user("hi"), assistant("hello there")], [user("What is 2 + 3?"), assistant("5")]]
    examples = tokenize_sft(convs, tok, max_len=64)
    lengths = [len(ids) for ids, _ in examples]
    T = max(lengths)
    batch = collate_lm(examples, tok.pad_id)
    assert batch["inputs"].shape == batch["labels"].shape == batch["label_mask"].shape == (2, T - 1)
    assert batch["label_mask"].dtype == torch.bool
    for b, (ids, mask) in enumerate(examples):
        padded = ids + [tok.pad_id] * (T - len(ids))
        assert batch["inputs"][b].tolist() == padded[:-1]
        assert batch["labels"][b].tolist() == padded[1:]  # label t = input t + 1
        assert batch["label_mask"][b].tolist() == (mask + [False] * (T - len(ids)))[1:]
        # trained labels are exactly the assistant content and <|im_end|>
        trained = [l for l, m in zip(batch["labels"][b].tolist(), batch["label_mask"][b].tolist()) if m]
        assert trained == tok.encode(convs[b][1]["content"]) + [tok.im_end_id]
    # pads are never trained
    assert not batch["label_mask"][batch["labels"] == tok.pad_id].any()


def test_collate_prompts_left_pads():
    ids, mask = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert mask.dtype == torch.bool


def test_tokenize_prompts_drops_long_prompts_with_count(tok):
    records = [PromptRecord([user("What is 2 + 3?")], {"gold_answer": "5"}), PromptRecord([user(LONG)])]
    stats = {}
    max_prompt_len = len(tok.render_prompt(records[0].prompt))
    out = tokenize_prompts(records, tok, max_prompt_len=max_prompt_len, stats=stats)
    assert len(out) == 1
    assert out[0]["prompt_ids"] == tok.render_prompt(records[0].prompt)
    assert out[0]["prompt_text"] == "What is 2 + 3?"
    assert out[0]["gold_answer"] == "5"
    assert stats == {"dropped_prompt_too_long": 1, "examples": 1}
