"""Testbed accuracy benchmark: the same as `vtprune testbed eval`, kept here beside the other benchmarks.

    python bench/testbed_accuracy.py [--n 1000] [--out results.json] [--markdown table.md]

Accuracy on the synthetic test split for budgets {all, 50%, 25%, 12.5%, 6.25%} x every registered method with
and without debiasing, FastV's ablations, each method with the other position numbering, and Random
(`vtprune testbed eval --list`), with 95% Wilson intervals and paired differences to each row's baseline, plus
the bias each method shows (see src/vtprune/testbed/benchmark.py). About 20-25 minutes on 2 CPU cores for
n=1000; `--methods pdrop` or `--settings A,B` runs a subset.
"""

import sys

from vtprune.testbed.cli import testbed_app

if __name__ == "__main__":
    sys.exit(testbed_app(["eval", *sys.argv[1:]]))
