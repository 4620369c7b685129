"""The project's shape, checked from its files: functions a reader holds in one sitting, and
the README, the Makefile and the docs giving one figure for one thing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONGEST_FUNCTION = 60  # lines, decorators left out, docstring and comments in
EXEMPT = {"tests", "benchmarks"}  # a test or a measurement reads top to bottom
CODE = ("noisy_student", "flows", "tasks", "cli", "docs")


def _functions_over(limit: int) -> list[str]:
    found = []
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        where = path.relative_to(ROOT)
                        found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_outside_tests_and_benchmarks_is_over_60_lines():
    assert not set(CODE) & EXEMPT
    assert _functions_over(LONGEST_FUNCTION) == []


def test_the_function_length_check_finds_a_long_function():
    assert _functions_over(1)  # the walk reaches the code: not a check that cannot fail


# "about 10 min", "9-13 min", "about 5 hours", "a one-minute look", "under 3 min"
DURATION = re.compile(r"\b(\d+(?:-\d+)?|an?|one)[ -](min|minutes?|hours?)\b")
MENTION = re.compile(r"make ([a-z][a-z-]*)\b(?!-)")
TEXTS = ("README.md", "docs", "benchmarks/README.md")


def _duration(match: re.Match) -> str:
    amount, unit = match.groups()
    return f"{'1' if amount in ('a', 'an', 'one') else amount} {unit[0]}"


def _makefile_durations() -> dict[str, str]:
    """Each target's duration in its `## help` line."""
    found = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        target = re.match(r"^([a-z][a-z-]*):.*##(.*)", line)
        duration = target and DURATION.search(target.group(2))
        if duration:
            found[target.group(1)] = _duration(duration)
    return found


def _documented_durations() -> list[tuple[str, str, str]]:
    """(file:line, target, duration) for each `make TARGET` followed on its line by a
    duration before the next `make`."""
    paths = [
        p for t in TEXTS for p in ([ROOT / t] if t.endswith(".md") else (ROOT / t).rglob("*.md"))
    ]
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            mentions = list(MENTION.finditer(line))
            for i, mention in enumerate(mentions):
                end = mentions[i + 1].start() if i + 1 < len(mentions) else len(line)
                duration = DURATION.search(line, mention.end(), end)
                if duration:
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append((where, mention.group(1), _duration(duration)))
    return found


def test_the_readme_the_makefile_and_the_docs_give_one_duration_per_command():
    makefile = _makefile_durations()
    documented = _documented_durations()
    assert {"demo", "smoke", "bench"} <= set(makefile)  # the check reads what it compares
    assert any(target == "demo" for _, target, _ in documented)
    first: dict[str, tuple[str, str]] = {t: ("Makefile", d) for t, d in makefile.items()}
    disagree = []
    for where, target, duration in documented:
        seen = first.setdefault(target, (where, duration))
        if seen[1] != duration:
            disagree.append(f"make {target}: {duration} in {where}, {seen[1]} in {seen[0]}")
    assert disagree == []


# `$(UV) run python -m benchmarks.accuracy --quick`, `$(if $(QUICK),--quick)` expanded both ways
BENCHMARK = re.compile(r"python -m (benchmarks\.\w+)(.*)$")
CONDITIONAL = re.compile(r"\$\(if \$\((\w+)\),((?:[^()$]|\$\(\w+\))*)\)")


class _Parsed(Exception):
    """Raised once a benchmark's parser has accepted its arguments: nothing runs."""


def _makefile_benchmark_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) for each benchmark command of the Makefile, each conditional
    argument once left out and once given (a variable standing for `VALUE`)."""
    found = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        command = BENCHMARK.search(line)
        if not command:
            continue
        module, rest = command.groups()
        for given in (False, True):
            expanded = CONDITIONAL.sub(lambda m, g=given: m.group(2) if g else "", rest)
            expanded = re.sub(r"\$\((\w+)\)", "VALUE", expanded)
            found.append((module, expanded.split()))
    return found


def test_the_makefile_runs_each_benchmark_with_arguments_it_accepts(monkeypatch):
    """`make bench-accuracy` once passed a flag the benchmark no longer had: the target
    failed at once, and no test ran it (a benchmark runs for hours)."""
    import argparse
    import importlib
    import sys

    parse = argparse.ArgumentParser.parse_args

    def parsed_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)  # exits 2 on an argument the benchmark does not take
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed_then_stop)
    commands = _makefile_benchmark_commands()
    assert {"benchmarks.accuracy", "benchmarks.labelling", "benchmarks.perf"} <= {
        m for m, _ in commands
    }
    for module, arguments in commands:
        monkeypatch.setattr(sys, "argv", [module, *arguments])
        try:
            importlib.import_module(module).main()
        except _Parsed:
            continue
        except SystemExit as error:
            raise AssertionError(f"make's {module} {' '.join(arguments)}: exit {error}") from None
        raise AssertionError(f"{module}.main() did not parse its arguments")


def test_the_makefile_and_the_image_install_one_uv():
    """`make setup` installed whichever uv was newest where none was installed: a new
    release could read uv.lock otherwise than the image's pinned one, or refuse it."""
    make = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    image = re.search(r"^ARG UV_VERSION=(\S+)$", (ROOT / "docker/Dockerfile").read_text(), re.M)
    assert make and image, "UV_VERSION missing from the Makefile or docker/Dockerfile"
    assert make.group(1) == image.group(1)
    assert '"uv==$(UV_VERSION)"' in (ROOT / "Makefile").read_text()
