"""minialign.walkthrough: every ALGO runs on the tiny model, every printed value equals a recomputation (with the
loss functions, and with the scripts' own functions on the same batch), and the lessons' embedded outputs match
what the code prints now.

One tiny SFT model is trained per session (minialign.walkthrough.context.tiny_sft, seconds) and every walkthrough
runs once (`trace`, cached): the values tests, the docs check and the "every ALGO runs" test share the runs.
"""

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_dpo
import train_grpo
import train_kto
import train_online_dpo
import train_ppo
import train_rm
import train_sft
from minialign.algorithms import losses as L
from minialign.algorithms.losses import DEFAULT_BETA
from minialign.algorithms.packing import collate_pairs
from minialign.algorithms.preference import LENGTH_AVERAGED, LOSS_TYPES, unpair
from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.rollout import load_rl_prompts, sample_rollout, step_prompt_indices
from minialign.data.batching import collate_lm, tokenize_preferences, tokenize_sft
from minialign.data.formats import load_preferences, load_sft
from minialign.training import checkpoint, runtime
from minialign.walkthrough import ALGOS, DEFAULT_GENERATIONS, docs, walk
from minialign.walkthrough.context import (MAX_LEN, REPO_DATA, SCRIPT_DEFAULTS, TinyRecipe, first_step_indices,
                                           prepare, sft_loss, tiny_sft)
from minialign.walkthrough.offline import kto_rows
from minialign.walkthrough.trace import WIDTH

ROOT = Path(__file__).resolve().parents[1]
NUMS = re.compile(r"-?\d+\.\d+")
_RUNS: dict = {}


def trace(args: str):
    """The walkthrough `args` on the tiny model (each run once per session)."""
    if args not in _RUNS:
        _RUNS[args] = walk(shlex.split(args) + ["--tiny"], echo=False, log=None)
    return _RUNS[args]


@pytest.fixture(scope="module")
def ctx():
    return prepare(tiny=True, log=None)


def printed_list(tr, name: str) -> torch.Tensor:
    """The values of a `name (shape): [...]` line as printed (4 decimals)."""
    (line,) = [ln for ln in tr.lines if ln.startswith(f"  {name} (")]
    return torch.tensor([float(v) for v in NUMS.findall(line.split(":", 1)[1].split("]")[0])], dtype=torch.float64)


def printed_scalar(tr, name: str) -> float:
    """The number of a `name = 0.1234  ...` line as printed."""
    (value,) = [m[1] for ln in tr.lines if (m := re.match(rf"  {re.escape(name)} = (-?\d+\.\d+)", ln))]
    return float(value)


# ---------------------------------------------------------------------------------------- every ALGO runs

RUNS = (["sft", "rm", "kto", "ppo", "online_dpo"] + [f"dpo --loss_type {t}" for t in LOSS_TYPES]
        + [f"grpo --advantage_estimator {e}" for e in L.ADVANTAGE_ESTIMATORS]
        + ["grpo --beta 0.04", "grpo --advantage_estimator rloo --beta 0.04", "grpo --loss_type dr_grpo",
           "online_dpo --loss_type ipo", "dpo --loss_type robust --label_smoothing 0.1"])


@pytest.mark.parametrize("args", RUNS)
def test_every_algo_runs_one_update_and_fits_100_columns(args):
    tr = trace(args)
    assert any("ONE update" in ln for ln in tr.lines), tr.text[-2000:]
    assert any(ln.startswith("-- ") and "after the step" in ln for ln in tr.lines)
    wide = [ln for ln in tr.lines if len(ln) > WIDTH]
    assert not wide, wide[:3]
    assert {a.split()[0] for a in RUNS} == set(ALGOS)


def test_the_walkthrough_is_deterministic():
    """The same run twice prints the same text; the tiny model trains to the same weights twice."""
    assert walk(["dpo", "--tiny"], echo=False, log=None).text == trace("dpo").text
    paths = [tiny_sft(REPO_DATA, recipe=TinyRecipe(steps=3), fresh=True) for _ in range(2)]
    states = [torch.load(Path(p) / "ckpt.pt", weights_only=False)["model"] for p in paths]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_defaults_are_the_scripts():
    assert SCRIPT_DEFAULTS["sft"]["lr"] == train_sft.Config().lr
    assert SCRIPT_DEFAULTS["rm"]["lr"] == train_rm.Config().lr
    assert SCRIPT_DEFAULTS["dpo"]["lr"] == train_dpo.Config().lr and DEFAULT_BETA is train_dpo.DEFAULT_BETA
    kto = train_kto.Config()
    assert (SCRIPT_DEFAULTS["kto"]["lr"], SCRIPT_DEFAULTS["kto"]["beta"]) == (kto.lr, kto.beta)
    ppo = train_ppo.Config()
    assert all(getattr(ppo, k) == v for k, v in SCRIPT_DEFAULTS["ppo"].items())
    grpo = train_grpo.Config()
    assert all(getattr(grpo, k) == v for k, v in SCRIPT_DEFAULTS["grpo"].items())
    assert DEFAULT_GENERATIONS["grpo"] == grpo.num_generations
    assert SCRIPT_DEFAULTS["online_dpo"]["lr"] == train_online_dpo.Config().lr
    assert DEFAULT_GENERATIONS["online_dpo"] == train_online_dpo.Config().num_generations
    assert all(DEFAULT_BETA[t] == b for t, b in train_online_dpo.DEFAULT_BETA.items())


# ------------------------------------------------------------------------------------------------ SFT

def test_sft_values_equal_a_recomputation_and_the_scripts_loss(ctx):
    tr = trace("sft")
    v = tr.values
    assert printed_scalar(tr, "loss") == pytest.approx(printed_scalar(tr, "sum of -log π") / v["n_tokens"], abs=1e-4)
    examples = tokenize_sft(load_sft(str(REPO_DATA / "sft_train.jsonl")), ctx.tok, MAX_LEN)
    batch = collate_lm([examples[i] for i in first_step_indices(len(examples), 4, ctx.seed, ctx.rt)], ctx.tok.pad_id)
    assert torch.equal(batch["label_mask"], v["label_mask"])
    model = checkpoint.load_model(ctx.ckpt)
    with torch.no_grad():
        script, _ = train_sft.sft_loss(model, batch)
        ours, _ = sft_loss(model, batch)
    assert torch.equal(script, ours)
    assert float(script) / v["n_tokens"] == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)
    assert float(-v["token_logps_0"].sum()) > 0 and not torch.equal(v["token_logps_0"], v["token_logps_0_after"])


# ----------------------------------------------------------------------------------------- reward model

def test_rm_values_equal_a_recomputation_and_the_scripts_loss(ctx):
    tr = trace("rm")
    r_c, r_r = printed_list(tr, "chosen_rewards"), printed_list(tr, "rejected_rewards")
    assert float(L.bradley_terry_loss(r_c, r_r)) == pytest.approx(printed_scalar(tr, "loss"), abs=2e-4)
    per_pair = tr.values["per_pair_losses"]
    assert float(per_pair.mean()) == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)
    assert printed_scalar(tr, "train_step loss") == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)
    # the script's rm_loss on the same batch, from the same seeded fresh head
    runtime.seed_everything(ctx.seed)
    model = checkpoint.load_model(ctx.ckpt, kind="scalar")
    pairs = tokenize_preferences(load_preferences(str(REPO_DATA / "pref_train.jsonl")), ctx.tok, MAX_LEN)
    from minialign.algorithms.packing import collate_groups, group_pairs
    batch = collate_groups(group_pairs([pairs[i] for i in first_step_indices(len(pairs), 4, ctx.seed, ctx.rt)]),
                           ctx.tok.pad_id)
    with torch.no_grad():
        loss_sum, _ = train_rm.rm_loss(model, batch, 0.0, [])
    assert float(loss_sum) / 4 == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)


# ------------------------------------------------------------------------------------------ DPO family

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_printed_loss_is_the_loss_of_the_printed_log_probs(loss_type):
    tr = trace(f"dpo --loss_type {loss_type}")
    v = tr.values
    mask = v["response_mask"]
    tok_pi = tr.values["policy token log-probs"]
    sums = L.sequence_logps(tok_pi, mask, average=loss_type in LENGTH_AVERAGED)
    assert torch.allclose(sums[0::2], v["policy_chosen_logps"], atol=1e-5)  # the token table adds up
    assert torch.allclose(sums[1::2], v["policy_rejected_logps"], atol=1e-5)
    pi_c, pi_r = printed_list(tr, "policy_chosen_logps"), printed_list(tr, "policy_rejected_logps")
    beta = DEFAULT_BETA[loss_type]
    if loss_type in ("sigmoid", "robust", "hinge", "ipo"):
        ref_c, ref_r = printed_list(tr, "ref_chosen_logps"), printed_list(tr, "ref_rejected_logps")
        losses, r_c, r_r = L.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type)
        assert torch.allclose(r_c, beta * (pi_c - ref_c)) and torch.equal(ref_c, pi_c)  # step 0: π = π_ref
    elif loss_type == "simpo":
        losses, _, _ = L.simpo_loss(pi_c, pi_r, beta)
    elif loss_type == "unlikelihood":  # per token: the printed token table of every response
        losses, _, _ = L.unlikelihood_loss(tok_pi[0::2].double(), mask[0::2], tok_pi[1::2].double(), mask[1::2], beta)
    else:
        nll = v["policy_chosen_nll"].double()
        losses, _, _ = (L.cpo_loss(pi_c, pi_r, nll, beta) if loss_type == "cpo" else L.orpo_loss(pi_c, pi_r, nll, beta))
    assert torch.allclose(losses.float(), v["losses"], atol=5e-3)
    assert float(losses.mean()) == pytest.approx(printed_scalar(tr, "loss"), abs=5e-3)
    assert printed_scalar(tr, "train_step loss") == pytest.approx(float(v["losses"].mean()), abs=1e-4)
    assert not torch.equal(v["policy_chosen_logps_after"], v["policy_chosen_logps"])  # the step moved them


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo"])
def test_dpo_equals_the_scripts_pair_loss(ctx, loss_type):
    tr = trace(f"dpo --loss_type {loss_type}")
    pairs = tokenize_preferences(load_preferences(str(REPO_DATA / "pref_train.jsonl")), ctx.tok, MAX_LEN)
    batch = collate_pairs([pairs[i] for i in first_step_indices(len(pairs), 4, ctx.seed, ctx.rt)], ctx.tok.pad_id)
    model = checkpoint.load_model(ctx.ckpt)
    cfg = train_dpo.Config(loss_type=loss_type, beta=DEFAULT_BETA[loss_type])
    with torch.no_grad():
        loss_sum, metrics = train_dpo.pair_loss(model, batch, checkpoint.load_model(ctx.ckpt), cfg)
    assert float(loss_sum) == pytest.approx(float(tr.values["losses"].sum()), abs=1e-5)
    assert float(metrics["logps/chosen"]) == pytest.approx(float(tr.values["policy_chosen_logps"].sum()), abs=1e-4)


# ------------------------------------------------------------------------------------------------- KTO

def test_kto_batch_and_loss_equal_the_scripts(ctx):
    tr = trace("kto")
    v = tr.values
    examples = unpair(tokenize_preferences(load_preferences(str(REPO_DATA / "pref_train.jsonl")), ctx.tok, MAX_LEN))
    idx = first_step_indices(len(examples), 4, ctx.seed, ctx.rt)
    ours, script = kto_rows(examples, idx, ctx.tok.pad_id), train_kto.collate_kto(examples, idx, ctx.tok.pad_id, MAX_LEN)
    for key in ("input_ids", "response_ids", "response_mask"):
        assert torch.equal(ours[key], script[key]) and torch.equal(ours["kl"][key], script["kl"][key])
    z0 = (v["policy_kl_logps"] - v["ref_kl_logps"]).mean()
    assert z0 == pytest.approx(printed_scalar(tr, "z0"), abs=1e-4)
    losses, _ = L.kto_loss(v["policy_logps"], v["ref_logps"], script["is_desirable"], z0, SCRIPT_DEFAULTS["kto"]["beta"])
    assert float(losses.mean()) == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)
    model = checkpoint.load_model(ctx.ckpt)
    with torch.no_grad():
        loss_sum, _ = train_kto.kto_batch_loss(model, script, checkpoint.load_model(ctx.ckpt),
                                               SimpleNamespace(beta=2.0, desirable_weight=1.0, undesirable_weight=1.0))
    assert float(loss_sum) / 4 == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)


# ------------------------------------------------------------------------------------------------- PPO

def test_ppo_gae_table_equals_gae_and_the_ratio_table_equals_the_losses():
    tr = trace("ppo")
    v = tr.values
    mask = v["response_mask"]
    A, R = L.gae(v["rewards"], v["values"], mask, 1.0, 0.95)
    assert torch.equal(A, v["advantages_raw"]) and torch.equal(R, v["returns"])
    # the printed δ_t and the recursion A_t = δ_t + γλ A_{t+1} (inside each response), R_t = A_t + V_t
    nxt = torch.cat([A[:, 1:] * mask[:, 1:], torch.zeros_like(A[:, :1])], 1)
    assert torch.allclose((v["delta"] + 0.95 * nxt)[mask], A[mask], atol=1e-5)
    assert torch.allclose((A + v["values"])[mask], R[mask], atol=1e-6)
    assert torch.equal(L.whiten(A, mask), v["advantages"])
    kl = L.kl_penalty(v["old_logps"], v["ref_logps"], "k1").masked_fill(~mask, 0)
    assert torch.equal(kl, v["kl"])
    last = mask.sum(-1) - 1
    expect = (-0.5 * kl).scatter_add(1, last[:, None], v["scores"][:, None])  # r_t = -β kl_t, + s at the last token
    assert torch.allclose(expect.masked_fill(~mask, 0), v["rewards"])
    # the second epoch's table: ℓ_t = max(-Â ratio, -Â clip(ratio)); the printed losses are their token means
    ratio, Ah = v["ratio"], v["advantages"]
    pg = torch.max(-Ah * ratio, -Ah * ratio.clamp(0.8, 1.2))
    k = v["clipped_response"]
    assert torch.allclose(v["pg_token"][mask[k]], pg[k][mask[k]], atol=1e-6)
    v_clip = v["values"] + (v["new_values"] - v["values"]).clamp(-0.2, 0.2)
    vf = 0.5 * torch.max((v["new_values"] - v["returns"]) ** 2, (v_clip - v["returns"]) ** 2)
    assert torch.allclose(v["vf_token"][mask[k]], vf[k][mask[k]], atol=1e-6)
    loss, _ = L.ppo_policy_loss(v["new_logps"], v["old_logps"], Ah, mask, 0.2)
    assert float(loss) == pytest.approx(float(pg[mask].mean()), abs=1e-5)
    assert float(loss) == pytest.approx(printed_scalar(tr, "ppo_policy_loss"), abs=1e-4)
    vloss, _ = L.ppo_value_loss(v["new_values"], v["values"], v["returns"], mask, 0.2)
    assert float(vloss) == pytest.approx(printed_scalar(tr, "ppo_value_loss"), abs=1e-4)
    assert printed_scalar(tr, "max |ratio - 1|") == 0


def test_ppo_rollout_tensors_and_loss_equal_the_scripts(ctx):
    tr = trace("ppo")
    v = tr.values
    runtime.seed_everything(ctx.seed)  # then the models in the walkthrough's (and the script's) order
    policy, ref_model = checkpoint.load_model(ctx.ckpt), checkpoint.load_model(ctx.ckpt)
    value = checkpoint.load_model(ctx.ckpt, kind="scalar")
    cfg = train_ppo.Config(prompts_per_step=4, num_minibatches=1, reward_model="", reward_funcs=["gold"],
                           init_from=ctx.ckpt)
    sources = parse_reward_funcs(["gold"], [], ("reward_model",))
    prompts = load_rl_prompts(str(REPO_DATA / "rl_train.jsonl"), ctx.tok, MAX_LEN - 32, sources)
    step = [prompts[i] for i in step_prompt_indices(len(prompts), 0, 4, ctx.seed, ctx.rt)]
    ro = sample_rollout(policy, ctx.tok, step, 1, 32, 1.0, ctx.seed, 0, 0)
    assert torch.equal(ro.response_mask, v["response_mask"])
    pv = train_ppo.PolicyAndValue(policy, value)
    b = train_ppo.rollout_tensors(pv, ref_model, None, ro, sources, 0, ctx.rt, cfg)
    for ours, theirs in (("old_logps", "old_logps"), ("values", "old_values"), ("advantages", "advantages"),
                         ("returns", "returns"), ("kl", "kl"), ("scores", "scores")):
        assert torch.allclose(v[ours], b[theirs], atol=1e-6), ours
    # the value head is drawn after the seed in the same order as the script, so V_t is the script's too
    batches = [train_ppo.packed_batch(ro, rows, **{k: b[k] for k in ("old_logps", "old_values", "advantages",
                                                                      "returns")})
               for mb in train_ppo.epoch_minibatches(ro, 0, 0, ctx.rt, cfg) for rows in mb]
    with torch.no_grad():
        total = sum(float(train_ppo.ppo_loss_sum(pv, x, cfg)[0]) for x in batches)
    assert total / int(ro.response_mask.sum()) == pytest.approx(v["update_loss"], abs=1e-5)


# ------------------------------------------------------------------------------ GRPO, REINFORCE family

@pytest.mark.parametrize("estimator", L.ADVANTAGE_ESTIMATORS)
def test_grpo_advantages_and_loss_equal_a_recomputation(estimator):
    tr = trace(f"grpo --advantage_estimator {estimator}")
    v = tr.values
    r, A, mask, G = v["reward"].double(), v["advantages"].double(), v["loss_mask"], 8
    grouped = r.view(-1, G)
    if estimator == "grpo":
        for p in range(len(grouped)):
            mean, std = printed_scalar_pair(tr, p)
            same = bool((grouped[p] == grouped[p][0]).all())
            expect = torch.zeros(G) if same else (grouped[p] - mean) / (std + 1e-4)
            assert torch.allclose(A.view(-1, G)[p].float(), expect.float(), atol=1e-3)
    elif estimator == "rloo":
        assert torch.allclose(A, (grouped - (grouped.sum(1, keepdim=True) - grouped) / (G - 1)).flatten(), atol=1e-6)
    elif estimator == "remax":
        assert torch.allclose(A, (grouped - v["greedy_reward"].double()[:, None]).flatten(), atol=1e-6)
    else:  # per token: whiten(score at every token) over the whole batch (β = 0: no KL)
        assert torch.allclose(A, L.reinforce_pp_advantages(r, torch.zeros_like(A), mask, 0.0).double(), atol=1e-5)
    A_tok = A if A.dim() == 2 else A[:, None].expand(mask.shape)
    show = v["shown_response"]
    assert torch.allclose(v["per_token_loss"][mask[show]].double(), -A_tok[show][mask[show]], atol=1e-6)  # ratio 1
    logps = v["logps"]
    fn = L.grpo_loss if A.dim() == 1 else L.policy_gradient_loss
    loss, _ = fn(logps, logps, None, A.float(), mask, 0.2, 0.2, 0.0, "grpo", 32)
    assert float(loss) == pytest.approx(float(v["loss"]), abs=1e-6)
    lengths = mask.sum(-1)
    seq = v["sequence_sums"][lengths > 0] / lengths[lengths > 0]
    assert float(seq.mean()) == pytest.approx(printed_scalar(tr, "loss"), abs=1e-4)  # mean of sequence means


def printed_scalar_pair(tr, prompt: int) -> tuple[float, float]:
    """The `mean(r) = ..., std(r) = ...` line of group `prompt`."""
    lines = [ln for ln in tr.lines if ln.startswith("  mean(r) = ")]
    mean, std = NUMS.findall(lines[prompt])[:2]
    return float(mean), float(std)


def test_grpo_batches_equal_the_scripts(ctx):
    tr = trace("grpo --advantage_estimator grpo")
    policy = checkpoint.load_model(ctx.ckpt)
    cfg = train_grpo.Config(prompts_per_step=4, init_from=ctx.ckpt)
    sources = parse_reward_funcs(["gold"], [], ("reward_model",))
    prompts = load_rl_prompts(str(REPO_DATA / "rl_train.jsonl"), ctx.tok, MAX_LEN - 32, sources)
    step = [prompts[i] for i in step_prompt_indices(len(prompts), 0, 4, ctx.seed, ctx.rt)]
    ro = sample_rollout(policy, ctx.tok, step, 8, 32, 1.0, ctx.seed, 0, 0)
    _, g = train_grpo.grpo_batches(ro, sources, None, None, ctx.rt, cfg, policy)
    assert torch.equal(g["reward"].float(), tr.values["reward"].float())
    assert torch.allclose(g["advantage"].float(), tr.values["advantages"].float())


# ---------------------------------------------------------------------------------------- online DPO

def test_online_dpo_pairs_and_loss_equal_a_recomputation():
    tr = trace("online_dpo")
    v = tr.values
    best, worst, keep = train_online_dpo.best_and_worst(v["scores"], 4)
    assert torch.equal(keep, v["keep"]) and bool(keep.any())
    losses, _, _ = L.dpo_loss(v["policy_chosen_logps"], v["policy_rejected_logps"], v["ref_chosen_logps"],
                              v["ref_rejected_logps"], DEFAULT_BETA["sigmoid"])
    assert torch.allclose(losses, v["losses"]) and float(losses.mean()) == pytest.approx(printed_scalar(tr, "loss"),
                                                                                         abs=1e-4)
    # the policy's log-probs (pair layout) equal the reference's (rollout layout) at step 0, to rounding
    assert torch.allclose(v["policy_chosen_logps"], v["ref_chosen_logps"], atol=1e-4)


# ----------------------------------------------------------------------------------------------- lessons

def test_the_lessons_embed_what_the_code_prints():
    """Each lesson's embedded output equals the walkthrough's (words exactly, numbers to 1e-3). If this fails:
    python -m minialign.walkthrough --write-docs docs/"""
    assert docs.lessons(ROOT / "docs"), "no lesson embeds a walkthrough"
    stale = docs.check_docs(ROOT / "docs", run=lambda args: trace(args).text)
    assert not stale, "\n".join(stale) + "\nregenerate: python -m minialign.walkthrough --write-docs docs/"


def test_a_changed_number_or_word_is_caught_and_rounding_is_not():
    text = "  loss = 0.6931      mean over pairs\n  pair  0  -1.2345"
    assert docs.same_output(text, text) is None
    assert docs.same_output(text, text.replace("0.6931", "0.6932")) is None  # a last digit rounded differently
    assert docs.same_output(text, text.replace("  0  ", "    0    ")) is None  # a wider column
    assert docs.same_output(text, text.replace("0.6931", "0.7931"))
    assert docs.same_output(text, text.replace("pairs", "pair"))


def test_every_test_a_lesson_names_exists():
    """The pitfalls name the tests that guard them (tests/test_x.py::test_y): each must exist."""
    named = set()
    for md in (ROOT / "docs").rglob("*.md"):
        named |= set(re.findall(r"tests/(test_\w+\.py)::(test_\w+)", md.read_text(encoding="utf-8")))
    assert named
    missing = [f"{f}::{t}" for f, t in sorted(named)
               if not re.search(rf"^def {t}\(", (ROOT / "tests" / f).read_text(encoding="utf-8"), re.M)]
    assert not missing, missing


def test_every_embedded_flag_set_is_a_run_this_file_checks():
    """The runs the lessons embed are among RUNS (or the plain ALGO), so their values are tested above too."""
    embedded = {args for md in docs.lessons(ROOT / "docs") for args, _ in docs.blocks(md.read_text(encoding="utf-8"))}
    assert embedded <= set(RUNS) | {"dpo"}, embedded - set(RUNS)
