"""minialign.algorithms.packing: the one shared-prompt packer, checked against its docstring and against plain rows.

Layers (STYLE.md principle 12):
  - the docstring diagram, parsed from packing.__doc__ and compared on its exact example (positions,
    segment mask, head_mask, columns / source, last);
  - refusals (empty prompt / response, responses that are not groups of G) and the small pair helpers;
  - parity: a packed row [x | y_1 | ... | y_G] gives every response what the plain row [x y_i] gives it
    (G = 1 with the prompt repeated, the layout of every other implementation): log-probs and their
    gradients (DPO pairs, G = 2; GRPO groups, G = 4), reward-model scores (G = 2), values (G = 2, 4);
    float64 to 1e-10, float32 to ~1e-5;
  - a naive reference: one full forward of [x y] and a log_softmax, read at the columns by hand.
"""

import random
import re

import pytest
import torch
from conftest import ARCHS, tiny_config, tiny_model

from minialign.algorithms import packing
from minialign.algorithms.packing import (collate_pairs, length_sorted_chunks, pack, pair_count, pair_lengths,
                                          response_logps, response_scores, response_values, segment_attention_mask)
from minialign.algorithms.preference import collate_completions, completion_logps, pair_logps
from minialign.models.decoder import ScalarModel

V = 64  # vocabulary of the tiny models here


def random_groups(n_prompts, group_size, seed, vocab=V):
    """Prompts and group_size responses each, every length different from group to group (1 token allowed)."""
    rng = random.Random(seed)
    draw = lambda lo, hi: [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    prompts = [draw(1, 12) for _ in range(n_prompts)]
    responses = [draw(1, 9) for _ in range(n_prompts * group_size)]
    return prompts, responses


def plain_rows(prompts, responses, group_size):
    """The plain layout: one row [x y_i] per response, the prompt repeated G times (pack with G = 1)."""
    return pack([p for p in prompts for _ in range(group_size)], responses, 1, pad_id=0)


def tiny_rm(seed=0, vocab_size=V, **overrides):
    torch.manual_seed(seed)
    return ScalarModel(tiny_config(vocab_size, **overrides)).eval()


def grads(model, loss):
    return [g.clone() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                                   allow_unused=True)]


def assert_grads_close(got, want, atol):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, atol=atol * 10, rtol=1e-4)


# ------------------------------------------------------------------------------- the docstring diagram

def parse_diagram(doc):
    """The example of packing's docstring -> its tables: tokens, position_ids, segment, the attention
    matrix, and for each response token the column that predicts it, and each response's last column."""
    lines = doc.splitlines()
    row = lambda name: next(l.split()[1:] for l in lines if l.split()[:1] == [name])  # noqa: E731
    tokens = row("token")
    positions = [int(v) for v in row("position_ids")[: len(tokens)]]
    segment = [int(v) for v in row("segment")[: len(tokens)]]
    matrix = []
    for name in tokens:  # the attention row of each query token: its first field is the token, then 1 / .
        fields = next(f for f in (l.split() for l in lines)
                      if f[:1] == [name] and all(v in "1." for v in f[1 : 1 + len(tokens)]) and len(f) > len(tokens))
        matrix.append([v == "1" for v in fields[1 : 1 + len(tokens)]])
    predicted_by = {tok: int(col) for tok, col in re.findall(r"(\w\d) <- column (\d)", doc)}
    last = {tok: int(col) for tok, col in re.findall(r"last token (\w\d) at column (\d)", doc)}
    return tokens, positions, segment, matrix, predicted_by, last


def test_pack_reproduces_the_docstring_diagram():
    tokens, positions, segment, matrix, predicted_by, last = parse_diagram(packing.__doc__)
    assert tokens == ["x0", "x1", "x2", "a0", "a1", "b0", "b1", "b2", "pad"]  # the parse found the example
    assert predicted_by == {"a0": 2, "a1": 3, "b0": 2, "b1": 5, "b2": 6} and last == {"a1": 4, "b2": 7}
    ids = {"x0": 10, "x1": 11, "x2": 12, "a0": 20, "a1": 21, "b0": 30, "b1": 31, "b2": 32}
    x, a, b = [ids[t] for t in ("x0", "x1", "x2")], [ids["a0"], ids["a1"]], [ids["b0"], ids["b1"], ids["b2"]]
    # a second row of 1 + 4 + 4 = 9 tokens makes T = 9, so the diagram's row gets its one pad column
    batch = pack([x, [13]], [a, b, [22, 23, 24, 25], [33, 34, 35, 36]], group_size=2, pad_id=0)
    T = 9
    assert batch["input_ids"].shape == (2, T)
    assert batch["input_ids"][0].tolist() == [ids[t] for t in tokens[:-1]] + [0]
    assert batch["position_ids"][0].tolist() == positions == [0, 1, 2, 3, 4, 3, 4, 5, 0]
    assert batch["attention_mask"][0].tolist() == matrix
    assert segment_attention_mask(torch.tensor([segment]))[0].tolist() == matrix  # the mask from the segment row
    # head_mask: exactly the columns that predict some response token (2 predicts a0 AND b0)
    head_cols = sorted(set(predicted_by.values()))
    assert head_cols == [2, 3, 5, 6]
    assert batch["head_mask"][0].tolist() == [c in head_cols for c in range(T)]
    # columns: flat index b * T + column of the predicting column; source: its row among the head's outputs
    # (row 0's head columns 2, 3, 5, 6 are head rows 0, 1, 2, 3); both 0 off the mask (N = 4)
    assert batch["columns"][:2].tolist() == [[predicted_by["a0"], predicted_by["a1"], 0, 0],
                                             [predicted_by["b0"], predicted_by["b1"], predicted_by["b2"], 0]]
    assert batch["source"][:2].tolist() == [[0, 1, 0, 0], [0, 2, 3, 0]]
    assert batch["response_mask"][:2].tolist() == [[True, True, False, False], [True, True, True, False]]
    assert batch["response_ids"][:2].tolist() == [a + [0, 0], b + [0]]
    # row 1 = [13 | 22 23 24 25 | 33 34 35 36]: head columns 0, 1, 2, 3, 5, 6, 7 = head rows 4 .. 10
    assert batch["columns"][2:].tolist() == [[T + 0, T + 1, T + 2, T + 3], [T + 0, T + 5, T + 6, T + 7]]
    assert batch["source"][2:].tolist() == [[4, 5, 6, 7], [4, 8, 9, 10]]
    # last: flat index of each response's last token (a1 at 4, b2 at 7, then row 1's columns 4 and 8)
    assert batch["last"].tolist() == [last["a1"], last["b2"], T + 4, T + 8]


def test_group_of_one_is_a_plain_right_padded_row():
    """G = 1: [x y] then padding, no mask and no positions (the causal fast path); the same shift."""
    batch = pack([[5, 6, 7], [5]], [[8, 9, 3], [3]], group_size=1, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3], [5, 3, 0, 0, 0, 0]]
    assert batch["attention_mask"] is None and batch["position_ids"] is None
    # columns 2, 3, 4 predict 8, 9, 3 in row 0; column 0 predicts 3 in row 1 (flat 6)
    assert batch["head_mask"].tolist() == [[False, False, True, True, True, False], [True] + [False] * 5]
    assert batch["columns"].tolist() == [[2, 3, 4], [6, 0, 0]]
    assert batch["source"].tolist() == [[0, 1, 2], [3, 0, 0]]
    assert batch["last"].tolist() == [5, 7]
    assert batch["response_ids"][batch["response_mask"]].tolist() == [8, 9, 3, 3]  # <|im_end|> (3) included
    assert collate_completions([[5, 6, 7], [5]], [[8, 9, 3], [3]], 0)["input_ids"].equal(batch["input_ids"])


def test_pack_refuses_empty_prompts_responses_and_ragged_groups():
    with pytest.raises(ValueError, match="prompt 0: the prompt and each of its responses need at least one token"):
        pack([[]], [[5]], 1, 0)
    with pytest.raises(ValueError, match="prompt 1: the prompt and each of its responses need at least one token"):
        pack([[5], [6]], [[7], [8], [9], []], 2, 0)
    with pytest.raises(ValueError, match="3 responses for 2 prompts are not groups of 2"):
        pack([[5], [6]], [[7], [8], [9]], 2, 0)
    with pytest.raises(ValueError, match="not groups of 0"):
        pack([[5]], [], 0, 0)


def test_collate_pairs_and_the_pair_helpers():
    pairs = [{"prompt": [5, 6], "chosen": [7, 3], "rejected": [8, 9, 3], "margin": 2},
             {"prompt": [5], "chosen": [7, 7, 7, 3], "rejected": [3], "margin": 0.5}]
    b = collate_pairs(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 3, 8, 9, 3], [5, 7, 7, 7, 3, 3, 0]]  # [x | y_c | y_r] per pair
    assert pair_count(b) == 2 and b["margin"].tolist() == [2.0, 0.5] and b["margin"].dtype == torch.float32
    assert pair_lengths(pairs) == [7, 6]
    with pytest.raises(ValueError, match="1 of 2 pairs have a 'margin' field"):
        collate_pairs([pairs[0], {k: v for k, v in pairs[1].items() if k != "margin"}], 0)
    assert "margin" not in collate_pairs([{k: v for k, v in p.items() if k != "margin"} for p in pairs], 0)
    # by increasing length, at most 2 per chunk; `indices` restricts to a subset (a rank's shard)
    assert length_sorted_chunks([5, 1, 4, 2, 3], 2) == [[1, 3], [4, 2], [0]]
    assert length_sorted_chunks([5, 1, 4, 2, 3], 2, indices=[0, 2, 4]) == [[4, 2], [0]]


# ---------------------------------------------------------------------- parity with the plain rows

@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_packed_pairs_logps_and_gradients_equal_the_plain_rows(dtype, atol):
    """DPO pairs (G = 2) packed vs one row per response: the same per-token log-probs, pair sums and
    means, logit means, and gradients of a loss that weighs every response differently."""
    model = tiny_model(seed=3, vocab_size=V).to(dtype)
    prompts, responses = random_groups(7, 2, seed=1)
    pairs = [{"prompt": x, "chosen": responses[2 * b], "rejected": responses[2 * b + 1]} for b, x in enumerate(prompts)]
    packed_batch, plain_batch = collate_pairs(pairs, 0), plain_rows(prompts, responses, 2)
    assert packed_batch["input_ids"].shape[0] == 7 and plain_batch["input_ids"].shape[0] == 14
    packed_tok, plain_tok = response_logps(model, packed_batch), response_logps(model, plain_batch)  # (14, N)
    assert packed_tok.dtype == dtype and packed_tok.shape == plain_tok.shape == (14, 9)
    torch.testing.assert_close(packed_tok, plain_tok, atol=atol, rtol=0)
    packed = pair_logps(model, packed_batch)
    total, avg, logit_mean = (t.view(-1, 2) for t in completion_logps(model, plain_batch))  # rows 2b, 2b + 1
    for name, want in (("chosen_logps", total[:, 0]), ("rejected_logps", total[:, 1]), ("chosen_logps_avg", avg[:, 0]),
                       ("rejected_logps_avg", avg[:, 1]), ("chosen_nll", -avg[:, 0]),
                       ("chosen_logits_mean", logit_mean[:, 0]), ("rejected_logits_mean", logit_mean[:, 1])):
        torch.testing.assert_close(getattr(packed, name), want, atol=atol, rtol=0, msg=name)
    assert packed.chosen_logps.shape == (7,) and (packed.chosen_logps < 0).all()
    weights = torch.randn(14, generator=torch.Generator().manual_seed(0)).to(dtype)
    g_plain = grads(model, (response_logps(model, plain_batch).sum(-1) * weights).sum())
    g_packed = grads(model, (response_logps(model, packed_batch).sum(-1) * weights).sum())
    assert_grads_close(g_packed, g_plain, atol)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_logps_equal_plain_rows_on_every_architecture(arch):
    """The same parity on the dense, qk-norm and MoE models (float64): the mask and positions, not the
    architecture, make a packed response see exactly what its own row sees."""
    model = tiny_model(seed=5, vocab_size=V, **ARCHS[arch]).double()
    prompts, responses = random_groups(4, 2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(response_logps(model, pack(prompts, responses, 2, 0)),
                                   response_logps(model, plain_rows(prompts, responses, 2)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_grpo_groups_of_four_equal_the_plain_rows(dtype, atol):
    """GRPO-style groups (G = 4, one-token responses included), at a sampling temperature of 0.7."""
    model = tiny_model(seed=2, vocab_size=V).to(dtype)
    prompts, responses = random_groups(3, 4, seed=4)
    responses[5] = [3]  # a response that is only <|im_end|>
    grouped, plain = pack(prompts, responses, 4, 0), plain_rows(prompts, responses, 4)
    assert grouped["input_ids"].shape[0] == 3 and grouped["response_ids"].shape[0] == 12
    torch.testing.assert_close(response_logps(model, grouped, temperature=0.7),
                               response_logps(model, plain, temperature=0.7), atol=atol, rtol=0)
    weights = torch.randn(12, generator=torch.Generator().manual_seed(1)).to(dtype)
    g_plain = grads(model, (response_logps(model, plain, temperature=0.7).sum(-1) * weights).sum())
    g_grouped = grads(model, (response_logps(model, grouped, temperature=0.7).sum(-1) * weights).sum())
    assert_grads_close(g_grouped, g_plain, atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_packed_rm_scores_and_gradients_equal_the_plain_rows(dtype, atol):
    """A reward model's score at each response's last token: packed pairs vs plain rows, gradients too;
    a one-token rejected response (just <|im_end|>) included, margins carried."""
    model = tiny_rm().to(dtype).train()  # dropout is 0: train mode changes nothing, and is what train_rm runs
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9, 3], "rejected": [3], "margin": 1.0},
             {"prompt": [5, 6, 7, 11, 12, 13], "chosen": [14, 15, 16, 17, 3], "rejected": [18, 19, 20, 21, 22, 23, 3],
              "margin": 0.0}]
    packed = collate_pairs(pairs, 0)
    plain = plain_rows([p["prompt"] for p in pairs], [y for p in pairs for y in (p["chosen"], p["rejected"])], 2)
    # T = 6 + 5 + 7 = 18; last tokens: pair 0 at columns 5 and 6, pair 1 at 10 and 17 of row 1 (flat 18 + ...)
    assert packed["input_ids"].shape == (2, 18) and packed["last"].tolist() == [5, 6, 18 + 10, 18 + 17]
    assert packed["margin"].tolist() == [1.0, 0.0]
    s_packed, s_plain = response_scores(model, packed), response_scores(model, plain)
    assert s_packed.shape == (4,)
    torch.testing.assert_close(s_packed, s_plain, atol=atol, rtol=0)
    w = torch.tensor([1.0, -2.0, 1.0, -2.0], dtype=s_plain.dtype)
    assert_grads_close(grads(model, (s_packed * w).sum()), grads(model, (response_scores(model, plain) * w).sum()), atol)


@pytest.mark.parametrize("group_size", [2, 4])
def test_packed_values_equal_the_plain_rows(group_size):
    """A value model's V(s_t) at the column predicting each response token: packed vs plain (float64)."""
    model = tiny_rm(seed=1).double()
    prompts, responses = random_groups(3, group_size, seed=group_size)
    with torch.no_grad():
        packed = response_values(model, pack(prompts, responses, group_size, 0))
        plain = response_values(model, plain_rows(prompts, responses, group_size))
    assert packed.shape == (3 * group_size, max(map(len, responses)))
    torch.testing.assert_close(packed, plain, atol=1e-10, rtol=0)
    mask = pack(prompts, responses, group_size, 0)["response_mask"]
    assert (packed[~mask] == 0).all()


# --------------------------------------------------------------------------------- naive reference

def test_logps_values_and_scores_equal_a_naive_full_forward_of_each_row():
    """Each row [x y] through the model whole, a full log_softmax, read by hand at column P - 1 + t (the
    column before token t): the packed pairs (3 in one padded batch) give exactly that, prompt tokens
    excluded; likewise a value model's V(s_t) and a reward model's score at the last token."""
    model, value_model = tiny_model(seed=0, vocab_size=V).double(), tiny_rm(seed=4).double()
    prompts, responses = random_groups(3, 2, seed=2)
    responses[1] = [3]  # a rejected response that is only <|im_end|>
    pairs = [{"prompt": x, "chosen": responses[2 * b], "rejected": responses[2 * b + 1]} for b, x in enumerate(prompts)]
    batch = collate_pairs(pairs, 0)
    with torch.no_grad():
        packed, values, scores = response_logps(model, batch), response_values(value_model, batch), response_scores(value_model, batch)
        for r, y in enumerate(responses):
            x = prompts[r // 2]
            P, ids = len(x), torch.tensor([x + y])
            logp = model(ids).log_softmax(-1)[0]  # (P + |y|, V): row j predicts token j + 1
            want = torch.stack([logp[P - 1 + t, tok] for t, tok in enumerate(y)])
            torch.testing.assert_close(packed[r, : len(y)], want, atol=1e-10, rtol=0)
            assert (packed[r, len(y):] == 0).all()
            v = value_model(ids)[0]  # (P + |y|,): V(s_t) is read at the state's last token, column P - 1 + t
            torch.testing.assert_close(values[r, : len(y)], v[P - 1 : P - 1 + len(y)], atol=1e-10, rtol=0)
            torch.testing.assert_close(scores[r], v[-1], atol=1e-10, rtol=0)  # the score at the last token
    pl = pair_logps(model, batch)
    lengths = torch.tensor([len(y) for y in responses], dtype=torch.float64).view(3, 2)
    torch.testing.assert_close(pl.chosen_logps, packed.sum(-1).view(3, 2)[:, 0], atol=1e-10, rtol=0)
    torch.testing.assert_close(pl.rejected_logps, packed.sum(-1).view(3, 2)[:, 1], atol=1e-10, rtol=0)
    torch.testing.assert_close(pl.chosen_nll, -pl.chosen_logps / lengths[:, 0], atol=1e-10, rtol=0)
    torch.testing.assert_close(pl.rejected_logps_avg, pl.rejected_logps / lengths[:, 1], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------- ranked groups (RM)

def test_group_pairs_lists_each_response_once_and_keeps_ungrouped_pairs_apart():
    """A ranked record a > b > c gave three pairs (a,b), (a,c), (b,c) sharing fields["group"]; a plain pair
    (no group) stays a group of two."""
    x, a, b, c = [5, 6], [7, 3], [8, 3], [9, 9, 3]
    pairs = [{"prompt": x, "chosen": a, "rejected": b, "group": "f.jsonl:1"},
             {"prompt": x, "chosen": a, "rejected": c, "group": "f.jsonl:1"},
             {"prompt": [4], "chosen": [7, 3], "rejected": [8, 3]},
             {"prompt": x, "chosen": b, "rejected": c, "group": "f.jsonl:1"}]
    groups = packing.group_pairs(pairs)
    assert [(g["prompt"], g["responses"], g["pairs"]) for g in groups] == [
        (x, [a, b, c], [(0, 1), (0, 2), (1, 2)]), ([4], [[7, 3], [8, 3]], [(0, 1)])]
    batch = packing.collate_groups(groups, pad_id=0)
    assert batch["pairs"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]  # response indices over the whole batch
    assert pair_count(batch) == 4 and packing.group_lengths(groups) == [2 + 2 + 2 + 3, 1 + 2 + 2]
    with pytest.raises(ValueError, match="different prompts"):
        packing.group_pairs([pairs[0], {**pairs[1], "prompt": [1, 2, 3]}])


# ScalarModel returns float32 scores even from a float64 model, so float64 agrees to float32 rounding of
# the 12 summed pair terms here (measured 2.7e-9), not to 1e-10
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-8), (torch.float32, 2e-5)])
def test_a_ranked_group_in_one_row_scores_what_its_pairs_score_apart(dtype, atol):
    """K = 4 responses of one prompt in one packed row, 6 pairs read from 4 scores, equal the 6 pairs packed
    one per row (each response computed 3 times there), rewards and gradients of the BT loss."""
    from minialign.algorithms.losses import bradley_terry_loss
    from minialign.algorithms.reward_model import pair_rewards
    prompts, responses = random_groups(2, 4, seed=5)
    model = tiny_rm(seed=3).to(dtype)
    ranked, apart = [], []
    for b, x in enumerate(prompts):
        ys = responses[4 * b : 4 * b + 4]
        for i in range(4):
            for j in range(i + 1, 4):
                ranked.append({"prompt": x, "chosen": ys[i], "rejected": ys[j], "group": f"g{b}"})
                apart.append({"prompt": x, "chosen": ys[i], "rejected": ys[j]})
    together = packing.collate_groups(packing.group_pairs(ranked), pad_id=0)
    assert together["input_ids"].shape[0] == 2 and pair_count(together) == 12  # one row per prompt
    c1, r1 = pair_rewards(model, together)
    g1 = grads(model, bradley_terry_loss(c1, r1))
    c2, r2 = pair_rewards(model, collate_pairs(apart, pad_id=0))
    g2 = grads(model, bradley_terry_loss(c2, r2))
    assert torch.allclose(c1, c2, atol=atol) and torch.allclose(r1, r2, atol=atol)
    assert_grads_close(g1, g2, atol)
