"""README.md and README_zh.md name the same commands, and the links of the Chinese README and the lessons resolve.

A command is a python / torchrun / pip invocation in a fenced code block, reduced to what it runs: `python X.py`,
`python -m package.module`, `torchrun X.py`, `pip install ...`. A command added to one README and not the other
fails here: translate it (README_zh.md mirrors the English code blocks of the sections it covers).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def commands(text: str) -> set[str]:
    out = set()
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                w = part.split()
                for i, t in enumerate(w):
                    if t in ("python", "python3") and i + 1 < len(w):
                        out.add(f"python -m {w[i + 2]}" if w[i + 1] == "-m" and i + 2 < len(w) else f"python {w[i + 1]}")
                        break
                    if t == "torchrun":
                        out.add("torchrun " + next((x for x in w[i + 1:] if x.endswith(".py")), "?"))
                        break
                    if t == "pip" and i + 1 < len(w):
                        out.add("pip " + " ".join(w[i + 1:]))
                        break
    return out


def test_the_command_reader_on_a_hand_made_block():
    text = "```bash\npip install -e \".[dev]\" && python -m pytest -q tests\n# python not_this.py\n" \
           "torchrun --nproc_per_node=2 train_sft.py   # one node\npython train_dpo.py \\\n    --loss_type ipo\n```\n" \
           "`python outside_a_block.py`\n"
    assert commands(text) == {'pip install -e ".[dev]"', "python -m pytest", "torchrun train_sft.py",
                              "python train_dpo.py"}


def test_both_readmes_name_the_same_commands():
    en = commands((ROOT / "README.md").read_text(encoding="utf-8"))
    zh = commands((ROOT / "README_zh.md").read_text(encoding="utf-8"))
    assert len(en) > 10
    assert en == zh, f"only in README.md: {sorted(en - zh)}; only in README_zh.md: {sorted(zh - en)}"


def test_the_readmes_link_each_other_and_the_lessons():
    assert "(README_zh.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    for md in [ROOT / "README_zh.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))\)", md.read_text(encoding="utf-8")):
            assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to a missing {target}"


def test_every_lesson_exists_in_both_languages():
    en = {p.name for p in (ROOT / "docs" / "en").glob("*.md")}
    zh = {p.name for p in (ROOT / "docs" / "zh").glob("*.md")}
    assert en and en == zh
