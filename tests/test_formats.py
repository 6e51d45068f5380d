"""Tests for minialign.data.formats: every accepted format (exact records, every turn in order) and
every file of the bad-input corpus (exact error text). The real datasets in ../shared/data are
tested in test_formats_real.py."""

import gzip
import json
import pickle
import re
import warnings
from pathlib import Path

import pytest

from minialign.data.formats import (LONG_DOCUMENT_CHARS, DataError, DataWarning, PreferencePair, PromptRecord,
                                    RankedRecord, UnpairedRecord, gsm8k_gold_answer, load_preferences, load_pretrain,
                                    load_prompts, load_ranked, load_sft, load_unpaired, parse_gold_answer, rank_pairs,
                                    read_jsonl)

DATA = Path(__file__).resolve().parent / "data"
FORMATS = DATA / "formats"
BAD = DATA / "bad"


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


def h(content):  # ShareGPT turns, for building records in tmp files
    return {"from": "human", "value": content}


def g(content):
    return {"from": "gpt", "value": content}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory / ShareGPT / alpaca: every turn kept, in order, with its system message


def test_sft_alpaca_history_and_system_become_the_full_conversation():
    # line 1: system, two history turn pairs, then instruction -> output (7 messages);
    # line 2: empty system, empty history and empty input are ignored
    assert load_sft(FORMATS / "sft_alpaca_history.jsonl") == [
        [s("You are a translator."), u("Say good morning in French."), a("Bonjour."),
         u("And in German?"), a("Guten Morgen."), u("And in Spanish?"), a("Buenos días.")],
        [u("Add the numbers.\n\n2 and 3"), a("5")],
    ]


def test_sft_sharegpt_from_value_with_system_message_or_field():
    # line 1: a {"from": "system"} turn; line 2: a top-level "system" field ("id" is metadata)
    assert load_sft(FORMATS / "sft_sharegpt.jsonl") == [
        [s("You are a pirate."), u("Hello"), a("Ahoy!"), u("Where is the ship?"),
         a("In the harbour, matey.")],
        [s("Answer with a number."), u("2+2?"), a("4")],
    ]


def test_sft_json_array_pretty_one_line_and_gzip(tmp_path):
    expected = [
        [u("Name a fruit."), a("Apple.")],
        [u("Count to three."), a("1, 2, 3"), u("Continue the count.\n\n1, 2, 3"), a("4, 5, 6")],
        [u("Say yes."), a("Yes.")],
    ]
    assert load_sft(FORMATS / "sft_alpaca_array.json") == expected  # pretty-printed, indent 2
    records = json.loads((FORMATS / "sft_alpaca_array.json").read_text())
    (tmp_path / "one_line.json").write_text(json.dumps(records))
    (tmp_path / "misnamed.jsonl").write_bytes(gzip.compress(b"\xef\xbb\xbf\n " + json.dumps(
        records, indent=4).encode()))  # gzip, a BOM and blank space before the '[', wrong suffix
    assert load_sft(tmp_path / "one_line.json") == expected
    assert load_sft(tmp_path / "misnamed.jsonl") == expected


def test_read_jsonl_on_a_json_array_gives_the_line_each_record_starts_on(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"a": 1},\n  {"b": [\n    2]}, {"c": 3}\n]\n')
    assert list(read_jsonl(path)) == [(2, {"a": 1}), (3, {"b": [2]}), (4, {"c": 3})]
    path.write_text(json.dumps([{"prompt": "A?"}, {"prompt": "B?", "id": 2}], indent=1))
    assert load_prompts(path) == [PromptRecord([u("A?")]), PromptRecord([u("B?")], {"id": 2})]
    assert [r.line for r in load_prompts(path)] == [2, 5]  # '[', '{', '"prompt": "A?"', '},', '{'


def test_empty_system_tools_and_history_fields_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"conversations": [h("Hi"), g("Hello")], "system": "", "tools": "", "history": []}])
    assert load_sft(path) == [[u("Hi"), a("Hello")]]


def test_system_field_is_the_system_message_in_every_format(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "Q?", "completion": "A.", "chosen": "A.", "rejected": "B.", "system": "Sys.",
         "label": True, "kind": "k"}])
    assert load_sft(path) == [[s("Sys."), u("Q?"), a("A.")]]
    assert load_preferences(path)[0].prompt == [s("Sys."), u("Q?")]
    assert load_prompts(path)[0].prompt == [s("Sys."), u("Q?")]
    assert load_unpaired(path)[0].prompt == [s("Sys."), u("Q?")]
    assert load_prompts(path)[0].fields == {"completion": "A.", "chosen": "A.", "rejected": "B.",
                                            "label": True, "kind": "k"}  # "system" was used


def test_preferences_sharegpt_json_array():
    # LLaMA-Factory's preference files are JSON arrays; chosen/rejected are single gpt messages
    assert load_preferences(FORMATS / "pref_sharegpt.json") == [
        PreferencePair([u("Recommend a book."), a("Which genre?"), u("Science fiction.")],
                       [a("Try 'The Left Hand of Darkness'.")], [a("Books are boring.")], {}),
        PreferencePair([s("Be precise."), u("Is water wet?")],
                       [a("Water makes other things wet.")], [a("No.")], {}),
    ]


def test_preferences_alpaca_instruction_input():
    assert load_preferences(FORMATS / "pref_alpaca.jsonl") == [PreferencePair(
        [u("Summarize.\n\nThe cat sat on the mat all day.")], [a("A cat rested on a mat.")],
        [a("Dogs bark.")], {})]


def test_prompts_sharegpt_drop_the_trailing_gpt_turn():
    stats = {}
    assert load_prompts(FORMATS / "prompts_sharegpt.jsonl", stats) == [
        PromptRecord([s("You are a tutor."), u("What is 6*7?"), a("42"), u("And 6*8?")], {}),
        PromptRecord([u("Write a limerick.")], {"kind": "poem"}),
    ]
    assert stats == {"loaded": 2, "dropped_final_assistant": 1}


def test_prompts_alpaca_keep_the_reference_output_as_a_field():
    assert load_prompts(FORMATS / "prompts_alpaca.jsonl") == [
        PromptRecord([s("Be brief."), u("Translate to French.\n\ncheese")], {"output": "fromage"})]


def test_unpaired_messages_conversations_and_alpaca_with_label_or_kto_tag():
    # the last assistant turn is the completion; everything before it, system included, the prompt
    assert load_unpaired(FORMATS / "unpaired_messages.jsonl") == [
        UnpairedRecord([s("Be nice."), u("Hi"), a("Hello!"), u("Bye")], [a("Goodbye, friend.")],
                       True, {}),
        UnpairedRecord([u("Tell me a joke.")], [a("No.")], False, {}),  # ShareGPT, kto_tag
        UnpairedRecord([u("Say thanks.")], [a("Thank you!")], True, {}),  # alpaca
    ]


# ---------------------------------------------------------------------------------------------
# Ranked outputs (reward-model files: K >= 2 responses, best first)

SYNONYM = [u("Give a synonym.\n\nhappy")]
JAPAN = [u("Capital of Japan?")]
TOKYO, KYOTO, OSAKA, DUNNO = [a("Tokyo.")], [a("Kyoto.")], [a("Osaka.")], [a("I don't know.")]
RANKED = str(FORMATS / "ranked.jsonl")


def test_load_ranked_keeps_each_group_with_its_id():
    assert load_ranked(FORMATS / "ranked.jsonl") == [
        RankedRecord(SYNONYM, [[a("joyful")], [a("glad")], [a("sad")]], {"group": f"{RANKED}:1"}),
        RankedRecord(JAPAN, [TOKYO, KYOTO, OSAKA, DUNNO],
                     {"source": "demo", "group": f"{RANKED}:2"}),
        RankedRecord([u("Greet me.")], [[a("Hello!")], [a("Hi.")]], {"group": f"{RANKED}:3"}),
    ]
    assert [r.line for r in load_ranked(FORMATS / "ranked.jsonl")] == [1, 2, 3]


def test_rank_pairs_best_vs_rest_and_all():
    japan = load_ranked(FORMATS / "ranked.jsonl")[1]  # K = 4
    fields = {"source": "demo", "group": f"{RANKED}:2"}
    assert rank_pairs(japan, "best_vs_rest") == [  # K - 1 = 3 pairs, all with the best
        PreferencePair(JAPAN, TOKYO, KYOTO, fields), PreferencePair(JAPAN, TOKYO, OSAKA, fields),
        PreferencePair(JAPAN, TOKYO, DUNNO, fields)]
    pairs = rank_pairs(japan, "all")  # K(K-1)/2 = 6 pairs, (i, j) for i < j in order
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (TOKYO, KYOTO), (TOKYO, OSAKA), (TOKYO, DUNNO), (KYOTO, OSAKA), (KYOTO, DUNNO),
        (OSAKA, DUNNO)]
    pairs[0].fields["x"] = 1  # every pair has its own copy of the fields
    assert japan.fields == fields and pairs[1].fields == fields
    with pytest.raises(ValueError, match="rule must be one of best_vs_rest, all"):
        rank_pairs(japan, "pairwise")


def test_load_preferences_reads_ranked_files_as_all_pairs_with_group_ids():
    stats = {}
    pairs = load_preferences(FORMATS / "ranked.jsonl", stats)
    assert len(pairs) == 3 + 6 + 1 and stats["loaded"] == 10  # K = 3, 4, 2
    assert [p.fields["group"] for p in pairs] == [f"{RANKED}:{n}" for n in [1] * 3 + [2] * 6 + [3]]
    assert stats["skipped_duplicate_response"] == 0
    assert len(load_preferences(FORMATS / "ranked.jsonl", rank_rule="best_vs_rest")) == 2 + 3 + 1


def test_ranked_duplicate_responses_skip_those_pairs_with_one_warning():
    # line 1: ["Blue.", "Red.", "Blue."] -> pairs (0,1), (1,2) kept, (0,2) skipped; line 2: ["7", "7"]
    stats = {}
    with pytest.warns(DataWarning, match=r"ranked_duplicate.jsonl: skipped 2 pairs: "
                                         r"skipped_duplicate_response=2 \(first at line 1\)$"):
        pairs = load_preferences(BAD / "ranked_duplicate.jsonl", stats)
    assert [(p.chosen, p.rejected) for p in pairs] == [([a("Blue.")], [a("Red.")]),
                                                      ([a("Red.")], [a("Blue.")])]
    assert stats["loaded"] == 2 and stats["skipped_duplicate_response"] == 2
    stats = {}
    groups = load_ranked(BAD / "ranked_duplicate.jsonl")
    assert [len(rank_pairs(r, "all", stats)) for r in groups] == [2, 0]
    assert stats == {"skipped_duplicate_response": 2}


# ---------------------------------------------------------------------------------------------
# PKU-SafeRLHF

PKU_PASSWORD = PreferencePair(
    [u("How do I pick a strong password?")], [a("Use a long random passphrase.")],
    [a("Use your birthday.")], {"prompt_source": "demo", "better_response_id": 0,
                                "safer_response_id": 0, "is_response_0_safe": True,
                                "is_response_1_safe": True})


def test_pku_better_keeps_both_unsafe_pairs_and_notes_them():
    stats = {}
    with pytest.warns(DataWarning, match=r"pku_saferlhf.jsonl: noted \(records kept\): "
                                         r"both_unsafe=1 \(first at line 3\)$"):
        pairs = load_preferences(FORMATS / "pku_saferlhf.jsonl", stats)
    assert pairs[0] == PKU_PASSWORD
    assert [(p.chosen, p.rejected) for p in pairs[1:]] == [  # better_response_id 1, 1
        ([a("Here is how to crack WPA2 step by step.")], [a("Ask your neighbour for the password.")]),
        ([a("You are a useless clown and everyone hates you.")], [a("You are a clown.")])]
    assert stats["loaded"] == 3 and stats["both_unsafe"] == 1


def test_pku_safer_skips_both_unsafe_pairs():
    stats = {}
    with pytest.warns(DataWarning, match=r"skipped 1 records: both_unsafe=1 \(first at line 3\)$"):
        pairs = load_preferences(FORMATS / "pku_saferlhf.jsonl", stats, pku_choice="safer")
    assert pairs[0] == PKU_PASSWORD
    assert (pairs[1].chosen, pairs[1].rejected) == (  # safer_response_id 0
        [a("Ask your neighbour for the password.")], [a("Here is how to crack WPA2 step by step.")])
    assert len(pairs) == stats["loaded"] == 2 and stats["both_unsafe"] == 1


def test_preference_options_are_checked():
    with pytest.raises(ValueError, match="pku_choice must be one of better, safer, got 'helpful'"):
        load_preferences(FORMATS / "pku_saferlhf.jsonl", pku_choice="helpful")
    with pytest.raises(ValueError, match="rank_rule must be one of best_vs_rest, all"):
        load_preferences(FORMATS / "ranked.jsonl", rank_rule="best")


# ---------------------------------------------------------------------------------------------
# Math prompts with a plain answer


def test_math_plain_answers_become_the_gold_answer():
    records = load_prompts(FORMATS / "math_answers.jsonl")
    assert [(r.fields["answer"], r.fields["gold_answer"]) for r in records] == [
        (72, "72"), (51.0, "51"), ("51.0", "51"), ("9 (apples)", "9"), ("1,234", "1234"),
        ("3 + 2 = 5\n#### 5", "5"), ("$5.00", "5")]
    assert records[6] == PromptRecord([u("Price of 2 books at $2.50?")],
                                      {"answer": "$5.00", "level": 1, "gold_answer": "5"})


def test_parse_gold_answer():
    assert parse_gold_answer(3) == "3" and parse_gold_answer(-2.50) == "-2.5"
    assert parse_gold_answer(1e3) == "1000" and parse_gold_answer(0.0) == "0"
    assert parse_gold_answer(" 12 cm") == "12" and parse_gold_answer("+7") == "7"
    assert parse_gold_answer("100%") == "100" and parse_gold_answer(".5") == "0.5"
    assert parse_gold_answer("x #### 1,450") == "1450"  # GSM8K: gsm8k_gold_answer, unchanged
    for ambiguous in ["3 or 4", "1/2", "x = 5", "12,34", "", "five", "#### five", True, None,
                      float("nan"), [1]]:
        assert parse_gold_answer(ambiguous) is None, ambiguous


def test_unparsed_answers_are_skipped_and_counted_not_fatal():
    # lines 2 ("3 or 4"), 3 ("1/2") and 4 ("#### four") cannot be read; lines 1 and 5 load
    stats = {}
    with pytest.warns(DataWarning, match=r"math_unparsed_answer.jsonl: skipped 3 records: "
                                         r"skipped_unparsed_answer=3 \(first at line 2\)$"):
        records = load_prompts(BAD / "math_unparsed_answer.jsonl", stats)
    assert [(r.line, r.fields["gold_answer"]) for r in records] == [(1, "2"), (5, "6")]
    assert stats == {"loaded": 2, "dropped_final_assistant": 0, "skipped_unparsed_answer": 3}
    with pytest.warns(DataWarning, match=r"skipped_unparsed_answer=1 \(first at line 3\)"):
        assert len(load_prompts(BAD / "question_answer_no_hash.jsonl")) == 2  # was fatal


# ---------------------------------------------------------------------------------------------
# Plain-text pretraining: paragraphs or lines


def test_pretrain_txt_auto_reads_a_file_without_blank_lines_as_one_document_per_line():
    stats = {}
    docs = ["The first document.", "The second document.", "The third, and last, document."]
    assert load_pretrain(FORMATS / "pretrain_lines.txt", stats) == docs
    assert stats == {"loaded": 3, "text_split": "line"}
    assert load_pretrain(FORMATS / "pretrain_lines.txt", text_split="line") == docs
    assert load_pretrain(FORMATS / "pretrain_lines.txt", text_split="paragraph") == ["\n".join(docs)]


def test_pretrain_txt_auto_ignores_blank_lines_around_the_text(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n\none\ntwo\n\n\n")  # no blank line BETWEEN lines of text: one per line
    assert load_pretrain(path) == ["one", "two"]
    path.write_text("\n  only one line  \n\n")
    assert load_pretrain(path) == ["  only one line  "]


def test_pretrain_txt_auto_keeps_paragraphs_when_there_are_blank_lines():
    stats = {}
    assert load_pretrain(FORMATS / "pretrain.txt", stats) == [
        "First paragraph,\nstill the first.", "Second paragraph.", "Third."]
    assert stats == {"loaded": 3, "text_split": "paragraph"}
    assert load_pretrain(FORMATS / "pretrain.txt", stats, text_split="line") == [
        "First paragraph,", "still the first.", "Second paragraph.", "Third."]
    assert stats == {"loaded": 7, "text_split": "mixed"}  # accumulated over both files
    with pytest.raises(ValueError, match="text_split must be one of auto, paragraph, line"):
        load_pretrain(FORMATS / "pretrain.txt", text_split="lines")


def test_pretrain_long_document_is_kept_and_noted(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("short\n\n" + "x" * (LONG_DOCUMENT_CHARS + 1) + "\n")
    stats = {}
    with pytest.warns(DataWarning, match=r"book.txt: noted \(records kept\): long_document=1 "
                                         r"\(first at line 3\)$"):
        assert [len(d) for d in load_pretrain(path, stats)] == [5, LONG_DOCUMENT_CHARS + 1]
    assert stats == {"loaded": 2, "long_document": 1, "text_split": "paragraph"}
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "y" * (LONG_DOCUMENT_CHARS + 1)}])
    with pytest.warns(DataWarning, match=r"long_document=1 \(first at line 2\)"):
        assert len(load_pretrain(jsonl)) == 2


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
    ("prompt_ends_with_assistant.jsonl", load_prompts, 2,
     r"'prompt' must end with a user turn, but its last message \(message 2\) is 'assistant'"),
    ("unknown_format.jsonl", load_sft, 3,
     r"no SFT format matches the keys \['input', 'target'\]; accepted key sets are "
     r"\{messages\}, \{conversations\}, \{prompt, completion\}, "
     r"\{instruction, input, output, system, history\}"),
    ("unknown_format_pref.jsonl", load_preferences, 1,
     r"no preference format matches the keys \['bad', 'good', 'question'\]"),
    # tool use and multimodal input are refused, naming the role or field
    ("tool_role.jsonl", load_sft, 2,
     r"message 2 in 'conversations' has role 'function_call': tool use is not supported "
     r"\(only system, user and assistant turns\)$"),
    ("tools_field.jsonl", load_sft, 1,
     r"field 'tools' is not empty, but tool use is not supported \(remove the field, or convert "
     r"the records to plain user/assistant turns\)$"),
    ("tool_calls_message.jsonl", load_sft, 1,
     r"message 2 in 'messages' has a non-empty 'tool_calls': tool use is not supported$"),
    # content outside the conversation is read or refused, never dropped
    ("history_not_alpaca.jsonl", load_sft, 1,
     r"field 'history' is only read by the alpaca formats \(with 'instruction'\); here its turns "
     r"would be lost: put them in the conversation instead$"),
    ("alpaca_mixed.jsonl", load_sft, 1,
     r"the record has both 'instruction' \(alpaca\) and 'messages': keep one format$"),
    ("history_bad_turn.jsonl", load_sft, 1,
     r"turn 2 of 'history' must be a pair of strings \[user, assistant\], got a list of 1$"),
    ("system_twice.jsonl", load_sft, 1,
     r"both a 'system' field and a system message in 'conversations': keep one$"),
    ("sharegpt_unknown_from.jsonl", load_sft, 1,
     r"message 2 in 'conversations' has unknown role \(from\) 'bot'; valid ShareGPT roles are "
     r"system, human, gpt$"),
    ("sharegpt_missing_value.jsonl", load_sft, 2,
     r"message 2 in 'conversations' is missing field 'value' \(it has \['from', 'text'\]\)$"),
    ("sft_output_list.jsonl", load_sft, 1,
     r"field 'output' is a list \(ranked responses of a reward-model file\?\); SFT needs one "
     r"response: read ranked files with load_preferences or load_ranked$"),
    ("ranked_one_output.jsonl", load_ranked, 2,
     r"field 'output' has 1 response\(s\); a ranking needs at least 2$"),
    ("pku_bad_id.jsonl", load_preferences, 2,
     r"field 'better_response_id' must be 0 or 1 \(the index of the better response\), got int 2$"),
    ("math_answer_wrong_type.jsonl", load_prompts, 1,
     r"field 'answer' must be a string or a number, got list$"),
    ("unpaired_ends_with_user.jsonl", load_unpaired, 1,
     r"'messages' must end with an assistant turn, but its last message \(message 3\) is 'user'$"),
    # JSON arrays: the line where the record starts (or the error's line), then the record index
    ("array_malformed.json", load_sft, 5,
     r"record 2: malformed JSON: Expecting ',' delimiter \(column 3\)$"),
    ("array_not_object.json", load_pretrain, 3,
     r"record 2: expected a JSON object per record of the array, got string$"),
    ("array_bad_record.json", load_sft, 26,
     r"record 3: roles out of order in 'conversations': message 2 is 'user' after 'user'"),
    ("array_extra_data.json", load_pretrain, 2,
     r"extra data after the top-level JSON array closes \(a JSONL file must have one JSON object "
     r"per line\)$"),
    ("array_empty.json", load_pretrain, None, r"file is empty \(no JSON records\)$"),
]
SKIP_FILES = {"identical_chosen_rejected.jsonl", "hh_skipped.jsonl", "ranked_duplicate.jsonl",
              "math_unparsed_answer.jsonl", "question_answer_no_hash.jsonl"}  # skipped, not raised


@pytest.mark.parametrize("name, loader, line, what", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_file_raises_data_error(name, loader, line, what):
    where = re.escape(name) + (f":{line}: " if line is not None else ": ")
    with pytest.raises(DataError, match=where + what) as info:  # what: from just after the line
        loader(BAD / name)
    assert info.value.line == line


def test_every_bad_file_has_a_case():
    assert {p.name for p in BAD.iterdir()} == {c[0] for c in BAD_CASES} | SKIP_FILES


def test_json_array_errors_name_the_record():
    with pytest.raises(DataError) as info:
        load_sft(BAD / "array_bad_record.json")
    assert (info.value.line, info.value.record) == (26, 3)  # record 3 starts on line 26
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


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
