"""Issue 2: the README opens with exactly two commands for a fresh machine (the main job, then the test suite),
and `.ci/run` executes the second one, so CI tests what the README promises."""

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    """The indented code lines of the README before its first section heading, in order."""
    top = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    return [line.strip() for line in top.splitlines() if line.startswith("    ") and line.strip()]


def ci_commands() -> list[str]:
    """The lines of .ci/run that are not comments, the shebang or shell set-up."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines
            if line and not line.startswith("#") and not re.match(r"(set|cd)\s", line)]


def test_readme_opens_with_the_main_job_then_the_test_suite():
    first, second = readme_commands()[:2]
    assert first.endswith("&& bash examples/toy/run.sh")
    assert (ROOT / "examples" / "toy" / "run.sh").is_file()
    assert second.endswith("&& .venv/bin/python -m pytest -q")
    # both set up the same fresh environment; only what they then run differs
    assert first.removesuffix("bash examples/toy/run.sh") == second.removesuffix(".venv/bin/python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    assert ci_commands() == [readme_commands()[1]]
    # and from the repository root, so the README's relative paths resolve as they do for a reader
    assert 'cd "$(dirname "$0")/.."' in (ROOT / ".ci" / "run").read_text()
