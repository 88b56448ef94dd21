"""Examples for calibration and analysis: a LLaVA-style jsonl file with an image folder, or the testbed.

jsonl: one object per line, `{"image": "relative/path.jpg", "text": "question"}` (LLaVA's evaluation
question files; "question" or "prompt" are accepted for "text", and an optional "answer"). The fields in
`EXTRA_FIELDS` ("answers", "choices", ...) are kept in `Example.meta` for evaluation.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .images import ImageError, read_image
from .models import named_data

#: the most questions the testbed generator makes per request (each is drawn on the fly; more would run for hours)
TESTBED_MAX = 100_000


def check_testbed_samples(samples: int | None, option: str = "--samples") -> None:
    """Refuse more testbed questions than `TESTBED_MAX`."""
    if samples is not None and samples > TESTBED_MAX:
        raise ValueError(f"{option} {samples}: the testbed generates at most {TESTBED_MAX:,} questions per split")


def testbed_split(split: str, samples: int) -> list:
    """The first `samples` questions of the testbed's `split` (`vtprune.testbed.data.make_split`, found by name in
    `vtprune.apps.models`: the applications never import the testbed)."""
    return list(named_data("testbed").make_split(split, samples))


#: fields of a jsonl row kept in `Example.meta` (what `vtprune eval` scores with)
EXTRA_FIELDS = ("question_id", "answers", "choices", "options", "category")


@dataclass
class Example:
    """One image and one question (the text after the image in the prompt); `answer` when known."""

    image: Image.Image
    question: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What loading skipped: unreadable image files (path, reason)."""

    unreadable: list[tuple[str, str]] = field(default_factory=list)


def load_jsonl(
    path: str | Path, images: str | Path | None, samples: int | None = None
) -> tuple[list[Example], LoadReport]:
    """Read up to `samples` examples (all when None) from `path`; image paths are relative to `images`
    (or to the jsonl's folder). Images are read as `images.read_image` does (EXIF orientation applied, 8-bit RGB).
    Unreadable images are skipped and reported; missing ones, images over PIL's decompression-bomb limit and
    empty questions are errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist: pass a jsonl file (or --data testbed)")
    folder = Path(images) if images is not None else path.parent
    if not folder.is_dir():
        raise ValueError(
            f"image folder {folder} does not exist: pass the folder the jsonl's image paths are relative to"
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f'{path}:{number} holds a JSON {type(row).__name__}; each line must be an object like {{"image": "a.jpg", "text": "question"}}'
            )
        text = next((row[k] for k in ("text", "question", "prompt") if isinstance(row.get(k), str)), None)
        if not isinstance(row.get("image"), str) or text is None:
            raise ValueError(
                f'{path}:{number} needs "image" (a path) and "text" (the question), got keys {sorted(row)}'
            )
        question = text.replace("<image>", "").strip()
        if not question:
            raise ValueError(
                f'{path}:{number}: the question ("text") is empty: every line needs a question about its image'
            )
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{path}:{number}: the question holds text that is not valid Unicode ({error.reason} at "
                f"character {error.start}): fix the line"
            ) from None
        rows.append((number, row, question))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    if samples is not None and samples > len(rows):
        raise ValueError(f"asked for {samples} samples but {path} holds only {len(rows)}: lower --samples")
    missing = [row["image"] for _, row, _ in rows if not (folder / row["image"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of {len(rows)} images are missing from {folder} ({shown}): check --images")
    examples: list[Example] = []
    report = LoadReport()
    for number, row, text in rows:
        if samples is not None and len(examples) == samples:
            break
        file = folder / row["image"]
        try:
            image = read_image(file)  # upright (EXIF) 8-bit RGB; a decompression bomb is an ImageError
        except ImageError as error:
            raise ValueError(f"{path}:{number}: image {error}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            report.unreadable.append((str(file), f"{type(error).__name__}: {error}"))
            continue
        meta = {"line": number, "image_path": str(file), **{k: row[k] for k in EXTRA_FIELDS if k in row}}
        examples.append(Example(image=image, question=text, answer=row.get("answer"), meta=meta))
    if report.unreadable:
        warnings.warn(
            f"skipped {len(report.unreadable)} unreadable image(s), e.g. {report.unreadable[0][0]}", stacklevel=2
        )
    if not examples:
        raise ValueError(f"none of the images in {path} could be read ({len(report.unreadable)} unreadable)")
    if samples is not None and len(examples) < samples:
        raise ValueError(
            f"asked for {samples} samples but only {len(examples)} readable images remain in {path} "
            f"({len(report.unreadable)} unreadable): lower --samples"
        )
    return examples, report


def load_examples(
    data: str, images: str | Path | None, samples: int, split: str = "val"
) -> tuple[list[Example], LoadReport]:
    """`data` = "testbed" (the synthetic generator's `split`, first `samples`) or a jsonl path."""
    if samples is not None and samples <= 0:
        raise ValueError(f"--samples must be positive, got {samples}")
    if data == "testbed":
        check_testbed_samples(samples)
        return list(testbed_split(split, samples)), LoadReport()
    return load_jsonl(data, images, samples)


__all__ = ["EXTRA_FIELDS", "Example", "LoadReport", "load_jsonl", "load_examples", "testbed_split"]
