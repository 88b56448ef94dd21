"""`vtprune reproduce`: the paper's tables as lmms-eval runs, and their results beside the published numbers.

A table (`TABLES`) lists its rows (the full model, then each method without and with debiasing) and its
benchmarks (lmms-eval tasks, the metric each reports and how the paper scales it). `commands` gives one
lmms-eval command per row (all benchmarks of the row in one run, the table's plugin model with
`profile=benchmark`: each task uses its own published profile where one exists, as the paper's code did);
`collect` reads the newest `*_results.json` lmms-eval wrote under each row's folder and averages the
benchmarks; `markdown` and `to_json` write the table with the published numbers beside. paper-llava15 runs
lmms-eval's image benchmarks; paper-videollava runs vtprune's video QA tasks (`vtprune.lmms.video_qa`), built
into OUT/tasks from Video-LLaVA's evaluation data by `prepare` and passed with --include_path.

Published numbers: arXiv 2508.17807 as summarised in the project's reference notes (averages only, LLaVA-1.5-7B
at 128 visual tokens). How the average is formed: every benchmark on 0-100, MME as its perception score /
2000 * 100; with LLaVA-1.5-7B's own published scores (VQAv2 78.5, GQA 62.0, VizWiz 50.0, SQA-IMG 66.8,
TextVQA 58.2, POPE 85.9, MME 1510.7, MMB 64.3, MMB-CN 58.3, MM-Vet 31.1; the LLaVA-1.5 paper) this gives
63.06, the 63.1 the paper reports for the full model (an inference, not stated in the reference).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_JUDGE = (
    "a GPT judge for every answer (OPENAI_API_KEY; VTPRUNE_JUDGE_MODEL, default gpt-3.5-turbo, Video-LLaVA's "
    "judge; the run stops with an error when the judge fails, it never scores 0)"
)
MMBENCH_JUDGE = (
    "OpenAI API (OPENAI_API_KEY) for answers its rules cannot map to an option; without a key those "
    "get a seeded random option"
)


@dataclass(frozen=True)
class Benchmark:
    """An lmms-eval task of a table: the metric it reports (lmms-eval's results key without the filter,
    e.g. 'exact_match'), the factor that puts it on the paper's 0-100 scale, and what it needs beyond the
    data (an API judge, a submission server), if anything."""

    task: str
    label: str
    metric: str
    scale: float = 1.0
    needs: str | None = None
    judge_key: bool = False  # cannot run at all without OPENAI_API_KEY (checked before any row starts)


@dataclass(frozen=True)
class Row:
    """A row: a method (None: the full model) with or without debiasing, and its published average."""

    label: str
    method: str | None
    debias: bool
    published: float | None

    @property
    def slug(self) -> str:
        """The row's folder under the output folder."""
        return "full" if self.method is None else self.method + ("-debias" if self.debias else "")


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    lmms_model: str
    pretrained: str
    budget: int  # the budget the published numbers are for, a count of `visual_tokens`
    benchmarks: tuple[Benchmark, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    unavailable: str | None = None  # why the table cannot run yet
    visual_tokens: int = 576  # the model's visual tokens per question, what budgets count (576: LLaVA-1.5's)
    pad_to_square: bool | None = True  # the plugin's pad_to_square (LLaVA-1.5 only; None: not passed)
    local_tasks: bool = False  # the benchmarks are vtprune's tasks built by `vtprune.lmms.video_qa` (--include_path)

    @property
    def model_budget(self) -> str:
        """How the budget is counted, for messages: 'of 576 visual tokens'."""
        return f"of the model's {self.visual_tokens} visual tokens"


LLAVA15_BENCHMARKS = (
    Benchmark("gqa", "GQA", "exact_match", 100),
    Benchmark("mmbench_en_dev", "MMB", "gpt_eval_score", 1, MMBENCH_JUDGE),
    Benchmark("mmbench_cn_dev", "MMB-CN", "gpt_eval_score", 1, MMBENCH_JUDGE),
    Benchmark("mme", "MME", "mme_perception_score", 100 / 2000),
    Benchmark(
        "mmvet",
        "MM-Vet",
        "gpt_eval_score",
        1,
        "a GPT judge for every answer (OPENAI_API_KEY; lmms-eval 0.7.3 uses MODEL_VERSION, default "
        "gpt-4o-2024-11-20, which may not be the paper's judge)",
    ),
    Benchmark("pope", "POPE", "pope_f1_score", 100),
    Benchmark("scienceqa_img", "SQA-IMG", "exact_match", 100),
    Benchmark("textvqa_val", "TextVQA", "exact_match", 100),
    Benchmark("vizwiz_vqa_val", "VizWiz", "exact_match", 100),
    Benchmark("vqav2_val", "VQAv2", "exact_match", 100),
)


def _method_rows(published: Sequence[tuple[str, str, float, float]]) -> tuple[Row, ...]:
    rows = []
    for label, method, plain, debiased in published:
        rows += [Row(label, method, False, plain), Row(f"{label} +debias", method, True, debiased)]
    return tuple(rows)


TABLES: dict[str, PaperTable] = {
    "paper-llava15": PaperTable(
        name="paper-llava15",
        title="LLaVA-1.5-7B, 128 visual tokens, average of 10 image benchmarks (arXiv 2508.17807, main table)",
        lmms_model="vtprune_llava_hf",
        pretrained="llava-hf/llava-1.5-7b-hf",
        budget=128,
        benchmarks=LLAVA15_BENCHMARKS,
        rows=(Row("Full model (576 tokens)", None, False, 63.1),)
        + _method_rows(
            [
                ("FastV", "fastv", 59.6, 62.5),
                ("HiMAP", "himap", 59.0, 61.4),
                ("iLLaVA", "illava", 59.7, 61.7),
                ("PyramidDrop", "pdrop", 60.5, 61.6),
                ("TokenCarve", "tokencarve", 61.5, 61.9),
                ("SparseVLM", "sparsevlm", 62.0, 62.4),
            ]
        ),
        notes=(
            "Debiased rows use the published per-benchmark positional profiles (profile=benchmark) plus padding "
            "suppression; FastV's single published curve serves every benchmark; iLLaVA has no published "
            "profile, so vtprune's calibration-free 'auto' fit stands in.",
            "Images are padded to a square (pad_to_square=True), as the original LLaVA-1.5 and the paper's code do; "
            "the llava-hf processor may center-crop instead.",
            "No benchmark here needs a submission server: these are the val/dev splits with public answers "
            "(vqav2_test, textvqa_test, vizwiz_vqa_test and mmbench_*_test would).",
            "lmms-eval's prompts and answer matching differ in details from LLaVA's own evaluation scripts, so "
            "absolute numbers can differ from the published ones; the debias-vs-plain differences are the point.",
        ),
    ),
    "paper-videollava": PaperTable(
        name="paper-videollava",
        title="Video-LLaVA-7B, 2048 -> 512 video tokens (8 frames x 256), video QA accuracy judged by GPT "
        "(arXiv 2508.17807; published: average of 3 video QA sets)",
        lmms_model="vtprune_video_llava",
        pretrained="LanguageBind/Video-LLaVA-7B-hf",
        budget=512,
        visual_tokens=2048,
        pad_to_square=None,
        local_tasks=True,
        benchmarks=tuple(
            Benchmark(task, label, "gpt_eval_accuracy", 1, VIDEO_JUDGE, judge_key=True)
            for task, label in (
                ("videollava_msvd_qa", "MSVD-QA"),
                ("videollava_msrvtt_qa", "MSRVTT-QA"),
                ("videollava_tgif_qa", "TGIF-QA"),
                ("videollava_activitynet_qa", "ActivityNet-QA"),
            )
        ),
        rows=(Row("Full model (2048 tokens)", None, False, None),)
        + _method_rows(
            [
                ("SparseVLM", "sparsevlm", 57.6, 58.2),
                ("FastV", "fastv", 57.3, 57.9),
                ("PyramidDrop", "pdrop", 57.8, 57.9),
            ]
        ),
        notes=(
            "The reference does not name the paper's three video QA sets, so every row runs Video-LLaVA's four "
            "(MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA) and averages them: compare the debiasing gains, not the "
            "averages, with the published numbers. (Video-LLaVA's own published accuracies, 70.7/59.2/70.0/45.3, "
            "average 58.2 over MSRVTT, TGIF and ActivityNet and 66.6 over MSVD, MSRVTT and TGIF: the paper's three "
            "likely include ActivityNet-QA; an inference.)",
            "The four sets are vtprune's lmms-eval tasks (`python -m vtprune.lmms.video_qa`), built from Video-LLaVA's "
            "evaluation data (GPT_Zero_Shot_QA: questions, answers, videos; --data) and judged as Video-LLaVA's "
            "evaluation does (yes/no and a 0-5 score; accuracy = yes share). lmms-eval 0.7.3 ships only "
            "ActivityNet-QA (`activitynetqa`), judged by gpt-4o by default and scored 0 when the judge fails, so "
            "vtprune's task stands in for it too.",
            "The budget is a count of the 2048 video tokens (8 frames x 256 patches; each frame's [CLS] token is "
            "never pruned), passed to the plugin as the share budget/2048; debiased rows use the 'auto' positional "
            "fit (no profile is published for Video-LLaVA) plus padding suppression (frames are cropped: no padding).",
            "lmms-eval's video_llava wrapper samples 8 frames uniformly and asks 'USER: <video>QUESTION? ASSISTANT:'; "
            "Video-LLaVA's own script used its llava_v1 conversation template: absolute numbers can differ.",
        ),
    ),
}


def table(name: str) -> PaperTable:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose from {', '.join(TABLES)}")
    return TABLES[name]


def select_rows(spec: PaperTable, methods: Sequence[str] | None) -> list[Row]:
    """The full model's row and the rows of `methods` (all when None)."""
    if methods is None:
        return list(spec.rows)
    known = {row.method for row in spec.rows if row.method}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(
            f"--methods: {', '.join(unknown)} not in {spec.name} (its methods: {', '.join(sorted(known))})"
        )
    return [row for row in spec.rows if row.method is None or row.method in methods]


def check_budget(spec: PaperTable, budget: int) -> None:
    """A one-line ValueError when `budget` is not a count of the table's visual tokens."""
    if not 1 <= budget <= spec.visual_tokens:
        raise ValueError(f"--budget {budget}: give a count {spec.model_budget} (1..{spec.visual_tokens})")


def model_args(spec: PaperTable, row: Row, *, budget: int, pretrained: str | None = None) -> str:
    """The row's lmms-eval --model_args (the plugin's options, see `vtprune.lmms.options`). The plugin counts
    budgets of 576 tokens; another model's count becomes a share (512 of 2048: budget=0.25)."""
    args = [f"pretrained={pretrained or spec.pretrained}"]
    if row.method is None:
        args.append("method=none")
    else:
        share = budget if spec.visual_tokens == 576 else f"{budget / spec.visual_tokens:.6g}"
        args += [
            f"method={row.method}",
            f"budget={share}",
            "debias=both,profile=benchmark" if row.debias else "debias=none",
        ]
    if spec.pad_to_square is not None:
        args.append(f"pad_to_square={spec.pad_to_square}")
    return ",".join(args)


def tasks_dir(spec: PaperTable, out_dir: Path) -> Path | None:
    """Where the table's local tasks are built (OUT/tasks), or None when it runs lmms-eval's own."""
    return Path(out_dir) / "tasks" if spec.local_tasks else None


def build_command(spec: PaperTable, out_dir: Path, data: str | None) -> list[str] | None:
    """The command that builds the table's local tasks from the data folder (None: no local tasks)."""
    if not spec.local_tasks:
        return None
    return [
        "python",
        "-m",
        "vtprune.lmms.video_qa",
        "--root",
        data or "GPT_Zero_Shot_QA",
        "--out",
        str(tasks_dir(spec, out_dir)),
        "--tasks",
        ",".join(b.task for b in spec.benchmarks),
    ]


def prepare(spec: PaperTable, out_dir: Path, data: str | None, environ=None) -> None:
    """Before any row runs: the judge's key where a benchmark cannot run without it, and the local tasks built
    from `data` (kept when already built and no data is given). One-line ValueErrors."""
    import os

    environ = os.environ if environ is None else environ
    judged = [b.task for b in spec.benchmarks if b.judge_key]
    if judged and not environ.get("OPENAI_API_KEY", "").strip():
        raise ValueError(
            f"{', '.join(judged)} are judged by a GPT model: set OPENAI_API_KEY (OPENAI_API_URL for "
            "another OpenAI-compatible endpoint), or print the commands with --dry-run"
        )
    folder = tasks_dir(spec, out_dir)
    if folder is None:
        return
    wanted = [b.task for b in spec.benchmarks]
    if data is None:
        missing = [task for task in wanted if not (folder / f"{task}.yaml").is_file()]
        if missing:
            raise ValueError(
                f"{spec.name} runs vtprune's video QA tasks, built from Video-LLaVA's evaluation data: "
                "give --data GPT_Zero_Shot_QA (its folder with MSVD_Zero_Shot_QA, ...)"
            )
        return
    # the tasks belong to the lmms-eval plugin (a layer above the apps): built by its own command
    import subprocess
    import sys

    args = build_command(spec, out_dir, data)
    done = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ValueError(
            lines[-1].removeprefix("error: ")
            if lines
            else f"building the video QA tasks failed (exit {done.returncode})"
        )


def command(
    spec: PaperTable,
    row: Row,
    out_dir: Path,
    *,
    budget: int,
    pretrained: str | None = None,
    limit: int | None = None,
    launcher: Sequence[str] = ("python", "-m", "lmms_eval"),
    extra: Sequence[str] = (),
) -> list[str]:
    """One lmms-eval command line (argv) running every benchmark of `row`, results under out_dir/row.slug."""
    argv = [
        *launcher,
        "--model",
        spec.lmms_model,
        "--model_args",
        model_args(spec, row, budget=budget, pretrained=pretrained),
        "--tasks",
        ",".join(b.task for b in spec.benchmarks),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out_dir / row.slug),
    ]
    if spec.local_tasks:
        argv += ["--include_path", str(tasks_dir(spec, out_dir))]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv + list(extra)


def shell(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def launcher_argv(text: str) -> list[str]:
    """The `--launcher` option as argv; a ValueError naming the option when it is empty or its quotes do not close."""
    try:
        argv = shlex.split(text)
    except ValueError as error:
        raise ValueError(
            f"--launcher {text!r} is malformed ({error}): give e.g. 'python -m lmms_eval' or "
            "'accelerate launch --num_processes 8 -m lmms_eval'"
        ) from None
    if not argv:
        raise ValueError("--launcher is empty: give e.g. 'python -m lmms_eval'")
    return argv


#: lines of an lmms-eval log that mean the run failed although lmms-eval exited with code 0
_FAILURE_MARKERS = ("Traceback (most recent call last)", "Error during evaluation", "| ERROR ")


def run_logged(argv: Sequence[str], log_path: Path, echo=None) -> tuple[int, str]:
    """Run one row's command, its output both echoed (`echo(line)`, default stdout) and written to `log_path`;
    (exit code, the output)."""
    import subprocess
    import sys

    echo = echo or (lambda line: (sys.stdout.write(line), sys.stdout.flush()))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process,
    ):
        for line in process.stdout:
            echo(line)
            log.write(line)
            lines.append(line)
    return process.returncode, "".join(lines)


def row_failure(spec: PaperTable, row: Row, out_dir: Path, code: int, output: str, log_path: Path) -> str | None:
    """Why a row's lmms-eval run failed, or None: a non-zero exit code, an error in its output (lmms-eval's CLI
    exits 0 after a model error), or a benchmark with no score in the results files."""
    if code != 0:
        return f"lmms-eval exited with code {code} (log: {log_path})"
    for line in output.splitlines():
        if any(marker in line for marker in _FAILURE_MARKERS):
            return f"its log reports an error: {line.strip()[:200]} (log: {log_path})"
    scores, _, problems = read_scores(Path(out_dir) / row.slug, spec.benchmarks)
    if problems:
        return problems[0]
    missing = [task for task, value in scores.items() if value is None]
    if missing:
        return f"no results for {', '.join(missing)} under {Path(out_dir) / row.slug} (log: {log_path})"
    return None


# --- collecting ---------------------------------------------------------------------------------------------
def _metric(values: dict, metric: str):
    """lmms-eval's value of `metric` in a task's results ('exact_match,none', or another filter)."""
    if f"{metric},none" in values:
        return values[f"{metric},none"]
    for key, value in values.items():
        if key.split(",")[0] == metric:
            return value
    return None


def read_scores(row_dir: Path, benchmarks: Sequence[Benchmark]) -> tuple[dict[str, float | None], list[str], list[str]]:
    """Each benchmark's score on the paper's 0-100 scale from the `*_results.json` files lmms-eval wrote
    under `row_dir` (the newest file that has a task wins), the files used, and the files that could not be read
    (one line each: the file, why, what to do)."""
    files = sorted(Path(row_dir).rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    scores: dict[str, float | None] = {b.task: None for b in benchmarks}
    used: list[str] = []
    problems: list[str] = []
    for file in files:
        try:
            results = json.loads(file.read_text()).get("results")
            if not isinstance(results, dict):
                raise ValueError('no "results" object')
        except (OSError, ValueError, AttributeError) as error:
            reason = " ".join(str(error).split())[:120]
            problems.append(
                f"{file} is not a readable lmms-eval results file ({reason}): delete it, or rerun the row with --force"
            )
            continue
        for benchmark in benchmarks:
            if scores[benchmark.task] is not None or not isinstance(results.get(benchmark.task), dict):
                continue
            value = _metric(results[benchmark.task], benchmark.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scores[benchmark.task] = float(value) * benchmark.scale
                if str(file) not in used:
                    used.append(str(file))
    return scores, used, problems


@dataclass
class RowResult:
    row: Row
    scores: dict[str, float | None]
    files: list[str] = field(default_factory=list)
    command: str = ""
    problems: list[str] = field(default_factory=list)  # unreadable results files, failed runs

    @property
    def average(self) -> float | None:
        """The mean over every benchmark (None until all have a score)."""
        values = list(self.scores.values())
        return None if not values or any(v is None for v in values) else sum(values) / len(values)

    @property
    def done(self) -> int:
        return sum(v is not None for v in self.scores.values())


def collect(
    spec: PaperTable, rows: Sequence[Row], out_dir: Path, commands: dict[str, str] | None = None
) -> list[RowResult]:
    out = []
    for row in rows:
        scores, files, problems = read_scores(Path(out_dir) / row.slug, spec.benchmarks)
        out.append(RowResult(row, scores, files, (commands or {}).get(row.slug, ""), problems))
    return out


def markdown(spec: PaperTable, results: Sequence[RowResult], budget: int) -> str:
    """The measured table (per benchmark, average) beside the published average, and the debiasing gains."""
    comparable = budget == spec.budget
    head = ["row", *(b.label for b in spec.benchmarks), "average", "published", "measured - published"]
    lines = [
        f"{spec.title}; measured at budget {budget}"
        + ("" if comparable else f" (published numbers are for {spec.budget}: not comparable)"),
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for result in results:
        cells = [f"{v:.1f}" if v is not None else "" for v in result.scores.values()]
        average = result.average
        partial = "" if average is not None or not result.done else f"({result.done}/{len(spec.benchmarks)})"
        published = result.row.published if comparable else None
        gap = "" if average is None or published is None else f"{average - published:+.1f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    result.row.label,
                    *cells,
                    f"{average:.1f}" if average is not None else partial,
                    "" if published is None else f"{published:.1f}",
                    gap,
                ]
            )
            + " |"
        )
    gains = []
    by = {(r.row.method, r.row.debias): r for r in results}
    for result in results:
        if result.row.method is None or result.row.debias or (result.row.method, True) not in by:
            continue
        plain, debiased = result, by[(result.row.method, True)]
        measured = None if plain.average is None or debiased.average is None else debiased.average - plain.average
        published = (debiased.row.published - plain.row.published) if comparable else None
        gains.append(
            f"| {plain.row.label} | {'' if measured is None else f'{measured:+.1f}'} | "
            f"{'' if published is None else f'{published:+.1f}'} |"
        )
    if gains:
        lines += [
            "",
            "Debiasing gain (average, +debias minus plain):",
            "",
            "| method | measured | published |",
            "|---|---|---|",
            *gains,
        ]
    return "\n".join(lines)


def to_json(spec: PaperTable, results: Sequence[RowResult], budget: int) -> dict:
    return {
        "table": spec.name,
        "title": spec.title,
        "budget": budget,
        "published_budget": spec.budget,
        "benchmarks": [
            {"task": b.task, "label": b.label, "metric": b.metric, "scale": b.scale, "needs": b.needs}
            for b in spec.benchmarks
        ],
        "rows": [
            {
                "label": r.row.label,
                "method": r.row.method,
                "debias": r.row.debias,
                "scores": r.scores,
                "average": r.average,
                "published": r.row.published if budget == spec.budget else None,
                "results_files": r.files,
                "problems": r.problems,
                "command": r.command,
            }
            for r in results
        ],
        "notes": list(spec.notes),
    }


__all__ = [
    "Benchmark",
    "Row",
    "PaperTable",
    "TABLES",
    "table",
    "select_rows",
    "check_budget",
    "model_args",
    "tasks_dir",
    "build_command",
    "prepare",
    "command",
    "shell",
    "launcher_argv",
    "run_logged",
    "row_failure",
    "read_scores",
    "RowResult",
    "collect",
    "markdown",
    "to_json",
]
