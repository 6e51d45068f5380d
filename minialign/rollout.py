"""Rollouts for online RL (GRPO; PPO shares them): which prompts a rank samples at a step, sampling
them with the KV-cache sampler, and the tensors the losses need.

A rollout of optimizer step s on rank r:
  1. prompts: this rank's share of the step's `prompts_per_step` prompts, from the same data order
     as every other script (engine.step_batches: a pure function of (seed, step)); rank r takes the
     r-th slice of the step's global prompts;
  2. sampling: `num_generations` completions per prompt (the G completions of a prompt contiguous),
     sampled by minialign.generation.generate (each prompt prefilled once, its KV cache copied G
     times, then one cached position per token) at the TRAINING temperature. The sampler's log-probs are those of softmax(logits / T),
     so they are the "old" log-probs of the PPO/GRPO ratio: recomputing them with
     generation.response_logps at the same T gives the same numbers up to float rounding (ratio 1);
  3. reward fields: the prompt's fields plus whether each response finished (emitted <|im_end|>),
     its length and the budget (minialign.rewards.ROLLOUT_FIELDS).

Determinism without sampler state: the sampler of each generate() call is seeded from
(seed, step, index of the call's first prompt in the step's global prompt list). Nothing needs saving
for an exact --resume (the step number is enough, as for the data order), and with
`prompts_per_generate` dividing each rank's share the same completions are drawn whatever the number
of ranks, so a 2-process run reproduces a 1-process run with the same global batch. (A generator
carried from step to step would need every rank's state in the checkpoint, which only rank 0 writes.)

Training forward, "shared_prompt" layout (`group_logps`): the G completions of a prompt go through
the model as ONE packed row [x | y_1 | ... | y_G], the prompt computed once instead of G times (the
DPO shared-prompt layout of minialign.preference, for G responses); the log-probs equal the plain
layout's [x y_i] rows to float error (tested). With 64-token prompts and 32-token answers, G = 4, a
group is 192 tokens instead of 384.

Simplified on purpose: one rollout per optimizer step (no rollout buffer spanning several steps);
top-k / top-p are not offered (they would make the rollout off-policy, see minialign.generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import engine
from .data import collate_prompts, segment_attention_mask, tokenize_prompts
from .generation import generate, response_logps
from .model import last_token_scores


def step_prompt_indices(n_prompts: int, step: int, prompts_per_step: int, seed: int, rt) -> list[int]:
    """Indices of this rank's prompts for optimizer step `step` (rank r gets global positions
    [r * share, (r + 1) * share) of the step, share = prompts_per_step / world_size)."""
    if prompts_per_step % rt.world_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} must be divisible by the number of ranks ({rt.world_size})")
    order = SimpleNamespace(micro_batch_size=prompts_per_step // rt.world_size, grad_accum=1, seed=seed, group_by_length=False)
    return engine.step_batches(n_prompts, step, order, rt)[0]


def sampling_seed(seed: int, step: int, first_prompt: int) -> int:
    """Seed of the sampler for the generate() call starting at global prompt `first_prompt` of `step`."""
    return int(np.random.SeedSequence([seed, step, first_prompt]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Rollout:
    rows: list[dict]  # the prompt record of each completion (tokenize_prompts dicts), G copies per prompt
    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) bool, True = real token
    response_ids: torch.Tensor  # (B, N) long, pad after each row's end
    response_mask: torch.Tensor  # (B, N) bool, True up to and including <|im_end|> (all N if truncated)
    logps: torch.Tensor  # (B, N) float32, sampling log-probs under softmax(logits / temperature); 0 off the mask
    finished: torch.Tensor  # (B,) bool, True where the response ended with <|im_end|>
    completions: list[str]  # decoded responses (special tokens dropped)
    group_size: int  # G, completions per prompt
    max_new_tokens: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,) tokens, <|im_end|> included


def _pad_cols(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    n = width - x.shape[1]
    return F.pad(x, (n, 0) if left else (0, n), value=value) if n else x


@torch.no_grad()
def sample_rollout(model, tok, prompts: list[dict], num_generations: int, max_new_tokens: int, temperature: float,
                   seed: int, step: int, first_prompt: int, prompts_per_generate: int = 0) -> Rollout:
    """Sample `num_generations` responses for each prompt (dicts with "prompt_ids", from tokenize_prompts).

    `model` is the bare CausalLM (engine.unwrap it). `first_prompt` is the global index of prompts[0]
    in the step (rank * share). prompts_per_generate: prompts per generate() call (0 = all at once);
    see the module docstring for why it matters under DDP. `tok` needs pad_id, eos_id and decode().
    """
    if temperature <= 0:
        raise ValueError(f"RL sampling needs temperature > 0 (got {temperature}): greedy rollouts have no log-probs to train on")
    device = next(model.parameters()).device
    chunk = prompts_per_generate or len(prompts)
    parts = []
    for start in range(0, len(prompts), chunk):
        group = prompts[start : start + chunk]
        p_ids, p_mask = collate_prompts([p["prompt_ids"] for p in group], tok.pad_id)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)  # (b, P), one row per prompt
        gen = torch.Generator(device=device).manual_seed(sampling_seed(seed, step, first_prompt + start))
        g = generate(model, p_ids, p_mask, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, generator=gen,
                     num_samples=num_generations)  # (b * G) rows, prompt-major
        parts.append((p_ids.repeat_interleave(num_generations, 0), p_mask.repeat_interleave(num_generations, 0), g))
    P = max(p.shape[1] for p, _, _ in parts)
    N = max(g.response_ids.shape[1] for _, _, g in parts)
    response_ids = torch.cat([_pad_cols(g.response_ids, N, tok.pad_id, False) for _, _, g in parts])  # (B, N)
    response_mask = torch.cat([_pad_cols(g.response_mask, N, False, False) for _, _, g in parts])
    return Rollout(
        rows=[p for p in prompts for _ in range(num_generations)],
        prompt_ids=torch.cat([_pad_cols(p, P, tok.pad_id, True) for p, _, _ in parts]),  # (B, P)
        prompt_mask=torch.cat([_pad_cols(m, P, False, True) for _, m, _ in parts]),
        response_ids=response_ids,
        response_mask=response_mask,
        logps=torch.cat([_pad_cols(g.logps, N, 0.0, False) for _, _, g in parts]),
        finished=torch.cat([g.finished for _, _, g in parts]),
        completions=[tok.decode(ids[m].tolist()) for ids, m in zip(response_ids, response_mask)],
        group_size=num_generations,
        max_new_tokens=max_new_tokens,
    )


def disable_dropout(model):
    """Dropout 0 everywhere (RL needs the same log-probs at sampling and training time)."""
    model.cfg.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0  # Attention passes it to scaled_dot_product_attention
    return model


def frozen(model, rt):
    """A model that only scores (reference, reward model): no dropout, eval mode, no gradients, on the device."""
    return disable_dropout(model).to(rt.device).eval().requires_grad_(False)


def load_reward_model(path: str, rt, prog: str):
    """A frozen ScalarModel from a train_rm.py folder; a causal checkpoint is refused naming --reward_model."""
    kind = engine.load_checkpoint(path)["model_kind"]
    if kind != "scalar":
        raise SystemExit(f"{prog}: error: --reward_model {path} holds a {kind} model, not a reward model (train_rm.py output)")
    return frozen(engine.load_model(path, kind="scalar"), rt)


def rows_per_micro_batch(micro_batch_size: int, group_size: int = 0) -> int:
    """Rows per micro-batch: micro_batch_size, or with packed groups (group_size > 0) whole groups, at least one."""
    return max(1, micro_batch_size // group_size) * group_size if group_size else micro_batch_size


def load_rl_prompts(path: str, tok, max_prompt_len: int, sources, stats: dict | None = None) -> list[dict]:
    """RL prompts from `path`, checked and tokenized (tokenize_prompts dicts); over-long ones dropped and counted.

    Raises MissingFieldError naming "path:line" when a line lacks a field that a reward function in
    `sources` reads, and ValueError when no prompt fits in max_prompt_len tokens.
    """
    from .formats import load_prompts
    from .rewards import check_fields

    records = load_prompts(path)
    check_fields(sources, [{"prompt_text": r.prompt[-1]["content"], **r.fields} for r in records],
                 locations=[f"{path}:{r.line}" for r in records])
    prompts = tokenize_prompts(records, tok, max_prompt_len, stats)
    if not prompts:
        raise ValueError(f"none of the {len(records)} prompts in {path} fits in --max_len - --max_new_tokens = {max_prompt_len} tokens")
    return prompts


def reward_fields(ro: Rollout) -> tuple[list[str], dict[str, list]]:
    """(prompts, fields) for the reward functions: the prompt texts and, per completion, every field
    the prompt records share (not the token ids) plus the rollout fields of minialign.rewards."""
    keys = set(ro.rows[0]).intersection(*ro.rows[1:]) - {"prompt_ids", "prompt_text"}
    fields = {k: [r[k] for r in ro.rows] for k in sorted(keys)}
    fields["finished"] = ro.finished.tolist()
    fields["completion_length"] = ro.lengths.tolist()
    fields["max_completion_length"] = [ro.max_new_tokens] * len(ro.rows)
    return [r["prompt_text"] for r in ro.rows], fields


def _row_chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def pack_groups(prompt_ids, prompt_mask, response_ids, response_mask, group_size: int) -> dict:
    """Rows in groups of G that share a prompt -> one packed row [x | y_1 | ... | y_G] per group.

    prompt_ids, prompt_mask (R, P) left-padded; response_ids, response_mask (R, N) right-padded;
    R = B * G with rows b*G .. b*G + G - 1 sharing prompt b. One group, prompt length 2, responses of
    2, 1 and 2 tokens (G = 3):

        column        0   1   2   3   4   5   6
        token         x0  x1  a0  a1  b0  c0  c1
        position_ids  0   1   2   3   2   2   3      <- every response starts at position P
        segment       0   0   1   1   2   3   3      (attention: the prompt and its own response, causally;
                                                      minialign.data.segment_attention_mask)
    The logits of column P - 1 (x1) predict the FIRST token of every response (a0, b0, c0); those of a
    response's own column j predict its token j + 1; a response's last column predicts nothing.

    Returns input_ids, position_ids (B, T) long; attention_mask (B, T, T) bool; head_mask (B, T) bool
    (the columns whose logits are needed); source (R, N) long: for each response token, the index of
    the column predicting it among head_mask's True columns in row-major order (0 off the mask).
    """
    R, N = response_ids.shape
    G = group_size
    if R % G:
        raise ValueError(f"{R} rows are not groups of {G}")
    B = R // G
    grouped_ids, grouped_mask = prompt_ids.view(B, G, -1), prompt_mask.view(B, G, -1)
    if not (bool((grouped_ids == grouped_ids[:, :1]).all()) and bool((grouped_mask == grouped_mask[:, :1]).all())):
        raise ValueError("the rows of a group must share their prompt (rows b*G .. b*G + G - 1 = prompt b)")
    p_len, r_len = prompt_mask.sum(-1).tolist(), response_mask.sum(-1).tolist()
    T = max(p_len[b * G] + sum(r_len[b * G : (b + 1) * G]) for b in range(B))
    device = prompt_ids.device
    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    position_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    segment = torch.full((B, T), -1, dtype=torch.long, device=device)
    column = torch.zeros(R, N, dtype=torch.long)  # packed column predicting each response token
    head = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        P = p_len[b * G]
        if P == 0:
            raise ValueError(f"group {b}: empty prompt")
        input_ids[b, :P] = prompt_ids[b * G, prompt_ids.shape[1] - P :]
        position_ids[b, :P] = torch.arange(P)
        segment[b, :P] = 0
        head[b, P - 1] = True
        start = P
        for j in range(G):
            r, L = b * G + j, r_len[b * G + j]
            input_ids[b, start : start + L] = response_ids[r, :L]
            position_ids[b, start : start + L] = torch.arange(P, P + L)
            segment[b, start : start + L] = j + 1
            column[r, 0] = b * T + P - 1
            column[r, 1:L] = b * T + torch.arange(start, start + L - 1)
            head[b, start : start + L - 1] = True
            start += L
    index = head.flatten().long().cumsum(0) - 1  # packed column -> its row among the head's outputs
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": segment_attention_mask(segment),
            "head_mask": head.to(device), "source": index[column].clamp(min=0).to(device)}


def group_logps(model, prompt_ids, prompt_mask, response_ids, response_mask, group_size: int, temperature: float = 1.0):
    """generation.response_logps for rows in groups sharing a prompt, through one packed row per group.

    Same arguments (plus G) and the same (R, N) float32 result, 0 where response_mask is False; the
    prompt goes through the model once per group instead of G times. Gradients flow unless no_grad.
    """
    from .losses import token_logps

    packed = pack_groups(prompt_ids, prompt_mask, response_ids, response_mask, group_size)
    logits = model(packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"],
                   logits_mask=packed["head_mask"])  # (M, V): only the columns that predict a response token
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps(logits[packed["source"]], response_ids).masked_fill(~response_mask, 0.0)  # (R, N)


def policy_logps(model, batch: dict, temperature: float, group_size: int = 0) -> torch.Tensor:
    """(R, N) response log-probs of a micro-batch: packed per group when group_size > 0, else one row each."""
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
    if group_size:
        return group_logps(model, *args, group_size, temperature)
    return response_logps(model, *args, temperature)


@torch.no_grad()
def rollout_logps(model, ro: Rollout, temperature: float, micro_batch_size: int, group_size: int = 0) -> torch.Tensor:
    """(B, N) log-probs of the rollout's responses under `model` (e.g. the reference) at `temperature`.

    group_size > 0: the shared-prompt layout, micro-batches of whole groups (micro_batch_size // G, at least one).
    """
    parts = []
    for s in _row_chunks(len(ro.rows), rows_per_micro_batch(micro_batch_size, group_size)):
        batch = {"prompt_ids": ro.prompt_ids[s], "prompt_mask": ro.prompt_mask[s], "response_ids": ro.response_ids[s],
                 "response_mask": ro.response_mask[s]}
        parts.append(policy_logps(model, batch, temperature, group_size))
    return torch.cat(parts)


@torch.no_grad()
def reward_model_scores(reward_model, ro: Rollout, micro_batch_size: int) -> torch.Tensor:
    """(B,) scores of a ScalarModel at each response's last token (<|im_end|> if it finished).

    The input is prompt (left-padded) + response (right-padded); the model's attention mask skips both
    paddings and its positions restart after the left padding, so each score is that of the unpadded
    sequence. (Written here because no shared reward-model scoring helper exists yet.)
    """
    out = []
    for s in _row_chunks(len(ro.rows), micro_batch_size):
        ids = torch.cat([ro.prompt_ids[s], ro.response_ids[s]], dim=1)  # (b, P + N)
        mask = torch.cat([ro.prompt_mask[s], ro.response_mask[s]], dim=1)
        out.append(last_token_scores(reward_model(ids, mask), mask))
    return torch.cat(out).float()


def micro_batches(tensors: dict[str, torch.Tensor], micro_batch_size: int, order: list[int] | None = None) -> list[dict]:
    """Cut row-aligned tensors into micro-batches of `micro_batch_size` rows (in `order` if given).

    Each micro-batch is trimmed to the columns it uses: prompt tensors ("prompt_ids", "prompt_mask")
    lose left-padding columns that are padding in every row, the other 2-D tensors (response-shaped)
    lose right columns past the longest response (by "response_mask"). Neither changes any result:
    positions are counted from each row's first real token, and attention is causal.
    """
    B = tensors["response_mask"].shape[0]
    idx = torch.as_tensor(order if order is not None else range(B))
    batches = []
    for s in _row_chunks(B, micro_batch_size):
        rows = idx[s]
        b = {k: v[rows] for k, v in tensors.items()}
        first_real = int(b["prompt_mask"].any(0).nonzero()[0])
        n_resp = int(b["response_mask"].sum(-1).max())
        for k, v in b.items():
            if k in ("prompt_ids", "prompt_mask"):
                b[k] = v[:, first_real:]
            elif v.dim() == 2:
                b[k] = v[:, :n_resp]
        batches.append(b)
    return batches


def all_gather_rows(x: torch.Tensor, rt) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor in rank order (all ranks must pass the same shape)."""
    if not rt.ddp:
        return x
    device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    parts = [torch.empty_like(x, device=device) for _ in range(rt.world_size)]
    dist.all_gather(parts, x.to(device).contiguous())
    return torch.cat(parts).to(x.device)


def all_reduce_max(x: float, rt) -> float:
    if not rt.ddp:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
