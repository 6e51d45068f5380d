"""Tests for minialign.algorithms.generation: greedy decoding against a cache-free reference loop, the
log-prob invariant PPO/GRPO rely on (rollout log-probs == recomputed log-probs), stopping at eos,
seeding, top-k / top-p, and input checks."""

import pytest
import torch
from conftest import left_padded_prompts, tiny_model

from minialign.algorithms.generation import generate
from minialign.algorithms.packing import pack_padded
from minialign.algorithms.packing import response_logps as packed_response_logps

V = 96
PAD = 0


def lively_model(seed=3, dtype=torch.float32):
    """A random tiny model whose greedy continuations vary.

    At the default init the residual stream is dominated by the (tied) input embedding, so a random
    model just repeats its last token forever; scaling every non-embedding matrix by 10 breaks that.
    """
    model = tiny_model(seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(10.0)
    return model.to(dtype)


@torch.no_grad()
def greedy_reference(model, ids, mask, max_new_tokens):
    """Greedy decoding the slow way: a full forward over the whole sequence for every new token."""
    out = []
    for _ in range(max_new_tokens):
        next_tok = model(ids, mask)[:, -1].argmax(-1)  # (B,)
        out.append(next_tok)
        ids = torch.cat([ids, next_tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)  # (B, N)


def test_greedy_matches_full_forward_loop():
    model = lively_model(dtype=torch.float64)  # float64: no near-tie can flip an argmax
    ids, mask = left_padded_prompts()
    gen = generate(model, ids, mask, max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=0)
    want = greedy_reference(model, ids, mask, 10)
    assert gen.response_ids.tolist() == want.tolist()
    assert len(set(want.flatten().tolist())) > 5  # the reference is not a trivial repeat
    assert gen.response_mask.all() and not gen.finished.any()


def response_logps(model, ids, mask, response_ids, response_mask, temperature):
    """The training forward's log-probs of sampled responses (minialign.algorithms.packing, one plain row each), (B, N)."""
    got = packed_response_logps(model, pack_padded(ids, mask, response_ids, response_mask, 1, PAD), temperature)
    return torch.nn.functional.pad(got, (0, response_ids.shape[1] - got.shape[1]))  # back to the sampler's width


def test_greedy_logps_are_temperature_one_logps():
    model = lively_model()
    ids, mask = left_padded_prompts()
    gen = generate(model, ids, mask, max_new_tokens=6, eos_id=-1, pad_id=PAD, temperature=0)
    with torch.no_grad():
        want = response_logps(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
    torch.testing.assert_close(gen.logps, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logps_equal_recomputed_logps(temperature):
    # the PPO/GRPO invariant: before the first update the ratio exp(new - old) is exactly 1
    model = lively_model()
    ids, mask = left_padded_prompts()
    g = torch.Generator().manual_seed(0)
    gen = generate(model, ids, mask, max_new_tokens=8, eos_id=5, pad_id=PAD, temperature=temperature, generator=g)
    with torch.no_grad():
        want = response_logps(model, ids, mask, gen.response_ids, gen.response_mask, temperature=temperature)
    torch.testing.assert_close(gen.logps, want, atol=1e-5, rtol=0)
    assert (gen.logps[~gen.response_mask] == 0).all()
    # and the temperature matters: recomputing at the wrong one would not pass
    if temperature != 1.0:
        with torch.no_grad():
            wrong = response_logps(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
        assert (wrong - gen.logps)[gen.response_mask].abs().max() > 1e-3


def expected_stop(seq, eos_id, pad_id):
    """From an unstopped greedy row: the row after stopping at the first eos_id -> (ids, mask, finished)."""
    seq = list(seq)
    if eos_id not in seq:
        return seq, [True] * len(seq), False
    k = seq.index(eos_id)
    return seq[: k + 1] + [pad_id] * (len(seq) - k - 1), [True] * (k + 1) + [False] * (len(seq) - k - 1), True


def test_stops_at_first_eos_per_row():
    model = lively_model(dtype=torch.float64)
    ids, mask = left_padded_prompts()
    N = 12
    free = generate(model, ids, mask, N, eos_id=-1, pad_id=PAD, temperature=0).response_ids.tolist()
    # an eos that rows 0 and 1 emit at different steps (not at their last step) and row 2 never emits
    firsts = lambda tok: [row.index(tok) if tok in row else None for row in free]
    candidates = [t for t in range(1, V)
                  if None not in firsts(t)[:2] and firsts(t)[0] != firsts(t)[1]
                  and max(firsts(t)[:2]) < N - 1 and firsts(t)[2] is None]
    assert candidates, f"no usable eos in {free}"
    eos = candidates[0]

    gen = generate(model, ids, mask, N, eos_id=eos, pad_id=PAD, temperature=0)
    for b in range(3):
        want_ids, want_mask, want_finished = expected_stop(free[b], eos, PAD)
        assert gen.response_ids[b].tolist() == want_ids
        assert gen.response_mask[b].tolist() == want_mask
        assert bool(gen.finished[b]) == want_finished
        assert (gen.logps[b][~gen.response_mask[b]] == 0).all()
    assert gen.finished.tolist() == [True, True, False]

    # when every row has stopped the loop ends early: the output is as long as the longest response
    gen2 = generate(model, ids[:2], mask[:2], N, eos_id=eos, pad_id=PAD, temperature=0)
    assert gen2.response_ids.shape == (2, max(firsts(eos)[:2]) + 1)
    assert gen2.finished.all()
    assert gen2.response_ids.tolist() == gen.response_ids[:2, : gen2.response_ids.shape[1]].tolist()


def test_same_seed_same_output_different_seed_different():
    model = lively_model()
    ids, mask = left_padded_prompts()

    def run(seed):
        return generate(model, ids, mask, 10, eos_id=-1, pad_id=PAD, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_p=1e-9)], ids=["top_k=1", "top_p_tiny"])
def test_extreme_truncation_equals_greedy(truncation):
    model = lively_model()
    ids, mask = left_padded_prompts()
    greedy = generate(model, ids, mask, 8, eos_id=-1, pad_id=PAD, temperature=0)
    sampled = generate(model, ids, mask, 8, eos_id=-1, pad_id=PAD, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), **truncation)
    assert sampled.response_ids.tolist() == greedy.response_ids.tolist()
    # the reported log-probs are the untruncated softmax's, like greedy's (temperature 1)
    torch.testing.assert_close(sampled.logps, greedy.logps, atol=1e-6, rtol=0)


def test_right_padded_prompts_are_refused():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7], [5, 6, PAD]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask, 4, eos_id=3, pad_id=PAD)
    with pytest.raises(TypeError, match="torch.bool"):
        generate(model, ids, mask.long(), 4, eos_id=3, pad_id=PAD)


def test_generate_restores_training_mode():
    model = tiny_model().train()
    ids, mask = left_padded_prompts()
    generate(model, ids, mask, 2, eos_id=-1, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert model.training
