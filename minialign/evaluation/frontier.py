"""One point of a reward-vs-KL frontier: a policy's mean true reward and its sequence-level KL to the SFT model.

For a policy π and the SFT model π_sft, on held-out prompts x, each sampled `samples_per_prompt` times at
temperature 1 (y ~ π(·|x), at most max_new_tokens, the end-of-turn token <|im_end|> included when emitted):

    reward = E_x E_{y~π} [ r(x, y) ]
    KL     = E_x E_{y~π} [ Σ_t log π(y_t | x, y_<t) - log π_sft(y_t | x, y_<t) ]        (nats per sequence)

KL is the Monte-Carlo (k1) estimate of KL(π(·|x) || π_sft(·|x)), unbiased because y is drawn from π; it is
the x-axis of Rafailov et al. 2023, Fig. 2. Both log-probs come from the same packed full forward
(minialign.algorithms.packing.response_logps, float32 log-softmax), not from the sampler's KV-cache log-probs, so a
policy identical to the SFT model gets exactly 0. A response cut at max_new_tokens counts the tokens it
has: the KL between the two length-truncated distributions, the same estimator for every method.

Sampling is seeded like an RL rollout (minialign.algorithms.rollout.sample_rollout at step 0 with the given seed), so
every policy is scored on the same prompts with the same random stream (common random numbers: the
differences between methods are less noisy than their absolute values).

Simplified on purpose: one temperature (1.0, the one the KL is about); no top-k / top-p.
"""

from __future__ import annotations

import math

import torch

from minialign.algorithms.packing import response_logps
from minialign.algorithms.rollout import Rollout, micro_batch_rows, rollout_forward, sample_rollout


@torch.no_grad()
def sequence_kl(policy, ref, ro: Rollout, micro_batch_size: int = 64) -> torch.Tensor:
    """(R,) float64 Σ_t [log π(y_t|..) - log π_ref(y_t|..)] of each rollout response (its mask: up to and
    including <|im_end|>), both log-probs from the same packed training-layout forward."""
    mb = micro_batch_rows(ro, micro_batch_size)
    policy_logps = rollout_forward(lambda b: response_logps(policy, b), ro, mb)  # (R, N) float32
    ref_logps = rollout_forward(lambda b: response_logps(ref, b), ro, mb)  # (R, N)
    return (policy_logps.double() - ref_logps.double()).masked_fill(~ro.response_mask, 0.0).sum(-1)


@torch.no_grad()
def sample_and_score(policy, ref, tok, prompts: list[dict], reward_fn, samples_per_prompt: int = 4,
                     max_new_tokens: int = 48, seed: int = 0, prompts_per_generate: int = 64,
                     micro_batch_size: int = 64) -> dict:
    """Sample `samples_per_prompt` responses per prompt from `policy`, score them.

    prompts: tokenize_prompts dicts ("prompt_ids", "prompt_text"); reward_fn(prompts, completions) -> floats
    (minialign.algorithms.reward_funcs' signature). Returns per response, in prompt-major order (R = P x samples):
    reward (R,) float64, kl (R,) float64, length (R,) long, finished (R,) bool, prompt [R] str, completion [R] str.
    """
    ro = sample_rollout(policy, tok, prompts, samples_per_prompt, max_new_tokens, 1.0, seed, 0, 0,
                        prompts_per_generate)
    texts = [r["prompt_text"] for r in ro.rows]
    reward = torch.tensor(reward_fn(texts, ro.completions), dtype=torch.float64)  # (R,)
    return {"reward": reward, "kl": sequence_kl(policy, ref, ro, micro_batch_size).cpu(),
            "length": ro.lengths.cpu(), "finished": ro.finished.cpu(), "prompt": texts,
            "completion": ro.completions}


def summarize(res: dict, n_examples: int = 4, stride: int = 1) -> dict:
    """Means and standard errors over the responses of sample_and_score, and n_examples responses (every
    stride-th: stride = samples_per_prompt gives one per prompt). The standard errors treat the responses
    as independent (those of one prompt are not quite)."""
    n = len(res["reward"])

    def mean_se(x: torch.Tensor) -> tuple[float, float]:
        x = x.double()
        return float(x.mean()), float(x.std() / math.sqrt(n)) if n > 1 else 0.0

    reward, reward_se = mean_se(res["reward"])
    kl, kl_se = mean_se(res["kl"])
    return {"reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se, "n_samples": n,
            "mean_length": float(res["length"].double().mean()), "eos_rate": float(res["finished"].double().mean()),
            "examples": [{"prompt": res["prompt"][i], "completion": res["completion"][i],
                          "reward": float(res["reward"][i]), "kl": float(res["kl"][i])}
                         for i in range(0, min(n_examples * stride, n), stride)]}
