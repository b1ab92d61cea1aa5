"""The documentation against the code: every command in README.md and docs/*.md that runs a project
script names a script that exists, flags its argument parser accepts and repository files that exist;
the links between these pages resolve; the table of models (README.md) agrees with model.py and that of
added keys (docs/configuration.md) with config.py.

Nothing is trained here: a script's flags are read from its `--help`. tests/test_demo.py runs the
demo's training command itself (`test_training_stops_at_max_iterations_and_says_where_its_outputs_are`).
"""

import contextlib
import dataclasses
import functools
import glob
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from config import SECTIONS
from conftest import ROOT
from model import build_model

DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
FENCED_BLOCK = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
SHELL_BLOCKS = ("", "sh", "bash", "shell", "console")  # the info strings of fenced blocks that hold commands
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
SEPARATORS = {"&&", "||", "|", ";"}
# Paths a command names that belong to the repository (outputs such as experiments/ are made by the commands).
REPOSITORY_FOLDERS = ("configs", "data", "docs", "pretrained", "scripts", "tests")


def read(document: str) -> str:
    with open(os.path.join(ROOT, document)) as f:
        return f.read()


def commands(document: str) -> list[list[str]]:
    """Every shell command of `document`: the lines of its fenced code blocks (`\\`-continued lines joined,
    comments dropped) and its inline code spans that start with `python`, `bash`, `torchrun` or `pip`, or
    with a script name (`bench.py --eager`), each split at `&&`, `||`, `|` and `;` into token lists."""
    text = read(document)
    lines = []
    for language, block in FENCED_BLOCK.findall(text):
        if language.strip() in SHELL_BLOCKS:
            lines += block.replace("\\\n", " ").splitlines()
    for span in INLINE_CODE.findall(FENCED_BLOCK.sub("", text)):
        span = " ".join(span.split())
        if re.match(r"(python3?|bash|torchrun|pip) ", span):
            lines.append(span)
        elif re.match(r"[\w/-]+\.py -", span):
            lines.append("python " + span)
    found = []
    for line in lines:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (Python in a code block)
            continue
        command = []
        for token in tokens + [";"]:
            if token in SEPARATORS:
                if command:
                    found.append(command)
                command = []
            else:
                command.append(token)
    return found


def project_script(command: list[str]) -> tuple[str, list[str]] | None:
    """`(script, its arguments)` when `command` runs a project script ("pytest" for `python -m pytest`), else None."""
    program = os.path.basename(command[0])
    if program in ("python", "python3") and len(command) > 1:
        if command[1] == "-m":
            return ("pytest", command[3:]) if command[2:3] == ["pytest"] else None
        if command[1].endswith(".py"):
            return command[1], command[2:]
        return None  # python -c '...': inline Python, no project script
    if program == "bash" and len(command) > 1:
        return command[1], command[2:]
    if program == "torchrun":
        script = next((index for index, token in enumerate(command) if token.endswith(".py")), None)
        return None if script is None else (command[script], command[script + 1 :])
    return None


def option_strings(help_text: str) -> set[str]:
    """The flags an argparse (or pytest) help text lists: the invocation part of its option lines."""
    options = set()
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            invocation = re.split(r"\s{2,}", stripped)[0]
            options.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", invocation))
    return options


@functools.cache
def accepted_flags(script: str) -> frozenset[str]:
    """The flags `script` accepts, from its `--help` (Python scripts run in this process, so that the
    heavy imports are paid once); for a shell script, every flag its text mentions."""
    if script == "pytest":
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return frozenset(option_strings(result.stdout))
    path = os.path.join(ROOT, script)
    if script.endswith(".sh"):
        return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", read(script)))
    output, argv = io.StringIO(), sys.argv
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None), f"{script} --help failed"
    return frozenset(option_strings(output.getvalue()))


def repository_paths(tokens: list[str]) -> list[str]:
    """The tokens that name a path in the repository's own folders (configs/demo.json, tests, ...)."""
    return [token for token in tokens if token.rstrip("/").split("/")[0] in REPOSITORY_FOLDERS]


def command_problems(document: str, command: list[str], markers: set[str]) -> list[str]:
    """What is wrong with one command of `document`: a missing script, an unknown flag, a missing file."""
    where = f"{document}: `{shlex.join(command)}`"
    found = project_script(command)
    if found is not None and found[0] != "pytest" and not os.path.isfile(os.path.join(ROOT, found[0])):
        return [f"{where}: no script {found[0]}"]
    problems = [
        f"{where}: no file or folder {path} in the repository"
        for path in repository_paths(command)
        if not os.path.exists(os.path.join(ROOT, path))
    ]
    if command[0] == "pip" and "-r" in command[1:-1]:
        requirements = command[command.index("-r") + 1]
        if not os.path.isfile(os.path.join(ROOT, requirements)):
            problems.append(f"{where}: no file {requirements}")
    if found is None:
        return problems
    script, arguments = found
    flags = accepted_flags(script)
    for index, token in enumerate(arguments):
        if token == "--" or not re.match(r"--?[A-Za-z]", token):
            continue
        flag = token.split("=", 1)[0]
        if flag not in flags:
            problems.append(f"{where}: {script} has no option {flag}")
        if script == "pytest" and flag == "-m" and index + 1 < len(arguments):
            unknown = set(re.findall(r"\w+", arguments[index + 1])) - {"not", "and", "or"} - markers
            if unknown:
                problems.append(f"{where}: no pytest marker {', '.join(sorted(unknown))} is registered")
    return problems


@pytest.fixture(scope="module")
def registered_markers(pytestconfig) -> set[str]:
    return {line.split(":")[0].split("(")[0].strip() for line in pytestconfig.getini("markers")}


def test_every_documented_command_names_a_real_script_its_flags_and_files(registered_markers):
    checked, problems = 0, []
    for document in DOCUMENTS:
        for command in commands(document):
            problems += command_problems(document, command, registered_markers)
            checked += project_script(command) is not None
    assert not problems, "\n".join(problems)
    assert checked >= 30  # the extraction found the commands (README.md and docs/ hold more than 30)


def test_the_check_catches_a_wrong_flag_script_or_file(registered_markers):
    def problems(line: str) -> list[str]:
        return command_problems("example.md", shlex.split(line), registered_markers)

    demo = "python train.py -s -t 0.8 -c configs/demo.json --checkpoint_path pretrained/nanoflow-demo.pt"
    assert problems(demo) == []
    assert "has no option --checkpoint" in problems("python train.py -s -c configs/demo.json --checkpoint x")[0]
    assert "no script scripts/prepare.py" in problems("python scripts/prepare.py --archive x")[0]
    assert "no file or folder configs/demo2.json" in problems("python train.py -c configs/demo2.json")[0]
    assert "no pytest marker slower" in problems('python -m pytest -q -m "not slower" tests')[0]
    assert "has no option --nproc" in problems("torchrun --nproc_per_node=2 bench.py -c configs/demo.json --nproc 2")[0]


def test_the_readme_gives_the_ci_test_command_and_links_every_page_of_docs():
    readme = read("README.md")
    # CI (.ci/run) runs exactly this; a newcomer finds install and tests as one command.
    assert "pip install -r requirements.txt && python -m pytest -q tests" in readme
    linked = {os.path.normpath(target.split("#")[0]) for target in LINK.findall(readme)}
    assert [page for page in DOCUMENTS[1:] if page not in linked] == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_resolves():
    problems = []
    for document in DOCUMENTS + ["image_density_experiments/README.md"]:
        for target in LINK.findall(read(document)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
            if not os.path.exists(os.path.join(ROOT, resolved)):
                problems.append(f"{document}: link to {target}: no {resolved}")
            elif anchor and resolved.endswith(".md"):
                headings = HEADING.findall(FENCED_BLOCK.sub("", read(resolved)))
                if anchor not in {slug(heading) for heading in headings}:
                    problems.append(f"{document}: link to {target}: no heading #{anchor} in {resolved}")
    assert not problems, "\n".join(problems)


def table_rows(text: str, first_column: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with `first_column`, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


# This project's configs, beside the original's six
PROJECT_CONFIGS = ("demo", "demo-long", "nanoflow-16k", "nanoflow-24k-hop300", "nanoflow-44k-hop512")


def test_the_table_of_added_keys_is_config_py():
    """Every key config.py accepts beyond those of the original's six configs is in the table, with its
    default; nothing else is."""
    original = {section: set() for section in SECTIONS}
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name[: -len(".json")] not in PROJECT_CONFIGS:
            with open(os.path.join(ROOT, "configs", name)) as f:
                for section, values in json.load(f).items():
                    original[section] |= set(values)
    added = {
        (section, field.name): json.dumps(field.default)
        for section, (_, cls) in SECTIONS.items()
        for field in dataclasses.fields(cls)
        if field.name not in original[section]
    }
    documented = {
        (section, key): default for section, key, default, _ in table_rows(read("docs/configuration.md"), "section")
    }
    assert documented == added


def test_the_readme_table_of_models_is_model_py():
    rows = table_rows(read("README.md"), "config")
    assert {row[0] for row in rows} == {name[: -len(".json")] for name in os.listdir(os.path.join(ROOT, "configs"))}
    for name, coupling_type, trained, inference, _ in rows:
        with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
            section = json.load(f)["waveflow_config"]
        model = build_model(section)
        assert section["coupling_type"] == coupling_type
        assert (model.parameter_count(), model.parameter_count(inference=True)) == (
            int(trained.replace(",", "")),
            int(inference.replace(",", "")),
        ), name
