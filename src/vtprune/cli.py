"""Command line: `vtprune run`, `demo`, `methods`, `profiles`, `calibrate`, `analyze` (and the testbed commands).

Errors: a mistake in a command line, or in a file it names, ends in one line on stderr and exit code 2, found
before any model loads wherever it can be (options, files, device, the model's config: its class and depth);
any other failure (a ValueError from deep inside a run included) ends in one line and exit code 1. `--debug` (anywhere on the line) shows the traceback
instead. torch and transformers are imported inside the commands that need them, so `--help` and `--version`
answer at once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .apps.errors import UsageError

console = Console()  # tables and results: stdout
status = Console(stderr=True)  # progress bars and status lines: stderr (stdout stays clean for --json)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _report(error: BaseException) -> int:
    """Print `error` as one line on stderr; return the exit code."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError

    if isinstance(error, NoArgsIsHelpError):  # a bare `vtprune` (or `vtprune testbed`): the help, not an error
        typer.echo(error.format_message())
        return 0
    if isinstance(error, UsageError):
        message, code = str(error), 2
    elif isinstance(error, ClickException):
        message, code = error.format_message(), error.exit_code
        if isinstance(error, ClickUsageError) and error.ctx is not None:
            message = f"{_one_line(message).rstrip('.')} (see `{error.ctx.command_path} --help`)"
    elif isinstance(error, _input_errors()):  # an input file the command names, found wrong while it runs
        message, code = str(error), 2
    elif isinstance(error, _runtime_errors()):  # clear messages of their own (a locked output, ...)
        message, code = str(error), 1
    else:
        message, code = f"{type(error).__name__}: {error} (rerun with --debug for the traceback)", 1
    sys.stderr.write(f"vtprune: error: {_one_line(message)}\n")
    return code


def _input_errors() -> tuple:
    """Errors in what the user gave that can only be found while a command runs: exit code 2."""
    from .apps.images import ImageError
    from .apps.loading import InputTooLong
    from .io import OutputError

    return (ImageError, OutputError, InputTooLong)


def _runtime_errors() -> tuple:
    from .io import LockedError

    return (LockedError,)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"vtprune: warning: {_one_line(message)}\n")


class _Group(TyperGroup):
    """The root command: every error as one line (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args
        args = [arg for arg in args if arg != "--debug"]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        shown = warnings.showwarning
        if not debug:
            warnings.showwarning = _show_warning
        try:
            code = super().main(
                args=args, prog_name="vtprune", complete_var=complete_var, standalone_mode=False, **extra
            )
            code = code if isinstance(code, int) else 0
            if code == 130:
                sys.stderr.write("vtprune: interrupted\n")
        except Exception as error:
            if debug:
                raise
            code = _report(error)
        finally:
            warnings.showwarning = shown
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"vtprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error (accepted anywhere on the line)"),
) -> None:
    """Visual-token pruning with debiased attention."""


# --- options -------------------------------------------------------------------------------------------------
AMOUNT_FORMS = "a token count (64) or a fraction of the visual tokens (0.25)"


def _amount(part: str, option: str) -> int | float:
    """One count or fraction: whole numbers >= 1 are token counts (`64`, also `64.0`), values in (0, 1]
    fractions (`0.25`; `1.0` keeps everything)."""
    text = part.strip()
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{option} {text!r} is not a number: give {AMOUNT_FORMS}") from None
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{option} {text}: give {AMOUNT_FORMS}") from None
        if value <= 1:
            return value
        if value.is_integer():
            return int(value)
        raise UsageError(f"{option} {text}: a count must be a whole number and a fraction must lie in (0, 1]") from None
    if value < 1:
        raise UsageError(
            f"{option} {text}: a count must be >= 1 (to keep a share of the visual tokens, give a fraction in "
            "(0, 1], e.g. 0.25)"
        )
    return value


def number_option(text: str | None, option: str):
    """A count or fraction (`8`, `0.25`), or a comma-separated schedule of them (`192,64`); None stays None."""
    if text is None:
        return None
    parts = str(text).split(",")
    if any(not part.strip() for part in parts):
        raise UsageError(f"{option} {text!r}: give {AMOUNT_FORMS}, or one per stage separated by commas (192,64)")
    values = [_amount(part, option) for part in parts]
    return values[0] if len(values) == 1 else values


def budget_option(text: str | None, option: str = "--budget"):
    """One count of 576 or fraction; None stays None."""
    if text is None:
        return None
    if "," in str(text):
        raise UsageError(f"{option} {text!r}: a budget is one number ({AMOUNT_FORMS}); per-stage values go in --keep")
    return _amount(str(text), option)


def layer_option(text: str | None):
    """`2` or `2,10,20`; None stays None (the method's default layers)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise UsageError(
            f"--layer {text!r}: give a layer index (an integer) or a comma-separated list of them (2,10,20)"
        ) from None
    if any(value < 0 for value in values):
        raise UsageError(
            f"--layer {text}: layers count from 0 (the first decoder layer); negative indices are not accepted"
        )
    return values[0] if len(values) == 1 else values


#: torch.Generator.manual_seed's range of non-negative seeds
SEED_LIMIT = 2**63 - 1


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= SEED_LIMIT:
        raise UsageError(f"--seed {seed}: give an integer in 0..{SEED_LIMIT} (2^63 - 1)")


def keep_option(keep) -> int | float:
    """A number as the press takes it: whole numbers >= 1 are token counts, values in (0, 1] fractions."""
    return _amount(str(keep), "--keep")


def _positive(value: int, option: str, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"{option} {value}: must be >= {minimum}")
    return value


def make_press(method: str, *, debias=None, **options):
    """The registered method `method` built from the generic options (None: the method's default); its own
    checks become usage errors."""
    from .methods import METHODS
    from .methods import method as method_class

    try:
        cls = method_class(method)
    except ValueError:
        raise UsageError(
            f"--method {method!r}: unknown method; choose from {', '.join(METHODS)} (`vtprune methods`)"
        ) from None
    if cls.query is None:
        debias = None  # nothing to debias
    from dataclasses import fields

    accepted = {f.name for f in fields(cls) if f.init} - {"debias"}  # type: ignore[arg-type]  # every method is a dataclass
    for option, value in options.items():
        if value is not None and option not in accepted:
            takes = ", ".join(f"--{name}" for name in sorted(accepted))
            raise UsageError(f"--{option}: {method} takes no {option} (its options: {takes})")
    try:
        return cls.create(debias=debias, **options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def _check_profile_choice(press, profile: str | None, no_debias: bool) -> None:
    if profile is None:
        return
    if press.query is None:
        raise UsageError(
            f"--profile {profile}: {press.name} ranks without attention, so there is nothing to debias; drop --profile"
        )
    if no_debias:
        raise UsageError("--profile and --no-debias contradict each other: drop one")


def _debias(profile: str | None, padding: bool = True):
    """A `Debias` from --profile (None: none; 'none': no positional debiasing); bad profiles are usage errors."""
    from .debias import Debias

    try:
        return Debias(profile=None if profile in (None, "none") else profile, padding=padding)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--profile: {error}") from None


def _open_image(path: Path):
    """The image of --image, upright (EXIF orientation applied) and 8-bit RGB (`images.read_image`)."""
    from .apps.images import ImageError, read_image

    if path.is_dir():
        raise UsageError(f"--image {path} is a directory: give an image file")
    try:
        return read_image(path)
    except ImageError as error:
        raise UsageError(f"--image {error}") from None
    except Exception as error:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise UsageError(f"--image {path}: not an image vtprune can read ({type(error).__name__}: {error})") from None


def _check_runtime(device: str, dtype: str) -> None:
    from .apps.loading import check_device, check_dtype

    try:
        check_dtype(dtype)
    except ValueError as error:
        raise UsageError(f"--dtype: {error}") from None
    try:
        check_device(device)
    except ValueError as error:
        raise UsageError(f"--device {error}") from None


def _inspect_model(spec: str, press=None):
    """The model's config, checked (and the press's schedule against its depth) before any weights load."""
    from .apps.loading import inspect_model

    try:
        info = inspect_model(spec)
    except ValueError as error:
        raise UsageError(f"--model {error}") from None
    if press is not None:
        try:
            press.validate(info.num_layers)
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None
    return info


def _load(info, device: str, dtype: str):
    from transformers.utils import logging as hf_logging

    from .apps.loading import load_model

    hf_logging.disable_progress_bar()  # the weights of these models load in seconds; keep stderr for what matters
    try:
        return load_model(info.spec, device=device, dtype=dtype)
    except ValueError as error:  # the checkpoint --model names does not hold together (e.g. another model's processor)
        raise UsageError(str(error)) from None


def default_profile(config, method: str) -> str | None:
    """The built-in positional profile for a model (its config) and method, if there is one: the published
    LLaVA-1.5-7B profiles, or the testbed's calibrated ones."""
    from .debias.profiles import default_profile_name
    from .methods import method as method_class

    cls = method_class(method)
    return default_profile_name(config, cls.name, cls.profile_name)


def _check_output_file(path: Path, option: str) -> None:
    """Create the folder of the output file `path` and check that it can be written there (before any model
    loads); a usage error naming `option` otherwise."""
    from .io import OutputError, prepare_output_file

    try:
        prepare_output_file(path, option)
    except OutputError as error:
        raise UsageError(str(error)) from None


def _check_output_dir(path: Path, option: str) -> None:
    """Create the output folder `path` (nested) and check that files can be written in it."""
    from .io import OutputError, prepare_output_dir

    try:
        prepare_output_dir(path, option)
    except OutputError as error:
        raise UsageError(str(error)) from None


def _lock_output(path: Path, option: str, *, wait: bool, is_dir: bool = True):
    """Hold the lock of an output folder (or file) until the command ends: a second vtprune writing there gets
    a one-line error naming this run (or waits, with --wait)."""
    from .io import OutputLock

    lock = OutputLock(path, option=option, is_dir=is_dir, wait=wait, note=lambda text: status.print(f"note: {text}"))
    lock.acquire()
    _current_context().call_on_close(lock.release)
    return lock


def _current_context():
    """The running command's click context (its close callbacks run when the command ends)."""
    from typer._click.globals import get_current_context

    return get_current_context()


WAIT_HELP = "if another vtprune run is writing the same output, wait for it to finish instead of stopping"


def _check_threads(threads: int | None) -> None:
    """--threads within 1 .. the machine's CPUs (torch starts that many threads; far more crash it)."""
    if threads is None:
        return
    limit = os.cpu_count() or 1
    if not 1 <= threads <= limit:
        raise UsageError(f"--threads {threads}: give 1 to {limit} (this machine's CPUs)")


def _check_text(text: str, option: str) -> None:
    """Refuse text that is not valid UTF-8 (bytes the shell passed through undecoded)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(
            f"{option}: not valid UTF-8 text (undecodable byte at character {error.start}): give the text in UTF-8"
        ) from None


def _check_generation_length(info, max_new_tokens: int) -> None:
    """--max-new-tokens within the model's positions (checked against its config before the weights load)."""
    from .apps.loading import max_positions

    limit = max_positions(info.config)
    if limit is not None and max_new_tokens >= limit:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens}: the model has {limit} positions in all (prompt included); give fewer"
        )


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=1))


def _stages(press, num_layers: int) -> list[dict]:
    return [{"layer": s.layer, "keep": s.keep, "score_layer": s.score_layer} for s in press.validate(num_layers)]


# --- commands --------------------------------------------------------------------------------------------------
@app.command()
def run(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, 'testbed' or 'testbed-lm'"),
    image: Path = typer.Option(..., "--image", exists=True, help="image file"),
    prompt: str = typer.Option(..., "--prompt", help="question about the image"),
    method: str = typer.Option("fastv", "--method", help="pruning method (see `vtprune methods`)"),
    budget: str | None = typer.Option(
        None, "--budget", help="token budget as the papers label it: a count of 576 or a fraction (e.g. 0.25)"
    ),
    keep: str | None = typer.Option(
        None, "--keep", help="visual tokens kept per stage: a count or a fraction, or a list (192,64)"
    ),
    layer: str | None = typer.Option(
        None, "--layer", help="layer(s) before which tokens are pruned (default: the method's)"
    ),
    positions: str | None = typer.Option(None, "--positions", help="original or compact (default: the method's)"),
    no_debias: bool = typer.Option(False, "--no-debias", help="rank by raw attention scores"),
    profile: str | None = typer.Option(
        None,
        "--profile",
        help="positional profile: built-in name (see `vtprune profiles`), JSON path, 'auto' or 'none'",
    ),
    seed: int | None = typer.Option(None, "--seed", help="seed of the random method"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="answer length limit (>= 1)"),
    repeats: int = typer.Option(5, "--repeats", help="timed prefills of each (unpruned, pruned), after a warm-up"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU; the testbed: fp32), float32, bfloat16, float16"
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads of torch (default: torch's; 1 is fastest for small models on a busy CPU)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Answer a question about an image unpruned and pruned: answers, tokens, prefill times and the speed-up."""
    _positive(max_new_tokens, "--max-new-tokens")
    _positive(repeats, "--repeats")
    _check_threads(threads)
    _check_text(prompt, "--prompt")
    _check_seed(seed)
    if not prompt.strip():
        raise UsageError("--prompt is empty: ask a question about the image")
    if "<image>" in prompt:
        raise UsageError("--prompt contains the image placeholder <image>: vtprune adds it; give only the question")
    options = {
        "budget": budget_option(budget),
        "keep": number_option(keep, "--keep"),
        "layer": layer_option(layer),
        "positions": positions,
        "seed": seed,
    }
    press = make_press(method, **options)
    _check_profile_choice(press, profile, no_debias)
    debias_wanted = not no_debias and press.query is not None
    debias = _debias(profile) if debias_wanted and profile is not None else None  # a bad --profile fails here
    picture = _open_image(image)
    _check_runtime(device, dtype)
    info = _inspect_model(model_path, press)
    _check_generation_length(info, max_new_tokens)
    if debias_wanted and debias is None:  # the model's built-in profile, else padding debiasing only
        debias = _debias(default_profile(info.config, press.name))
    if debias is not None:
        press = make_press(method, debias=debias, **options)

    import torch

    from .apps.runner import compare_one

    if threads is not None:
        torch.set_num_threads(threads)
    model, processor = _load(info, device, dtype)
    result = compare_one(model, processor, picture, prompt, press, repeats=repeats, max_new_tokens=max_new_tokens)
    selection = result.pruned.selection
    first, final = selection[0], selection[-1]
    visual, kept = first.num_visual[0], len(final.kept[0]) + final.extra[0]
    notes = [note for stage in selection for note in stage.notes]
    stages = _stages(press, info.num_layers)
    if as_json:
        _print_json(
            {
                "model": info.name,
                "method": press.name,
                "stages": stages,
                "positions": press.positions,
                "debias": None if debias is None else debias.describe(),
                "image": str(image),
                "image_size": list(picture.size),
                "prompt": prompt,
                "device": device,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "warmup_ms": {"unpruned": result.warmup_ms[0], "pruned": result.warmup_ms[1]},
                "unpruned": {
                    "answer": result.unpruned.text,
                    "prefill_ms": result.unpruned_median,
                    "prefill_ms_runs": result.unpruned_ms,
                    "visual_tokens": visual,
                    "sequence_tokens": result.sequence_tokens[0],
                },
                "pruned": {
                    "answer": result.pruned.text,
                    "prefill_ms": result.pruned_median,
                    "prefill_ms_runs": result.pruned_ms,
                    "visual_tokens": kept,
                    "sequence_tokens": result.sequence_tokens[1],
                    "kept": [int(i) for i in final.kept[0].tolist()],
                },
                "speedup": result.speedup,
                "notes": notes,
            }
        )
        return
    layers = ", ".join(str(s["layer"]) for s in stages)
    table = Table(title=f"{info.name}: {type(press).__name__} (layers {layers}, positions {press.positions})")
    for column in ("run", "answer", "visual tokens", "sequence tokens", "prefill ms"):
        table.add_column(column, justify="right" if column.endswith(("tokens", "ms")) else "left")
    table.add_row(
        "unpruned", result.unpruned.text, str(visual), str(result.sequence_tokens[0]), f"{result.unpruned_median:.1f}"
    )
    table.add_row(
        press.name,
        result.pruned.text,
        f"{visual} -> {kept}",
        f"{result.sequence_tokens[0]} -> {result.sequence_tokens[1]}",
        f"{result.pruned_median:.1f}",
    )
    console.print(table)
    console.print(
        f"prefill speed-up {result.speedup:.2f}x (median of {repeats} interleaved runs each, after a warm-up whose "
        f"first, cold forward took {result.warmup_ms[0]:.0f} ms)"
    )
    console.print(f"debias: {'off' if debias is None else debias.describe()}")
    for note in notes:
        console.print(f"note: {note}")


@app.command()
def demo(
    model_name: str = typer.Option(
        "testbed-lm", "--model", help="'testbed-lm' (SmolLM2-135M inside: the bias is real) or 'testbed'"
    ),
    keep: str = typer.Option(
        "0.25", "--keep", help="visual tokens FastV keeps: a fraction (0.25 = 36 of 144) or a count"
    ),
    questions: int = typer.Option(
        48, "--questions", help="held-out test questions answered (the first N of the test split)"
    ),
    count: int = typer.Option(4, "--count", help="pictures of questions whose FastV answers differ (1-20)"),
    out_dir: Path = typer.Option(Path("vtprune-demo"), "--out-dir", help="where the PNGs go"),
    profile: str | None = typer.Option(
        None, "--profile", help="positional profile (default: the model's calibrated one)"
    ),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """What debiasing changes, offline, in about a minute on a CPU: a shipped model answers held-out questions
    unpruned, with FastV and with debiased FastV; prints each accuracy with its 95% interval and the paired
    difference, and draws the first questions whose two FastV answers differ (see vtprune.apps.demo)."""
    amount = budget_option(keep, "--keep")
    if model_name not in ("testbed-lm", "testbed"):
        raise UsageError(
            f"--model {model_name}: the demo runs 'testbed-lm' or 'testbed' (`vtprune run` takes any model)"
        )
    if questions < 1:
        raise UsageError(f"--questions {questions}: answer at least one question")
    if not 1 <= count <= 20:
        raise UsageError(f"--count {count}: give 1 to 20 pictures")
    _check_output_dir(out_dir, "--out-dir")
    if profile is not None:
        _debias(profile)
    make_press("fastv", keep=amount)
    if model_name == "testbed-lm":
        from .testbed.lm import availability_problem

        problem = availability_problem()
        if problem:
            raise UsageError(f"{problem} (or run `vtprune demo --model testbed`)")
    _lock_output(out_dir, "--out-dir", wait=wait)
    import torch

    from .apps.demo import run_demo, summary_lines
    from .apps.loading import load_model

    torch.set_num_threads(min(4, torch.get_num_threads()))
    model, processor = load_model(model_name)
    profile = profile or default_profile(model.config, "fastv") or "auto"
    result = run_demo(
        model,
        processor,
        model_name=model_name,
        keep=amount,
        profile=profile,
        questions=questions,
        pictures=count,
        out_dir=out_dir,
        progress=lambda name: status.print(f"answering: {name}"),
    )
    for line in summary_lines(result):
        console.print(line, highlight=False)
    console.print(
        f"debias = padding + positional profile {profile}; pictures: the first differing questions in "
        "test order, alternately fixed and broken by debiasing",
        highlight=False,
    )
    for picture in result.pictures:
        answers = ", ".join(f"{name} '{text}'" for name, text in picture.answers.items())
        console.print(
            f"  question {picture.number}: {picture.question} (answer {picture.truth}): {answers} -> {picture.path}",
            highlight=False,
        )


@app.command()
def methods() -> None:
    """List the pruning methods (the registry every command uses) with their defaults."""
    from rich import box

    from .core.press import REFERENCE_LAYERS, REFERENCE_TOKENS
    from .methods import METHODS

    table = Table(
        title="pruning methods (defaults for LLaVA-1.5-7B: 32 layers, 576 visual tokens)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    table.add_column("--method", no_wrap=True)
    table.add_column("class and defaults; what it ranks by")
    for name, cls in METHODS.items():
        press = cls()
        stages = ", ".join(
            f"{s.layer}: {round(s.keep * REFERENCE_TOKENS) if isinstance(s.keep, float) else s.keep}"
            for s in press.stages(REFERENCE_LAYERS)
        )
        debias = "debiasable" if cls.query else "no attention, nothing to debias"
        table.add_row(
            name,
            f"[bold]{cls.__name__}[/bold]; stages (before layer: kept) {stages}; positions "
            f"{press.positions}; {debias}\n[dim]{cls.summary}[/dim]",
            end_section=True,
        )
    console.print(table)


def _profile_groups():
    """Built-in profiles grouped by (model, method): [(model, method label, registry name or None, default
    profile name, [profiles])], in name order."""
    from .debias.profiles import builtin_aliases, builtin_profiles
    from .methods import METHODS

    by_profile_name = {(cls.profile_name or name): name for name, cls in METHODS.items()} | {
        name: name for name in METHODS
    }
    aliases = builtin_aliases()
    groups: dict[tuple[str, str], list] = {}
    for p in builtin_profiles():
        model, method = p.name.split("/")[:2] if p.name.count("/") >= 1 else ("", p.name)
        groups.setdefault((model, method), []).append(p)
    out = []
    for (model, method), members in groups.items():
        base = f"{model}/{method}"
        default = base if base in aliases or any(p.name == base for p in members) else members[0].name
        out.append((model, method, by_profile_name.get(method), default, members))
    return out


@app.command()
def profiles(
    show_all: bool = typer.Option(
        False, "--all", help="list every profile (one per benchmark), also those of methods vtprune does not ship"
    ),
    method: str | None = typer.Option(None, "--method", help="only this method's profiles (a `vtprune methods` name)"),
    as_json: bool = typer.Option(False, "--json", help="print every profile as JSON"),
) -> None:
    """List the built-in positional debiasing profiles: by default one line per model and method (its default
    profile and how many per-benchmark ones exist); --all lists them all."""
    from .debias.profiles import builtin_aliases
    from .methods import METHODS

    if method is not None and method not in METHODS:
        raise UsageError(f"--method {method!r}: unknown method; choose from {', '.join(METHODS)}")
    groups = [g for g in _profile_groups() if method is None or g[2] == method]
    if as_json:
        aliases = builtin_aliases()
        _print_json(
            [
                {
                    "name": p.name,
                    "aliases": sorted(a for a, target in aliases.items() if target == p.name),
                    "model": model,
                    "method": registry,
                    "kind": p.kind,
                    "length": p.length,
                    "sigma": p.sigma,
                    "mu": p.mu,
                    "layer": p.layer,
                    "query": p.query,
                    "source": p.source,
                    "default": p.name == default or aliases.get(default) == p.name,
                }
                for model, _, registry, default, members in groups
                for p in members
            ]
        )
        return
    from rich import box

    shipped = [g for g in groups if g[2] is not None]
    other = [g for g in groups if g[2] is None]
    if not show_all:
        table = Table(
            title="built-in positional profiles (--all lists the per-benchmark ones)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for column in ("model", "--method", "default profile", "sigma", "benchmarks"):
            table.add_column(column, no_wrap=True, justify="right" if column in ("sigma", "benchmarks") else "left")
        for model, _, registry, default, members in shipped:
            chosen = next((p for p in members if p.name == builtin_aliases().get(default, default)), members[0])
            sigma = f"{chosen.sigma:+.3f}" if chosen.kind == "exp" else "curve"
            table.add_row(model, registry, default, sigma, str(len(members) - 1) if len(members) > 1 else "")
        console.print(table)
        if other:
            count = sum(len(g[4]) for g in other)
            names = ", ".join(sorted({g[1] for g in other}))
            console.print(
                f"Also built in: {count} profiles of methods vtprune does not ship yet ({names}); --all lists them."
            )
        console.print(
            "Pass a name to --profile (run, analyze) or to Debias(profile=...). Sources: arXiv 2508.17807 "
            "(llava-1.5-7b), `vtprune calibrate` (testbed)."
        )
        return
    for model, label, registry, default, members in shipped + other:
        first = members[0]
        what = f"--method {registry}" if registry else "not a vtprune method yet"
        console.print(
            f"[bold]{model}/{label}[/bold]: {what}; default {default}; scores of layer {first.layer}, "
            f"query {first.query}"
        )
        table = Table(box=box.SIMPLE_HEAD)
        for column in ("name", "kind", "L", "sigma"):
            table.add_column(column, no_wrap=True, justify="right" if column in ("L", "sigma") else "left")
        for p in members:
            table.add_row(p.name, p.kind, str(p.length), "" if p.kind == "curve" else f"{p.sigma:+.3f}")
        console.print(table)


def _progress(label: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=status,
    )


SPLITS = ("train", "val", "test")


def _load_data(data: str, images: Path | None, samples: int, split: str):
    from .apps.datasets import load_examples

    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: use {', '.join(SPLITS)} (for --data testbed)")
    if data != "testbed" and images is not None and not images.is_dir():
        raise UsageError(
            f"--images {images} is not a directory: give the folder the jsonl's image paths are relative to"
        )
    try:
        with warnings.catch_warnings():  # reported below, once
            warnings.simplefilter("ignore", UserWarning)
            examples, report = load_examples(data, images, samples, split=split)
    except ValueError as error:
        raise UsageError(f"--data: {error}") from None
    if report.unreadable:
        status.print(
            f"[yellow]skipped {len(report.unreadable)} unreadable image(s)[/yellow], e.g. {report.unreadable[0][0]}"
        )
    return examples


DATA_HELP = "calibration data: a LLaVA-style jsonl ({'image': path, 'text': question} per line) or 'testbed'"


@app.command()
def calibrate(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, 'testbed' or 'testbed-lm'"),
    method: str = typer.Option("fastv", "--method", help="attention-based method whose scores are calibrated"),
    layer: str | None = typer.Option(
        None, "--layer", help="the method's pruning layer(s) (default: the method's); its first stage is calibrated"
    ),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    images: Path | None = typer.Option(None, "--images", help="folder the jsonl's image paths are relative to"),
    samples: int = typer.Option(256, "--samples", help="examples to use (the first N)"),
    split: str = typer.Option("val", "--split", help="testbed split for --data testbed"),
    out: Path = typer.Option(..., "--out", help="profile JSON to write"),
    curve: bool = typer.Option(
        False, "--curve", help="store a smoothed per-position curve (used instead of the exp fit)"
    ),
    name: str | None = typer.Option(None, "--name", help="profile name (default MODEL/METHOD/calibrated)"),
    no_padding: bool = typer.Option(False, "--no-padding", help="do not exclude padding tokens from the fit"),
    force: bool = typer.Option(False, "--force", help="recompute even if OUT already holds this calibration"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Fit the positional trend f(x)=mu*exp(sigma*x) of a method's scores on data; write a profile JSON.

    Progress is saved beside OUT (OUT.partial.json): rerunning the same command resumes (and says so); if OUT
    already holds the same calibration it is reused, not recomputed (--force recomputes)."""
    from .apps.calibration import calibrate as run_calibration
    from .apps.calibration import calibration_settings, read_progress, reusable
    from .debias.profiles import load_profile

    _positive(samples, "--samples")
    _positive(batch_size, "--batch-size")
    press = make_press(method, layer=layer_option(layer))
    if press.query is None:
        raise UsageError(
            f"--method {method}: it ranks without attention, so there is nothing to calibrate; pick an attention method (`vtprune methods`)"
        )
    if name is not None:
        _check_text(name, "--name")
    _check_output_file(out, "--out")
    examples = _load_data(data, images, samples, split)
    _check_runtime(device, dtype)
    info = _inspect_model(model_path, press)
    _lock_output(out, "--out", wait=wait, is_dir=False)
    model, processor = _load(info, device, dtype)
    state = out.with_name(out.name + ".partial.json")
    settings = calibration_settings(model, examples, press, padding=not no_padding)
    result, previous, outcome = None, None, "computed"
    if out.is_file() and not force:
        try:
            previous = load_profile(out)
        except (TypeError, ValueError):
            previous = None
        if previous is not None and reusable(previous, settings, curve=curve, name=name):
            outcome = "reused"
            status.print(
                f"reused: {out} already holds this calibration (same model, data, method, layer and "
                "settings); nothing recomputed (--force recomputes)"
            )
    if outcome != "reused":
        done, problem = read_progress(state, settings)
        if done:
            status.print(f"resuming: {len(done)} of {len(examples)} samples were done in an earlier run ({state})")
        elif problem:
            status.print(f"not resuming: {state} {problem}; starting over")
        try:
            with _progress("calibrate") as bar:
                task = bar.add_task("calibrate", total=len(examples))
                result = run_calibration(
                    model,
                    processor,
                    examples,
                    press,
                    batch_size=batch_size,
                    curve=curve,
                    padding=not no_padding,
                    name=name,
                    method=method,
                    state_path=state,
                    progress=lambda n: bar.advance(task, n),
                    model_name=info.name,
                )
        except KeyboardInterrupt:
            if state.is_file():
                status.print(f"interrupted: progress is saved in {state}; rerun the same command to resume")
            raise
        outcome = "resumed" if result.resumed else "computed"
        result.profile.save(out)  # atomically
        state.unlink(missing_ok=True)
    profile = result.profile if result is not None else previous
    extra = profile.extra
    fit = {"mu": profile.mu, "sigma": profile.sigma, "r2": extra.get("r2")}
    if as_json:
        _print_json(
            {
                "outcome": outcome,
                "resumed_samples": result.resumed if result is not None else None,
                "out": str(out),
                "profile": profile.name,
                "model": profile.model,
                "method": profile.method,
                "layer": profile.layer,
                "query": profile.query,
                "kind": profile.kind,
                "length": profile.length,
                "samples": extra.get("samples"),
                "fit": fit,
            }
        )
        return
    residuals = extra.get("residuals") or [0.0]
    table = Table(title=f"calibrated profile {profile.name} ({outcome})", show_header=False)
    for key, value in (
        ("method / layer / query", f"{profile.method} / {profile.layer} / {profile.query}"),
        ("samples", str(extra.get("samples"))),
        ("visual tokens per image (L)", str(profile.length)),
        ("fit", f"mu={profile.mu:.4g}  sigma={profile.sigma:+.4f}  R^2={extra.get('r2', float('nan')):.3f}"),
        ("residual RMS", f"{math.sqrt(sum(r * r for r in residuals) / len(residuals)):.4f}"),
        ("kind", profile.kind),
        ("written" if outcome != "reused" else "file", str(out)),
    ):
        table.add_row(key, value)
    console.print(table)


@app.command()
def analyze(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, 'testbed' or 'testbed-lm'"),
    method: str = typer.Option("fastv", "--method"),
    layer: str | None = typer.Option(None, "--layer", help="pruning layer(s) (default: the method's)"),
    budget: str | None = typer.Option(
        None, "--budget", help="token budget (count of 576 or fraction); default 0.25 unless --keep"
    ),
    keep: str | None = typer.Option(
        None, "--keep", help="visual tokens kept per stage: a count or a fraction, or a list"
    ),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    images: Path | None = typer.Option(None, "--images"),
    samples: int = typer.Option(256, "--samples"),
    split: str = typer.Option("val", "--split"),
    profile: str = typer.Option(
        "auto", "--profile", help="positional debiasing: built-in name, JSON path, 'auto' or 'none'"
    ),
    no_padding: bool = typer.Option(False, "--no-padding", help="turn padding debiasing off"),
    out_dir: Path = typer.Option(Path("analysis"), "--out-dir", help="where report.json and the PNGs go"),
    example: int = typer.Option(0, "--example", help="index of the example drawn in selection.png"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="print report.json to stdout too"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Measure a method's positional and padding bias before/after debiasing; write report.json and plots."""
    _positive(samples, "--samples")
    _positive(batch_size, "--batch-size")
    if make_press(method).query is None:
        raise UsageError(
            f"--method {method}: it uses no attention scores, so there is nothing to analyse; pick an attention method"
        )
    debias = _debias(profile, padding=not no_padding)
    keep_value = number_option(keep, "--keep")
    budget_value = budget_option(budget) if budget is not None else (0.25 if keep_value is None else None)
    press = make_press(method, debias=debias, layer=layer_option(layer), keep=keep_value, budget=budget_value)
    _check_output_dir(out_dir, "--out-dir")
    examples = _load_data(data, images, samples, split)
    if not 0 <= example < len(examples):
        raise UsageError(f"--example {example} is outside the {len(examples)} examples (0..{len(examples) - 1})")
    _check_runtime(device, dtype)
    info = _inspect_model(model_path, press)
    _lock_output(out_dir, "--out-dir", wait=wait)

    from .adapters import adapter_for
    from .apps.analysis import bias_report
    from .apps.plots import plot_keep_frequency, plot_score_heatmap, plot_score_vs_position, plot_selection

    model, processor = _load(info, device, dtype)
    records = _analyze_records(model, processor, examples, press, batch_size, out_dir / "report.partial.json")
    report = bias_report(records)
    stages = _stages(press, info.num_layers)
    from . import __version__

    settings = {
        "model": info.name,
        "method": press.name,
        "layers": [s["layer"] for s in stages],
        "keep": [s["keep"] for s in stages],
        "budget": budget_value,
        "keep_option": keep_value,
        "positions": press.positions,
        "profile": debias.describe(),
        "profile_name": None
        if debias.profile is None
        else (debias.profile if debias.loaded_profile is None else debias.loaded_profile.name),
        "padding": not no_padding,
        "data": data,
        "split": split if data == "testbed" else None,
        "samples": len(examples),
        "device": device,
        "dtype": dtype,
        "vtprune_version": __version__,
    }
    data_out = {"settings": settings, **report.to_dict()}
    from .io import atomic_write_json

    atomic_write_json(out_dir / "report.json", data_out)
    first = stages[0]
    amount = f"budget {budget_value:g}" if budget_value is not None else f"keep {keep}"
    label = f"{method}, first stage at layer {first['layer']}, {amount}, {debias.describe()}, {len(examples)} samples"
    plot_score_vs_position(
        report.curves, report.fits, out_dir / "score_vs_position.png", f"Mean score vs position ({label})"
    )
    plot_score_heatmap(report.curves["score_before"], out_dir / "score_heatmap.png", "Mean raw score per patch")
    plot_keep_frequency(
        report.curves["freq_before"],
        report.curves.get("freq_after"),
        out_dir / "keep_frequency.png",
        f"Keep frequency ({label})",
    )
    record = records[example]
    segment = record.segments[0]
    part = slice(segment.offset, segment.offset + segment.length)
    inside = lambda kept: kept[(kept >= segment.offset) & (kept < segment.offset + segment.length)] - segment.offset  # noqa: E731
    plot_selection(
        examples[example].image,
        adapter_for(model).image_geometry(processor),
        segment.grid,
        [("raw scores (no debiasing)", inside(record.kept_raw)), ("debiased", inside(record.kept))],
        None if record.padding is None else record.padding[part],
        out_dir / "selection.png",
        f"{examples[example].question}",
    )
    if as_json:
        _print_json(data_out)
        return
    table = Table(title=f"bias of {label}")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {out_dir / 'report.json'} and 4 plots in {out_dir}")


def _analyze_records(model, processor, examples, press, batch_size: int, state: Path) -> list:
    """The first-stage records of `examples` (dry run), saved to `state` every few batches so that an
    interrupted analysis resumes (and says so); `state` is removed at the end."""
    from .apps.calibration import data_fingerprint, model_fingerprint, read_saved_records
    from .apps.runner import record_from_json, record_to_json, run_examples
    from .io import atomic_write_json

    key = {"model": model_fingerprint(model), "data": data_fingerprint(examples), "press": repr(press)}
    records, problem = read_saved_records(state, "key", key, record_from_json, "of another analysis")
    records = records[: len(examples)]
    if records:
        status.print(f"resuming: {len(records)} of {len(examples)} examples were done in an earlier run ({state})")
    elif problem:
        status.print(f"not resuming: {state} {problem}; starting over")
    chunk = 8 * batch_size
    try:
        with _progress("analyze") as bar:
            task = bar.add_task("analyze", total=len(examples), completed=len(records))
            for start in range(len(records), len(examples), chunk):
                records += run_examples(
                    model,
                    processor,
                    examples[start : start + chunk],
                    press,
                    generate=False,
                    batch_size=batch_size,
                    dry_run=True,
                    progress=lambda n: bar.advance(task, n),
                ).records
                if len(records) < len(examples):
                    atomic_write_json(state, {"key": key, "records": [record_to_json(r) for r in records]}, indent=None)
    except KeyboardInterrupt:
        if state.is_file():
            status.print(f"interrupted: progress is saved in {state}; rerun the same command to resume")
        raise
    state.unlink(missing_ok=True)
    return records


def _list_option(text: str, option: str) -> list[str]:
    """A comma-separated list of names (`fastv,pdrop`), each non-empty, duplicates dropped."""
    parts = [part.strip() for part in str(text).split(",")]
    if not parts or any(not part for part in parts):
        raise UsageError(f"{option} {text!r}: give one or more names separated by commas")
    return list(dict.fromkeys(parts))


def _budgets_option(text: str) -> list:
    """`--budgets 192,128,64`: counts of LLaVA-1.5-7B's 576 visual tokens or fractions."""
    parts = [part.strip() for part in str(text).split(",")]
    if any(not part for part in parts):
        raise UsageError(f"--budgets {text!r}: give budgets separated by commas ({AMOUNT_FORMS} each)")
    return list(dict.fromkeys(budget_option(part, "--budgets") for part in parts))


@app.command("eval")
def eval_command(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, 'testbed' or 'testbed-lm'"),
    data: str = typer.Option(..., "--data", help="a LLaVA-style jsonl with an answer per line, or 'testbed'"),
    images: Path | None = typer.Option(
        None, "--images", help="folder the jsonl's image paths are relative to (default: the jsonl's)"
    ),
    samples: int | None = typer.Option(None, "--samples", help="the first N questions (default: all; testbed: 100)"),
    split: str = typer.Option("test", "--split", help="testbed split for --data testbed"),
    methods: str = typer.Option("fastv", "--methods", help="comma-separated methods (`vtprune methods`)"),
    budgets: str = typer.Option(
        "128", "--budgets", help="comma-separated budgets: counts of 576 (192,128,64) or fractions"
    ),
    debias: str = typer.Option("none,both", "--debias", help="comma-separated: none, positional, padding, both"),
    profile: str = typer.Option(
        "default",
        "--profile",
        help="positional profile: 'default' (the model's built-in one per method, else auto), a name, a JSON path or 'auto'",
    ),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="answer length limit (>= 1)"),
    batch_size: int = typer.Option(1, "--batch-size", help="questions per generate() call (timings are per call)"),
    pad_to_square: bool | None = typer.Option(
        None,
        "--pad-to-square/--no-pad-to-square",
        help="pad images to a square (LLaVA-1.5's own preprocessing) or not; default: the processor as it is",
    ),
    out_dir: Path = typer.Option(
        Path("vtprune-eval"), "--out", help="folder for results.json, results.csv and the saved cells"
    ),
    force: bool = typer.Option(False, "--force", help="measure every setting again instead of reusing saved cells"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps"),
    dtype: str = typer.Option("auto", "--dtype"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads of torch"),
    as_json: bool = typer.Option(False, "--json", help="print results.json to stdout"),
    processes: int = typer.Option(
        1,
        "--processes",
        help="answer the questions in N processes, one model replica each (CPU: threads divided; cuda: one GPU each); under `accelerate launch`/`torchrun` each rank answers its share",
    ),
) -> None:
    """Accuracy, speed and memory of every method x budget x debias setting on your own questions.

    Prints a table (accuracy with its 95% Wilson interval, the paired difference of debiased to plain at the
    same method and budget, visual tokens, prefill ms, decode ms per token, peak memory) and writes
    OUT/results.json and OUT/results.csv. Finished settings are saved in OUT/cells.json: rerunning resumes."""
    from .apps.evaluation import build_grid

    _positive(max_new_tokens, "--max-new-tokens")
    _positive(batch_size, "--batch-size")
    _positive(processes, "--processes")
    if samples is not None:
        _positive(samples, "--samples")
    _check_threads(threads)
    method_names = _list_option(methods, "--methods")
    for name in method_names:
        make_press(name)  # unknown methods are usage errors
    budget_values = _budgets_option(budgets)
    modes = _list_option(debias, "--debias")
    if profile != "default" and profile not in ("none",):
        _debias(profile)  # a bad --profile fails here
    if profile == "none" and any(m in ("positional", "both") for m in modes):
        raise UsageError("--profile none contradicts --debias positional/both: drop one")
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: use {', '.join(SPLITS)} (for --data testbed)")
    if data != "testbed" and images is not None and not images.is_dir():
        raise UsageError(
            f"--images {images} is not a directory: give the folder the jsonl's image paths are relative to"
        )
    _check_output_dir(out_dir, "--out")
    _check_runtime(device, dtype)
    info = _inspect_model(model_path)
    _check_generation_length(info, max_new_tokens)
    resolved: dict[str, str] = {}

    def profile_for(name: str) -> str:
        if profile != "default":
            return profile
        if name not in resolved:
            resolved[name] = default_profile(info.config, name) or "auto"
        return resolved[name]

    try:
        settings, notes = build_grid(method_names, budget_values, modes, profile_for)
        for setting in settings:
            press = setting.press()
            if press is not None:
                press.validate(info.num_layers)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    questions = _load_questions(data, images, samples, split)
    from .apps import sharding

    if (sharding.launched() or (0, 1))[0] == 0:  # under a launcher, rank 0 holds --out for every rank
        _lock_output(out_dir, "--out", wait=wait)

    import torch

    from .apps.evaluation import TABLE_COLUMNS, markdown_table, run_grid, table_rows, write_results

    sharded = processes > 1 or sharding.launched() is not None
    if processes > len(questions):
        raise UsageError(f"--processes {processes} is more than the {len(questions)} questions")
    if threads is not None:
        torch.set_num_threads(threads)
    if not sharded:
        model, processor = _load(info, device, dtype)
        if pad_to_square is not None:
            from .apps.loading import set_pad_to_square

            set_pad_to_square(processor, pad_to_square)
    for name, chosen in resolved.items():
        if chosen == "auto":
            notes.append(
                f"{name}: no built-in profile for this model, positional debiasing uses 'auto' (calibration-free)"
            )
    for note in notes:
        status.print(f"note: {note}")
    state = out_dir / "cells.json"
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        with _progress("eval") as bar:
            task = bar.add_task("eval", total=len(settings) * len(questions))
            if sharded:
                cells, dtype_name = sharding.run_grid_sharded(
                    info.spec,
                    questions,
                    settings,
                    processes=processes,
                    device=device,
                    dtype=dtype,
                    pad_to_square=pad_to_square,
                    threads=threads,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    state_dir=out_dir,
                    force=force,
                    progress=lambda n: bar.advance(task, n),
                    log=lambda text: status.print(text),
                )
                if cells is None:
                    return  # a rank other than 0 under a launcher: rank 0 writes the results
            else:
                cells = run_grid(
                    model,
                    processor,
                    questions,
                    settings,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    state_path=state,
                    force=force,
                    progress=lambda n: bar.advance(task, n),
                    log=lambda text: status.print(text),
                )
                dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    except KeyboardInterrupt:
        if state.is_file():
            status.print(f"interrupted: finished settings are saved in {state}; rerun the same command to resume")
        raise
    from . import __version__

    meta = {
        "model": info.name,
        "data": data,
        "images": None if images is None else str(images),
        "split": split if data == "testbed" else None,
        "questions": len(questions),
        "kinds": {kind: sum(q.kind == kind for q in questions) for kind in ("exact", "choice")},
        "methods": method_names,
        "budgets": budget_values,
        "debias": modes,
        "profile": profile,
        "profiles": {s.key: s.profile for s in settings if s.profile},
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "pad_to_square": pad_to_square,
        "device": device,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "processes": sharding.launched()[1] if sharding.launched() else processes,
        "notes": notes,
        "vtprune_version": __version__,
        "load_average": None if load_before is None else [load_before, os.getloadavg()[0]],
    }
    json_path, csv_path = write_results(out_dir, cells, meta)
    from .io import atomic_write_text

    atomic_write_text(out_dir / "results.md", markdown_table(cells) + "\n")
    if as_json:
        _print_json(json.loads(json_path.read_text()))
        return
    kinds = ", ".join(f"{n} {k}" for k, n in meta["kinds"].items() if n)
    from rich import box

    table = Table(
        title=f"{info.name} on {data}: {len(questions)} questions ({kinds}), {meta['dtype']} on {device}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in table_rows(cells):
        table.add_row(*row)
    console.print(table)
    memory = cells[0].memory_kind if cells else ""
    console.print(
        f"accuracy: exact match after normalisation / option letter; prefill and decode: medians per "
        f"request of {batch_size}; peak memory: {memory}"
    )
    if meta["load_average"] is not None and device == "cpu":
        console.print(
            f"machine load average {meta['load_average'][0]:.1f} at the start, {meta['load_average'][1]:.1f} "
            f"at the end ({os.cpu_count()} CPUs): CPU timings are only comparable at a low, steady load"
        )
    console.print(f"wrote {json_path}, {csv_path} and {out_dir / 'results.md'}")


def _load_questions(data: str, images: Path | None, samples: int | None, split: str):
    from .apps.evaluation import load_questions

    try:
        return load_questions(data, images, samples, split=split)  # unreadable images: one warning line
    except ValueError as error:
        raise UsageError(f"--data: {error}") from None


@app.command()
def reproduce(
    name: str = typer.Argument(..., help="the paper table: paper-llava15 or paper-videollava"),
    budget: int | None = typer.Option(
        None,
        "--budget",
        help="visual tokens kept, of the model's (paper-llava15: of 576, default 128; paper-videollava: of 2048, default 512)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the lmms-eval command of every row, run nothing"),
    collect_only: bool = typer.Option(False, "--collect", help="only collect the results already in --out"),
    out_dir: Path = typer.Option(
        Path("vtprune-reproduce"), "--out", help="one folder per row, table.md and table.json"
    ),
    pretrained: str | None = typer.Option(
        None,
        "--pretrained",
        help="the checkpoint (default: the table's, llava-hf/llava-1.5-7b-hf or LanguageBind/Video-LLaVA-7B-hf)",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="paper-videollava: Video-LLaVA's evaluation data folder (GPT_Zero_Shot_QA), built into OUT/tasks",
    ),
    methods: str | None = typer.Option(None, "--methods", help="only these methods' rows (and the full model)"),
    limit: int | None = typer.Option(
        None,
        "--limit",
        help="lmms-eval --limit: the first N questions per task (a smoke test, not the paper's numbers)",
    ),
    launcher: str = typer.Option(
        "python -m lmms_eval",
        "--launcher",
        help="how to start lmms-eval, e.g. 'accelerate launch --num_processes 8 -m lmms_eval'",
    ),
    force: bool = typer.Option(False, "--force", help="rerun rows whose results are already there"),
) -> None:
    """The lmms-eval commands for every row of a paper table (--dry-run prints them), run one after the other,
    and the results collected into one table beside the published numbers (OUT/table.md, OUT/table.json)."""
    import shlex

    from .apps import reproduce as rep

    try:
        spec = rep.table(name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if spec.unavailable:
        published = "; ".join(f"{row.label} {row.published}" for row in spec.rows)
        raise UsageError(f"{name}: not runnable yet: {spec.unavailable}. Published averages: {published}")
    budget = spec.budget if budget is None else budget
    try:
        rep.check_budget(spec, budget)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if limit is not None:
        _positive(limit, "--limit")
    try:
        rows = rep.select_rows(spec, None if methods is None else _list_option(methods, "--methods"))
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        starter = rep.launcher_argv(launcher)
    except ValueError as error:
        raise UsageError(str(error)) from None
    commands = {
        row.slug: rep.command(spec, row, out_dir, budget=budget, pretrained=pretrained, limit=limit, launcher=starter)
        for row in rows
    }
    if dry_run:
        lines = [
            f"# {spec.title}",
            f"# budget {budget}; {len(rows)} rows x {len(spec.benchmarks)} benchmarks "
            f"({', '.join(b.task for b in spec.benchmarks)})",
        ]
        needs = [(b.task, b.needs) for b in spec.benchmarks if b.needs]
        lines += [f"# {task} needs {what}" for task, what in needs]
        lines += [f"# note: {note}" for note in spec.notes]
        build = rep.build_command(spec, out_dir, data)
        if build is not None:
            lines += ["", "# first: the video QA tasks, from Video-LLaVA's evaluation data", rep.shell(build)]
        for row in rows:
            published = (
                "" if row.published is None or budget != spec.budget else f" (published average {row.published})"
            )
            lines += ["", f"# {row.label}{published}", rep.shell(commands[row.slug])]
        lines += [
            "",
            f"# then: vtprune reproduce {name} --collect --out {shlex.quote(str(out_dir))}"
            + ("" if budget == spec.budget else f" --budget {budget}"),
        ]
        typer.echo("\n".join(lines))
        return
    _check_output_dir(out_dir, "--out")
    failed: list[str] = []
    if not collect_only:
        from importlib.util import find_spec

        if "lmms_eval" in launcher and find_spec("lmms_eval") is None:
            raise UsageError(
                "lmms-eval is not installed: pip install 'vtprune[eval]' (where a CUDA torch is installed), "
                "or print the commands with --dry-run"
            )
        try:
            rep.prepare(spec, out_dir, data)
        except ValueError as error:
            raise UsageError(str(error)) from None
        for row in rows:
            done = rep.collect(spec, [row], out_dir)[0]
            if done.done == len(spec.benchmarks) and not force:
                status.print(f"{row.label}: results already in {out_dir / row.slug} (--force reruns)")
                continue
            status.print(f"[bold]{row.label}[/bold]: {rep.shell(commands[row.slug])}")
            argv = commands[row.slug]
            argv = [sys.executable, *argv[1:]] if argv[0] in ("python", "python3") else argv  # this environment's
            log_path = out_dir / row.slug / "lmms_eval.log"
            code, output = rep.run_logged(argv, log_path)
            failure = rep.row_failure(spec, row, out_dir, code, output, log_path)
            if failure is not None:
                failed.append(f"{row.label}: {failure}")
                status.print(f"[red]row {row.label!r} failed[/red]: {failure}")
    results = rep.collect(spec, rows, out_dir, {slug: rep.shell(argv) for slug, argv in commands.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    text = rep.markdown(spec, results, budget)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "table.json").write_text(json.dumps(rep.to_json(spec, results, budget), indent=1))
    console.print(text)
    missing = [r.row.label for r in results if r.average is None]
    if missing:
        console.print(f"incomplete rows (no average yet): {', '.join(missing)}")
    console.print(f"wrote {out_dir / 'table.md'} and {out_dir / 'table.json'}")
    unreadable = [problem for r in results for problem in r.problems]
    for problem in unreadable:
        status.print(f"[red]error[/red]: {problem}")
    for failure in failed:
        status.print(f"[red]failed row[/red] {failure}")
    if failed or unreadable:
        raise typer.Exit(1)


def _mount_testbed() -> None:
    try:
        from .testbed.cli import testbed_app
    except ImportError:
        return
    app.add_typer(testbed_app, name="testbed", help="The small model trained and shipped by vtprune.")


_mount_testbed()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m vtprune.cli`
    main()
