"""Video-LLaVA's zero-shot video QA sets (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA) as local lmms-eval tasks,
judged by a GPT model as Video-LLaVA's evaluation does (lmms-eval 0.7.3 ships none of the first three, and its
`activitynetqa` scores 0 silently when the judge is unreachable).

    python -m vtprune.lmms.video_qa --root /data/GPT_Zero_Shot_QA --out tasks
    OPENAI_API_KEY=... python -m lmms_eval --include_path tasks --tasks videollava_msvd_qa --model vtprune_video_llava ...

ROOT is Video-LLaVA's evaluation layout (`GPT_Zero_Shot_QA`, from the Video-LLaVA repository's evaluation
instructions): per set a folder with test_q.json ([{"video_name", "question_id", "question"}]), test_a.json
([{"answer", ...}], in the same order) and the videos (`SETS`: MSVD_Zero_Shot_QA/videos, MSRVTT_Zero_Shot_QA/
videos/all, TGIF_Zero_Shot_QA/mp4, Activitynet_Zero_Shot_QA/all_test), a video being VIDEO_NAME or v_VIDEO_NAME
with .mp4/.avi/.mov/.mkv/.webm. `build` writes, per set, TASK.jsonl (question, answer, the video's absolute path),
TASK.yaml and a utils.py that calls the functions below. Questions whose video is missing are left out and
counted, as Video-LLaVA's inference script skips them.

The judge (`judge`): one chat-completions request per answer at OPENAI_API_URL (default OpenAI's) with
OPENAI_API_KEY, model VTPRUNE_JUDGE_MODEL (default gpt-3.5-turbo, Video-LLaVA's judge), temperature 0, asking,
as Video-ChatGPT's protocol does (in vtprune's words), whether the prediction matches the answer (yes/no) and a
0-5 score. Metrics: gpt_eval_accuracy (yes / (yes + no) x 100, the "accuracy" Video-LLaVA reports) and
gpt_eval_score (the mean score). A missing key is a one-line error before the model answers anything; a judge
that cannot be reached or whose reply cannot be read after retries is an error, never a 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoQASet:
    task: str  # the lmms-eval task name
    label: str
    folder: str  # under ROOT
    videos: str  # the videos' folder under ROOT/folder


SETS: dict[str, VideoQASet] = {
    s.task: s
    for s in (
        VideoQASet("videollava_msvd_qa", "MSVD-QA", "MSVD_Zero_Shot_QA", "videos"),
        VideoQASet("videollava_msrvtt_qa", "MSRVTT-QA", "MSRVTT_Zero_Shot_QA", "videos/all"),
        VideoQASet("videollava_tgif_qa", "TGIF-QA", "TGIF_Zero_Shot_QA", "mp4"),
        VideoQASet("videollava_activitynet_qa", "ActivityNet-QA", "Activitynet_Zero_Shot_QA", "all_test"),
    )
}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
JUDGE_MODEL = "gpt-3.5-turbo"  # Video-LLaVA's eval_video_qa.py
JUDGE_URL = "https://api.openai.com/v1/chat/completions"

TASK_YAML = """\
# Video-LLaVA's {label} (zero-shot video QA), built by `python -m vtprune.lmms.video_qa`; judged by a GPT model
# (OPENAI_API_KEY; VTPRUNE_JUDGE_MODEL, default {judge})
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: gpt_eval_accuracy
    aggregation: !function utils.aggregate_accuracy
    higher_is_better: true
  - metric: gpt_eval_score
    aggregation: !function utils.aggregate_score
    higher_is_better: true
"""

UTILS = '''"""lmms-eval functions of the video QA tasks built by `python -m vtprune.lmms.video_qa` (keep beside the YAMLs)."""

from vtprune.lmms.video_qa import (aggregate_accuracy, aggregate_score, doc_to_target, doc_to_text,  # noqa: F401
                                   doc_to_visual, process_results)
'''


# --- building the tasks -------------------------------------------------------------------------------------
def find_video(folder: Path, name: str) -> Path | None:
    """The video file of `name` in `folder` (NAME or v_NAME, any of `VIDEO_EXTENSIONS`), or None."""
    for stem in (name, f"v_{name}"):
        for extension in VIDEO_EXTENSIONS:
            path = folder / f"{stem}{extension}"
            if path.is_file():
                return path
    return None


def read_set(root: Path, qa_set: VideoQASet) -> tuple[list[dict], int]:
    """The rows of one set (question_id, question, answer, video: absolute path) and how many questions were left
    out for a missing video. A missing or malformed question/answer file is a one-line ValueError."""
    folder = Path(root) / qa_set.folder
    files = [folder / "test_q.json", folder / "test_a.json"]
    try:
        questions, answers = (json.loads(path.read_text()) for path in files)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{qa_set.label}: cannot read {folder}/test_q.json and test_a.json ({error}): give --root the "
            "GPT_Zero_Shot_QA folder of Video-LLaVA's evaluation data"
        ) from None
    if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
        raise ValueError(
            f"{qa_set.label}: {files[0]} and {files[1]} must be lists of the same length (one answer per "
            "question, in order)"
        )
    videos = folder / qa_set.videos
    rows, missing = [], 0
    for question, answer in zip(questions, answers):
        if "question_id" in answer and answer["question_id"] != question["question_id"]:
            raise ValueError(
                f"{qa_set.label}: question {question['question_id']} is paired with the answer of "
                f"{answer['question_id']}: test_a.json must follow test_q.json's order"
            )
        video = find_video(videos, str(question["video_name"]))
        if video is None:
            missing += 1
            continue
        rows.append(
            {
                "question_id": str(question["question_id"]),
                "question": str(question["question"]),
                "answer": str(answer["answer"]),
                "video": str(video.resolve()),
            }
        )
    return rows, missing


def build(
    root: Path, out: Path, tasks: list[str] | None = None, *, limit: int | None = None, max_new_tokens: int = 1024
) -> list[Path]:
    """Write OUT/TASK.jsonl and OUT/TASK.yaml for each set (all when `tasks` is None) and OUT/utils.py; returns
    the YAML paths. limit: the first N questions of each set (a smoke test)."""
    unknown = [t for t in tasks or () if t not in SETS]
    if unknown:
        raise ValueError(f"unknown video QA task {', '.join(unknown)}; choose from {', '.join(SETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks or list(SETS):
        qa_set = SETS[task]
        rows, missing = read_set(Path(root), qa_set)
        if not rows:
            raise ValueError(
                f"{qa_set.label}: no question has its video in {Path(root) / qa_set.folder / qa_set.videos}"
            )
        if missing:
            print(
                f"{qa_set.label}: {missing} of {missing + len(rows)} questions left out (video not found, as "
                "Video-LLaVA's evaluation skips them)",
                file=sys.stderr,
            )
        rows = rows[:limit] if limit is not None else rows
        data = out / f"{task}.jsonl"
        _write(data, "".join(json.dumps(row) + "\n" for row in rows))
        yaml_path = out / f"{task}.yaml"
        _write(
            yaml_path,
            TASK_YAML.format(
                label=qa_set.label,
                judge=JUDGE_MODEL,
                task=task,
                data=json.dumps(str(data.resolve())),
                max_new_tokens=max_new_tokens,
            ),
        )
        written.append(yaml_path)
    _write(out / "utils.py", UTILS)
    return written


def _write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# --- the lmms-eval task functions ----------------------------------------------------------------------------
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    judge_settings()  # a missing key fails here, before the model answers anything
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    """The judge's verdict on one answer (`results[0]`), under both metrics."""
    prediction = results[0].strip() if isinstance(results[0], str) else str(results[0])
    verdict, score = judge(doc["question"], doc["answer"], prediction)
    record = {
        "question_id": doc["question_id"],
        "question": doc["question"],
        "answer": doc["answer"],
        "pred": prediction,
        "judge": verdict,
        "score": score,
    }
    return {"gpt_eval_accuracy": record, "gpt_eval_score": record}


def aggregate_accuracy(results, args=None) -> float:
    """yes / (yes + no) x 100 over the judged answers."""
    yes = sum(r["judge"] == "yes" for r in results)
    no = sum(r["judge"] == "no" for r in results)
    return 100.0 * yes / (yes + no) if yes + no else 0.0


def aggregate_score(results, args=None) -> float:
    """The mean 0-5 score."""
    return sum(r["score"] for r in results) / len(results) if results else 0.0


# --- the judge --------------------------------------------------------------------------------------------------
class JudgeError(RuntimeError):
    """The GPT judge is not configured, cannot be reached, or answers unreadably."""


def judge_settings() -> tuple[str, str, str]:
    """(url, key, model) of the judge from the environment; a one-line JudgeError without a key."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise JudgeError(
            "the video QA tasks are judged by a GPT model, as Video-LLaVA's evaluation is: set "
            "OPENAI_API_KEY (and OPENAI_API_URL for another OpenAI-compatible endpoint, VTPRUNE_JUDGE_MODEL "
            f"for another judge than {JUDGE_MODEL})"
        )
    return os.environ.get("OPENAI_API_URL", JUDGE_URL), key, os.environ.get("VTPRUNE_JUDGE_MODEL", JUDGE_MODEL)


def judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
    """The chat messages asking for a yes/no match and a 0-5 score as a Python dict (Video-ChatGPT's protocol)."""
    system = (
        "You evaluate generated answers to questions about videos. Compare the predicted answer with the correct "
        "answer and decide whether they match in meaning. Instructions: judge the meaningful match, not the "
        "wording; accept synonyms and paraphrases; judge how correct the prediction is against the answer."
    )
    user = (
        f"Evaluate this question-answer pair about a video.\n\nQuestion: {question}\nCorrect Answer: {answer}\n"
        f"Predicted Answer: {prediction}\n\nReply with a yes/no verdict and a score, an integer from 0 to 5 where 5 "
        "is the best meaningful match, as a Python dictionary string with the keys 'pred' (the string 'yes' or "
        "'no') and 'score' (an INTEGER, not a string). Give no other text or explanation, only the dictionary, "
        "for example {'pred': 'yes', 'score': 4}."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> tuple[str, int] | None:
    """('yes' | 'no', score) from the judge's reply, or None when it holds no readable dictionary."""
    match = re.search(r"\{.*?\}", reply or "", flags=re.S)
    if match is None:
        return None
    try:
        verdict = ast.literal_eval(match.group(0))
        score = int(verdict["score"])
        said = str(verdict["pred"]).strip().lower()
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    if "yes" in said:
        return "yes", score
    if "no" in said:
        return "no", score
    return None


JUDGE_ATTEMPTS = 5  # tries per answer
JUDGE_WAIT = 5.0  # seconds between tries


def judge(
    question: str, answer: str, prediction: str, *, attempts: int | None = None, wait: float | None = None
) -> tuple[str, int]:
    """The judge's (verdict, score) for one prediction; retries a failed request or an unreadable reply
    (`JUDGE_ATTEMPTS` tries, `JUDGE_WAIT` s apart), then raises JudgeError (a run is never scored 0 silently)."""
    import urllib.error
    import urllib.request

    attempts = JUDGE_ATTEMPTS if attempts is None else attempts
    wait = JUDGE_WAIT if wait is None else wait

    url, key, model = judge_settings()
    payload = json.dumps(
        {"model": model, "messages": judge_messages(question, answer, prediction), "temperature": 0, "max_tokens": 64}
    ).encode()
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait)
        request = urllib.request.Request(
            url,
            data=payload,
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code} from {url}"
            if error.code in (400, 401, 403, 404):
                break  # a wrong key, model or URL: retrying does not help
            continue
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            problem = f"{type(error).__name__} from {url}: {' '.join(str(error).split())[:120]}"
            continue
        verdict = parse_verdict(reply)
        if verdict is not None:
            return verdict
        problem = f"unreadable reply {reply[:80]!r}"
    raise JudgeError(
        f"the GPT judge ({model}) failed after {attempt + 1} tries ({problem}): check OPENAI_API_KEY, "
        "OPENAI_API_URL and VTPRUNE_JUDGE_MODEL"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="Video-LLaVA's GPT_Zero_Shot_QA folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to pass as lmms-eval's --include_path")
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(SETS)} (default: all)")
    parser.add_argument("--limit", type=int, help="the first N questions of each set (a smoke test)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit (Video-LLaVA's: 1024)")
    args = parser.parse_args(argv)
    try:
        paths = build(
            args.root,
            args.out,
            None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()],
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(
        f"wrote {', '.join(p.name for p in paths)} in {args.out}; run: python -m lmms_eval --include_path {args.out} "
        f"--tasks {','.join(p.stem for p in paths)} --model vtprune_video_llava ..."
    )


if __name__ == "__main__":
    main()


__all__ = [
    "SETS",
    "VideoQASet",
    "build",
    "read_set",
    "find_video",
    "judge",
    "judge_settings",
    "judge_messages",
    "parse_verdict",
    "JudgeError",
    "doc_to_visual",
    "doc_to_text",
    "doc_to_target",
    "process_results",
    "aggregate_accuracy",
    "aggregate_score",
]
