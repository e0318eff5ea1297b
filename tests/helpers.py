"""Helpers shared by tests; the CLI runs through bench/cli_runner.py, as the benches run it."""

from bench.cli_runner import ROOT, run_cli

__all__ = ["ROOT", "TINY", "TINY_TRANSFORMER", "one_line_error", "run_cli"]

# A decoder small enough that a test trains it in seconds.
TINY = ["--embed-size", "16", "--hidden-size", "16", "--batch-size", "8"]
# The same for the transformer, whose embedding is its width (it refuses --embed-size).
TINY_TRANSFORMER = ["--decoder", "transformer", "--hidden-size", "16", "--heads", "2", "--batch-size", "8"]


def one_line_error(result) -> str:
    """The single error line of a failed click command (and proof that it is one line, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]
