"""The real datasets in ../shared/data (next to the repository) load with the counts they had before
the loaders learned JSON arrays, ShareGPT, ranked, PKU and plain-answer formats (measured with the
previous minialign/data/formats.py). Every test skips cleanly where ../shared/data is absent."""

import gzip
import json
import re
import warnings
from pathlib import Path

import pytest

from minialign.data.formats import DataWarning, gsm8k_gold_answer, load_preferences, load_pretrain, load_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} not present")

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
GSM8K_FILES = {"train": 7473, "test": 1319, "test_socratic": 1319}  # every line loads


def quietly(loader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return loader(*args, **kwargs)


@needs_shared
@pytest.mark.parametrize("name", list(HH_FILES))
def test_real_hh_test_split_loads(name):
    path = SHARED / "hh-rlhf" / name / "test.jsonl.gz"
    n_lines, expected = HH_FILES[name]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert sum(1 for _ in f) == n_lines
    stats = {}
    pairs = quietly(load_preferences, path, stats)
    assert stats == expected  # no new counters: HH is none of the new formats
    assert len(pairs) == stats["loaded"] and sum(stats.values()) == n_lines  # loaded + skipped
    for pair in pairs:  # every HH pair differs in exactly one final, non-empty reply
        assert pair.prompt[-1]["role"] == "user"
        assert len(pair.chosen) == len(pair.rejected) == 1
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
        assert pair.chosen[0]["content"].strip() and pair.rejected[0]["content"].strip()
        assert pair.chosen != pair.rejected and pair.fields == {}


@needs_shared
def test_real_hh_as_a_gzipped_one_line_json_array_gives_the_same_pairs(tmp_path):
    path = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    array = tmp_path / "helpful-base.json.gz"
    array.write_bytes(gzip.compress(json.dumps(records).encode("utf-8")))
    stats = {}
    assert quietly(load_preferences, array, stats) == quietly(load_preferences, path)
    assert stats == HH_FILES["helpful-base"][1]


@needs_shared
@pytest.mark.parametrize("split", list(GSM8K_FILES))
def test_real_gsm8k_loads_with_gold_answer_for_every_line(split):
    path = SHARED / "gsm8k" / f"{split}.jsonl"
    n_lines = sum(1 for _ in path.open(encoding="utf-8"))
    stats = {}
    records = load_prompts(path, stats)
    assert n_lines == GSM8K_FILES[split]
    assert stats == {"loaded": n_lines, "dropped_final_assistant": 0, "skipped_unparsed_answer": 0}
    assert len(records) == n_lines and [r.line for r in records] == list(range(1, n_lines + 1))
    for rec in records:
        assert rec.prompt[0]["role"] == "user" and len(rec.prompt) == 1
        assert re.fullmatch(r"-?\d+(\.\d+)?", rec.fields["gold_answer"])
        assert rec.fields["gold_answer"] == gsm8k_gold_answer(rec.fields["answer"])  # as before
        assert "####" in rec.fields["answer"]  # the original solution is passed on untouched
    # first lines: Janet's ducks (16 - 3 - 4 = 9 eggs * $2) and Natalia's clips (48 + 48/2)
    assert records[0].fields["gold_answer"] == {"test": "18", "train": "72", "test_socratic": "18"}[split]


@needs_shared
def test_real_gsm8k_as_a_pretty_json_array_gives_the_same_records(tmp_path):
    path = SHARED / "gsm8k" / "test.jsonl"
    records = [json.loads(line) for line in path.open(encoding="utf-8")]
    array = tmp_path / "test.json"
    array.write_text(json.dumps(records, indent=2))
    from_array, from_jsonl = load_prompts(array), load_prompts(path)
    assert from_array == from_jsonl  # prompts and fields; .line differs (where each record starts)
    assert from_array[1].line == 2 + 4  # "[", then 4 lines per record: "{", question, answer, "},"


@needs_shared
def test_real_tinyshakespeare_paragraphs_as_before_and_lines_on_request():
    path = SHARED / "tinyshakespeare" / "input.txt"
    stats = {}
    paragraphs = load_pretrain(path, stats)  # auto: the file has blank lines -> paragraphs
    assert stats == {"loaded": 7222, "text_split": "paragraph"}  # 7222 documents before, too
    assert sum(len(p) for p in paragraphs) == 1_100_949 and paragraphs[0].startswith("First Citizen:")
    assert load_pretrain(path, text_split="paragraph") == paragraphs
    lines = load_pretrain(path, text_split="line")
    assert len(lines) == 32777 == sum(1 for line in path.open(encoding="utf-8") if line.strip())
