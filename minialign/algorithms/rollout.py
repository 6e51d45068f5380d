"""Rollouts for online RL (PPO and GRPO): which prompts a rank samples at a step, sampling them with the
KV-cache sampler, and cutting the rollout into packed micro-batches for the training-layout forwards.

A rollout of optimizer step s on rank r:
  1. prompts: this rank's share of the step's `prompts_per_step` prompts, from the same data order
     as every other script (loop.step_batches: a pure function of (seed, step)); rank r takes the
     r-th slice of the step's global prompts;
  2. sampling: `num_generations` completions per prompt (the G completions of a prompt contiguous),
     sampled by minialign.algorithms.generation.generate (each prompt prefilled once, its KV cache copied G
     times, then one cached position per token) at the TRAINING temperature. The sampler's log-probs
     (`Rollout.logps`) are those of softmax(logits / T). They are NOT the "old" log-probs of the ratio:
     the KV-cache forward differs from the packed training forward by float rounding (under bf16
     autocast by much more), so the scripts take old log-probs from a training-layout forward and log
     the difference as a diagnostic (sampler/logp_max_abs_diff);
  3. reward fields: the prompt's fields plus whether each response finished (emitted <|im_end|>),
     its length and the budget (minialign.algorithms.reward_funcs.ROLLOUT_FIELDS).
ReMax's baseline is a `greedy_rollout`: one argmax response per prompt (a Rollout with G = 1), rewarded
by the same functions and never trained on. `step_advantages` computes a step's advantages (train_grpo.py's
--advantage_estimator) on every rank's rows; `log_completions` writes the learner-facing completions.jsonl.

Training layout: every forward over a rollout (policy, reference, value, reward model) goes through
minialign.algorithms.packing: the rows of a micro-batch (`micro_batch_rows`: whole groups of G) become one packed
row per prompt [x | y_1 | ... | y_G] (`packed_batch`; G = 1 is a plain right-padded row [x | y]), the
prompt computed once instead of G times. `rollout_forward` runs a no-grad forward over micro-batches
and puts the results back in rollout row order.

Determinism without sampler state: the sampler of each generate() call is seeded from
(seed, step, index of the call's first prompt in the step's global prompt list). Nothing needs saving
for an exact --resume (the step number is enough, as for the data order), and with
`prompts_per_generate` dividing each rank's share the same completions are drawn whatever the number
of ranks, so a 2-process run reproduces a 1-process run with the same global batch. (A generator
carried from step to step would need every rank's state in the checkpoint, which only rank 0 writes.)

Simplified on purpose: one rollout per optimizer step (no rollout buffer spanning several steps);
top-k / top-p are not offered (they would make the rollout off-policy, see minialign.algorithms.generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from minialign.algorithms import packing
from minialign.algorithms.generation import generate
from minialign.data.batching import collate_prompts, tokenize_prompts
from minialign.training import loop


def step_prompt_indices(n_prompts: int, step: int, prompts_per_step: int, seed: int, rt) -> list[int]:
    """Indices of this rank's prompts for optimizer step `step` (rank r gets global positions
    [r * share, (r + 1) * share) of the step, share = prompts_per_step / world_size)."""
    if prompts_per_step % rt.world_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} must be divisible by the {rt.world_size} ranks")
    order = SimpleNamespace(micro_batch=prompts_per_step // rt.world_size, grad_accum=1, seed=seed,
                            group_by_length=False)
    return loop.step_batches(n_prompts, step, order, rt)[0]


def sampling_seed(seed: int, step: int, first_prompt: int) -> int:
    """Seed of the sampler for the generate() call starting at global prompt `first_prompt` of `step`."""
    return int(np.random.SeedSequence([seed, step, first_prompt]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Rollout:
    rows: list[dict]  # the prompt record of each completion (tokenize_prompts dicts), G copies per prompt
    response_ids: torch.Tensor  # (R, N) long, pad after each row's end
    response_mask: torch.Tensor  # (R, N) bool, True up to and including <|im_end|> (all N if truncated)
    logps: torch.Tensor  # (R, N) float32, the SAMPLER's log-probs under softmax(logits / T); 0 off the mask
    finished: torch.Tensor  # (R,) bool, True where the response ended with <|im_end|>
    completions: list[str]  # decoded responses (special tokens dropped)
    group_size: int  # G, completions per prompt (rows b*G .. b*G + G - 1 answer prompt b)
    max_new_tokens: int
    pad_id: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (R,) tokens, <|im_end|> included


def _pad_cols(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


@torch.no_grad()
def sample_rollout(model, tok, prompts: list[dict], num_generations: int, max_new_tokens: int, temperature: float,
                   seed: int, step: int, first_prompt: int, prompts_per_generate: int = 0) -> Rollout:
    """Sample `num_generations` responses for each prompt (dicts with "prompt_ids", from tokenize_prompts).

    `model` is the bare CausalLM (runtime.unwrap it). `first_prompt` is the global index of prompts[0]
    in the step (rank * share). prompts_per_generate: prompts per generate() call (0 = all at once);
    see the module docstring for why it matters under DDP. `tok` needs pad_id, eos_id and decode().
    """
    if temperature <= 0:
        raise ValueError(f"RL sampling needs temperature > 0 (got {temperature}): greedy rollouts have no log-probs")
    device = next(model.parameters()).device

    def generator_at(start: int) -> torch.Generator:  # the sampler of the generate() call starting at prompt `start`
        return torch.Generator(device=device).manual_seed(sampling_seed(seed, step, first_prompt + start))

    return _rollout(model, tok, prompts, num_generations, max_new_tokens, temperature, prompts_per_generate,
                    generator_at)


@torch.no_grad()
def greedy_rollout(model, tok, prompts: list[dict], max_new_tokens: int, prompts_per_generate: int = 0) -> Rollout:
    """One greedy (argmax, temperature 0) response per prompt: ReMax's baseline, rewarded, never trained on.
    A Rollout with group_size 1 (so the reward functions and packed forwards take it like any other);
    its logps are under temperature 1 and unused. Deterministic: no generator to seed."""
    return _rollout(model, tok, prompts, 1, max_new_tokens, 0.0, prompts_per_generate, lambda start: None)


def _rollout(model, tok, prompts, num_generations, max_new_tokens, temperature, prompts_per_generate,
             generator_at) -> Rollout:
    """generate() over chunks of prompts_per_generate prompts (sampler: generator_at(the chunk's first prompt))."""
    device = next(model.parameters()).device
    chunk = prompts_per_generate or len(prompts)
    gens = []
    for start in range(0, len(prompts), chunk):
        p_ids, p_mask = collate_prompts([p["prompt_ids"] for p in prompts[start : start + chunk]], tok.pad_id)
        gens.append(generate(model, p_ids.to(device), p_mask.to(device), max_new_tokens, tok.eos_id, tok.pad_id,
                             temperature=temperature, generator=generator_at(start),
                             num_samples=num_generations))  # prompt-major rows
    N = max(g.response_ids.shape[1] for g in gens)
    response_ids = torch.cat([_pad_cols(g.response_ids, N, tok.pad_id) for g in gens])  # (R, N)
    response_mask = torch.cat([_pad_cols(g.response_mask, N, False) for g in gens])
    return Rollout(
        rows=[p for p in prompts for _ in range(num_generations)],
        response_ids=response_ids,
        response_mask=response_mask,
        logps=torch.cat([_pad_cols(g.logps, N, 0.0) for g in gens]),
        finished=torch.cat([g.finished for g in gens]),
        completions=[tok.decode(ids[m].tolist()) for ids, m in zip(response_ids, response_mask)],
        group_size=num_generations,
        max_new_tokens=max_new_tokens,
        pad_id=tok.pad_id,
    )


# ------------------------------------------------------------------------------ packed micro-batches

def micro_batch_rows(ro: Rollout, micro_batch_size: int, rows: list[int] | None = None,
                     by_length: bool = False) -> list[list[int]]:
    """Cut rollout rows (all, or `rows`: whole groups, each group's rows in order) into micro-batches.

    A micro-batch holds max(1, micro_batch_size // G) whole groups (G = 1: micro_batch_size rows).
    by_length: groups sorted by packed length (prompt + the G responses; stable), so a micro-batch pads
    to similar lengths; the step's loss is unchanged (a mean over the whole step).
    """
    G = ro.group_size
    rows = list(range(len(ro.rows))) if rows is None else list(rows)
    groups = [rows[i : i + G] for i in range(0, len(rows), G)]
    if any(g[0] % G or g != list(range(g[0], g[0] + G)) for g in groups):
        raise ValueError(f"rows must be whole groups of {G} (rows b*G .. b*G + G - 1 answer prompt b)")
    if by_length:
        lengths = ro.lengths.tolist()
        groups.sort(key=lambda g: len(ro.rows[g[0]]["prompt_ids"]) + sum(lengths[r] for r in g))
    per = max(1, micro_batch_size // G)
    return [[r for g in groups[i : i + per] for r in g] for i in range(0, len(groups), per)]


def packed_batch(ro: Rollout, rows: list[int], **tensors: torch.Tensor) -> dict:
    """Rollout rows (whole groups, see micro_batch_rows) -> a minialign.algorithms.packing.pack batch on the
    rollout's device, plus each row-aligned tensor of `tensors` ((R, N) per token or (R,) per response,
    e.g. old_logps, advantages) cut to these rows, and 2-D ones to the batch's width n (its longest
    response). Row i of every (r, n) tensor of the batch is rollout row rows[i]."""
    G = ro.group_size
    lengths = ro.lengths[rows].tolist()
    ids = ro.response_ids[rows].tolist()
    batch = packing.pack([ro.rows[r]["prompt_ids"] for r in rows[::G]], [y[:L] for y, L in zip(ids, lengths)],
                         G, ro.pad_id)
    batch = {k: v.to(ro.response_ids.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n = batch["response_ids"].shape[1]
    index = torch.tensor(rows, device=ro.response_ids.device)
    for name, t in tensors.items():
        batch[name] = t[index, :n] if t.dim() == 2 else t[index]
    return batch


@torch.no_grad()
def rollout_forward(fn, ro: Rollout, micro_batches: list[list[int]]) -> torch.Tensor:
    """fn(packed batch) -> (r, n) per-token or (r,) per-response tensor, run on every micro-batch (lists of
    rollout rows) without gradients -> (R, N) or (R,) float32 in rollout row order (0 past a batch's width)."""
    R, N = ro.response_ids.shape
    out = None
    for rows in micro_batches:
        y = fn(packed_batch(ro, rows)).float()
        if out is None:
            out = torch.zeros((R, N) if y.dim() == 2 else (R,), device=y.device)
        index = torch.tensor(rows, device=y.device)
        if y.dim() == 2:
            out[index, : y.shape[1]] = y
        else:
            out[index] = y
    return out


def source_rewards(sources, ro: Rollout, reward_model_scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each reward source's unweighted rewards of the rollout, {name: (R,) float64}: the rule functions
    (minialign.algorithms.reward_funcs) on the decoded completions, and "reward_model" from the given scores."""
    from minialign.algorithms.reward_funcs import compute_rewards

    texts, fields = reward_fields(ro)
    per_source = compute_rewards(sources, texts, ro.completions, fields)
    if reward_model_scores is not None:
        per_source["reward_model"] = reward_model_scores.tolist()
    device = ro.response_ids.device
    return {s.name: torch.tensor(per_source[s.name], dtype=torch.float64, device=device) for s in sources}


def minibatch_slots(prompts_per_step: int, num_minibatches: int, seed: int, step: int, epoch: int, rt) -> torch.Tensor:
    """(B_local,) minibatch index of each of this rank's rows for one PPO epoch (a stratified shuffle).

    The step's global rows are cut into chunks of M = num_minibatches consecutive rows; a random
    permutation of each chunk (seeded from (seed, step, epoch), the same on every rank) sends one row of
    the chunk to each minibatch. Each rank's share divides by M, so it holds whole chunks, and the
    union over ranks of "my rows in minibatch m" is the same set as in a one-process run.
    """
    M = num_minibatches
    seed = int(np.random.SeedSequence([seed, step, epoch, 7]).generate_state(1, np.uint64)[0] >> 1)
    slots = torch.rand(prompts_per_step // M, M, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    share = prompts_per_step // rt.world_size
    return slots.flatten()[rt.rank * share : (rt.rank + 1) * share]  # row i of chunk c -> minibatch slots[c, i]


# ---------------------------------------------------------------------------------- models, prompts


def load_rl_prompts(path: str, tok, max_prompt_len: int, sources, stats: dict | None = None) -> list[dict]:
    """RL prompts from `path`, checked and tokenized (tokenize_prompts dicts); over-long ones dropped and counted.

    Raises MissingFieldError naming "path:line" when a line lacks a field that a reward function in
    `sources` reads, and ValueError when no prompt fits in max_prompt_len tokens.
    """
    from minialign.algorithms.reward_funcs import check_fields
    from minialign.data.formats import load_prompts

    records = load_prompts(path)
    check_fields(sources, [{"prompt_text": r.prompt[-1]["content"], **r.fields} for r in records],
                 locations=[f"{path}:{r.line}" for r in records])
    prompts = tokenize_prompts(records, tok, max_prompt_len, stats)
    if not prompts:
        raise ValueError(f"none of the {len(records)} prompts in {path} fits in --max_len - --max_new_tokens = "
                         f"{max_prompt_len} tokens")
    return prompts


def reward_fields(ro: Rollout) -> tuple[list[str], dict[str, list]]:
    """(prompts, fields) for the reward functions: the prompt texts and, per completion, every field
    the prompt records share (not the token ids) plus the rollout fields of minialign.algorithms.reward_funcs."""
    keys = set(ro.rows[0]).intersection(*ro.rows[1:]) - {"prompt_ids", "prompt_text"}
    fields = {k: [r[k] for r in ro.rows] for k in sorted(keys)}
    fields["finished"] = ro.finished.tolist()
    fields["completion_length"] = ro.lengths.tolist()
    fields["max_completion_length"] = [ro.max_new_tokens] * len(ro.rows)
    return [r["prompt_text"] for r in ro.rows], fields


# ---------------------------------------------------------------------------------- completions log


