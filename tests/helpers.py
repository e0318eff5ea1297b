"""Helpers shared by tests: running the CLI as a user would."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, check: bool = True, **kwargs):
    """`python cli.py ARGS` in a subprocess, as a user runs it; returns the CompletedProcess."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=kwargs.pop("cwd", ROOT),
                            capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
