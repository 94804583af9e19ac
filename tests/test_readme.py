"""README.md is a test: its shell blocks run as written, and every flag it shows exists.

Blocks: each ```bash / ```sh / ```shell / ```console block of README.md (console: its `$ ` lines) runs with
`bash -euo pipefail`, in README order, in one fresh temporary folder, so later blocks use the files
of earlier ones as a reader's shell would. The README starts in the clone's root: the folder holds
a `.venv` symlink to this venv, whose bin is also first on PATH. A block whose previous line is
`<!-- readme-test: skip (REASON) -->` does not run (board-only steps, ones needing the network or
running this suite). The `$ ` examples of every `taskedge CMD --help` run after the README blocks,
in the same folder.

SUBST below is applied to the text before it runs, and nothing else is changed; a substitution
that no longer matches anything fails the test (else it would silently stop shrinking the run).

Flags: every `taskedge CMD ... --flag` in README code (blocks and inline spans) and in the help
texts must be an option of CMD's parser (runtime/cli.py:build_parser); `python -m MODULE --flag`
must appear in that module's --help; `make TARGET` must be a Makefile target.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SKIP = re.compile(r"^<!-- readme-test: skip \((.+)\) -->$")
SUBST = [
    ("--steps 200", "--steps 4"),                 # a few optimizer steps instead of minutes of training
    ("--steps 400", "--steps 6"),
    ("n_train=2000", "n_train=300"),              # export calibrates on 256 of them
    ("n_test=1000", "n_test=64"),                 # accuracy on 64 held-out reviews, not 1000
    ("taskedge bench --quick", "taskedge bench --quick --steps 4 --rounds 1 --no-profile"),  # no timing-only rounds
]


def blocks(text=README):
    """[(line, heading, lang, body, skip_reason)] of the README's fenced blocks."""
    out, lines, heading, i = [], text.splitlines(), "top", 0
    while i < len(lines):
        line = lines[i]
        heading = line.lstrip("# ").strip() if re.match(r"#{2,} ", line) else heading
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            skip = SKIP.match(lines[i - 1]) if i else None
            out.append((i + 1, heading, line[3:].strip(), "\n".join(lines[i + 1:end]), skip and skip.group(1)))
            i = end
        i += 1
    return out


SHELL = [b for b in blocks() if b[2] in ("bash", "sh", "shell", "console")]
RUN = [b for b in SHELL if not b[4]]


def script(lang, body):
    if lang == "console":
        body = "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ "))
    for old, new in SUBST:
        body = body.replace(old, new)
    return body


def bash(code, cwd, timeout=600):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def help_texts():
    """{'taskedge CMD': formatted --help} for every (sub)command; formatting raises on a bad help string."""
    from taskedge.runtime.cli import build_parser
    out, todo = {}, [("taskedge", build_parser())]
    while todo:
        name, p = todo.pop()
        out[name] = p.format_help()
        todo += [(f"{name} {sub}", sp) for sub, sp in (_subcommands(p) or {}).items()]
    return out


def help_examples():
    return [line.strip()[2:] for text in help_texts().values() for line in text.splitlines()
            if line.strip().startswith("$ ")]


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Run the README's blocks, then the help examples, in order in one folder; stop at the first failure."""
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"{sys.prefix} is not a venv (the README activates .venv)")
    d = tmp_path_factory.mktemp("readme")
    (d / ".venv").symlink_to(sys.prefix)
    results, failed = {}, None
    steps = [(b[0], script(b[2], b[3])) for b in RUN] + [("help", script("bash", "\n".join(help_examples())))]
    for key, code in steps:
        results[key] = f"not run: the block at README line {failed} failed" if failed else bash(code, d)
        if not failed and results[key].returncode != 0:
            failed = key
    return d, results


def _outcome(r):
    assert not isinstance(r, str), r
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("block", RUN, ids=[f"L{b[0]}-{re.sub(r'[^a-z]+', '-', b[1].lower())[:24]}" for b in RUN])
def test_readme_block_runs(readme_runs, block):
    _outcome(readme_runs[1][block[0]])


def test_help_examples_run(readme_runs):
    assert help_examples(), "no `$ ` example in any --help (adapt has two)"
    _outcome(readme_runs[1]["help"])
    assert (readme_runs[0] / "runs" / "r1" / "update.npz").is_file()


def test_blocks_markers_and_substitutions_are_in_use():
    assert any("taskedge adapt" in b[3] and "--resume" in b[3] for b in RUN), "the walk-through is not run"
    markers = [line for line in README.splitlines() if line.startswith("<!-- readme-test")]
    assert all(SKIP.match(m) for m in markers), "malformed marker; write <!-- readme-test: skip (why) -->"
    assert len(markers) == sum(1 for b in blocks() if b[4]), "a skip marker that is not right above a block"
    ran = "\n".join([b[3] for b in RUN] + help_examples())
    stale = [old for old, _ in SUBST if old not in ran]
    assert not stale, f"substitutions that match nothing any more: {stale}"


# -- flags ------------------------------------------------------------------------------------------

def _subcommands(parser):
    import argparse
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def commands(text):
    """(program, args) of each `taskedge ...`, `python -m MODULE ...` and `make ...` in shell text."""
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex) + [";"]
        except ValueError:                                 # unbalanced quotes: prose, not a command
            continue
        group = []
        for tok in tokens:
            if not set(tok) <= set(";&|()<>"):
                group.append(tok)
                continue
            for i, word in enumerate(group):
                name = os.path.basename(word)
                if name == "taskedge" or (name == "make" and i == 0):
                    yield name, group[i + 1:]
                    break
                if name.startswith("python") and group[i + 1:i + 2] == ["-m"] and len(group) > i + 2:
                    yield group[i + 2], group[i + 3:]
                    break
            group = []


def readme_code():
    """Every block (shell or not: usage lines appear in both) and inline code span of the README."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    return [b[3] for b in blocks()] + [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]


def flag_problems(prog, args, parser):
    if prog == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        return [f"make {t}: no such Makefile target" for t in args if not t.startswith("-") and t not in targets]
    if prog != "taskedge":
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        if not flags:
            return []
        text = _module_help(prog)
        return [f"python -m {prog} {f}: not in its --help" for f in flags
                if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    out, path, picked = [], "taskedge", False
    for a in args:
        subs = _subcommands(parser)
        if a.startswith("-"):
            if a.split("=")[0] not in parser._option_string_actions:
                out.append(f"{path} {a}: no such option (`{path} --help`)")
        elif subs is not None and not picked:
            if a not in subs:
                return out + [f"{path} {a}: no such command"]
            parser, path = subs[a], f"{path} {a}"
            picked = _subcommands(parser) is None
    return out


_HELP = {}


def _module_help(module):
    if module not in _HELP:
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        _HELP[module] = r.stdout + r.stderr
    return _HELP[module]


def test_readme_flags_exist():
    from taskedge.runtime.cli import build_parser
    parser = build_parser()
    found = [c for text in readme_code() for c in commands(text)]
    assert sum(p == "taskedge" for p, _ in found) >= 20, found   # the parse still finds the README's commands
    problems = sorted({p for prog, args in found for p in flag_problems(prog, args, parser)})
    assert not problems, "README.md shows what the CLI does not have:\n" + "\n".join(problems)


def test_every_help_runs_and_its_commands_exist():
    from taskedge.runtime.cli import build_parser
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        texts = help_texts()                               # a host tool that fails to register warns here
    assert not err.getvalue(), err.getvalue()
    assert {"taskedge adapt", "taskedge bench", "taskedge flash", "taskedge profile show"} <= set(texts)
    parser, problems = build_parser(), []
    for name, text in texts.items():
        code = re.findall(r"`([^`]+)`", text) + [line.strip()[2:] for line in text.splitlines()
                                                 if line.strip().startswith("$ ")]
        problems += [f"{name} --help: {p}" for c in code for prog, args in commands(c)
                     for p in flag_problems(prog, args, parser)]
    assert not problems, "\n".join(sorted(set(problems)))
    r = subprocess.run([sys.executable, "-m", "taskedge.runtime.cli", "adapt", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and not r.stderr, r.stderr
