"""README.md and docs/ against the code: every script's --help formats, every flag the pages
name exists in the parser of the script it is given to (or, in prose, of some script), every
page of docs/ is reachable from README, and every relative link and #anchor resolves. The
parsers are read from the scripts themselves (argparse), so a renamed or removed flag fails
here, not in a newcomer's shell."""

import argparse
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("preprocess.py", "data.py", "models.py", "pretrain.py", "finetune.py", "evaluate.py", "bench.py")
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# Flags of other programs the pages quote: torchrun, pip, pytest, docker, SLURM, and the authors' scripts
# (their flags are spelt with underscores or are quoted as theirs).
FOREIGN = {
    "--nproc_per_node",
    "--nnodes",
    "--rdzv-endpoint",
    "--index-url",
    "--shm-size",
    "--signal",
    "--durations",
    "--dry-run",
    "--lrdecay",
    "--noamp",
    "--no-cache-dir",
    "--upgrade",
    "--check",
}


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def options(parser):
    """Every option string of an argparse parser and of its sub-commands -> its choices (or None)."""
    found = {}
    for action in parser._actions:
        found.update((s, action.choices) for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(options(sub))
    return found


def helps(parser):
    """The --help text of a parser and of each of its sub-commands, formatted as argparse prints it."""
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            text += "".join(helps(sub) for sub in action.choices.values())
    return text


@pytest.fixture(scope="module")
def parsers():
    """script name -> {option string: choices}, captured at parse_args (nothing runs past it)."""

    def capture(self, *args, **kwargs):
        raise Captured(self)

    found = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        mp.setattr(sys, "argv", ["x"])
        mp.syspath_prepend(str(ROOT))
        for script in SCRIPTS:
            with pytest.raises(Captured) as c:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            found[script] = options(c.value.parser)
            helps(c.value.parser)  # --help itself works (a stray % in a help string breaks it)
    return found


def commands(text):
    """(script, its argument string) for every `python S.py ...` / `torchrun ... S.py ...` on a line,
    up to the end of that command (&&, ;, |, a comment or the code span's end)."""
    text = text.replace("\\\n", " ")
    for m in re.finditer(r"(?:python3?|torchrun[^`\n]*?)\s+((?:[\w./]+/)?(\w+\.py))([^`\n]*)", text):
        script, rest = m.group(2), re.split(r"&&|;|\||#", m.group(3))[0]
        if script in SCRIPTS:
            yield script, rest


def test_every_flag_in_readme_and_docs_exists(parsers):
    kit = set().union(*parsers.values())
    wrong = []
    for page in PAGES:
        text = page.read_text()
        for script, rest in commands(text):
            words = rest.split()
            for flag, value in zip(words, words[1:] + [""]):
                if not re.fullmatch(r"--[a-z][\w-]*", flag) or flag in FOREIGN:
                    continue
                if flag not in parsers[script]:
                    wrong.append(f"{page.name}: {script} has no {flag}")
                elif (
                    parsers[script][flag] and re.fullmatch(r"[a-z][\w]*", value) and value not in parsers[script][flag]
                ):  # a literal choice (not a placeholder or $var)
                    wrong.append(f"{page.name}: {script} {flag} has no choice {value}")
        for flag in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text)):
            if flag not in kit and flag not in FOREIGN and "_" not in flag:
                wrong.append(f"{page.name}: no script has {flag}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def anchors(page):
    """GitHub's anchors of a Markdown page's headings."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_docs_reachable_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, f"README does not link docs/{page.name}"
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", page.read_text()):
            target = target[0] or target[1]
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} does not exist")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_readme_stays_short():
    """A five-minute read: the rest lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
