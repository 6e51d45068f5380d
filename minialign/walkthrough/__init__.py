"""One real update of each algorithm, every quantity printed: `python -m minialign.walkthrough ALGO`.

    python -m minialign.walkthrough sft | rm | dpo | kto | ppo | grpo | online_dpo
    python -m minialign.walkthrough dpo --loss_type ipo              (the DPO family: sigmoid robust hinge ipo
                                                                      simpo cpo orpo)
    python -m minialign.walkthrough grpo --advantage_estimator rloo  (grpo rloo reinforce_pp remax)
    python -m minialign.walkthrough --write-docs docs/               (regenerate the lessons' embedded outputs)

On the default task's data (data/) and an SFT checkpoint (--ckpt; default the main job's out/sft, else a tiny
model trained here in seconds, which it says), each walkthrough takes step 0 of its script's data order (or
rollout), computes what the script computes with the SAME package functions (minialign.algorithms.*: packing,
preference, rollout, advantages, losses), prints each quantity by the name it has in the losses' docstrings,
with shapes and values, decoded tokens beside their ids, then takes ONE AdamW step through
minialign.training.loop.train_step and prints how the quantities moved. Deterministic: seeded, one thread.
tests/test_walkthrough.py recomputes the printed values (the DPO loss from the printed log-probs with
dpo_loss, the GAE table with gae(), ...) and compares the walkthrough with the scripts' own loss functions.

What is simplified, on purpose: a few examples (--batch) in one micro-batch; the peak learning rate without
warmup, so one step is visible; PPO with one minibatch (its second epoch's forward shows the ratio and
clipping after the step).
"""

from __future__ import annotations

import argparse
import sys

import torch

from minialign.algorithms.losses import ADVANTAGE_ESTIMATORS, DPO_LOSS_TYPES, GRPO_LOSS_TYPES
from minialign.algorithms.preference import LOSS_TYPES
from minialign.walkthrough.context import prepare
from minialign.walkthrough.trace import Trace

ALGOS = ("sft", "rm", "dpo", "kto", "ppo", "grpo", "online_dpo")
DEFAULT_BATCH = {"sft": 4, "rm": 4, "dpo": 4, "kto": 4, "ppo": 4, "grpo": 4, "online_dpo": 8}
DEFAULT_GENERATIONS = {"grpo": 8, "online_dpo": 4}  # the scripts' --num_generations
LOSS_TYPE_CHOICES = {"dpo": LOSS_TYPES, "online_dpo": DPO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minialign.walkthrough", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("algo", nargs="?", choices=ALGOS, help="the algorithm whose update to walk through")
    ap.add_argument("--ckpt", default="", help="SFT checkpoint (default: out/sft if the main job wrote it, else a tiny "
                                               "model trained in seconds)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny model even when out/sft exists (the lessons do)")
    ap.add_argument("--reward_model", default=None, help="PPO / GRPO / online DPO judge (default: out/rm next to "
                                                         "out/sft; '' or none: the default task's gold rule)")
    ap.add_argument("--seed", type=int, default=1337, help="the scripts' --seed: data order, sampling, fresh heads")
    ap.add_argument("--batch", type=int, default=None, help=f"examples (pairs, prompts) in the step (unset: {DEFAULT_BATCH})")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the one step (unset: the script's peak lr)")
    ap.add_argument("--beta", type=float, default=None, help="dpo/online_dpo/kto β, ppo kl_coef, grpo β (default: "
                                                             "the script's)")
    ap.add_argument("--loss_type", default=None, help=f"dpo: {' | '.join(LOSS_TYPES)}; online_dpo: "
                                                      f"{' | '.join(DPO_LOSS_TYPES)}; grpo: {' | '.join(GRPO_LOSS_TYPES)}")
    ap.add_argument("--label_smoothing", type=float, default=0.0, help="dpo: ε of cDPO (sigmoid) / rDPO (robust)")
    ap.add_argument("--advantage_estimator", default="grpo", choices=ADVANTAGE_ESTIMATORS, help="grpo's baseline")
    ap.add_argument("--num_generations", type=int, default=None, help="grpo G / online_dpo K: samples per prompt "
                                                                      f"(unset: the script's, {DEFAULT_GENERATIONS})")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="ppo / grpo / online_dpo generation budget "
                                                                  "(the scripts' 32)")
    ap.add_argument("--rows", type=int, default=0, help="token rows per table (0 = every token of the response)")
    ap.add_argument("--data_dir", default="", help="the default task's folder (default: the repository's data/)")
    ap.add_argument("--write-docs", dest="write_docs", metavar="DIR", default="",
                    help="regenerate the walkthrough outputs embedded in DIR/**/*.md (e.g. docs/)")
    ap.add_argument("--check-docs", dest="check_docs", metavar="DIR", default="",
                    help="fail when an output embedded in DIR/**/*.md differs from what the code prints")
    return ap


def walk(argv: list[str], echo: bool = True, log=sys.stderr) -> Trace:
    """Run one walkthrough (argv as on the command line, e.g. ["dpo", "--loss_type", "ipo"]) -> its Trace."""
    args = parser().parse_args(argv)
    if args.algo is None:
        parser().error("give an ALGO (" + " | ".join(ALGOS) + "), or --write-docs DIR")
    choices = LOSS_TYPE_CHOICES.get(args.algo)
    if args.loss_type is not None and (choices is None or args.loss_type not in choices):
        parser().error(f"--loss_type {args.loss_type} is not a loss of {args.algo}"
                       + (f" (choose from {', '.join(choices)})" if choices else ""))
    if args.advantage_estimator != "grpo" and args.algo != "grpo":
        parser().error("--advantage_estimator is read by grpo only")
    from minialign.walkthrough import offline, online  # after the flags are checked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every run (and tiny models gain nothing from 2)
    try:
        ctx = prepare(args.ckpt, args.reward_model, args.tiny, args.seed, args.data_dir, log)
        tr = Trace(echo)
        batch = args.batch or DEFAULT_BATCH[args.algo]
        common = {"lr": args.lr, "batch_size": batch, "rows": args.rows}
        sampled = {"num_generations": args.num_generations or DEFAULT_GENERATIONS.get(args.algo, 0),
                   "max_new_tokens": args.max_new_tokens}
        if args.algo == "sft":
            offline.walk_sft(ctx, tr, **common)
        elif args.algo == "rm":
            offline.walk_rm(ctx, tr, **common)
        elif args.algo == "dpo":
            offline.walk_dpo(ctx, tr, args.loss_type or "sigmoid", args.beta or 0.0,
                             label_smoothing=args.label_smoothing, **common)
        elif args.algo == "kto":
            offline.walk_kto(ctx, tr, args.beta or 0.0, **common)
        elif args.algo == "ppo":
            online.walk_ppo(ctx, tr, kl_coef=args.beta, max_new_tokens=args.max_new_tokens, **common)
        elif args.algo == "grpo":
            online.walk_grpo(ctx, tr, args.advantage_estimator, args.loss_type or "grpo", beta=args.beta, **sampled,
                             **common)
        else:
            online.walk_online_dpo(ctx, tr, args.loss_type or "sigmoid", args.beta or 0.0, **sampled, **common)
    finally:
        torch.set_num_threads(threads)
    return tr
