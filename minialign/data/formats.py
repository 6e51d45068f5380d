"""Read the data files people already have into normalized Python records.

Every loader reads a .jsonl / .jsonl.gz file, or a .json file holding one top-level JSON array of
objects (pretty-printed or on one line). Gzip is detected by its magic bytes and a JSON array by
its first non-blank character '[', never by the suffix. Each record's format is recognized from
its keys, validated, and returned as plain records whose conversations are lists of messages
{"role": ..., "content": str}. Nothing is tokenized here; that is the collator's job.

    load_pretrain(path)     {"text"}; or a plain .txt file: documents are paragraphs (separated by
                            blank lines) or lines, see load_pretrain's text_split
    load_sft(path)          {"messages"} (OpenAI/TRL), {"conversations"} (MiniMind role/content, or
                            ShareGPT/LLaMA-Factory from/value with human/gpt/system),
                            {"prompt", "completion"} (strings or message lists, TRL),
                            {"instruction", "input", "output", "system", "history"} (alpaca,
                            LLaMA-Factory: system, history turns, then instruction + input -> output)
    load_preferences(path)  {"prompt", "chosen", "rejected"} (strings or message lists, TRL),
                            {"chosen", "rejected"} as whole conversations (MiniMind DPO, TRL
                            implicit prompt) or as Anthropic HH transcripts ("\\n\\nHuman: ..."),
                            {"conversations", "chosen", "rejected"} (ShareGPT, LLaMA-Factory: chosen
                            and rejected are single {"from", "value"} messages),
                            {"instruction", "input", "chosen", "rejected"} (alpaca, LLaMA-Factory),
                            ranked outputs {..., "output": [best, second, ...]} (pairs by rank_rule),
                            PKU-SafeRLHF {"prompt", "response_0", "response_1", "better_response_id",
                            "safer_response_id", "is_response_0_safe", "is_response_1_safe"}
                            (pairs by pku_choice)
    load_ranked(path)       ranked outputs, kept as groups: an alpaca prompt ({"instruction",
                            "input", "system", "history"}), {"prompt"} or {"conversations"} /
                            {"messages"}, plus "output": a list of K >= 2 responses, best first
                            (LLaMA-Factory reward-model files); rank_pairs turns a group into pairs
    load_prompts(path)      {"prompt"} (string or messages), {"messages"} / {"conversations"} (a
                            trailing assistant turn is dropped), {"instruction", "input"} (alpaca),
                            math {"question", "answer"}: GSM8K "... #### 72", or a plain answer (72,
                            51.0, "1,234", "9 (apples)"); every other key is kept in `fields`
    load_unpaired(path)     {"prompt", "completion", "label"}, {"messages"} / {"conversations"} with
                            "label" (the last assistant turn is the completion), {"instruction",
                            "input", "output", "label"}; "kto_tag" (LLaMA-Factory) is read as "label"

Rules every conversation obeys after loading (anything else is a DataError):
  - roles are "system", "user", "assistant" (ShareGPT's "human" and "gpt" are renamed to user and
    assistant); other keys of a message are ignored, except tool calls (see below);
  - an optional system message comes first, then user and assistant turns alternate, starting
    with user (two user turns in a row is an error, not something we merge);
  - contents are strings, and non-empty after strip() (a system message may be empty);
  - SFT conversations end with an assistant turn; prompts end with a user turn.

Keys outside the conversation: a top-level "system" string becomes the system message in every
format (empty is ignored; a second system message is an error); "history" is read by the alpaca
formats and is an error elsewhere, where it would be lost; a record mixing alpaca's "instruction"
with "prompt", "messages", "conversations" or "question" is an error. Every other key is
metadata: prompts, preferences, ranked groups and unpaired records keep it in `fields`; SFT and
pretraining return bare conversations and texts, so they ignore it (ids, scores, UltraChat's
"prompt" that repeats the first user turn, the default task's "kind" and "answer").

Errors name the file, the 1-based line and what is wrong: "data.jsonl:3: field 'content' of
message 2 in 'messages' must be a string, got int". In a JSON array the line is where the record
starts and the 1-based record index follows: "data.json:12: record 3: ...". Only problems that
occur in real public data are skipped instead of raised; every skip is counted in `stats` (if
given) and reported in a single DataWarning per load, which also reports the "noted" counts
(records kept, but worth knowing about):

  identical_chosen_rejected  chosen == rejected: the pair carries no preference signal.
  skipped_empty_response     HH: the final Assistant reply is empty.
  skipped_empty_turn         HH: an earlier turn of the transcript is empty.
  skipped_bad_role_order     HH: turns do not alternate Human/Assistant ending with Assistant
                             (a reply that itself contains "\\n\\nAssistant:", or a transcript
                             that ends with a Human turn).
  skipped_duplicate_response ranked outputs: two responses of a group are identical; the pair
                             between them is skipped (counts pairs, not records).
  both_unsafe                PKU-SafeRLHF: both responses are labelled unsafe. Noted and kept for
                             pku_choice="better" (helpfulness is still compared); skipped for
                             "safer", where the chosen response would be an unsafe one.
  skipped_unparsed_answer    math prompts: no number can be read from 'answer' ("#### five",
                             "3 or 4", "1/2").
  long_document              pretrain: a document of more than LONG_DOCUMENT_CHARS characters
                             (noted and kept; usually a text file read in the wrong text_split).
  dropped_final_assistant    prompts from {"messages"} / {"conversations"}: the trailing assistant
                             turn was removed (the record is kept: counted in stats, no warning).
  skipped_empty_text         pretrain: {"text": ""}.

`stats` counters accumulate, so one dict can collect several files. "loaded" counts returned
records (pairs, for load_preferences). The counters a loader always had are always written;
both_unsafe, skipped_duplicate_response and skipped_unparsed_answer appear (possibly as 0) once a
record of their format (PKU, ranked, {question, answer}) is read, long_document once one occurs.
Pretraining text files also set stats["text_split"] to the split used ("paragraph" or "line";
"mixed" when files loaded into one dict differed).

The HH skips apply only to HH transcripts, whose turns we recover by splitting text; the same
defects in explicit message lists are the writer's mistake and raise a DataError. HH lines that
are not transcripts at all (no leading "\\n\\nHuman:", no Assistant turn), or whose chosen and
rejected share no prompt ending with a Human turn (never seen in the real files), also raise.
In the four HH test splits (8552 lines) 8475 pairs load; skipped are 36 identical pairs,
10 empty replies, 2 empty earlier turns and 29 transcripts with broken turn order.

Simplified on purpose: no tool use (roles "function_call", "observation", "tool", "function",
a "tools" field, or "tool_calls" / "function_call" in a message) and no multimodal input
("images", "videos", "audios", content lists); they are refused with a DataError naming the
role or field rather than half supported.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterator

from minialign.errors import UserError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}  # ShareGPT "from" -> our role
TOOL_ROLES = ("function_call", "observation", "tool", "function")
_MULTIMODAL = "multimodal input is not supported"
UNSUPPORTED_FIELDS = {"tools": "tool use is not supported", "images": _MULTIMODAL,
                      "videos": _MULTIMODAL, "audios": _MULTIMODAL}  # field -> why it is refused
LONG_DOCUMENT_CHARS = 100_000
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = " \t\r\n"


class DataError(UserError, ValueError):
    """A data file is malformed. str(err) is "<path>:<line>: <what>" ("<path>: <what>" when the
    problem concerns the whole file, e.g. it is empty); in a JSON array file the 1-based record
    index follows the line: "<path>:<line>: record <n>: <what>"."""

    def __init__(self, path, line: int | None, what: str, record: int | None = None):
        self.path = str(path)
        self.line = line
        self.what = what
        self.record = record
        where = self.path if line is None else f"{self.path}:{line}"
        if record is not None:
            where += f": record {record}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep picklable despite the multi-argument constructor
        return (DataError, (self.path, self.line, self.what, self.record))


class DataWarning(UserWarning):
    """Records were skipped or noted while loading (see the module docstring for the reasons)."""


@dataclass
class PreferencePair:
    prompt: list[Message]  # ends with a user turn
    chosen: list[Message]  # the turn(s) after the prompt, ending with an assistant turn
    rejected: list[Message]
    fields: dict = field(default_factory=dict)  # extra keys of the line, e.g. "margin", "group"


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


@dataclass
class RankedRecord:
    prompt: list[Message]  # ends with a user turn
    responses: list[list[Message]]  # K >= 2 responses (each one assistant message), best first
    fields: dict = field(default_factory=dict)  # every other key, plus "group" (see load_ranked)
    line: int | None = field(default=None, compare=False)  # line number in the file it came from


# ---------------------------------------------------------------------------------------------
# Reading records: JSONL (plain or gzip) line by line, or one JSON array


def _open_binary(raw):
    """(stream of decompressed bytes, is_gzip) for a file opened with open(path, "rb")."""
    is_gzip = raw.read(2) == GZIP_MAGIC
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw) if is_gzip else raw), is_gzip


def _read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) for a plain or gzipped UTF-8 file."""
    with open(path, "rb") as raw:
        stream, is_gzip = _open_binary(raw)
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


def _is_json_array(path: str | Path) -> bool:
    """True if the first non-blank character of the (decompressed) file is '['."""
    try:
        with open(path, "rb") as raw:
            stream, _ = _open_binary(raw)
            head = b""
            while chunk := stream.read(1 << 16):
                head = (head + chunk).removeprefix(UTF8_BOM).lstrip(b" \t\r\n")
                if head:
                    return head.startswith(b"[")
    except (EOFError, OSError, zlib.error):  # corrupt gzip: the line reader reports it precisely
        return False
    return False


def _read_json_array(path: str | Path) -> Iterator[tuple[int, int, object]]:
    """Yield (line where the record starts, 1-based record index, value) for each element of a
    file holding one JSON array. The whole file is read: a JSON array cannot be streamed by line,
    and the files people keep as .json are small enough."""
    with open(path, "rb") as raw:
        stream, _ = _open_binary(raw)
        try:
            data = stream.read()
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(path, None, f"gzip data is truncated or corrupt ({e})") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1,
                        f"not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file as "
                        f"UTF-8") from None
    decoder, n = json.JSONDecoder(), len(text)

    def skip_space(pos: int) -> int:
        while pos < n and text[pos] in _JSON_SPACE:
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip_space(skip_space(0) + 1)  # just after the '[' (_is_json_array checked it is one)
    index, line, line_pos = 0, 1, 0  # line_pos: where `line` was last counted up to
    closed = pos < n and text[pos] == "]"
    if closed:
        pos += 1
    while not closed:
        index += 1
        line, line_pos = line + text.count("\n", line_pos, pos), pos  # line_of(pos), in O(step)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:  # e.lineno, e.colno: in the whole file, 1-based
            raise DataError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})",
                            record=index) from None
        yield line, index, obj
        pos = skip_space(pos)
        if pos < n and text[pos] in ",]":
            closed = text[pos] == "]"
            pos = skip_space(pos + 1)
            continue
        found = f"found {text[pos]!r}" if pos < n else "the file ends"
        raise DataError(path, line_of(pos), f"malformed JSON: expected ',' or ']' after this "
                        f"record of the top-level array, but {found}", record=index)
    pos = skip_space(pos)
    if pos < n:
        raise DataError(path, line_of(pos), "extra data after the top-level JSON array closes "
                        "(a JSONL file must have one JSON object per line)")


def _read_records(path: str | Path) -> Iterator[tuple[int, int | None, dict]]:
    """Yield (line, record index or None, object) for each record of a .jsonl(.gz) file (index
    None) or of a JSON array file (index 1-based, line = where the record starts)."""
    n_records = 0
    if _is_json_array(path):
        for line_no, index, obj in _read_json_array(path):
            if not isinstance(obj, dict):
                raise DataError(path, line_no, f"expected a JSON object per record of the array, "
                                f"got {_type_name(obj)}", record=index)
            n_records += 1
            yield line_no, index, obj
    else:
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
            yield line_no, None, obj
    if n_records == 0:
        raise DataError(path, None, "file is empty (no JSON records)")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a .jsonl(.gz) file, or
    for each record of a JSON array file (the line where the record starts)."""
    for line_no, _, obj in _read_records(path):
        yield line_no, obj


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


def _is_empty(value) -> bool:
    """null, "", whitespace, [] or {}: a field holding nothing can be ignored without loss."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == [] or value == {}


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


def _refuse_unsupported(obj: dict) -> None:
    """Fields whose content the record's format cannot carry are an error, not silently dropped:
    tools and multimodal fields, "history" outside alpaca, and alpaca mixed with another format
    (which of the two conversations would be meant?)."""
    if "instruction" in obj:
        for other in ("prompt", "messages", "conversations", "question"):
            if other in obj:
                raise _Invalid(f"the record has both 'instruction' (alpaca) and '{other}': keep "
                               f"one format")
    for key, why in UNSUPPORTED_FIELDS.items():
        if key in obj and not _is_empty(obj[key]):
            raise _Invalid(f"field '{key}' is not empty, but {why} (remove the field, or convert "
                           f"the records to plain user/assistant turns)")
    if "instruction" not in obj and not _is_empty(obj.get("history")):
        raise _Invalid("field 'history' is only read by the alpaca formats (with 'instruction'); "
                       "here its turns would be lost: put them in the conversation instead")


def _message(msg, i: int, where: str) -> Message:
    """One message {"role", "content"} or ShareGPT {"from", "value"} -> {"role", "content"}."""
    if not isinstance(msg, dict):
        raise _Invalid(f"message {i} in {where} must be an object with 'role' and 'content', "
                       f"got {_type_name(msg)}")
    sharegpt = "from" in msg and "role" not in msg
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    # tool use first: an OpenAI tool-call message has "content": null, which is not the problem
    if msg.get(role_key) in TOOL_ROLES:
        raise _Invalid(f"message {i} in {where} has role {msg[role_key]!r}: tool use is not "
                       f"supported (only system, user and assistant turns)")
    for key in ("tool_calls", "function_call"):
        if not _is_empty(msg.get(key)):
            raise _Invalid(f"message {i} in {where} has a non-empty '{key}': tool use is not "
                           f"supported")
    for key in (role_key, content_key):
        if key not in msg:
            raise _Invalid(f"message {i} in {where} is missing field '{key}' "
                           f"(it has {sorted(msg)})")
        if not isinstance(msg[key], str):
            raise _Invalid(f"field '{key}' of message {i} in {where} must be a string, "
                           f"got {_type_name(msg[key])}")
    role, content = msg[role_key], msg[content_key]
    if sharegpt:
        if role not in SHAREGPT_ROLES:
            raise _Invalid(f"message {i} in {where} has unknown role (from) {role!r}; valid "
                           f"ShareGPT roles are system, human, gpt")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise _Invalid(f"message {i} in {where} has unknown role {role!r}; "
                       f"valid roles are {', '.join(ROLES)}")
    if role != "system" and not content.strip():
        raise _Invalid(f"message {i} in {where} ({role}) has empty content")
    return {"role": role, "content": content}


def _messages(value, where: str) -> list[Message]:
    """Normalize a JSON list of messages to [{"role", "content"}]; `where` names it in errors."""
    if not isinstance(value, list):
        raise _Invalid(f"{where} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise _Invalid(f"{where} is an empty list")
    return [_message(msg, i, where) for i, msg in enumerate(value, start=1)]


def _as_messages(obj: dict, key: str, role_for_string: str) -> list[Message]:
    """A field holding a plain string (one message of `role_for_string`), one message object
    (ShareGPT's chosen/rejected) or a message list."""
    if isinstance(obj[key], str):
        return [{"role": role_for_string, "content": _string(obj, key)}]
    if isinstance(obj[key], dict):
        return [_message(obj[key], 1, f"'{key}'")]
    if not isinstance(obj[key], list):
        raise _Invalid(f"field '{key}' must be a string or a list of messages, "
                       f"got {_type_name(obj[key])}")
    return _messages(obj[key], f"'{key}'")


def _with_system(obj: dict, conversation: list[Message], where: str) -> list[Message]:
    """Prepend a non-empty top-level "system" string (LLaMA-Factory) as the system message."""
    if _is_empty(obj.get("system")):
        return conversation
    system = _string(obj, "system", allow_empty=True)
    if conversation and conversation[0]["role"] == "system":
        raise _Invalid(f"both a 'system' field and a system message in {where}: keep one")
    return [{"role": "system", "content": system}] + conversation


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


def _conversation_key(obj: dict) -> str | None:
    """'messages' or 'conversations', whichever the record has (both is an error)."""
    if "messages" in obj and "conversations" in obj:
        raise _Invalid("the record has both 'messages' and 'conversations': keep one")
    return "messages" if "messages" in obj else "conversations" if "conversations" in obj else None


def _alpaca_prompt(obj: dict) -> list[Message]:
    """LLaMA-Factory alpaca prompt: [system], history turns, then user = instruction + input."""
    user = _string(obj, "instruction")
    extra = _string(obj, "input", allow_empty=True) if "input" in obj else ""
    if extra.strip():
        user += "\n\n" + extra
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise _Invalid(f"field 'history' must be a list of [user, assistant] pairs, "
                       f"got {_type_name(history)}")
    turns = []
    for i, turn in enumerate(history, start=1):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            if isinstance(turn, list) and len(turn) == 2:
                got = f"[{_type_name(turn[0])}, {_type_name(turn[1])}]"
            elif isinstance(turn, list):
                got = f"a list of {len(turn)}"
            else:
                got = _type_name(turn)
            raise _Invalid(f"turn {i} of 'history' must be a pair of strings [user, assistant], "
                           f"got {got}")
        for text, role in zip(turn, ("user", "assistant")):
            if not text.strip():
                raise _Invalid(f"turn {i} of 'history' has an empty {role} message")
        turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return _with_system(obj, turns + [{"role": "user", "content": user}], "'history'")


def _unknown_format(obj: dict, kind: str, key_sets: list[str]) -> _Invalid:
    return _Invalid(f"no {kind} format matches the keys {sorted(obj)}; accepted key sets are "
                    + ", ".join(key_sets))


# ---------------------------------------------------------------------------------------------
# The common loading loop


PAIR_SKIPS = ("skipped_duplicate_response",)  # counted in pairs: the record's other pairs load


class _Tally:
    """Counts for one load: skips (record dropped, warned), notes (record kept, warned) and
    quiet counts (stats only). `line` and `record` locate the record being parsed."""

    def __init__(self, path):
        self.path, self.line, self.record = str(path), None, None
        self.counts, self.first_skip, self.first_note = Counter(), {}, {}

    @property
    def where(self) -> str:  # in warnings: "line 3", or "record 3, line 12" in a JSON array
        if self.record is None:
            return f"line {self.line}"
        return f"record {self.record}, line {self.line}"

    @property
    def source(self) -> str:  # "path:line" or "path:record n", unique per record across files
        return f"{self.path}:{self.line if self.record is None else f'record {self.record}'}"

    def touch(self, key: str) -> None:  # the counter exists in stats from now on, even at 0
        self.counts[key] += 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        if n:
            self.first_skip.setdefault(key, self.where)

    def note(self, key: str) -> None:
        self.counts[key] += 1
        self.first_note.setdefault(key, self.where)


def _finish(path, n_loaded: int, tally: _Tally, stats: dict | None, counters: tuple[str, ...]):
    """Add the counts to `stats` and issue the one DataWarning of this load, if any."""
    if stats is not None:  # counters accumulate, so one dict can collect several files
        stats["loaded"] = stats.get("loaded", 0) + n_loaded
        for name in list(counters) + sorted(set(tally.counts) - set(counters)):
            stats[name] = stats.get(name, 0) + tally.counts[name]
    parts = []
    for unit in ("records", "pairs"):
        skips = sorted(r for r in tally.first_skip if (r in PAIR_SKIPS) == (unit == "pairs"))
        if skips:
            parts.append(f"skipped {sum(tally.counts[r] for r in skips)} {unit}: " + ", ".join(
                f"{r}={tally.counts[r]} (first at {tally.first_skip[r]})" for r in skips))
    if tally.first_note:
        parts.append("noted (records kept): " + ", ".join(
            f"{r}={tally.counts[r]} (first at {tally.first_note[r]})" for r in sorted(tally.first_note)))
    if parts:
        warnings.warn(f"{path}: " + "; ".join(parts), DataWarning, stacklevel=4)


def _load(path: str | Path, parse: Callable[[dict, _Tally], object], stats: dict | None,
          counters: tuple[str, ...], with_lines: bool = False, many: bool = False) -> list:
    """Parse every record of `path`; `parse(obj, tally)` returns a record (a list of records if
    `many`), raises _Invalid (-> DataError) or _Skip, and may count in `tally` records it keeps
    but changes. `counters` are always written to stats; other tallied keys once they occur."""
    records, tally = [], _Tally(path)
    for line_no, index, obj in _read_records(path):
        tally.line, tally.record = line_no, index
        try:
            parsed = parse(obj, tally)
        except _Invalid as e:
            raise DataError(path, line_no, str(e), record=index) from None
        except _Skip as e:
            tally.skip(e.args[0])
            continue
        for rec in (parsed if many else [parsed]):
            records.append((rec, line_no) if with_lines else rec)
    _finish(path, len(records), tally, stats, counters)
    return records


# ---------------------------------------------------------------------------------------------
# Pretraining text

TEXT_SPLITS = ("auto", "paragraph", "line")


def load_pretrain(path: str | Path, stats: dict | None = None,
                  text_split: str = "auto") -> list[str]:
    """{"text": str} per record; or a .txt(.gz) file split into documents by `text_split`:

        "paragraph"  documents are separated by blank (or whitespace-only) lines; the lines of a
                     paragraph are joined with "\\n" (tinyshakespeare: 7222 documents)
        "line"       every non-blank line is a document (one document per line, as many
                     pretraining corpora are written; blank lines are skipped like in JSONL)
        "auto"       "paragraph" if a blank line separates two lines of text (or there is only
                     one line), else "line": a file with no blank line between its lines is
                     almost always one document per line, and read as paragraphs it would be
                     one document

    The split used is stored in stats["text_split"]. Empty {"text"} records are skipped and
    counted as skipped_empty_text; documents over LONG_DOCUMENT_CHARS characters are kept and
    counted as long_document (both warned)."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {', '.join(TEXT_SPLITS)}, got {text_split!r}")
    name = Path(path).name.removesuffix(".gz")
    if name.endswith(".txt"):
        return _load_txt(path, stats, text_split)

    def parse(obj: dict, tally: _Tally) -> str:
        if "text" not in obj:
            raise _unknown_format(obj, "pretraining", ["{text}"])
        text = _string(obj, "text", allow_empty=True)
        if not text.strip():
            raise _Skip("skipped_empty_text")
        if len(text) > LONG_DOCUMENT_CHARS:
            tally.note("long_document")
        return text

    return _load(path, parse, stats, ("skipped_empty_text",))


def _load_txt(path: str | Path, stats: dict | None, text_split: str) -> list[str]:
    lines = [(no, line.rstrip("\r\n")) for no, line in _read_text_lines(path)]
    if text_split == "auto":  # blank lines before the first or after the last text don't count
        filled = [i for i, (_, line) in enumerate(lines) if line.strip()]
        inner = lines[filled[0]:filled[-1] + 1] if filled else []
        has_blank = any(not line.strip() for _, line in inner)
        text_split = "paragraph" if has_blank or len(inner) <= 1 else "line"
    documents = []  # (first line number, text)
    if text_split == "line":
        documents = [(no, line) for no, line in lines if line.strip()]
    else:
        current = []
        for no, line in lines + [(None, "")]:  # a final blank line closes the last paragraph
            if line.strip():
                current.append((no, line))
            elif current:
                documents.append((current[0][0], "\n".join(text for _, text in current)))
                current = []
    if not documents:
        raise DataError(path, None, "file is empty (no text)")
    tally = _Tally(path)
    for line_no, text in documents:
        if len(text) > LONG_DOCUMENT_CHARS:
            tally.line = line_no
            tally.note("long_document")
    if stats is not None:
        previous = stats.get("text_split")
        stats["text_split"] = text_split if previous in (None, text_split) else "mixed"
    _finish(path, len(documents), tally, stats, ())
    return [text for _, text in documents]


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning

SFT_KEY_SETS = ["{messages}", "{conversations}", "{prompt, completion}",
                "{instruction, input, output, system, history}"]


def _parse_sft(obj: dict, tally: _Tally) -> list[Message]:
    _refuse_unsupported(obj)
    key = _conversation_key(obj)
    if key:
        conversation = _with_system(obj, _messages(obj[key], f"'{key}'"), f"'{key}'")
        _check_order(conversation, f"'{key}'", last_role="assistant")
        return conversation
    if "prompt" in obj or "completion" in obj:
        _require_keys(obj, ("prompt", "completion"), "the prompt-completion format")
        conversation = _with_system(obj, _as_messages(obj, "prompt", "user"), "'prompt'")
        conversation += _as_messages(obj, "completion", "assistant")
        _check_order(conversation, "'prompt' + 'completion'", last_role="assistant")
        return conversation
    if "instruction" in obj or "output" in obj:
        _require_keys(obj, ("instruction", "output"), "the alpaca format")
        if isinstance(obj["output"], list):
            raise _Invalid("field 'output' is a list (ranked responses of a reward-model file?); "
                           "SFT needs one response: read ranked files with load_preferences or "
                           "load_ranked")
        return _alpaca_prompt(obj) + [{"role": "assistant", "content": _string(obj, "output")}]
    raise _unknown_format(obj, "SFT", SFT_KEY_SETS)


def load_sft(path: str | Path, stats: dict | None = None) -> list[list[Message]]:
    """One conversation per record, ending with an assistant turn. Metadata keys are ignored
    (see the module docstring: "system" and alpaca's "history" are read, "tools" refused)."""
    return _load(path, _parse_sft, stats, ())


# ---------------------------------------------------------------------------------------------
# Preference pairs

PREFERENCE_SKIPS = ("identical_chosen_rejected", "skipped_empty_response", "skipped_empty_turn",
                    "skipped_bad_role_order")
PREFERENCE_KEY_SETS = ["{prompt, chosen, rejected}",
                       "{chosen, rejected} (whole conversations or Anthropic HH transcripts)",
                       "{conversations, chosen, rejected} (ShareGPT)",
                       "{instruction, input, chosen, rejected} (alpaca)",
                       "{..., output: [best, second, ...]} (ranked)",
                       "{prompt, response_0, response_1, better_response_id, ...} (PKU-SafeRLHF)"]
RANK_RULES = ("best_vs_rest", "all")
PKU_CHOICES = ("better", "safer")
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


def _explicit_pair(prompt: list[Message], obj: dict, fields: dict, where: str) -> PreferencePair:
    """A pair whose prompt is given (`where` names it); chosen and rejected are strings, one
    message or message lists."""
    chosen = _as_messages(obj, "chosen", "assistant")
    rejected = _as_messages(obj, "rejected", "assistant")
    _check_order(prompt, where, last_role="user")
    _check_order(prompt + chosen, f"{where} + 'chosen'", last_role="assistant")
    _check_order(prompt + rejected, f"{where} + 'rejected'", last_role="assistant")
    if chosen == rejected:
        raise _Skip("identical_chosen_rejected")
    return PreferencePair(prompt, chosen, rejected, fields)


def _parse_pair(obj: dict) -> PreferencePair:
    _require_keys(obj, ("chosen", "rejected"), "a preference pair")
    _refuse_unsupported(obj)

    def fields_without(*keys: str) -> dict:
        return {k: v for k, v in obj.items() if k not in ("chosen", "rejected", "system") + keys}

    if "prompt" in obj:  # explicit prompt: strings or TRL conversational message lists
        prompt = _with_system(obj, _as_messages(obj, "prompt", "user"), "'prompt'")
        return _explicit_pair(prompt, obj, fields_without("prompt"), "'prompt'")
    if "instruction" in obj:  # alpaca (LLaMA-Factory)
        return _explicit_pair(_alpaca_prompt(obj), obj,
                              fields_without("instruction", "input", "history"), "the alpaca prompt")
    key = _conversation_key(obj)
    if key:  # ShareGPT (LLaMA-Factory): the conversation is the prompt
        prompt = _with_system(obj, _messages(obj[key], f"'{key}'"), f"'{key}'")
        return _explicit_pair(prompt, obj, fields_without(key), f"'{key}'")
    fields = fields_without()

    both_strings = isinstance(obj["chosen"], str) and isinstance(obj["rejected"], str)
    both_lists = isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list)
    if both_strings:  # Anthropic HH transcripts
        chosen_all = _with_system(obj, _parse_hh(obj["chosen"], "chosen"), "'chosen'")
        rejected_all = _with_system(obj, _parse_hh(obj["rejected"], "rejected"), "'rejected'")
        if chosen_all == rejected_all:
            raise _Skip("identical_chosen_rejected")
        for turns, key in ((chosen_all, "chosen"), (rejected_all, "rejected")):
            reason = _hh_skip_reason(turns, key)
            if reason:
                raise _Skip(reason)
        return PreferencePair(*_split_shared_prompt(chosen_all, rejected_all), fields)
    if both_lists:  # implicit prompt: two whole conversations (MiniMind DPO, TRL)
        chosen_all = _with_system(obj, _messages(obj["chosen"], "'chosen'"), "'chosen'")
        rejected_all = _with_system(obj, _messages(obj["rejected"], "'rejected'"), "'rejected'")
        _check_order(chosen_all, "'chosen'", last_role="assistant")
        _check_order(rejected_all, "'rejected'", last_role="assistant")
        if chosen_all == rejected_all:
            raise _Skip("identical_chosen_rejected")
        return PreferencePair(*_split_shared_prompt(chosen_all, rejected_all), fields)
    raise _Invalid(f"without 'prompt', 'chosen' and 'rejected' must both be strings (HH "
                   f"transcripts) or both message lists, got {_type_name(obj['chosen'])} and "
                   f"{_type_name(obj['rejected'])}")


def _pku_pair(obj: dict, choice: str, tally: _Tally) -> PreferencePair:
    """PKU-SafeRLHF: two responses, which one is better (helpfulness) and which one is safer."""
    _refuse_unsupported(obj)
    id_key = f"{choice}_response_id"
    _require_keys(obj, ("prompt", "response_0", "response_1", id_key, "is_response_0_safe",
                        "is_response_1_safe"), "the PKU-SafeRLHF format")
    best = obj[id_key]
    if isinstance(best, bool) or best not in (0, 1):
        raise _Invalid(f"field '{id_key}' must be 0 or 1 (the index of the {choice} response), "
                       f"got {_type_name(best)} {best!r}")
    for key in ("is_response_0_safe", "is_response_1_safe"):
        if not isinstance(obj[key], bool):
            raise _Invalid(f"field '{key}' must be a JSON bool (true/false), "
                           f"got {_type_name(obj[key])} {obj[key]!r}")
    prompt = [{"role": "user", "content": _string(obj, "prompt")}]
    responses = [[{"role": "assistant", "content": _string(obj, f"response_{i}")}] for i in (0, 1)]
    fields = {k: v for k, v in obj.items() if k not in ("prompt", "response_0", "response_1")}
    tally.touch("both_unsafe")
    if responses[0] == responses[1]:
        raise _Skip("identical_chosen_rejected")
    if not obj["is_response_0_safe"] and not obj["is_response_1_safe"]:
        if choice == "safer":  # the "safer" reply is still unsafe: no pair to imitate
            raise _Skip("both_unsafe")
        tally.note("both_unsafe")
    return PreferencePair(prompt, responses[best], responses[1 - best], fields)


def _ranked_pairs(record: RankedRecord, rule: str) -> tuple[list[PreferencePair], int]:
    """(pairs, number of pairs skipped because their two responses are identical)."""
    if rule not in RANK_RULES:
        raise ValueError(f"rule must be one of {', '.join(RANK_RULES)}, got {rule!r}")
    k = len(record.responses)
    index_pairs = [(0, j) for j in range(1, k)] if rule == "best_vs_rest" else \
        [(i, j) for i in range(k) for j in range(i + 1, k)]
    pairs = [PreferencePair(record.prompt, record.responses[i], record.responses[j],
                            dict(record.fields))
             for i, j in index_pairs if record.responses[i] != record.responses[j]]
    return pairs, len(index_pairs) - len(pairs)


def rank_pairs(record: RankedRecord, rule: str = "best_vs_rest",
               stats: dict | None = None) -> list[PreferencePair]:
    """The preference pairs of one ranked group (responses best first), chosen ranked above
    rejected:

        "best_vs_rest"  the best response against each other one: K - 1 pairs (0, j)
        "all"           every ordered pair i < j: K(K-1)/2 pairs, InstructGPT's reward-model
                        comparisons (Ouyang et al. 2022, sec. 3.5)

    Each pair gets a copy of record.fields, so fields["group"] names the group: a trainer should
    keep the pairs of one group together (InstructGPT trains on all K(K-1)/2 comparisons of a
    prompt as one batch element; shuffled independently, each response appears in K - 1 pairs
    and the reward model overfits). Pairs of identical responses are skipped and counted in
    stats["skipped_duplicate_response"]."""
    pairs, n_duplicate = _ranked_pairs(record, rule)
    if stats is not None:
        stats["skipped_duplicate_response"] = stats.get("skipped_duplicate_response", 0) + n_duplicate
    return pairs


def load_preferences(path: str | Path, stats: dict | None = None, *, pku_choice: str = "better",
                     rank_rule: str = "all") -> list[PreferencePair]:
    """(prompt, chosen, rejected) pairs; see the module docstring for the formats and skips.

    A ranked record ("output": [best, second, ...]) gives the pairs of rank_pairs(rule=rank_rule)
    ("all" by default: every comparison the ranking states), each with fields["group"] set (see
    load_ranked). A PKU-SafeRLHF record gives one pair, chosen by `pku_choice`: "better" (more
    helpful, better_response_id) or "safer" (safer_response_id). stats["loaded"] counts pairs."""
    if pku_choice not in PKU_CHOICES:
        raise ValueError(f"pku_choice must be one of {', '.join(PKU_CHOICES)}, got {pku_choice!r}")
    if rank_rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {', '.join(RANK_RULES)}, got {rank_rule!r}")

    def parse(obj: dict, tally: _Tally) -> list[PreferencePair]:
        if "response_0" in obj or "response_1" in obj:
            return [_pku_pair(obj, pku_choice, tally)]
        if "output" in obj and "chosen" not in obj and "rejected" not in obj:
            tally.touch("skipped_duplicate_response")
            pairs, n_duplicate = _ranked_pairs(_parse_ranked(obj, tally.source), rank_rule)
            tally.skip("skipped_duplicate_response", n_duplicate)
            return pairs
        if "chosen" not in obj and "rejected" not in obj:
            raise _unknown_format(obj, "preference", PREFERENCE_KEY_SETS)
        return [_parse_pair(obj)]

    return _load(path, parse, stats, PREFERENCE_SKIPS, many=True)


# ---------------------------------------------------------------------------------------------
# Ranked responses (reward-model files with K >= 2 responses per prompt)

RANKED_KEY_SETS = ["{instruction, input, output: [...]}", "{prompt, output: [...]}",
                   "{conversations, output: [...]}", "{messages, output: [...]}"]


def _parse_ranked(obj: dict, source: str) -> RankedRecord:
    _refuse_unsupported(obj)
    key = _conversation_key(obj)
    if "output" not in obj:
        raise _unknown_format(obj, "ranked", RANKED_KEY_SETS)
    if "instruction" in obj:
        prompt = _alpaca_prompt(obj)
    elif "prompt" in obj:
        prompt = _with_system(obj, _as_messages(obj, "prompt", "user"), "'prompt'")
    elif key:
        prompt = _with_system(obj, _messages(obj[key], f"'{key}'"), f"'{key}'")
    else:
        raise _unknown_format(obj, "ranked", RANKED_KEY_SETS)
    where = "the prompt" if "instruction" in obj else f"'{key or 'prompt'}'"
    _check_order(prompt, where, last_role="user")
    outputs = obj["output"]
    if not isinstance(outputs, list):
        raise _Invalid(f"field 'output' must be a list of K >= 2 responses, best first, got "
                       f"{_type_name(outputs)}")
    if len(outputs) < 2:
        raise _Invalid(f"field 'output' has {len(outputs)} response(s); a ranking needs at least 2")
    responses = []
    for i, out in enumerate(outputs, start=1):
        if isinstance(out, str):
            if not out.strip():
                raise _Invalid(f"response {i} in 'output' is empty")
            responses.append([{"role": "assistant", "content": out}])
        elif isinstance(out, dict):
            message = _message(out, i, "'output'")
            if message["role"] != "assistant":
                raise _Invalid(f"message {i} in 'output' must be an assistant (gpt) message, "
                               f"got '{message['role']}'")
            responses.append([message])
        else:
            raise _Invalid(f"response {i} in 'output' must be a string or a message, "
                           f"got {_type_name(out)}")
    if "group" in obj:
        raise _Invalid("field 'group' is reserved for the group id of ranked pairs; rename it")
    used = {"prompt", "output", "system", "instruction", "input", "history", key}
    fields = {k: v for k, v in obj.items() if k not in used}
    fields["group"] = source
    return RankedRecord(prompt, responses, fields)


def load_ranked(path: str | Path, stats: dict | None = None) -> list[RankedRecord]:
    """Groups of K >= 2 responses to one prompt, best first (LLaMA-Factory reward-model files).
    fields["group"] is "<path>:<line>" ("<path>:record <n>" in a JSON array): unique per group,
    also across files. Turn a group into pairs with rank_pairs."""

    def parse(obj: dict, tally: _Tally) -> RankedRecord:
        return _parse_ranked(obj, tally.source)

    records = _load(path, parse, stats, (), with_lines=True)
    for rec, line_no in records:
        rec.line = line_no
    return [rec for rec, _ in records]


# ---------------------------------------------------------------------------------------------
# RL prompts

PROMPT_KEY_SETS = ["{prompt}", "{messages}", "{conversations}", "{instruction, input}",
                   "{question, answer} (math, e.g. GSM8K)"]
# The package's one number token, for gold answers here and for completions' final answers
# (minialign.algorithms.reward_funcs.extract_final_answer): an optional minus, digits with commas as thousands
# separators, optional decimals, or a bare ".5". number_text gives its canonical text (commas removed).
NUMBER = re.compile(r"-?(?:\d[\d,]*)?\.?\d+")
# a plain answer: optional "$", a number (thousands separators allowed), then text without digits
_PLAIN_ANSWER = re.compile(r"\s*\$?\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(\D*)",
                           re.DOTALL)


def number_text(token: str) -> str | None:
    """A NUMBER token with its thousands separators removed ("1,450" -> "1450"), or None if what is left
    is not a number."""
    text = token.replace(",", "")
    return text if re.fullmatch(r"-?\d*\.?\d+", text) else None


def gsm8k_gold_answer(answer: str) -> str | None:
    """The number after the last '####' with thousands separators removed ("1,450" -> "1450"),
    or None if there is no such number."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip()
    return number_text(gold) if NUMBER.fullmatch(gold) else None


def parse_gold_answer(answer) -> str | None:
    """The gold answer of a math record as a number string, or None if none can be read.

    GSM8K solutions ("... #### 1,450") give gsm8k_gold_answer's "1450". Otherwise the answer is
    a plain number: a JSON int or float (72, 51.0), or a string that starts with one and has no
    other digit ("51.0", "1,234", "$5", "9 (apples)", "12 cm"). Plain answers are normalized
    (no thousands separators, no trailing zeros, no exponent: "51.0" -> "51", 1e3 -> "1000"),
    which minialign.algorithms.reward_funcs.gsm8k_reward compares numerically. Ambiguous strings ("3 or 4",
    "1/2", "x = 5") give None rather than a guess."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        if isinstance(answer, float) and not math.isfinite(answer):
            return None
        number = repr(answer)
    elif isinstance(answer, str):
        if "####" in answer:
            return gsm8k_gold_answer(answer)
        match = _PLAIN_ANSWER.fullmatch(answer)
        if not match:
            return None
        number = match.group(1).replace(",", "")
    else:
        return None
    try:
        value = Decimal(number)
    except InvalidOperation:
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def _parse_math(obj: dict, tally: _Tally) -> PromptRecord:
    _require_keys(obj, ("question", "answer"), "the math format")
    tally.touch("skipped_unparsed_answer")
    answer = obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _Invalid(f"field 'answer' must be a string or a number, got {_type_name(answer)}")
    gold = parse_gold_answer(answer)
    if gold is None:
        raise _Skip("skipped_unparsed_answer")
    prompt = _with_system(obj, [{"role": "user", "content": _string(obj, "question")}],
                          "'question'")
    fields = {k: v for k, v in obj.items() if k not in ("question", "system")}
    fields["gold_answer"] = gold
    return PromptRecord(prompt, fields)


def _parse_prompt(obj: dict, tally: _Tally) -> PromptRecord:
    _refuse_unsupported(obj)
    if "prompt" in obj:
        prompt = _with_system(obj, _as_messages(obj, "prompt", "user"), "'prompt'")
        _check_order(prompt, "'prompt'", last_role="user")
        return PromptRecord(prompt, {k: v for k, v in obj.items() if k not in ("prompt", "system")})
    key = _conversation_key(obj)
    if key:
        messages = _with_system(obj, _messages(obj[key], f"'{key}'"), f"'{key}'")
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            # a chat dataset reused for RL: the reference reply is not part of the prompt
            messages = messages[:-1]
            tally.count("dropped_final_assistant")
        _check_order(messages, f"'{key}'", last_role="user")
        return PromptRecord(messages, {k: v for k, v in obj.items() if k not in (key, "system")})
    if "question" in obj:
        return _parse_math(obj, tally)
    if "instruction" in obj:  # alpaca; a reference "output" stays in fields
        used = ("instruction", "input", "history", "system")
        return PromptRecord(_alpaca_prompt(obj), {k: v for k, v in obj.items() if k not in used})
    raise _unknown_format(obj, "prompt", PROMPT_KEY_SETS)


def load_prompts(path: str | Path, stats: dict | None = None) -> list[PromptRecord]:
    """RL prompts ending with a user turn. From {"messages"} / {"conversations"}, a final
    assistant turn is dropped (counted as dropped_final_assistant). Math {"question", "answer"}
    records get fields["gold_answer"] (see parse_gold_answer); a record whose answer cannot be
    read is skipped and counted as skipped_unparsed_answer."""
    records = _load(path, _parse_prompt, stats, ("dropped_final_assistant",), with_lines=True)
    for rec, line_no in records:
        rec.line = line_no
    return [rec for rec, _ in records]


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO)

UNPAIRED_KEY_SETS = ["{prompt, completion, label}", "{messages, label}", "{conversations, label}",
                     "{instruction, input, output, label}"]


def _parse_unpaired(obj: dict, tally: _Tally) -> UnpairedRecord:
    label_key = "kto_tag" if "kto_tag" in obj and "label" not in obj else "label"
    key = _conversation_key(obj)
    if key:
        _require_keys(obj, (key, label_key), "the unpaired (KTO) conversation format")
    elif "instruction" in obj or "output" in obj:
        _require_keys(obj, ("instruction", "output", label_key), "the unpaired (KTO) alpaca format")
    elif any(k in obj for k in ("prompt", "completion", label_key)):
        _require_keys(obj, ("prompt", "completion", label_key), "the unpaired (KTO) format")
    else:
        raise _unknown_format(obj, "unpaired", UNPAIRED_KEY_SETS)
    _refuse_unsupported(obj)
    if key:  # the last assistant turn is the completion, the messages before it the prompt
        messages = _with_system(obj, _messages(obj[key], f"'{key}'"), f"'{key}'")
        _check_order(messages, f"'{key}'", last_role="assistant")
        prompt, completion = messages[:-1], messages[-1:]
        used = (key, "system")
    elif "instruction" in obj:
        prompt = _alpaca_prompt(obj)
        completion = [{"role": "assistant", "content": _string(obj, "output")}]
        used = ("instruction", "input", "output", "history", "system")
    else:
        prompt = _with_system(obj, _as_messages(obj, "prompt", "user"), "'prompt'")
        completion = _as_messages(obj, "completion", "assistant")
        _check_order(prompt, "'prompt'", last_role="user")
        _check_order(prompt + completion, "'prompt' + 'completion'", last_role="assistant")
        used = ("prompt", "completion", "system")
    label = obj[label_key]
    if not isinstance(label, bool):
        raise _Invalid(f"field '{label_key}' must be a JSON bool (true/false), "
                       f"got {_type_name(label)} {label!r}")
    fields = {k: v for k, v in obj.items() if k not in used + (label_key,)}
    return UnpairedRecord(prompt, completion, label, fields)


def load_unpaired(path: str | Path, stats: dict | None = None) -> list[UnpairedRecord]:
    """KTO-style records: one completion with a desirable (true) / undesirable (false) label."""
    return _load(path, _parse_unpaired, stats, ())
