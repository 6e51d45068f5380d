"""Read the JSONL formats people already have into normalized Python records.

Every loader reads a .jsonl or .jsonl.gz file (gzip is detected by its magic bytes, not by the
suffix), recognizes the format of each line from its keys, validates it, and returns plain
records whose conversations are lists of messages {"role": ..., "content": str}. Nothing is
tokenized here; that is the collator's job.

    load_pretrain(path)     {"text"}, or a plain .txt file split into paragraphs on blank lines
    load_sft(path)          {"messages"} (OpenAI/TRL), {"conversations"} (MiniMind),
                            {"prompt", "completion"} (strings or message lists, TRL),
                            {"instruction", "input", "output"} (alpaca)
    load_preferences(path)  {"prompt", "chosen", "rejected"} (strings or message lists, TRL),
                            {"chosen", "rejected"} as whole conversations (MiniMind DPO, TRL
                            implicit prompt) or as Anthropic HH transcripts ("\\n\\nHuman: ...")
    load_prompts(path)      {"prompt"} (string or messages), {"messages"}, GSM8K
                            {"question", "answer"}; every other key is kept in `fields`
    load_unpaired(path)     {"prompt", "completion", "label": bool} (KTO)

Rules every conversation obeys after loading (anything else is a DataError):
  - roles are "system", "user", "assistant"; other keys of a message are ignored;
  - an optional system message comes first, then user and assistant turns alternate, starting
    with user (two user turns in a row is an error, not something we merge);
  - contents are strings, and non-empty after strip() (a system message may be empty);
  - SFT conversations end with an assistant turn; prompts end with a user turn.

Errors name the file, the 1-based line and what is wrong: "data.jsonl:3: field 'content' of
message 2 in 'messages' must be a string, got int". Only problems that occur in real public
data are skipped instead of raised; every skip is counted in `stats` (if given) and reported
in a single DataWarning per load:

  identical_chosen_rejected  chosen == rejected: the pair carries no preference signal.
  skipped_empty_response     HH: the final Assistant reply is empty.
  skipped_empty_turn         HH: an earlier turn of the transcript is empty.
  skipped_bad_role_order     HH: turns do not alternate Human/Assistant ending with Assistant
                             (a reply that itself contains "\\n\\nAssistant:", or a transcript
                             that ends with a Human turn).
  dropped_final_assistant    prompts from {"messages"}: the trailing assistant turn was removed
                             (the record is kept: counted in stats, no warning).
  skipped_empty_text         pretrain: {"text": ""}.

The HH skips apply only to HH transcripts, whose turns we recover by splitting text; the same
defects in explicit message lists are the writer's mistake and raise a DataError. HH lines that
are not transcripts at all (no leading "\\n\\nHuman:", no Assistant turn), or whose chosen and
rejected share no prompt ending with a Human turn (never seen in the real files), also raise.
In the four HH test splits (8552 lines) 8475 pairs load; skipped are 36 identical pairs,
10 empty replies, 2 empty earlier turns and 29 transcripts with broken turn order.

Simplified on purpose: no ShareGPT {"from", "value"} turns, no tool/function roles, no
multimodal content lists; they are refused with a clear error rather than half supported.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")
GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is malformed. str(err) is "<path>:<line>: <what>" ("<path>: <what>" when the
    problem concerns the whole file, e.g. it is empty)."""

    def __init__(self, path, line: int | None, what: str):
        self.path = str(path)
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep picklable despite the 3-argument constructor
        return (DataError, (self.path, self.line, self.what))


class DataWarning(UserWarning):
    """Records were skipped while loading (see the module docstring for the reasons)."""


@dataclass
class PreferencePair:
    prompt: list[Message]  # ends with a user turn
    chosen: list[Message]  # the turn(s) after the prompt, ending with an assistant turn
    rejected: list[Message]
    fields: dict = field(default_factory=dict)  # extra keys of the line, e.g. "margin"


@dataclass
class PromptRecord:
    prompt: list[Message]  # ends with a user turn
    fields: dict = field(default_factory=dict)  # every other key, passed on to reward functions
    line: int | None = field(default=None, compare=False)  # line number in the file it came from


@dataclass
class UnpairedRecord:
    prompt: list[Message]
    completion: list[Message]
    label: bool  # True = desirable completion
    fields: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading lines


def _read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) for a plain or gzipped UTF-8 file."""
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if is_gzip else raw
        lines = iter(stream)
        line_no = 0
        while True:
            try:
                raw_line = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                if not is_gzip:
                    raise
                last_good = f"after line {line_no}" if line_no else "before the first line"
                raise DataError(path, line_no + 1,
                                f"gzip data is truncated or corrupt {last_good} ({e})") from None
            line_no += 1
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no,
                                f"not valid UTF-8 (byte 0x{raw_line[e.start]:02x} at byte "
                                f"{e.start} of the line); re-encode the file as UTF-8") from None
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless
            yield line_no, text


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a .jsonl(.gz) file."""
    n_records = 0
    for line_no, text in _read_text_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:  # e.pos + 1: a column within this line, 1-based
            raise DataError(path, line_no,
                            f"malformed JSON: {e.msg} (column {e.pos + 1})") from None
        if not isinstance(obj, dict):
            raise DataError(path, line_no,
                            f"expected a JSON object per line, got {_type_name(obj)}")
        n_records += 1
        yield line_no, obj
    if n_records == 0:
        raise DataError(path, None, "file is empty (no JSON records)")


# ---------------------------------------------------------------------------------------------
# Validation helpers. They raise _Invalid (just the "what"); _load adds the path and line.


class _Invalid(Exception):
    pass


class _Skip(Exception):
    """The line is well-formed but unusable in a way real datasets contain; args[0] = reason."""


def _type_name(value) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
             list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _require_keys(obj: dict, keys: tuple[str, ...], fmt: str) -> None:
    for key in keys:
        if key not in obj:
            raise _Invalid(f"missing field '{key}' ({fmt} needs {', '.join(map(repr, keys))}; "
                           f"the line has {sorted(obj)})")


def _string(obj: dict, key: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f"field '{key}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _Invalid(f"field '{key}' is empty")
    return value


def _messages(value, where: str) -> list[Message]:
    """Normalize a JSON list of messages to [{"role", "content"}]; `where` names it in errors."""
    if not isinstance(value, list):
        raise _Invalid(f"{where} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise _Invalid(f"{where} is an empty list")
    out = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            raise _Invalid(f"message {i} in {where} must be an object with 'role' and 'content', "
                           f"got {_type_name(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise _Invalid(f"message {i} in {where} is missing field '{key}' "
                               f"(it has {sorted(msg)})")
            if not isinstance(msg[key], str):
                raise _Invalid(f"field '{key}' of message {i} in {where} must be a string, "
                               f"got {_type_name(msg[key])}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise _Invalid(f"message {i} in {where} has unknown role {role!r}; "
                           f"valid roles are {', '.join(ROLES)}")
        if role != "system" and not content.strip():
            raise _Invalid(f"message {i} in {where} ({role}) has empty content")
        out.append({"role": role, "content": content})
    return out


def _as_messages(obj: dict, key: str, role_for_string: str) -> list[Message]:
    """A field holding a plain string (one message of `role_for_string`) or a message list."""
    if isinstance(obj[key], str):
        return [{"role": role_for_string, "content": _string(obj, key)}]
    if not isinstance(obj[key], list):
        raise _Invalid(f"field '{key}' must be a string or a list of messages, "
                       f"got {_type_name(obj[key])}")
    return _messages(obj[key], f"'{key}'")


def _check_order(messages: list[Message], where: str, last_role: str) -> None:
    """Optional leading system, then user/assistant alternating from user, ending with last_role."""
    expected = "user"
    for i, msg in enumerate(messages, start=1):
        if msg["role"] == "system" and i == 1:
            continue
        if msg["role"] != expected:
            previous = f"after '{messages[i - 2]['role']}'" if i > 1 else "first"
            raise _Invalid(f"roles out of order in {where}: message {i} is '{msg['role']}' "
                           f"{previous}; expected an optional system message first, then user "
                           f"and assistant turns alternating, starting with user")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != last_role:
        article = "an" if last_role == "assistant" else "a"
        raise _Invalid(f"{where} must end with {article} {last_role} turn, but its last message "
                       f"(message {len(messages)}) is '{messages[-1]['role']}'")


def _unknown_format(obj: dict, kind: str, key_sets: list[str]) -> _Invalid:
    return _Invalid(f"no {kind} format matches the keys {sorted(obj)}; accepted key sets are "
                    + ", ".join(key_sets))


# ---------------------------------------------------------------------------------------------
# The common loading loop


def _load(path: str | Path, parse: Callable[[dict, Counter], object], stats: dict | None,
          counters: tuple[str, ...], with_lines: bool = False) -> list:
    """Parse every record of `path`; `parse(obj, counts)` returns a record, raises _Invalid
    (-> DataError) or _Skip, and may bump counts[...] for records it keeps but changes."""
    records, counts, first_skip_line = [], Counter(), {}
    for line_no, obj in read_jsonl(path):
        try:
            rec = parse(obj, counts)
            records.append((rec, line_no) if with_lines else rec)
        except _Invalid as e:
            raise DataError(path, line_no, str(e)) from None
        except _Skip as e:
            reason = e.args[0]
            counts[reason] += 1
            first_skip_line.setdefault(reason, line_no)
    if stats is not None:  # counters accumulate, so one dict can collect several files
        stats["loaded"] = stats.get("loaded", 0) + len(records)
        for name in counters:
            stats[name] = stats.get(name, 0) + counts[name]
    if first_skip_line:
        details = ", ".join(f"{r}={counts[r]} (first at line {first_skip_line[r]})"
                            for r in sorted(first_skip_line))
        n_skipped = sum(counts[r] for r in first_skip_line)
        warnings.warn(f"{path}: skipped {n_skipped} records: {details}", DataWarning, stacklevel=3)
    return records


# ---------------------------------------------------------------------------------------------
# Pretraining text


def load_pretrain(path: str | Path, stats: dict | None = None) -> list[str]:
    """{"text": str} per line; or a .txt(.gz) file whose paragraphs (separated by blank lines)
    become the documents. Empty texts are skipped and counted as skipped_empty_text."""
    name = Path(path).name.removesuffix(".gz")
    if name.endswith(".txt"):
        return _load_txt(path, stats)

    def parse(obj: dict, counts: Counter) -> str:
        if "text" not in obj:
            raise _unknown_format(obj, "pretraining", ["{text}"])
        text = _string(obj, "text", allow_empty=True)
        if not text.strip():
            raise _Skip("skipped_empty_text")
        return text

    return _load(path, parse, stats, ("skipped_empty_text",))


def _load_txt(path: str | Path, stats: dict | None) -> list[str]:
    paragraphs, current = [], []
    for _, line in _read_text_lines(path):
        if line.strip():
            current.append(line.rstrip("\r\n"))
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    if not paragraphs:
        raise DataError(path, None, "file is empty (no text)")
    if stats is not None:
        stats["loaded"] = stats.get("loaded", 0) + len(paragraphs)
    return paragraphs


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning

SFT_KEY_SETS = ["{messages}", "{conversations}", "{prompt, completion}",
                "{instruction, input, output}"]


def _parse_sft(obj: dict, counts: Counter) -> list[Message]:
    if "messages" in obj or "conversations" in obj:
        key = "messages" if "messages" in obj else "conversations"
        conversation = _messages(obj[key], f"'{key}'")
        _check_order(conversation, f"'{key}'", last_role="assistant")
        return conversation
    if "prompt" in obj or "completion" in obj:
        _require_keys(obj, ("prompt", "completion"), "the prompt-completion format")
        conversation = (_as_messages(obj, "prompt", "user")
                        + _as_messages(obj, "completion", "assistant"))
        _check_order(conversation, "'prompt' + 'completion'", last_role="assistant")
        return conversation
    if "instruction" in obj or "output" in obj:
        _require_keys(obj, ("instruction", "output"), "the alpaca format")
        user = _string(obj, "instruction")
        extra = _string(obj, "input", allow_empty=True) if "input" in obj else ""
        if extra.strip():
            user += "\n\n" + extra
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _string(obj, "output")}]
    raise _unknown_format(obj, "SFT", SFT_KEY_SETS)


def load_sft(path: str | Path, stats: dict | None = None) -> list[list[Message]]:
    """One conversation per line, ending with an assistant turn. Extra keys are ignored."""
    return _load(path, _parse_sft, stats, ())


# ---------------------------------------------------------------------------------------------
# Preference pairs

PREFERENCE_SKIPS = ("identical_chosen_rejected", "skipped_empty_response", "skipped_empty_turn",
                    "skipped_bad_role_order")
PREFERENCE_KEY_SETS = ["{prompt, chosen, rejected}",
                       "{chosen, rejected} (whole conversations or Anthropic HH transcripts)"]
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _parse_hh(text: str, key: str) -> list[Message]:
    """Split an Anthropic HH transcript into turns. Raises _Invalid if it is not a transcript;
    roles and emptiness are checked by the caller (they occur in real HH data)."""
    if text.startswith(("Human:", "Assistant:")):  # tolerate a missing leading "\n\n"
        text = "\n\n" + text
    parts = _HH_MARKER.split(text)  # [before, "Human", content, "Assistant", content, ...]
    if parts[0].strip() or len(parts) == 1:
        raise _Invalid(f"field '{key}' is not an Anthropic HH transcript: it must start with "
                       f"'\\n\\nHuman:', but starts with {text[:30]!r}")
    turns = [{"role": "user" if marker == "Human" else "assistant",
              "content": content.removeprefix(" ")}
             for marker, content in zip(parts[1::2], parts[2::2])]
    if not any(t["role"] == "assistant" for t in turns):
        raise _Invalid(f"field '{key}' is an HH transcript with no '\\n\\nAssistant:' turn")
    return turns


def _hh_skip_reason(turns: list[Message], key: str) -> str | None:
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"].strip():
        return "skipped_empty_response"
    if any(not t["content"].strip() for t in turns):
        return "skipped_empty_turn"
    try:
        _check_order(turns, f"'{key}'", last_role="assistant")
    except _Invalid:
        return "skipped_bad_role_order"
    return None


def _split_shared_prompt(chosen: list[Message], rejected: list[Message]):
    """(prompt, chosen reply, rejected reply): the prompt is the longest common prefix of whole
    messages, and must end with a user turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or chosen[n - 1]["role"] != "user":
        last = f"ends with '{chosen[n - 1]['role']}' (message {n})" if n else "is empty"
        raise _Invalid(f"'chosen' and 'rejected' must share a prompt ending with a user turn, "
                       f"but their common prefix of whole messages {last}")
    return chosen[:n], chosen[n:], rejected[n:]


def _parse_preference(obj: dict, counts: Counter) -> PreferencePair:
    if "chosen" not in obj and "rejected" not in obj:
        raise _unknown_format(obj, "preference", PREFERENCE_KEY_SETS)
    _require_keys(obj, ("chosen", "rejected"), "a preference pair")
    fields = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}

    if "prompt" in obj:  # explicit prompt: strings or TRL conversational message lists
        prompt = _as_messages(obj, "prompt", "user")
        chosen = _as_messages(obj, "chosen", "assistant")
        rejected = _as_messages(obj, "rejected", "assistant")
        _check_order(prompt, "'prompt'", last_role="user")
        _check_order(prompt + chosen, "'prompt' + 'chosen'", last_role="assistant")
        _check_order(prompt + rejected, "'prompt' + 'rejected'", last_role="assistant")
        if chosen == rejected:
            raise _Skip("identical_chosen_rejected")
        return PreferencePair(prompt, chosen, rejected, fields)

    both_strings = isinstance(obj["chosen"], str) and isinstance(obj["rejected"], str)
    both_lists = isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list)
    if both_strings:  # Anthropic HH transcripts
        chosen_all = _parse_hh(obj["chosen"], "chosen")
        rejected_all = _parse_hh(obj["rejected"], "rejected")
        if chosen_all == rejected_all:
            raise _Skip("identical_chosen_rejected")
        for turns, key in ((chosen_all, "chosen"), (rejected_all, "rejected")):
            reason = _hh_skip_reason(turns, key)
            if reason:
                raise _Skip(reason)
        return PreferencePair(*_split_shared_prompt(chosen_all, rejected_all), fields)
    if both_lists:  # implicit prompt: two whole conversations (MiniMind DPO, TRL)
        chosen_all = _messages(obj["chosen"], "'chosen'")
        rejected_all = _messages(obj["rejected"], "'rejected'")
        _check_order(chosen_all, "'chosen'", last_role="assistant")
        _check_order(rejected_all, "'rejected'", last_role="assistant")
        if chosen_all == rejected_all:
            raise _Skip("identical_chosen_rejected")
        return PreferencePair(*_split_shared_prompt(chosen_all, rejected_all), fields)
    raise _Invalid(f"without 'prompt', 'chosen' and 'rejected' must both be strings (HH "
                   f"transcripts) or both message lists, got {_type_name(obj['chosen'])} and "
                   f"{_type_name(obj['rejected'])}")


def load_preferences(path: str | Path, stats: dict | None = None) -> list[PreferencePair]:
    """One (prompt, chosen, rejected) pair per line; see the module docstring for the skips."""
    return _load(path, _parse_preference, stats, PREFERENCE_SKIPS)


# ---------------------------------------------------------------------------------------------
# RL prompts

PROMPT_KEY_SETS = ["{prompt}", "{messages}", "{question, answer} (GSM8K)"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_gold_answer(answer: str) -> str | None:
    """The number after the last '####' with thousands separators removed ("1,450" -> "1450"),
    or None if there is no such number."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold if _NUMBER.fullmatch(gold) else None


def _parse_prompt(obj: dict, counts: Counter) -> PromptRecord:
    if "prompt" in obj:
        prompt = _as_messages(obj, "prompt", "user")
        _check_order(prompt, "'prompt'", last_role="user")
        return PromptRecord(prompt, {k: v for k, v in obj.items() if k != "prompt"})
    if "messages" in obj:
        messages = _messages(obj["messages"], "'messages'")
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            # a chat dataset reused for RL: the reference reply is not part of the prompt
            messages = messages[:-1]
            counts["dropped_final_assistant"] += 1
        _check_order(messages, "'messages'", last_role="user")
        return PromptRecord(messages, {k: v for k, v in obj.items() if k != "messages"})
    if "question" in obj:
        _require_keys(obj, ("question", "answer"), "the GSM8K format")
        answer = _string(obj, "answer")
        gold = gsm8k_gold_answer(answer)
        if gold is None:
            raise _Invalid("field 'answer' does not end with '#### <number>', so the gold answer "
                           "cannot be extracted")
        fields = {k: v for k, v in obj.items() if k != "question"}
        fields["gold_answer"] = gold
        return PromptRecord([{"role": "user", "content": _string(obj, "question")}], fields)
    raise _unknown_format(obj, "prompt", PROMPT_KEY_SETS)


def load_prompts(path: str | Path, stats: dict | None = None) -> list[PromptRecord]:
    """RL prompts ending with a user turn. From {"messages"}, a final assistant turn is dropped
    (counted as dropped_final_assistant). GSM8K lines get fields["gold_answer"]."""
    records = _load(path, _parse_prompt, stats, ("dropped_final_assistant",), with_lines=True)
    for rec, line_no in records:
        rec.line = line_no
    return [rec for rec, _ in records]


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO)


def _parse_unpaired(obj: dict, counts: Counter) -> UnpairedRecord:
    if not any(k in obj for k in ("prompt", "completion", "label")):
        raise _unknown_format(obj, "unpaired", ["{prompt, completion, label}"])
    _require_keys(obj, ("prompt", "completion", "label"), "the unpaired (KTO) format")
    prompt = _as_messages(obj, "prompt", "user")
    completion = _as_messages(obj, "completion", "assistant")
    _check_order(prompt, "'prompt'", last_role="user")
    _check_order(prompt + completion, "'prompt' + 'completion'", last_role="assistant")
    if not isinstance(obj["label"], bool):
        raise _Invalid(f"field 'label' must be a JSON bool (true/false), "
                       f"got {_type_name(obj['label'])} {obj['label']!r}")
    fields = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "label")}
    return UnpairedRecord(prompt, completion, obj["label"], fields)


def load_unpaired(path: str | Path, stats: dict | None = None) -> list[UnpairedRecord]:
    """KTO-style lines: one completion with a desirable (true) / undesirable (false) label."""
    return _load(path, _parse_unpaired, stats, ())
