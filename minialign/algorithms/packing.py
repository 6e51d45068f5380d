"""Shared-prompt packing: a prompt and its G responses in ONE row [x | y_1 | ... | y_G].

Every stage that scores responses to a prompt goes through here:
    DPO, RM     pairs: G = 2, (chosen, rejected); RM ranked groups: the K responses of one prompt
                (G_b = K, all its comparisons scored from one row; `group_pairs`)
    GRPO        groups: G = num_generations samples of one prompt
    KTO, PPO    G = 1: one response per prompt, a plain right-padded row [x | y] on the causal fast path
The prompt is computed once per row instead of G times. The plain layout of every other implementation
(one row [x y_i] per response) is this packer with G = 1 and the prompt repeated: the parity tests
compare the two (tests/test_packing.py).

One row, prompt length P = 3, responses of 2 and 3 tokens (G = 2), then padding:

    column          0   1   2   3   4   5   6   7   8
    token           x0  x1  x2  a0  a1  b0  b1  b2  pad
    position_ids    0   1   2   3   4   3   4   5   0      <- every response starts at position P
    segment         0   0   0   1   1   2   2   2   -1

    attention (query row attends to key column where 1; `segment_attention_mask`):
              x0 x1 x2 a0 a1 b0 b1 b2 pad
        x0     1  .  .  .  .  .  .  .  .
        x1     1  1  .  .  .  .  .  .  .
        x2     1  1  1  .  .  .  .  .  .
        a0     1  1  1  1  .  .  .  .  .
        a1     1  1  1  1  1  .  .  .  .
        b0     1  1  1  .  .  1  .  .  .      <- a response never sees another one
        b1     1  1  1  .  .  1  1  .  .
        b2     1  1  1  .  .  1  1  1  .
        pad    .  .  .  .  .  .  .  .  1      (a pad sees itself only, so softmax has a key)

With these positions and this mask every token's hidden state equals the one it has in its own row
[x y_i], so log-probs and scores agree with the plain layout to float error.

The shift. The logits of column P - 1 (x2, the last prompt token) predict the FIRST token of EVERY
response (a0 and b0); those of a response's own column j predict its token j + 1; a response's last
column predicts nothing (but holds its score, for a reward or value model). So each response token
gets "the column that predicts it":

    response a:  a0 <- column 2,  a1 <- column 3                   (last token a1 at column 4)
    response b:  b0 <- column 2,  b1 <- column 5,  b2 <- column 6  (last token b2 at column 7)

Only the columns that predict some response token go through the output head (`head_mask`), so a
packed row costs no more head work than the plain rows.

Label convention as everywhere: masks are bool, True = the token counts.
"""

from __future__ import annotations

import torch

from minialign.algorithms.losses import token_logps


def segment_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T, T) bool attention mask for packed rows [prompt | response | response ...].

    segment: 0 = the shared prompt, k >= 1 = the k-th response, -1 = padding. A query attends to an
    earlier-or-same key that is in the prompt or in its own response (so responses never see each
    other); a pad attends to itself only (so no softmax row is empty). True = may attend.
    """
    T = segment.shape[1]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    mask = causal[None] & (seg_q >= 0) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    return mask | torch.eye(T, dtype=torch.bool, device=segment.device)[None]


def pack(prompts: list[list[int]], responses: list[list[int]], group_size, pad_id: int) -> dict:
    """B prompts and their responses, in order (prompt b's G_b responses follow prompt b-1's) -> one packed
    row per prompt. group_size: G for every prompt, or a list of the G_b (a reward model's ranked groups).

    Returns (tensors on the CPU):
        input_ids, position_ids (B, T) long; attention_mask (B, T, T) bool, True = query row may attend to
          key column (None when every G_b = 1: plain right-padded rows need no mask and no positions);
        head_mask (B, T) bool: the columns whose logits predict a response token;
        response_ids (R, N) long (pad_id off the mask); response_mask (R, N) bool, True = a real token;
        columns (R, N) long: flat index (b * T + column) of the column predicting each response token
          (its state: the value model reads it there), 0 off the mask;
        source (R, N) long: the same columns as rows of the head's output (head_mask's True columns in
          row-major order), 0 off the mask;
        last (R,) long: flat index of each response's last token (where a reward model's score is read).
    """
    B, R = len(prompts), len(responses)
    sizes = [group_size] * B if isinstance(group_size, int) else list(group_size)
    first = [sum(sizes[:b]) for b in range(B)]  # index of prompt b's first response
    if len(sizes) != B or min(sizes, default=1) < 1 or sum(sizes) != R:
        raise ValueError(f"{R} responses for {B} prompts are not groups of {group_size}")
    groups = [responses[first[b] : first[b] + sizes[b]] for b in range(B)]
    for b, x in enumerate(prompts):
        if not x or any(not y for y in groups[b]):
            raise ValueError(f"prompt {b}: the prompt and each of its responses need at least one token")
    T = max(len(prompts[b]) + sum(len(y) for y in groups[b]) for b in range(B))
    N = max(len(y) for y in responses)
    plain = all(g == 1 for g in sizes)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # 0 prompt, j >= 1 the j-th response, -1 pad
    head = torch.zeros(B, T, dtype=torch.bool)
    response_ids = torch.full((R, N), pad_id, dtype=torch.long)
    response_mask = torch.zeros(R, N, dtype=torch.bool)
    columns = torch.zeros(R, N, dtype=torch.long)
    last = torch.zeros(R, dtype=torch.long)
    for b, x in enumerate(prompts):
        P = len(x)
        input_ids[b, :P] = torch.tensor(x)
        position_ids[b, :P] = torch.arange(P)
        segment[b, :P] = 0
        head[b, P - 1] = True  # predicts the first token of every response
        start = P
        for j, y in enumerate(groups[b]):
            r = first[b] + j
            L = len(y)
            input_ids[b, start : start + L] = torch.tensor(y)
            position_ids[b, start : start + L] = torch.arange(P, P + L)  # y_j restarts right after the prompt
            segment[b, start : start + L] = j + 1
            head[b, start : start + L - 1] = True  # y_j's own columns predict its next tokens
            columns[r, 0] = b * T + P - 1
            columns[r, 1:L] = b * T + torch.arange(start, start + L - 1)
            response_ids[r, :L] = torch.tensor(y)
            response_mask[r, :L] = True
            last[r] = b * T + start + L - 1
            start += L
    head_row = head.flatten().long().cumsum(0) - 1  # flat column -> its row among the head's outputs
    return {
        "input_ids": input_ids,
        "position_ids": None if plain else position_ids,
        "attention_mask": None if plain else segment_attention_mask(segment),
        "head_mask": head,
        "response_ids": response_ids,
        "response_mask": response_mask,
        "columns": columns.masked_fill(~response_mask, 0),
        "source": head_row[columns].clamp(min=0).masked_fill(~response_mask, 0),
        "last": last,
    }


def pack_padded(prompt_ids, prompt_mask, response_ids, response_mask, group_size: int, pad_id: int) -> dict:
    """`pack` for tensors as the sampler returns them: prompts (R, P) left-padded, responses (R, N) right-padded,
    masks bool (True = real token); rows b*G .. b*G + G - 1 share prompt b (its first copy is used)."""
    prompts = [ids[m].tolist() for ids, m in zip(prompt_ids[::group_size], prompt_mask[::group_size])]
    responses = [ids[m].tolist() for ids, m in zip(response_ids, response_mask)]
    return pack(prompts, responses, group_size, pad_id)


def response_logps(model, batch: dict, temperature: float = 1.0, logit_means: bool = False):
    """Per-token log π(y_t | x, y_<t) of every response in a packed batch -> (R, N) float32, 0 off the mask.

    One forward of `model` (a CausalLM, through forward so DDP's hooks run), the head on head_mask's
    columns only; log-softmax of logits / temperature in float32. Gradients flow unless under no_grad.
    logit_means=True also returns the mean raw logit over the vocabulary at each token's predicting
    column, (R, N) detached (TRL's logits/chosen metric).
    """
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   logits_mask=batch["head_mask"])  # (M, V): one row per head column
    mask = batch["response_mask"]
    src = batch["source"][mask]  # (K,) the head row predicting each of the K response tokens
    wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32 BEFORE the division, as the sampler
    scaled = logits.to(wide) / temperature if temperature != 1.0 else logits
    lp = token_logps(scaled[src][None], batch["response_ids"][mask][None])[0]  # (K,) float32
    out = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)  # (R, N)
    if not logit_means:
        return out
    means = logits.detach().to(lp.dtype).mean(-1)[src]  # (K,)
    return out, torch.zeros_like(out).masked_scatter(mask, means)


def response_scores(model, batch: dict) -> torch.Tensor:
    """A ScalarModel's score at each response's last token -> (R,) float32 (a reward model's reward)."""
    scores = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    return scores.flatten()[batch["last"]]  # scores (B, T) -> (R,)


def response_values(model, batch: dict) -> torch.Tensor:
    """A ScalarModel's score at the column predicting each response token -> (R, N) float32, 0 off the mask.

    For a value model: V_t = V(s_t), s_t = prompt + y_<t, read at the state's last token, the same column
    whose logits give π(y_t).
    """
    scores = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    return scores.flatten()[batch["columns"]].masked_fill(~batch["response_mask"], 0.0)  # (R, N)


# ------------------------------------------------------------------------------------------ pairs

def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Tokenized pairs (dicts with "prompt", "chosen", "rejected" id lists) -> one packed batch, G = 2.

    The packing.pack batch (B rows [x | y_c | y_r]), pairs (B, 2) long = the (chosen, rejected) response
    indices (2b, 2b + 1), and, when the pairs carry a "margin" field (all of them or none), margin (B,) float32.
    """
    batch = pack([e["prompt"] for e in examples],
                 [y for e in examples for y in (e["chosen"], e["rejected"])], 2, pad_id)
    batch["pairs"] = torch.arange(2 * len(examples)).view(-1, 2)  # (B, 2): (chosen, rejected) response indices
    with_margin = sum("margin" in e for e in examples)
    if with_margin:
        if with_margin != len(examples):
            raise ValueError(f"{with_margin} of {len(examples)} pairs have a 'margin' field: "
                             "give it to every pair or none")
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)  # (B,)
    return batch


def pair_count(batch: dict) -> int:
    """Pairs in a collate_pairs or collate_groups batch."""
    return len(batch["pairs"])


# ------------------------------------------------------------------------------ ranked groups (RM)

def group_pairs(pairs: list[dict]) -> list[dict]:
    """Tokenized pairs -> reward-model groups {prompt, responses, pairs, margins}.

    The pairs of one ranked-output record (the same fields["group"]; minialign.data.formats.rank_pairs) become
    ONE group whose K responses are listed once, with its (better, worse) index pairs (K(K-1)/2 of them,
    or K - 1); any other pair is a group of two responses with the pair (0, 1). InstructGPT (Ouyang et al.
    2022, Sec. 3.5): a prompt's comparisons are highly correlated, and shuffled as independent examples
    they overfit within an epoch; as one batch element each response is also computed only once.
    """
    groups, where = [], {}
    for i, e in enumerate(pairs):
        key = e.get("group", ("pair", i))  # a pair without a group is a group of its own
        if key not in where:
            where[key] = len(groups)
            groups.append({"prompt": e["prompt"], "responses": [], "pairs": [], "margins": []})
        g = groups[where[key]]
        if g["prompt"] != e["prompt"]:
            raise ValueError(f"the pairs of group {key} have different prompts")
        for y in (e["chosen"], e["rejected"]):
            if y not in g["responses"]:
                g["responses"].append(y)
        g["pairs"].append((g["responses"].index(e["chosen"]), g["responses"].index(e["rejected"])))
        if "margin" in e:
            g["margins"].append(float(e["margin"]))
    return groups


def collate_groups(groups: list[dict], pad_id: int) -> dict:
    """Reward-model groups (group_pairs) -> one packed row per group [x | y_1 | ... | y_K] (G_b = K_b), pairs
    (P, 2) long = the (better, worse) response indices over the batch, margin (P,) when every pair has one."""
    sizes = [len(g["responses"]) for g in groups]
    batch = pack([g["prompt"] for g in groups], [y for g in groups for y in g["responses"]], sizes, pad_id)
    offsets = [sum(sizes[:b]) for b in range(len(groups))]
    batch["pairs"] = torch.tensor([(o + i, o + j) for g, o in zip(groups, offsets) for i, j in g["pairs"]])  # (P, 2)
    margins = [m for g in groups for m in g["margins"]]
    if margins:
        if len(margins) != len(batch["pairs"]):
            raise ValueError(f"{len(margins)} of {len(batch['pairs'])} pairs have a 'margin' field: "
                             "give it to every pair or none")
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)  # (P,)
    return batch


def group_lengths(groups: list[dict]) -> list[int]:
    """Tokens each group occupies in its packed row (for length-grouped micro-batches)."""
    return [len(g["prompt"]) + sum(len(y) for y in g["responses"]) for g in groups]


def pair_lengths(examples: list[dict]) -> list[int]:
    """Tokens each pair occupies in its packed row (for length-grouped micro-batches)."""
    return [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]


def length_sorted_chunks(lengths: list[int], batch_size: int, indices=None) -> list[list[int]]:
    """Index lists of at most batch_size, by increasing length (little padding for no-grad passes)."""
    order = sorted(indices if indices is not None else range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
