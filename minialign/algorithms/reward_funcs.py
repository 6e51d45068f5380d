"""Rule-based reward functions for online RL (GRPO, and PPO's optional rule terms), and their registry.

Every reward function has the same signature, TRL's:

    f(prompts: list[str], completions: list[str], **fields) -> list[float]     (one reward per completion)

`prompts[i]` is the last user message of completion i's prompt, `completions[i]` its decoded response
(special tokens such as <|im_end|> dropped, so text alone cannot tell a finished response from a
truncated one). Each field is a list with one entry per completion. Two sources of fields:

  * the prompt file: every key of a prompt line besides the prompt itself (minialign.data.formats.load_prompts),
    e.g. "kind" and "answer" for the default task, "gold_answer" for GSM8K, plus "messages";
  * the rollout (ROLLOUT_FIELDS, added by minialign.algorithms.rollout.reward_fields):
        finished               True if the response ended with the end-of-turn token <|im_end|>
        completion_length      response length in tokens, the end-of-turn token included
        max_completion_length  the generation budget (max_new_tokens)

A function names the fields it needs as parameters (without default) after `completions`; the rest
arrive in **fields and are ignored. `check_fields` compares those names with the prompts once, before
training, and `compute_rewards` again at every call, so a prompt without a needed field fails with a
message naming the function and the field, instead of a KeyError deep inside a rollout.

The registry (REWARD_FUNCS), selected with `--reward_funcs gold format --reward_weights 1.0 0.1`:

    gold     the default task's rule (minialign.task.gold.gold_reward): 1 if the completion is correct
             for its kind (arith: last integer is the answer; harmful: refusal; benign: a
             non-refusal of >= 3 words), else 0. Needs fields kind, answer.
    format   1 if the response ended with <|im_end|> (it finished instead of running out of
             tokens) and has visible text, else 0. Needs the rollout field finished.
    length   -completion_length / max_completion_length, in [-1, 0): a penalty proportional to
             the response's token count (the end-of-turn token included).
    gsm8k    1 if the completion's final answer equals fields["gold_answer"] numerically, else 0.
             The final answer is the number after the last "####" if there is one, else the last
             number in the text ("1,450" reads as 1450). GSM8K prompt files get gold_answer from
             minialign.data.formats.load_prompts.

Parameterized terms, NAME:ARG (PARAMETERIZED_REWARD_FUNCS; ARG is everything after the first colon):

    classifier:PATH  P(positive) of prompt + completion under the sentiment classifier saved at PATH
             (minialign.algorithms.classifier; the IMDb experiment's true reward, minialign.experiments.imdb.run). The
             text scored is the whole review, prefix x then continuation y, as in Rafailov et al. 2023
             (Sec. 6.1, r(x, y) of the review x + y): the prefix alone already carries sentiment ("I loved"),
             so the policy is judged on what the reader sees. The file is loaded once per process (cached by
             path) when the term is parsed, so a bad path fails before training starts.

Simplified on purpose: rewards are computed on rank-local completions in Python (cheap next to
generation); no async or batched remote reward servers.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

from minialign.data.formats import NUMBER, number_text
from minialign.errors import UserError
from minialign.task.gold import gold_reward

__all__ = ["gold_reward", "format_reward", "length_penalty", "gsm8k_reward", "extract_final_answer",
           "classifier_reward", "REWARD_FUNCS", "PARAMETERIZED_REWARD_FUNCS", "resolve_reward_func", "ROLLOUT_FIELDS",
           "RewardSource", "MissingFieldError", "parse_reward_funcs",
           "required_fields", "check_fields", "compute_rewards"]

ROLLOUT_FIELDS = ("finished", "completion_length", "max_completion_length")


def format_reward(prompts: list, completions: list[str], finished: list[bool], **fields) -> list[float]:
    """1.0 where the response ended with <|im_end|> and has non-whitespace text, else 0.0."""
    _check_lengths("format", prompts, completions, finished=finished)
    return [float(bool(f) and bool(c.strip())) for c, f in zip(completions, finished)]


def length_penalty(prompts: list, completions: list[str], completion_length: list[int],
                   max_completion_length: list[int], **fields) -> list[float]:
    """-length / budget, in [-1, 0): the longer the response (in tokens), the lower the reward."""
    _check_lengths("length", prompts, completions, completion_length=completion_length,
                   max_completion_length=max_completion_length)
    return [-float(n) / float(m) for n, m in zip(completion_length, max_completion_length)]


_FINAL = re.compile(r"####\s*(" + NUMBER.pattern + ")")


def extract_final_answer(text: str) -> str | None:
    """The number after the last '####', else the last number in `text` (the number grammar of
    minialign.data.formats.NUMBER, shared with the gold answers); commas removed; None if none."""
    found = _FINAL.findall(text) or NUMBER.findall(text)
    return number_text(found[-1]) if found else None


def _same_number(a: str | None, b) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(str(b).replace(",", ""))  # exact: "72" == "72.0", no float rounding
    except InvalidOperation:
        return False


def gsm8k_reward(prompts: list, completions: list[str], gold_answer: list, **fields) -> list[float]:
    """1.0 where the completion's final answer (see extract_final_answer) equals gold_answer, else 0.0."""
    _check_lengths("gsm8k", prompts, completions, gold_answer=gold_answer)
    return [float(_same_number(extract_final_answer(c), g)) for c, g in zip(completions, gold_answer)]


REWARD_FUNCS: dict[str, Callable] = {
    "gold": gold_reward,
    "format": format_reward,
    "length": length_penalty,
    "gsm8k": gsm8k_reward,
}

_CLASSIFIERS: dict[str, object] = {}  # resolved path -> loaded minialign.algorithms.classifier.SentimentClassifier


def classifier_reward(path: str) -> Callable:
    """The reward function of the term classifier:PATH: f(prompts, completions) = P(positive | prompt + completion)
    under the sentiment classifier at `path` (loaded once per process). A missing or unreadable file is a
    ValueError naming it."""
    from pathlib import Path

    from minialign.algorithms.classifier import load_classifier

    if not path:
        raise ValueError("reward function 'classifier' needs the classifier's path: classifier:PATH")
    key = str(Path(path).resolve())
    if key not in _CLASSIFIERS:
        try:
            _CLASSIFIERS[key] = load_classifier(path)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    clf = _CLASSIFIERS[key]

    def classifier(prompts: list, completions: list[str], **fields) -> list[float]:
        _check_lengths("classifier", prompts, completions)
        return clf.predict_proba([p + c for p, c in zip(prompts, completions)]).tolist()

    return classifier


# NAME:ARG terms: NAME -> a factory taking ARG and returning the reward function
PARAMETERIZED_REWARD_FUNCS: dict[str, Callable[[str], Callable]] = {
    "classifier": classifier_reward,
}


def resolve_reward_func(name: str) -> Callable | None:
    """The function of a --reward_funcs entry: a registry name, or NAME:ARG of a parameterized term; None if
    unknown. A parameterized term's factory may raise ValueError (e.g. a classifier file that is missing)."""
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    head, sep, arg = name.partition(":")
    if sep and head in PARAMETERIZED_REWARD_FUNCS:
        return PARAMETERIZED_REWARD_FUNCS[head](arg)
    return None


def _check_lengths(name: str, prompts: list, completions: list, **fields) -> None:
    n = len(completions)
    bad = {k: len(v) for k, v in {"prompts": prompts, **fields}.items() if len(v) != n}
    if bad:
        raise ValueError(f"reward function {name!r}: {n} completions but "
                         + ", ".join(f"{v} {k}" for k, v in bad.items()))


# --------------------------------------------------------------------------------------- registry

@dataclass
class RewardSource:
    """One term of the total reward: total = sum over sources of weight * reward."""
    name: str
    fn: Callable | None  # None for a trained reward model (scored by the trainer, not here)
    weight: float


def parse_reward_funcs(names: list[str], weights: list[float], model_names: tuple[str, ...] = ()) -> list[RewardSource]:
    """`--reward_funcs a b --reward_weights wa wb` -> sources. No weights = all 1.0.

    model_names: names the trainer scores itself with a trained model (e.g. "reward_model"); they
    get fn=None here.
    """
    if not names:
        raise ValueError("--reward_funcs needs at least one name; valid: " + ", ".join([*REWARD_FUNCS, *model_names]))
    if len(set(names)) != len(names):
        raise ValueError(f"--reward_funcs lists a function twice: {names}")
    valid = ", ".join([*REWARD_FUNCS, *model_names, *(f"{k}:ARG" for k in PARAMETERIZED_REWARD_FUNCS)])
    unknown = [n for n in names if n not in model_names and n not in REWARD_FUNCS
               and n.partition(":")[0] not in PARAMETERIZED_REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; valid: {valid}")
    weights = list(weights) if weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} --reward_funcs {names}")
    return [RewardSource(n, None if n in model_names else resolve_reward_func(n), float(w))
            for n, w in zip(names, weights)]


def required_fields(fn: Callable) -> list[str]:
    """The fields a reward function needs: its parameters without default after (prompts, completions)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in params
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


class MissingFieldError(UserError, ValueError):
    """A prompt record lacks a field that a reward function reads (the message names path:line)."""


def check_fields(sources: list[RewardSource], rows: list[dict], provided: tuple[str, ...] = ROLLOUT_FIELDS,
                 locations: list[str] | None = None) -> None:
    """Raise MissingFieldError if some row lacks a field that a reward function needs.

    rows: one dict per prompt (or per completion) holding its fields; `provided` names fields the
    trainer adds itself (the rollout fields); locations: optional "file:line" of each row, for the message.
    """
    for src in sources:
        if src.fn is None:
            continue
        for name in required_fields(src.fn):
            if name in provided:
                continue
            for i, row in enumerate(rows):
                if name not in row:
                    shown = {k: v for k, v in row.items() if k not in ("prompt_ids", "messages")}
                    raise MissingFieldError(
                        f"reward function {src.name!r} needs the field {name!r}, but "
                        f"{locations[i] if locations else f'prompt {i}'} has none "
                        f"(its fields: {sorted(shown)}; e.g. {str(shown.get('prompt_text', ''))[:60]!r}). "
                        f"Add {name!r} to every line of the prompt file, or choose other --reward_funcs.")


def compute_rewards(sources: list[RewardSource], prompts: list[str], completions: list[str],
                    fields: dict[str, list]) -> dict[str, list[float]]:
    """Each rule source's rewards, unweighted: {name: [reward per completion]} (model sources skipped)."""
    out = {}
    for src in sources:
        if src.fn is None:
            continue
        missing = [n for n in required_fields(src.fn) if n not in fields]
        if missing:
            raise MissingFieldError(f"reward function {src.name!r} needs the field {missing[0]!r}, which these prompts "
                                    f"do not have (fields present: {sorted(fields)})")
        values = src.fn(prompts, completions, **fields)
        if len(values) != len(completions):
            raise ValueError(f"reward function {src.name!r} returned {len(values)} rewards for "
                             f"{len(completions)} completions")
        out[src.name] = [float(v) for v in values]
    return out
