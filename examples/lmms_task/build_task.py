"""Build a local lmms-eval task from the questions `vtprune eval` reads, so that both score the same questions.

    python examples/lmms_task/build_task.py --data testbed --samples 40 --out my_task
    python examples/lmms_task/build_task.py --data questions.jsonl --images images/ --out my_task --task my_qa
    python -m lmms_eval --include_path my_task --tasks my_qa --model vtprune_llava_hf \\
        --model_args pretrained=...,method=fastv,budget=64,debias=both --output_path out --log_samples

`--data` is what `vtprune eval --data` takes: a LLaVA-style jsonl (one {"image", "text", "answer"} object a
line; "answers" and "choices" optional) or `testbed` (the shipped testbed's questions, `--split`, first
`--samples`). OUT receives TASK.parquet (images embedded as bytes, so the folder can be moved), TASK.yaml
(the task, `dataset_path: parquet`) and utils.py (prompt and scoring, copied from this folder).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(questions) -> dict[str, list]:
    """Columns of the parquet file: the image as PNG bytes, the prompt text, accepted answers, options."""
    columns: dict[str, list] = {"id": [], "image": [], "question": [], "answers": [], "choices": []}
    for index, question in enumerate(questions):
        buffer = io.BytesIO()
        question.image.convert("RGB").save(buffer, format="PNG")
        columns["id"].append(index)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["question"].append(question.question)
        columns["answers"].append(list(question.answers))
        columns["choices"].append(list(question.choices or ()))
    return columns


def build(data: str, out: Path, *, task: str = "vtprune_qa", images: str | None = None, samples: int | None = None,
          split: str = "test", max_new_tokens: int = 16) -> Path:
    """Write OUT/TASK.parquet, OUT/TASK.yaml and OUT/utils.py; returns the YAML's path."""
    from datasets import Dataset, Features, Image, Sequence, Value

    from vtprune.apps.evaluation import load_questions

    questions = load_questions(data, images, samples, split=split)
    features = Features({"id": Value("int64"), "image": Image(), "question": Value("string"),
                         "answers": Sequence(Value("string")), "choices": Sequence(Value("string"))})
    out.mkdir(parents=True, exist_ok=True)
    parquet = out / f"{task}.parquet"
    partial = out / f".{task}.parquet.partial"
    Dataset.from_dict(rows(questions), features=features).to_parquet(str(partial))
    os.replace(partial, parquet)
    template = (HERE / "task.yaml.template").read_text()
    text = (template.replace("@TASK@", task).replace("@DATA_FILE@", str(parquet.resolve()))
            .replace("@MAX_NEW_TOKENS@", str(max_new_tokens)))
    yaml_path = out / f"{task}.yaml"
    yaml_path.write_text(text)
    shutil.copyfile(HERE / "utils.py", out / "utils.py")
    return yaml_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a jsonl question file, or 'testbed'")
    parser.add_argument("--images", help="folder the jsonl's image paths are relative to (default: the jsonl's)")
    parser.add_argument("--samples", type=int, help="the first N questions (testbed: default 100)")
    parser.add_argument("--split", default="test", help="testbed split")
    parser.add_argument("--task", default="vtprune_qa", help="the task's name (and file names)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (vtprune eval's default: 16)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to pass as lmms-eval's --include_path")
    args = parser.parse_args()
    path = build(args.data, args.out, task=args.task, images=args.images, samples=args.samples, split=args.split,
                 max_new_tokens=args.max_new_tokens)
    print(f"wrote {path}; run: python -m lmms_eval --include_path {args.out} --tasks {args.task} --model ...")


if __name__ == "__main__":
    main()
