"""Tests for minialign.formats: every accepted format, every file of the bad-input corpus, and
the real HH-RLHF / GSM8K files when ../shared/data is present."""

import gzip
import json
import pickle
import re
import warnings
from pathlib import Path

import pytest

from minialign.formats import (
    DataError,
    DataWarning,
    PreferencePair,
    PromptRecord,
    UnpairedRecord,
    gsm8k_gold_answer,
    load_preferences,
    load_pretrain,
    load_prompts,
    load_sft,
    load_unpaired,
    read_jsonl,
)

DATA = Path(__file__).resolve().parent / "data"
FORMATS = DATA / "formats"
BAD = DATA / "bad"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def u(content):
    return {"role": "user", "content": content}


def a(content):
    return {"role": "assistant", "content": content}


def s(content):
    return {"role": "system", "content": content}


# ---------------------------------------------------------------------------------------------
# Accepted formats: exact normalized results


def test_pretrain_jsonl():
    assert load_pretrain(FORMATS / "pretrain.jsonl") == [
        "The cat sat on the mat.", "Second document.\nWith two lines."]


def test_pretrain_txt_splits_paragraphs_on_blank_lines():
    # the fixture has a run of two blank lines and a whitespace-only line as separators
    assert load_pretrain(FORMATS / "pretrain.txt") == [
        "First paragraph,\nstill the first.", "Second paragraph.", "Third."]


def test_pretrain_empty_text_is_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n{"text": "  "}\n')
    stats = {}
    with pytest.warns(DataWarning, match=r"skipped_empty_text=1 \(first at line 2\)"):
        assert load_pretrain(path, stats) == ["a"]
    assert stats == {"loaded": 1, "skipped_empty_text": 1}


def test_sft_messages_keeps_system_and_ignores_extra_keys():
    assert load_sft(FORMATS / "sft_messages.jsonl") == [
        [s("You are terse."), u("What is 2+2?"), a("4")],
        [u("Hi"), a("Hello!"), u("Bye"), a("Goodbye.")],
    ]


def test_sft_minimind_conversations():
    assert load_sft(FORMATS / "sft_conversations.jsonl") == [
        [u("你好"), a("你好！有什么可以帮你？")]]


def test_sft_prompt_completion_strings_and_message_lists():
    assert load_sft(FORMATS / "sft_prompt_completion.jsonl") == [
        [u("Capital of France?"), a("Paris.")],
        [s("Be brief."), u("Capital of Italy?"), a("Rome.")],
    ]


def test_sft_alpaca_appends_nonempty_input():
    assert load_sft(FORMATS / "sft_alpaca.jsonl") == [
        [u("Translate to French.\n\nGood morning"), a("Bonjour")],
        [u("Name a primary color."), a("Red")],
    ]


def test_preferences_explicit_strings_keep_extra_fields():
    assert load_preferences(FORMATS / "pref_explicit.jsonl") == [PreferencePair(
        prompt=[u("Is the sky blue?")], chosen=[a("Yes, on a clear day.")], rejected=[a("No.")],
        fields={"margin": 2.5})]


def test_preferences_conversational_explicit_prompt():
    assert load_preferences(FORMATS / "pref_conversational.jsonl") == [PreferencePair(
        prompt=[s("Be kind."), u("Rate my poem.")], chosen=[a("It has lovely imagery.")],
        rejected=[a("It is bad.")], fields={"kind": "tone"})]


def test_preferences_implicit_prompt_is_longest_common_prefix():
    assert load_preferences(FORMATS / "pref_implicit.jsonl") == [PreferencePair(
        prompt=[u("Hi"), a("Hello!"), u("Tell me a joke")],
        chosen=[a("Why did the chicken cross the road?")], rejected=[a("No.")], fields={})]


def test_preferences_hh_text_strips_one_leading_space():
    # the chosen reply is "Assistant:  Four, I think." -> exactly one of the two spaces goes
    assert load_preferences(FORMATS / "pref_hh.jsonl") == [PreferencePair(
        prompt=[u("What is 1+1?"), a("2"), u("And 2+2?")],
        chosen=[a(" Four, I think.")], rejected=[a("Fish.")], fields={})]


def test_prompts_string_messages_and_dropped_final_assistant():
    stats = {}
    assert load_prompts(FORMATS / "prompts.jsonl", stats) == [
        PromptRecord([u("Write a haiku about rain.")], {"kind": "poem"}),
        PromptRecord([s("You are a math tutor."), u("What is 3*4?")], {"answer": "12"}),
        PromptRecord([u("Summarize: cats are great.")], {"id": 3}),
    ]
    assert stats == {"loaded": 3, "dropped_final_assistant": 1}


def test_prompts_gsm8k_gold_answer_without_thousands_separator():
    assert load_prompts(FORMATS / "question_answer.jsonl") == [
        PromptRecord([u("Tom has 3 apples and buys 4 more. How many?")],
                     {"answer": "3 + 4 = <<3+4=7>>7\n#### 7", "gold_answer": "7"}),
        PromptRecord([u("A car costs $1,200 and a bike $50. Total?")],
                     {"answer": "1200 + 50 = 1250\n#### 1,250", "gold_answer": "1250"}),
    ]


def test_gsm8k_gold_answer_function():
    assert gsm8k_gold_answer("x #### -3.5 ") == "-3.5"
    assert gsm8k_gold_answer("#### 1 then #### 2") == "2"  # the last marker wins
    assert gsm8k_gold_answer("no marker 5") is None
    assert gsm8k_gold_answer("#### five") is None


def test_unpaired_strings_and_message_lists():
    assert load_unpaired(FORMATS / "unpaired.jsonl") == [
        UnpairedRecord([u("Say hi.")], [a("Hi!")], True, {}),
        UnpairedRecord([u("Say bye.")], [a("No.")], False, {"source": "kto"}),
    ]


# ---------------------------------------------------------------------------------------------
# Reading: gzip, blank lines, BOM, CRLF


def test_gzip_detected_by_magic_bytes_not_suffix(tmp_path):
    text = (FORMATS / "sft_messages.jsonl").read_bytes()
    expected = load_sft(FORMATS / "sft_messages.jsonl")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "misnamed.jsonl").write_bytes(gzip.compress(text))  # gzip without .gz
    assert load_sft(tmp_path / "a.jsonl.gz") == expected
    assert load_sft(tmp_path / "misnamed.jsonl") == expected


def test_read_jsonl_line_numbers_skip_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"b": 2}\r\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_data_error_attributes_and_pickling():
    with pytest.raises(DataError) as info:
        load_sft(BAD / "unknown_role.jsonl")
    err = info.value
    assert (Path(err.path).name, err.line) == ("unknown_role.jsonl", 3)
    assert isinstance(err, ValueError)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_stats_accumulate_across_files():
    stats = {}
    load_preferences(FORMATS / "pref_explicit.jsonl", stats)
    load_preferences(FORMATS / "pref_hh.jsonl", stats)
    assert stats["loaded"] == 2 and stats["identical_chosen_rejected"] == 0


# ---------------------------------------------------------------------------------------------
# The bad-input corpus: one case per file -> (loader, line, message substance)

BAD_CASES = [
    ("malformed_json.jsonl", load_sft, 3, r"malformed JSON: Expecting ',' delimiter \(column 49\)"),
    ("missing_field.jsonl", load_preferences, 3, r"missing field 'rejected'"),
    ("wrong_type_content.jsonl", load_sft, 3,
     r"field 'content' of message 2 in 'messages' must be a string, got list"),
    ("number_for_string.jsonl", load_sft, 1,
     r"field 'completion' must be a string or a list of messages, got int"),
    ("null_content.jsonl", load_sft, 2,
     r"field 'content' of message 2 in 'messages' must be a string, got null"),
    ("empty_completion.jsonl", load_sft, 3, r"field 'completion' is empty"),
    ("empty_assistant_content.jsonl", load_sft, 3,
     r"message 2 in 'messages' \(assistant\) has empty content"),
    ("message_missing_content.jsonl", load_sft, 3,
     r"message 2 in 'messages' is missing field 'content' \(it has \['role', 'text'\]\)"),
    ("unknown_role.jsonl", load_sft, 3,
     r"message 2 in 'messages' has unknown role 'bot'; valid roles are system, user, assistant"),
    ("roles_out_of_order.jsonl", load_sft, 3,
     r"roles out of order in 'messages': message 2 is 'user' after 'user'"),
    ("sft_ends_with_user.jsonl", load_sft, 3,
     r"'messages' must end with an assistant turn, but its last message \(message 3\) is 'user'"),
    ("empty.jsonl", load_sft, None, r"file is empty"),
    ("blank_lines_only.jsonl", load_pretrain, None, r"file is empty"),
    ("non_utf8.jsonl", load_sft, 2, r"not valid UTF-8 \(byte 0xff"),
    # the cut falls inside line 93 of 200; lines 1-92 decompress and parse before the error
    ("truncated.jsonl.gz", load_preferences, 93,
     r"gzip data is truncated or corrupt after line 92"),
    ("not_an_object.jsonl", load_sft, 3, r"expected a JSON object per line, got list"),
    ("hh_no_assistant.jsonl", load_preferences, 3,
     r"field 'chosen' is an HH transcript with no '\\n\\nAssistant:' turn"),
    ("hh_not_transcript.jsonl", load_preferences, 1,
     r"field 'chosen' is not an Anthropic HH transcript"),
    ("no_shared_prompt.jsonl", load_preferences, 1,
     r"'chosen' and 'rejected' must share a prompt ending with a user turn, "
     r"but their common prefix of whole messages ends with 'assistant' \(message 2\)"),
    ("pref_mixed_types.jsonl", load_preferences, 1,
     r"without 'prompt', 'chosen' and 'rejected' must both be strings \(HH transcripts\) "
     r"or both message lists, got string and list"),
    ("label_not_bool.jsonl", load_unpaired, 3,
     r"field 'label' must be a JSON bool \(true/false\), got string 'true'"),
    ("question_answer_no_hash.jsonl", load_prompts, 3,
     r"field 'answer' does not end with '#### <number>', so the gold answer cannot be extracted"),
    ("prompt_ends_with_assistant.jsonl", load_prompts, 2,
     r"'prompt' must end with a user turn, but its last message \(message 2\) is 'assistant'"),
    ("unknown_format.jsonl", load_sft, 3,
     r"no SFT format matches the keys \['input', 'target'\]; accepted key sets are "
     r"\{messages\}, \{conversations\}, \{prompt, completion\}, \{instruction, input, output\}"),
    ("unknown_format_pref.jsonl", load_preferences, 1,
     r"no preference format matches the keys \['bad', 'good', 'question'\]"),
]


@pytest.mark.parametrize("name, loader, line, what", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_file_raises_data_error(name, loader, line, what):
    where = re.escape(name) + (f":{line}: " if line is not None else ": ")
    with pytest.raises(DataError, match=where + what) as info:  # what: from just after the line
        loader(BAD / name)
    assert info.value.line == line


def test_every_bad_file_has_a_case():
    covered = {c[0] for c in BAD_CASES} | {"identical_chosen_rejected.jsonl", "hh_skipped.jsonl"}
    assert {p.name for p in BAD.iterdir()} == covered


def test_identical_chosen_rejected_is_skipped_with_one_warning():
    stats = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = load_preferences(BAD / "identical_chosen_rejected.jsonl", stats)
    assert len(caught) == 1 and caught[0].category is DataWarning
    assert "identical_chosen_rejected=2 (first at line 2)" in str(caught[0].message)
    assert [p.chosen for p in pairs] == [[a("Good.")], [a("Good.")]]  # lines 1 and 3
    assert stats["identical_chosen_rejected"] == 2 and stats["loaded"] == 2


def test_hh_oddities_from_real_data_are_skipped_and_counted():
    # line 1 is fine; 2: empty final reply; 3: empty earlier Assistant turn; 4: two Assistant
    # turns in a row; 5: rejected ends with a Human turn; 6: identical
    stats = {}
    with pytest.warns(DataWarning, match="skipped 5 records"):
        pairs = load_preferences(BAD / "hh_skipped.jsonl", stats)
    assert pairs == [PreferencePair([u("Hi")], [a("Hello")], [a("Go away")], {})]
    assert stats == {"loaded": 1, "identical_chosen_rejected": 1, "skipped_empty_response": 1,
                     "skipped_empty_turn": 1, "skipped_bad_role_order": 2}


def test_same_defect_in_message_lists_is_an_error_not_a_skip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"chosen": [u("Q"), a("A"), a("B")],
                                "rejected": [u("Q"), a("C")]}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: roles out of order in 'chosen'"):
        load_preferences(path)


# ---------------------------------------------------------------------------------------------
# Real data (only where ../shared/data exists next to the repository)

HH_FILES = {  # name -> (lines, expected stats); the files are fixed, see SOURCE.txt
    "harmless-base": (2312, {"loaded": 2299, "identical_chosen_rejected": 0,
                             "skipped_empty_response": 4, "skipped_empty_turn": 0,
                             "skipped_bad_role_order": 9}),
    "helpful-base": (2354, {"loaded": 2333, "identical_chosen_rejected": 2,
                            "skipped_empty_response": 3, "skipped_empty_turn": 1,
                            "skipped_bad_role_order": 15}),
    "helpful-online": (1137, {"loaded": 1129, "identical_chosen_rejected": 2,
                              "skipped_empty_response": 3, "skipped_empty_turn": 1,
                              "skipped_bad_role_order": 2}),
    "helpful-rejection-sampled": (2749, {"loaded": 2714, "identical_chosen_rejected": 32,
                                         "skipped_empty_response": 0, "skipped_empty_turn": 0,
                                         "skipped_bad_role_order": 3}),
}
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} not present")


@needs_shared
@pytest.mark.parametrize("name", list(HH_FILES))
def test_real_hh_test_split_loads(name):
    path = SHARED / "hh-rlhf" / name / "test.jsonl.gz"
    n_lines, expected = HH_FILES[name]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert sum(1 for _ in f) == n_lines
    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pairs = load_preferences(path, stats)
    assert stats == expected
    assert len(pairs) == stats["loaded"] and sum(stats.values()) == n_lines  # loaded + skipped
    for pair in pairs:  # every HH pair differs in exactly one final, non-empty reply
        assert pair.prompt[-1]["role"] == "user"
        assert len(pair.chosen) == len(pair.rejected) == 1
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
        assert pair.chosen[0]["content"].strip() and pair.rejected[0]["content"].strip()
        assert pair.chosen != pair.rejected and pair.fields == {}


@needs_shared
@pytest.mark.parametrize("split", ["test", "train"])
def test_real_gsm8k_loads_with_gold_answer_for_every_line(split):
    path = SHARED / "gsm8k" / f"{split}.jsonl"
    n_lines = sum(1 for _ in path.open(encoding="utf-8"))
    stats = {}
    records = load_prompts(path, stats)
    assert len(records) == stats["loaded"] == n_lines == {"test": 1319, "train": 7473}[split]
    for rec in records:
        assert rec.prompt[0]["role"] == "user" and len(rec.prompt) == 1
        assert re.fullmatch(r"-?\d+(\.\d+)?", rec.fields["gold_answer"])
        assert "####" in rec.fields["answer"]  # the original solution is passed on untouched
    # first lines: Janet's ducks (16 - 3 - 4 = 9 eggs * $2) and Natalia's clips (48 + 48/2)
    assert records[0].fields["gold_answer"] == {"test": "18", "train": "72"}[split]
