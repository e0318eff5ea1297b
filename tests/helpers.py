"""Helpers shared by tests: running the CLI as a user would."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, check: bool = True, **kwargs):
    """`python cli.py ARGS` in a subprocess, as a user runs it; returns the CompletedProcess."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        cwd=kwargs.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# A decoder small enough that a test trains it in seconds.
TINY = ["--embed-size", "16", "--hidden-size", "16", "--batch-size", "8"]


def one_line_error(result) -> str:
    """The single error line of a failed click command (and proof that it is one line, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]
