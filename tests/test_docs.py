r"""README.md and docs/*.md stay true to the code: every `trime` command in their code blocks parses
with the CLI's own parser, every relative link and image resolves, and every subcommand is documented.

Only `build_parser().parse_args` is asked, never a help text, so the parser may be rebuilt in any way
that keeps its flags. A command is parsed, not run: what it would read need not exist.

A command is `trime ...`, `python -m trime ...` or `torchrun ... -m trime ...` in a fenced code block,
after `\` continuations are joined, comments dropped and `&&`/`;`/`|` split apart (`$ ` marks a command
in a transcript; the other lines of a `text` block are output). `$VAR` takes the block's own `VAR=...`,
else its name as a placeholder; `[--flag]` is an optional flag, shown and tested. `...` stands for
arguments the line leaves out: the required ones the parser then asks for are filled in with placeholders,
and everything the line does show must parse."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from trime.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Lines of code blocks that look like trime commands but are not meant to be run as written, each with
# the reason. Keyed by the line as written (after joining `\` continuations). Empty now; a stale entry fails.
NOT_COMMANDS: dict[str, str] = {}
ALLOWED: set[str] = set()  # the NOT_COMMANDS lines the pages still have

FENCE = re.compile(r"^\s*(```|~~~)\s*(\S*)")
OPERATORS = {";", "&&", "||", "|", "&"}  # a new command follows
REDIRECTS = {">", ">>", "<", "2>", "&>"}  # the next word is a file
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


@dataclass(frozen=True)
class Command:
    where: str  # page:line
    line: str  # the logical line as written
    args: tuple[str, ...]  # what follows `trime`
    elided: bool  # the line shows `...` for arguments it leaves out

    def __str__(self) -> str:
        return "trime " + shlex.join(self.args)


def code_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the first line, language, lines) of each fenced code block."""
    blocks, cur, lang, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if cur is None and m:
            cur, lang, start = [], m.group(2), n + 1
        elif cur is not None and m and not m.group(2):
            blocks.append((start, lang, cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Lines with their `\\` continuations joined, each with the number of its first line."""
    out, buf, first = [], "", None
    for n, line in enumerate(lines, start):
        first = n if first is None else first
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    if buf:
        out.append((first, buf))
    return out


def expand(line: str, variables: dict[str, str]) -> str:
    """Shell variables: the block's own assignments, else the variable's name as a placeholder."""
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(1)), line)


def split_commands(tokens: list[str]) -> list[list[str]]:
    cmds, cur, skip = [], [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in OPERATORS:
            cmds.append(cur)
            cur = []
        elif tok in REDIRECTS:
            skip = True
        else:
            cur.append(tok)
    return [c for c in [*cmds, cur] if c]


def trime_args(words: list[str]) -> list[str] | None:
    """What follows `trime` in `trime ...`, `python -m trime ...` or `torchrun ... -m trime ...`."""
    while words and ASSIGNMENT.match(words[0]):  # OMP_NUM_THREADS=1 trime ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "trime":
        return words[1:]
    if words[0] in ("python", "python3", "torchrun"):
        for i in range(1, len(words) - 1):
            if words[i] == "-m":
                return words[i + 2 :] if words[i + 1] == "trime" else None
    return None


def page_commands(page: Path) -> list[Command]:
    name = page.relative_to(ROOT).as_posix()
    found = []
    for start, lang, lines in code_blocks(page.read_text()):
        variables: dict[str, str] = {}
        for n, raw in logical_lines(start, lines):
            line = raw.strip()
            if line.startswith("$ "):  # a shell prompt in a transcript
                line = line[2:]
            elif lang in ("text", "console"):  # the program's output
                continue
            if line in NOT_COMMANDS:
                ALLOWED.add(line)
                continue
            words = shlex.split(line, comments=True) if "=" in line.split(" ")[0] else []
            if len(words) == 1 and ASSIGNMENT.match(words[0]):  # W="--tokens-per-sample 512 ..."
                var, value = ASSIGNMENT.match(words[0]).groups()
                variables[var] = value
                continue
            if not re.search(r"\b(trime|torchrun)\b", line):
                continue
            lex = shlex.shlex(expand(line, variables), posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            try:
                tokens = list(lex)
            except ValueError as e:
                raise AssertionError(f"{name}:{n}: cannot split `{line}` as the shell would ({e})") from None
            for words in split_commands(tokens):
                args = trime_args(words)
                if args is None:
                    continue
                elided = "..." in args
                args = [a[1:-1] if a.startswith("[-") and a.endswith("]") else a for a in args if a != "..."]
                found.append(Command(f"{name}:{n}", raw.strip(), tuple(args), elided))
    return found


COMMANDS = [c for page in PAGES for c in page_commands(page)]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = subcommands(parser)
    if not subs:
        return [path]
    return [leaf for name, p in subs.items() for leaf in leaf_commands(p, (*path, name))]


def command_path(parser: argparse.ArgumentParser, args: tuple[str, ...]) -> tuple[str, ...]:
    path = []
    for a in args:
        subs = subcommands(parser)
        if a not in subs:
            break
        path.append(a)
        parser = subs[a]
    return tuple(path)


def parse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's error message, or None when the arguments parse."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as e:
            return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_the_pages_have_commands():
    # the extraction itself works: a broken fence or prompt rule would silently test nothing
    assert len(COMMANDS) >= 60, len(COMMANDS)
    assert {p.name for p in PAGES} >= {"README.md", "language-models.md", "translation.md"}


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_parses(parser, cmd):
    args = list(cmd.args)
    msg = parse(parser, args)
    missing = re.search(r"the following arguments are required: (.*)$", msg or "")
    if cmd.elided and missing:
        # `trime eval ... --use-local`: the `...` stands for the required arguments; fill them in, then
        # every argument the line does show must still parse
        fill = []
        for name in missing.group(1).split(", "):
            fill += [name, name.lstrip("-").upper()] if name.startswith("-") else [name.upper()]
        depth = len(command_path(parser, cmd.args))
        args = args[:depth] + fill + args[depth:]
        msg = parse(parser, args)
    if msg is not None:
        pytest.fail(f"{cmd.where}: `{cmd.line}` does not parse as `{cmd}`: {msg}")


def test_every_subcommand_is_documented(parser):
    shown = {command_path(parser, c.args) for c in COMMANDS}
    missing = [" ".join(leaf) for leaf in leaf_commands(parser) if leaf not in shown]
    assert not missing, f"no command in README.md or docs/*.md uses: trime {', trime '.join(missing)}"


def test_allow_list_is_current():
    stale = set(NOT_COMMANDS) - ALLOWED
    assert not stale, f"NOT_COMMANDS entries no page has any more: {sorted(stale)}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where nothing is a link."""
    out, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        out.append("" if inside else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks; their inline code counts, as on GitHub)."""
    seen: dict[str, int] = {}
    inside = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        m = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
    return {s if i == 0 else f"{s}-{i}" for s, n in seen.items() for i in range(n + 1)}


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)=\"([^\"]+)\"")


def links(page: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(prose(page.read_text()))]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif ROOT not in (dest, *dest.parents):
            bad.append(f"{target} (outside the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not bad, f"{page.relative_to(ROOT)}: broken links: {bad}"


def test_images_are_files():
    images = [(page, m) for page in PAGES for m in re.findall(r"!\[[^\]]*\]\(\s*([^)\s]+)", prose(page.read_text()))]
    assert len(images) >= 5, images
    bad = [f"{p.relative_to(ROOT)}: {m}" for p, m in images if not (p.parent / m).is_file()]
    assert not bad, bad


def test_readme_opens_with_the_two_commands():
    start, _, block = code_blocks((ROOT / "README.md").read_text())[0]
    assert start < 15, "the README's first code block is the set-up"
    first = [line.split("#")[0].strip() for line in block]
    assert first == ["make reproduce", "make test"], first
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^reproduce:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
