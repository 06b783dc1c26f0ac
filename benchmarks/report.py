"""Write a section of BENCHMARKS.md, replacing the same section from an earlier run."""

from __future__ import annotations

import platform
import re
import subprocess
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`; rerun it to refresh its section.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Two hosts may give the same model name; the vector instructions torch uses tell them apart.
    cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def speed_probe() -> float:
    """Seconds for a fixed piece of arithmetic (2,000 products of 256 x 256 matrices on one
    thread): how fast this machine runs at the moment, for comparing runs on a shared host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(2000):
        x @ x
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return seconds


def commit() -> str:
    """The commit measured, flagged when tracked files (other than this report) differ from it."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        changed = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} with uncommitted changes" if changed.strip() else sha


def write_section(name: str, body: str) -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(
        rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    BENCHMARKS.write_text(text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
