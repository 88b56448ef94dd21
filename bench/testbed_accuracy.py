"""Testbed accuracy benchmark: the same as `vtprune testbed eval`, kept here beside the other benchmarks.

    python bench/testbed_accuracy.py [--n 1000] [--out results.json] [--markdown table.md]

Accuracy on the synthetic test split for keep in {all, 50%, 25%, 12.5%, 6.25%} of the 144 visual tokens x
{FastV, FastV+positional, FastV+padding, FastV+both, FastV+auto, FastV+auto+padding, Random}, with 95% Wilson
intervals and paired differences to FastV, plus the bias measured on the model (see
src/vtprune/testbed/benchmark.py). Takes about 15-20 minutes on 2 CPU cores for n=1000.
"""

import sys

from vtprune.testbed.cli import testbed_app

if __name__ == "__main__":
    sys.exit(testbed_app(["eval", *sys.argv[1:]]))
