"""The documentation cannot drift from the code: every command it shows parses, every reference resolves.

1. Every shell command in the docs (README.md, README_zh.md if present, bench/README.md, data/README.md,
   examples/*.md), in fenced or indented code blocks and in inline code spans, that runs `python X.py ...`,
   `python -m minialign.x ...` or `torchrun ... X.py ...`: the script or module exists, and its own argparse
   parser accepts every flag shown. Nothing is run: the command is executed as `python` would (runpy, with the
   shown argv) up to the moment it parses its arguments, where the test stops it.
2. Every `tests/x.py`, `tests/x.py::name`, `minialign.x.y` (module, or module attribute) and repository path
   (`minialign/...`, `bench/...`, `examples/...`, `data/...`, `tests/...`, `train_*.py`) the docs mention exists.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in [ROOT / "README.md", ROOT / "README_zh.md", ROOT / "bench" / "README.md",
                    ROOT / "data" / "README.md", *sorted((ROOT / "examples").glob("*.md"))] if p.exists()]
NOT_SHELL = {"python", "py", "text", "json", "jsonl"}  # fenced blocks in these languages hold no commands
LAUNCHER = re.compile(r"^\s*(?:\$\s+)?(?:[A-Za-z_]\w*=\S*\s+)*(?:python3?|torchrun)\s")


def fenced_blocks(text: str):
    """(language, body) of every ``` fenced block."""
    return re.findall(r"^```[ \t]*(\w*)[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def shell_lines(text: str) -> list[str]:
    """Command lines of a doc: fenced shell blocks (continuation lines joined) and inline `python ...` spans."""
    lines = []
    for lang, body in fenced_blocks(text):
        if lang.lower() in NOT_SHELL:
            continue
        lines += [l for l in body.replace("\\\n", " ").splitlines() if LAUNCHER.match(l)]
    lines += re.findall(r"^(?: {4}|\t)((?:python3?|torchrun) .*)$", prose(text), flags=re.M)  # indented code blocks
    for span in re.findall(r"`([^`]+)`", prose(text)):
        span = " ".join(span.split())
        if LAUNCHER.match(span + " "):
            lines.append(span)
    return lines


def commands(line: str) -> list[tuple[str, str, list[str]]]:
    """[(kind, target, args)] for each python/torchrun command of a shell line; kind "script" or "module"."""
    out = []
    words = shlex.split(line.lstrip("$ "), comments=True)
    segment: list[str] = []
    for w in [*words, "&&"]:
        if w not in ("&&", "||", ";", "|"):
            segment.append(w)
            continue
        seg, segment = segment, []
        while seg and (re.match(r"^[A-Za-z_]\w*=", seg[0]) or seg[0] == "time"):
            seg = seg[1:]  # environment assignments
        if not seg or seg[0] not in ("python", "python3", "torchrun"):
            continue
        launcher, rest = seg[0], seg[1:]
        if launcher == "torchrun":  # its own flags come first, each --flag=value
            while rest and rest[0].startswith("-"):
                rest = rest[1:]
        rest = [w for w in rest if not re.match(r"^\d?>", w)]  # no redirections in the docs' commands
        if rest[:1] == ["-m"] and len(rest) > 1:
            out.append(("module", rest[1], rest[2:]))
        elif rest and rest[0].endswith(".py"):
            out.append(("script", rest[0], rest[1:]))
    return out


def doc_commands():
    cases = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text(encoding="utf-8")):
            for kind, target, args in commands(line):
                if kind == "module" and not target.startswith("minialign"):
                    continue  # pip, pytest
                cases.append(pytest.param(kind, target, args, id=f"{doc.relative_to(ROOT)}: {target} {' '.join(args)}"[:150]))
    return cases


class _Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once the arguments parsed: the command stops there."""


def declared_flags(path: Path) -> set[str]:
    """The --flags a file's add_argument calls declare (read from its source, for a script that cannot start here)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def parse_only(kind: str, target: str, args: list[str]) -> tuple[int | str | None, str]:
    """Run the script or module as `python` would, stopping when it has parsed its argv.

    Returns (None, "") when the arguments parsed, else (exit status, what argparse printed). A script that exits
    before it parses (an optional extra not installed here: bench/compare_trl.py without trl) is checked against
    the flags its source declares instead."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, argv=None, namespace=None):
        original(self, argv, namespace)  # an unknown flag or a bad value exits here with status 2
        raise _Parsed()

    old_argv, err = sys.argv, io.StringIO()
    sys.argv = [target if kind == "script" else f"-m {target}", *args]
    argparse.ArgumentParser.parse_args = parse_args
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "script":
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None, ""
    except SystemExit as e:
        if e.code in (0, None) and "--help" in args:
            return None, ""
        if "usage:" not in err.getvalue() and kind == "script":  # it stopped before parsing: read its flags
            unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in declared_flags(ROOT / target)]
            return (None, "") if not unknown else (2, f"{target} declares no {' '.join(unknown)} ({e.code})")
        if e.code == 2 and not args and "the following arguments are required" in err.getvalue():
            return None, ""  # a command named in prose without its arguments
        return e.code, err.getvalue()
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = old_argv
    return -1, "the command ran to its end without parsing its arguments"


@pytest.mark.parametrize("kind,target,args", doc_commands())
def test_every_documented_command_parses(kind, target, args, monkeypatch):
    monkeypatch.chdir(ROOT)
    if kind == "script":
        assert (ROOT / target).is_file(), f"no script {target}"
    else:
        assert importlib.util.find_spec(target) is not None, f"no module {target}"
    status, message = parse_only(kind, target, args)
    assert status is None, f"`{kind} {target} {' '.join(args)}` is refused (exit {status}): {message.strip()[-600:]}"


def test_the_docs_show_commands():
    """The extraction finds the commands (a regex that matched nothing would pass every doc)."""
    targets = {p.values[1] for p in doc_commands()}
    assert {"train_sft.py", "train_dpo.py", "minialign.pipeline", "bench/compare_trl.py"} <= targets


# ------------------------------------------------------------------------------------------- references

def top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    base = ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def resolve_dotted(ref: str) -> str | None:
    """None if `minialign.a.b[.attr]` names a module (or a module's top-level name), else what is wrong."""
    parts = ref.split(".")
    for n in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:n]))
        if path is None:
            continue
        rest = parts[n:]
        if not rest:
            return None
        if rest[0] in top_level_names(path):
            return None
        return f"{'.'.join(parts[:n])} has no {rest[0]}"
    return "no such module"


def has_test(path: Path, name: str) -> bool:
    return name in top_level_names(path) or bool(re.search(rf"^\s+def {re.escape(name)}\(", path.read_text(), re.M))


PATH_REF = re.compile(r"(?<![\w./-])((?:minialign|bench|examples|data|tests|\.ci)/[\w./-]*[\w/]|train_\w+\.py)")


def references(text: str) -> list[tuple[str, str]]:
    """[(kind, ref)]: test files and test names, dotted minialign names, repository paths."""
    refs, last_test_file = [], None
    for m in re.finditer(r"(tests/[\w/]+\.py)(::\w+)?|`::(\w+)`|\bminialign(?:\.\w+)+|" + PATH_REF.pattern, text):
        s = m.group(0)
        if m.group(1):
            last_test_file = m.group(1)
            refs.append(("test", s))
        elif m.group(3):
            refs.append(("test", f"{last_test_file}::{m.group(3)}" if last_test_file else s))
        elif s.startswith("minialign."):
            refs.append(("dotted", s))
        else:
            refs.append(("path", s))
    return refs


def broken_references(doc: Path) -> list[str]:
    bad = []
    for kind, ref in references(doc.read_text(encoding="utf-8")):
        if kind == "test":
            file, _, name = ref.partition("::")
            if not (ROOT / file).is_file():
                bad.append(f"{ref}: no file {file}")
            elif name and not has_test(ROOT / file, name):
                bad.append(f"{ref}: {file} has no {name}")
        elif kind == "dotted":
            why = resolve_dotted(ref)
            if why:
                bad.append(f"{ref}: {why}")
        elif not (ROOT / ref).exists() and not (doc.parent / ref).exists():
            bad.append(f"{ref}: no such file or folder")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_reference_resolves(doc):
    bad = broken_references(doc)
    assert not bad, f"{doc.relative_to(ROOT)}: {len(bad)} broken reference(s):\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------------- the Files tree

def files_tree(readme: Path) -> set[str]:
    """The paths README's "## Files" block lists: one entry per line, folders end with "/", two spaces of
    indentation per level (`minialign/` then `  models/` then `    decoder.py` is minialign/models/decoder.py)."""
    section = readme.read_text(encoding="utf-8").split("\n## Files\n", 1)[1]
    (_, block), *_ = fenced_blocks(section)
    paths, parents = set(), []
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        indent = len(line) - len(line.lstrip())
        if not name or indent % 2 or indent // 2 > len(parents) or not re.match(r"^[\w./-]+$", name):
            continue  # a continuation line of a description (indented deeper than any entry)
        parents = parents[: indent // 2]
        path = "".join(parents) + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_the_files_tree_lists_every_module_and_script():
    listed = files_tree(ROOT / "README.md")
    missing_on_disk = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing_on_disk, f"README's Files lists what does not exist: {missing_on_disk}"
    expected = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("minialign/**/*.py"), *ROOT.glob("train_*.py"),
                                                    *ROOT.glob("bench/*.py"), *ROOT.glob("examples/*")]
                if p.name not in ("__init__.py", "__main__.py")}
    assert not expected - listed, f"README's Files does not list: {sorted(expected - listed)}"
