"""How long the command line takes: `vtprune --help`, `--version` and `vtprune run`, cold and warm.

    python bench/cli_timing.py [--repeats 5] [--model testbed] [--image PATH --prompt TEXT] [--threads 1,2] [--markdown]

Each command runs `--repeats` + 1 times in a fresh process. "cold" is the first process of the series (nothing
of vtprune imported yet in this series; the OS file cache is left as it is, this script does not drop it),
"warm" the median of the others. For `vtprune run --json` it also reports what happens inside one process:
the first (cold) forward of the model, and the medians of the timed unpruned and pruned prefills after it.
The machine's load is printed with the table: on a shared CPU the numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vtprune_command() -> list[str]:
    """The `vtprune` console script of this interpreter's environment (what a user runs)."""
    script = Path(sys.executable).parent / "vtprune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vtprune.cli"]


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, done.stdout


def series(args: list[str], repeats: int) -> tuple[float, float, list[str]]:
    """(cold seconds, warm median seconds, stdout of every run)."""
    times, outputs = [], []
    for _ in range(repeats + 1):
        seconds, out = timed(args)
        times.append(seconds)
        outputs.append(out)
    return times[0], statistics.median(times[1:]), outputs


def machine() -> str:
    try:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"{platform.system()}; load average (1, 5, 15 min) {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm runs after the cold one")
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--image", type=Path, help="default: a testbed test image")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--method", default="fastv")
    parser.add_argument("--threads", default="", help="comma-separated torch thread counts for `run` (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    vtprune = vtprune_command()
    with tempfile.TemporaryDirectory() as folder:
        image, prompt = args.image, args.prompt
        if image is None:
            from vtprune.testbed.data import make_sample

            sample = make_sample("test", 0, 3)
            image = Path(folder) / "image.png"
            sample.image.save(image)
            prompt = prompt or sample.question
        prompt = prompt or "What is in the image?"
        rows = []
        for label, extra in (("vtprune --help", ["--help"]), ("vtprune --version", ["--version"])):
            cold, warm, _ = series(vtprune + extra, args.repeats)
            rows.append((label, f"{cold:.2f}", f"{warm:.2f}", ""))
        for threads in [int(t) for t in args.threads.split(",") if t.strip()] or [None]:
            run = vtprune + ["run", "--model", args.model, "--image", str(image), "--prompt", prompt, "--method",
                             args.method, "--json", "--max-new-tokens", "8"]
            run += [] if threads is None else ["--threads", str(threads)]
            cold, warm, outputs = series(run, args.repeats)
            results = [json.loads(out) for out in outputs]
            inside = (f"{results[0]['threads']} thread(s): first forward "
                      f"{statistics.median(r['warmup_ms']['unpruned'] for r in results):.0f} ms; then prefill unpruned "
                      f"{statistics.median(r['unpruned']['prefill_ms'] for r in results):.1f} ms, pruned "
                      f"{statistics.median(r['pruned']['prefill_ms'] for r in results):.1f} ms, speed-up "
                      f"{statistics.median(r['speedup'] for r in results):.2f}x (medians over the runs)")
            label = f"vtprune run --model {args.model} --method {args.method}" + ("" if threads is None else f" --threads {threads}")
            rows.append((label, f"{cold:.2f}", f"{warm:.2f}", inside))
    title = f"vtprune command line, wall time of a process in seconds; {machine()}"
    if args.markdown:
        print(title + "\n")
        print("| command | cold s | warm s | inside the process |\n|---|---:|---:|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("command", "cold s", "warm s", "inside the process"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
