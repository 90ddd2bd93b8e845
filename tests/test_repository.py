"""The repository speaks for itself: no file points outside it, every link of the README and the docs exists, and
every command line they show parses with its own script's argument parser (so a renamed flag cannot leave a
stale command behind). Commands are parsed, never run: the parser is stopped right after it has read the line."""
import argparse
import ast
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_SUFFIXES = (".py", ".md", ".txt", ".ini", ".json", ".toml", ".cfg", ".yml", ".yaml")
if os.path.isdir(os.path.join(REPO, ".git")):
    TRACKED = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
else:   # an exported tree without git: every file under the repository
    TRACKED = [os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(REPO) for f in fs]
TEXT_FILES = [f for f in TRACKED if f.endswith(TEXT_SUFFIXES) or f.startswith(".ci/")]
DOCS = ["README.md"] + sorted(f for f in TRACKED if f.startswith("docs/") and f.endswith(".md"))

# Paths a user of the repository does not have: the development machine's folders, and specification files that
# are not part of the repository (a method fact cites its paper and the official code instead).
SPEC_NAMES = "|".join(("degla", "cehn", "c2lip", "goal", "benchmarks"))
OUTSIDE = re.compile(r"\.\./shared\b|\bshared" + r"/methods\b|/work/|(?<![\w/.-])(" + SPEC_NAMES + r")\.md\b")


def _read(path):
    with open(os.path.join(REPO, path), encoding="utf-8", errors="replace") as f:
        return f.read()


def test_no_file_points_outside_the_repository():
    # this file names the patterns it looks for, so it is the one file not searched
    hits = [f"{path}:{n}: {line.strip()[:120]}" for path in TEXT_FILES if path != "tests/test_repository.py"
            for n, line in enumerate(_read(path).splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "references to paths outside the repository:\n" + "\n".join(hits[:40])


def _links(path):
    """Relative link targets of a markdown file: [text](target) and bare `docs/...` paths in its text."""
    text = _read(path)
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    targets += re.findall(r"(?<![\w/.-])(docs/[\w./-]+\.(?:md|png|json))", text)
    return [t for t in targets if not re.match(r"[a-z]+://|mailto:", t)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_exists(doc):
    base = os.path.dirname(os.path.join(REPO, doc))
    missing = [t for t in _links(doc) if not os.path.exists(os.path.join(REPO, t) if t.startswith("docs/")
                                                            else os.path.join(base, t))]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


# ---- command lines -------------------------------------------------------------------------------------------
COMMAND = re.compile(r"(?:^|\s)(python3? (?:-m lab\.\w+|[\w/]+\.py)(?=\s|$)[^`]*)")
TORCHRUN = re.compile(r"(?:^|\s)torchrun\b.*?\s([\w/]+\.py)((?:\s[^`]*)?)$")


def _command_lines(path):
    """Every `python X.py ...` / `python -m lab.X ...` / `torchrun ... X.py ...` command in code blocks and inline
    code spans, with backslash continuations joined and trailing comments, pipes and redirections cut off."""
    text = _read(path)
    spans = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        spans += block.replace("\\\n", " ").splitlines()
    text_outside = re.sub(r"```.*?```", "", text, flags=re.S)
    spans += re.findall(r"`([^`\n]+)`", text_outside)
    commands = []
    for span in spans:
        torchrun = TORCHRUN.search(span)
        if torchrun:   # the script and its flags, as the equivalent python command
            span = f"python {torchrun.group(1)}{torchrun.group(2)}"
        for match in COMMAND.finditer(span):
            line = re.split(r"\s+#|\s\||\s&&|\s>|\s2>|;", match.group(1))[0].strip()
            commands.append(line)
    return commands


class _Parsed(Exception):
    pass


def _parse_only(target, argv, monkeypatch):
    """Run `target`'s own argument parsing on argv and stop right after it: ArgumentParser.parse_args raises
    _Parsed once it has read the line (argparse's own errors end in SystemExit with its message)."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [target, *argv])
    if target.startswith("lab."):
        module = importlib.import_module(target)
        tree = ast.parse(_read(target.replace(".", "/") + ".py"))
        # what `python -m lab.X` runs: the call under `if __name__ == "__main__":`
        main_block = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert main_block, f"{target} has no `if __name__ == '__main__':` block"
        call = main_block[0].body[-1].value   # e.g. main(), compare_main(sys.argv[1:]) or cehn.main()
        function = eval(ast.unparse(call.func), vars(module))
        run = (lambda: function(argv)) if call.args else function
    else:
        module = importlib.import_module(target[:-3])
        run = lambda: module.parse_args(argv)   # noqa: E731
    with pytest.raises(_Parsed):
        run()


def _all_commands():
    found = []
    for doc in DOCS:
        for line in _command_lines(doc):
            found.append(pytest.param(doc, line, id=f"{doc}: {line[:70]}"))
    return found


def test_the_docs_show_commands():
    """The command check below is not vacuous: the README shows the demo and the real-data run."""
    readme = _command_lines("README.md")
    assert any(c.startswith("python degla.py") for c in readme), readme
    assert any("--data coco" in c and "--gpus 8" in c for c in readme), readme


@pytest.mark.parametrize("doc, line", _all_commands())
def test_command_line_parses(doc, line, monkeypatch):
    words = shlex.split(line)
    start = next(i for i, w in enumerate(words) if w in ("python", "python3"))
    words = words[start + 1:]
    if words[0] == "-m":
        target, argv = words[1], words[2:]
        assert os.path.exists(os.path.join(REPO, target.replace(".", "/") + ".py")), f"{doc}: no module {target}"
    else:
        target, argv = words[0], words[1:]
        assert os.path.exists(os.path.join(REPO, target)), f"{doc}: no script {target}"
        if target not in ("degla.py", "cehn.py", "c2lip.py", "goal.py", "eval.py"):
            pytest.fail(f"{doc}: `{line}`: scripts live at the top level (methods, eval.py) or run as python -m lab.X")
    try:
        _parse_only(target, argv, monkeypatch)
    except SystemExit as error:   # argparse rejected the line: say which document and line
        pytest.fail(f"{doc}: `{line}` does not parse with {target}'s arguments (exit {error.code})")


def test_a_renamed_flag_is_caught(monkeypatch):
    """The check above can fail: a flag the parser does not know ends in SystemExit."""
    with pytest.raises(SystemExit):
        _parse_only("degla.py", ["--no-such-flag", "1"], monkeypatch)
    with pytest.raises(SystemExit):
        _parse_only("lab.compare", ["--no-such-flag"], monkeypatch)


# ---- the layout: imports run one way ---------------------------------------------------------------------------
LAYERS = {"data": 0, "common": 1, "eval": 2, "degla": 3, "cehn": 3, "c2lip": 3, "goal": 3}   # lab/: above them all


def _imports_of(path):
    """(module imported, at the top of the file?) for each import of this repository's modules in `path`."""
    tree = ast.parse(_read(path))
    top = set(id(node) for node in tree.body)
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            root = name.split(".")[0]
            if root in LAYERS or root == "lab":
                found.append((root, id(node) in top))
    return found


def test_imports_run_one_way():
    """data <- common <- eval <- the four methods <- lab/: a module imports only layers below it (a method never
    another method), always at the top of the file, never inside a function to get around a circle."""
    problems = []
    for path in [f"{m}.py" for m in LAYERS] + sorted(f for f in TRACKED if f.startswith("lab/") and f.endswith(".py")):
        here = LAYERS.get(path[:-3], 4)
        for imported, at_top in _imports_of(path):
            there = 4 if imported == "lab" else LAYERS[imported]
            if not at_top:
                problems.append(f"{path}: imports {imported} inside a function or block")
            if there >= here and not (here == 4 and imported == "lab"):
                problems.append(f"{path}: imports {imported}, which is not below it")
    assert not problems, "\n".join(problems)
