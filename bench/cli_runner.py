"""`python cli.py ARGS` in a subprocess, as a user runs it: the one way tests and benches run the CLI.

    from bench.cli_runner import run_cli
    run = run_cli("train", work, "--epochs", 2)         # tests: output captured, exit code checked
    run.returncode, run.stdout, run.stderr
    run = run_cli("train", work, check=False)           # a failure to look at rather than to raise
    run = run_cli("featurize", work, log=OUT / "log")   # benches: the command printed, output appended
    run.seconds, run.peak_mb                            # every run is timed and its memory read

The peak resident memory is the kernel's account of that one process (os.wait4), so a bench needs
no second tool to measure it. A failure raises CliFailed with the end of the output: a bench ends
with that message, a test fails with it.

It lives in bench/ and imports no package of légende (running the real command is the point), so
that the benches and the tests, which both sit above every package, can use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL_CHARS = 3000  # of the output, in the message of a failed command


class CliFailed(SystemExit):
    """A command that exited non-zero under check=True: ends a bench with the message, fails a test."""


@dataclass(frozen=True)
class CliRun:
    args: list[str]
    returncode: int
    stdout: str  # empty when the output went to a log
    stderr: str
    seconds: float
    peak_mb: int  # the process's peak resident memory


def run_cli(*args, check: bool = True, log: Path | None = None, env: dict[str, str] | None = None) -> CliRun:
    """Run `python cli.py ARGS` from the repository root with this Python and wait for it.

    Without `log`, stdout and stderr are captured (text). With `log`, the command line is printed,
    then it and the output are appended to that file. `env` replaces the environment. With `check`,
    a non-zero exit raises CliFailed naming the command, its exit code and the end of its output."""
    args = [str(a) for a in args]
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    with ExitStack() as files:
        if log is None:
            out, err = files.enter_context(tempfile.TemporaryFile()), files.enter_context(tempfile.TemporaryFile())
        else:
            print("$ python cli.py " + " ".join(args), flush=True)
            out = err = files.enter_context(open(log, "ab"))
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also gives the child's resource usage
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = ("", "") if log is not None else (_text(out), _text(err))
    run = CliRun(args, proc.returncode, stdout, stderr, seconds, round(usage.ru_maxrss / 1024))  # KiB on Linux
    if check and run.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-TAIL_CHARS:] if log is not None else stderr[-TAIL_CHARS:]
        raise CliFailed(f"`cli.py {' '.join(args)}` failed (exit {run.returncode}):\n{tail}")
    return run


def _text(file) -> str:
    """A captured stream as text, its newlines read as subprocess's text mode reads them."""
    file.seek(0)
    return file.read().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
