"""Training and evaluation of the testbed LLaVA on the synthetic spatial VQA data (CPU friendly).

Training is seeded and resumable: ``work_dir/state.pt`` holds model, optimizer and step; the
training stream is indexed by step, so a resumed run sees exactly the samples it would have seen.
Whenever validation accuracy improves, the model and processor are written with ``save_pretrained``
to ``out`` (atomically, via a temporary directory), so an interrupted run still leaves a usable model.

``out`` is protected: it may not lie inside the installed package (the shipped checkpoint is never
overwritten), an existing directory is replaced only if it is a checkpoint, and an existing checkpoint only
by a model with a better validation accuracy (its accuracy is read from its ``training.json``, or measured
on the run's validation set) unless ``force``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from vtprune.testbed.data import (
    COLOURS,
    DESCRIBE_QUESTION,
    SHAPES,
    Sample,
    accuracy,
    describe,
    make_sample,
    make_split,
    object_map,
    prompt_for,
    scene_questions,
)
from vtprune.testbed.model import IMAGE_SIZE, PATCH_SIZE, build_model, build_processor

#: where `vtprune testbed train` writes by default: the current directory, never the installed package
DEFAULT_WORK_DIR = Path("runs/testbed")
DEFAULT_OUT = DEFAULT_WORK_DIR / "checkpoint"
METRICS_FILE = "training.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (stored in the work dir; a resumed run reuses them)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    eval_every: int = 200
    val_size: int = 300
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 192
    text_layers: int = 6
    heads: int = 4
    workers: int = 0
    extra_questions: int = 8
    caption: bool = True
    patch_size: int = 14
    aux_weight: float = 1.0  # weight of the training-only per-patch colour/shape loss (`AuxHeads`)
    log_every: int = 50


def encode_batch(
    processor,
    samples: Sequence[Sample],
    with_answer: bool = True,
    extra: Sequence[Sequence[tuple[str, str]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Processor inputs. With answers, ``labels`` cover only answer tokens and their EOS.

    The first turn is always ``prompt_for(question) + answer``; ``extra`` adds further
    (question, answer) turns about the same image (multi-turn, LLaVA-1.5 style) for training.
    """
    texts = []
    for i, s in enumerate(samples):
        text = prompt_for(s.question) + (f" {s.answer}</s>" if with_answer else "")
        for q, a in extra[i] if extra is not None else ():
            text += f"USER: {q} ASSISTANT: {a}</s>"
        texts.append(text)
    enc = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    if with_answer:
        ids = enc["input_ids"]
        tok = processor.tokenizer
        assistant, colon = tok.convert_tokens_to_ids("ASSISTANT"), tok.convert_tokens_to_ids(":")
        target = torch.zeros_like(ids, dtype=torch.bool)
        for r, row in enumerate(ids.tolist()):
            inside = False  # from after "ASSISTANT :" up to and including the next EOS
            for j in range(2, len(row)):
                if row[j - 2] == assistant and row[j - 1] == colon:
                    inside = True
                target[r, j] = inside
                if row[j] == tok.eos_token_id:
                    inside = False
        enc["labels"] = torch.where(target, ids, torch.full_like(ids, -100))
    return dict(enc)


def encode_packed(
    processor, samples: Sequence[Sample], branches: Sequence[Sequence[tuple[str, str]]]
) -> dict[str, torch.Tensor]:
    """Training inputs with several independent question/answer branches per image.

    Each row is one image: the shared prefix `<s> USER: <image>...` followed by branches
    `{question} ASSISTANT: {answer}</s>`. A 4-D attention mask lets every branch see the prefix and itself
    only, and its position ids continue from the prefix, so each branch is exactly the evaluation prompt
    (`prompt_for(question)`) plus its answer, and no branch can copy an answer from another. `labels` cover
    each branch's answer and EOS. Rows are right-padded (padding attends to itself, labels -100).
    """
    tok = processor.tokenizer
    prefix = processor(
        images=[s.image for s in samples], text=[prompt_for("{}").split("{}")[0]] * len(samples), return_tensors="pt"
    )
    assistant = tok.convert_tokens_to_ids("ASSISTANT")
    rows, label_rows, position_rows, branch_rows = [], [], [], []
    for b, sample_branches in enumerate(branches):
        head = prefix["input_ids"][b].tolist()
        ids, labels, positions, branch_of = list(head), [-100] * len(head), list(range(len(head))), [0] * len(head)
        for k, (question, answer) in enumerate(sample_branches, start=1):
            part = tok(f"{question} ASSISTANT: {answer}</s>", add_special_tokens=False)["input_ids"]
            start = part.index(assistant) + 2  # answer tokens follow "ASSISTANT :"
            ids += part
            labels += [-100] * start + part[start:]
            positions += list(range(len(head), len(head) + len(part)))
            branch_of += [k] * len(part)
        rows.append(ids)
        label_rows.append(labels)
        position_rows.append(positions)
        branch_rows.append(branch_of)
    return {
        "pixel_values": prefix["pixel_values"],
        **pack_branches(rows, label_rows, position_rows, branch_rows, tok.pad_token_id),
    }


def pack_branches(rows, label_rows, position_rows, branch_rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of packed training rows (per row: token ids, labels, position ids, and each token's
    branch: 0 the shared prefix, k branch k), with the 4-D mask that lets each branch see the prefix and itself
    only (padding attends to itself; its labels are -100)."""
    length, batch = max(len(r) for r in rows), len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    branch = torch.full((batch, length), -1, dtype=torch.long)  # -1: padding, 0: prefix, k: branch k
    for b, (ids, lab, pos, br) in enumerate(zip(rows, label_rows, position_rows, branch_rows)):
        n = len(ids)
        input_ids[b, :n], labels[b, :n], position_ids[b, :n], branch[b, :n] = map(torch.tensor, (ids, lab, pos, br))
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    padding_self = (branch[:, :, None] == -1) & (index[None, :, None] == index[None, None, :])
    mask = (causal & visible & (branch[:, None, :] >= 0)) | padding_self
    return {
        "input_ids": input_ids,
        "attention_mask": mask[:, None],  # (B, 1, N, N) bool, True = may attend
        "position_ids": position_ids,
        "labels": labels,
    }


def patch_targets(
    sample: Sample, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of the model input (row-major, (G*G,) each): the colour and the shape class (1..6, 0 for
    background) of the object covering most of the patch, when it covers at least a quarter of it.

    The object map goes through the processor's own steps (pad to square at the centre, resize), with
    nearest-neighbour resampling so labels stay labels."""
    objects = sample.meta["objects"]
    labels = object_map(sample)
    h, w = labels.shape
    side = max(w, h)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(Image.fromarray(labels), ((side - w) // 2, (side - h) // 2))
    grid = image_size // patch_size
    pixels = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.NEAREST), dtype=np.int64)
    counts = np.eye(len(objects) + 1, dtype=np.int32)[pixels]  # (S, S, 1 + objects) one-hot
    counts = counts.reshape(grid, patch_size, grid, patch_size, -1).sum(axis=(1, 3)).reshape(grid * grid, -1)
    best = counts[:, 1:].argmax(axis=1) if len(objects) else np.zeros(grid * grid, dtype=np.int64)
    covered = counts[np.arange(grid * grid), best + 1] * 4 >= patch_size * patch_size if len(objects) else best > 0
    colour_ids = np.array([0] + [1 + list(COLOURS).index(o["colour"]) for o in objects])
    shape_ids = np.array([0] + [1 + SHAPES.index(o["shape"]) for o in objects])
    label = np.where(covered, best + 1, 0)
    return colour_ids[label], shape_ids[label]


class AuxHeads(torch.nn.Module):
    """Training-only linear heads on the patch features the projector receives: colour and shape class per
    patch. They give the vision tower a direct signal early in training; they are never saved in the model."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)

    def loss(self, features: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """features (B, P, hidden); colour, shape (B, P) class ids."""
        ce = torch.nn.functional.cross_entropy
        return ce(self.colour(features).flatten(0, 1), colour.flatten()) + ce(
            self.shape(features).flatten(0, 1), shape.flatten()
        )


class _Stream(IterableDataset):
    """Encoded training batches for steps ``start, start+1, ...`` (sample index = step * bs + j): per image the
    main question, `extra` more questions about its scene and the caption, as independent branches
    (`encode_packed`), with the per-patch targets of the auxiliary heads."""

    def __init__(self, processor, batch_size: int, seed: int, start: int, stop: int, extra: int, caption: bool) -> None:
        self.processor, self.bs, self.seed, self.start, self.stop = processor, batch_size, seed, start, stop
        self.extra, self.caption = extra, caption

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for step in range(self.start, self.stop):
            samples = [make_sample("train", self.seed, step * self.bs + j) for j in range(self.bs)]
            rng = np.random.default_rng([self.seed, step, 7])
            branches = [
                [(s.question, s.answer)]
                + scene_questions(s, self.extra, rng)
                + ([(DESCRIBE_QUESTION, describe(s))] if self.caption else [])
                for s in samples
            ]
            batch = encode_packed(self.processor, samples, branches)
            targets = [patch_targets(s) for s in samples]
            batch["patch_colour"] = torch.from_numpy(np.stack([t[0] for t in targets]))
            batch["patch_shape"] = torch.from_numpy(np.stack([t[1] for t in targets]))
            yield batch


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def predict(model, processor, samples: Sequence[Sample], batch_size: int = 50) -> list[str]:
    """Greedy answers of the unpruned model (`vtprune.apps.runner.run_examples`, up to 3 new tokens)."""
    from vtprune.apps.runner import run_examples

    model.eval()
    return run_examples(model, processor, samples, None, max_new_tokens=3, batch_size=batch_size).answers


def text_prior_accuracy(train: Sequence[Sample], test: Sequence[Sample]) -> float:
    """Accuracy of the best image-free answerer: the most frequent training answer per question."""
    by_q: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        by_q[s.question][s.answer] += 1
    overall = Counter(s.answer for s in train).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_q.items()}
    return sum(guess.get(s.question, overall) == s.answer for s in test) / len(test)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a saved model (a config.json)."""
    return (Path(path) / "config.json").is_file()


def package_dir() -> Path:
    """The installed vtprune package (nothing may be written under it)."""
    return Path(__file__).resolve().parents[1]


def check_output(out: Path, name: str = "out") -> None:
    """Refuse an output inside the installed package, or an existing path that is not a checkpoint directory
    (it would be deleted to make room). ValueError saying what to pass instead."""
    package = package_dir()
    resolved = Path(out).expanduser().resolve()
    if resolved == package or package in resolved.parents:
        raise ValueError(
            f"{name} {out} lies inside the installed vtprune package ({package}), which is never written to: "
            f"train into a directory of your own (default {DEFAULT_OUT})"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} is a file: give a directory for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not is_checkpoint(out):
        raise ValueError(f"{name} {out} exists and is not a testbed checkpoint: choose a new or empty directory")


def check_work_dir(work_dir: Path) -> None:
    """Refuse a work dir inside the installed package, or one that is a file."""
    package = package_dir()
    resolved = Path(work_dir).expanduser().resolve()
    if resolved == package or package in resolved.parents:
        raise ValueError(
            f"work dir {work_dir} lies inside the installed vtprune package ({package}): use a directory of your own"
        )
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(f"work dir {work_dir} is a file: give a directory")


def checkpoint_metrics(path: Path) -> dict | None:
    """What `train` recorded beside a checkpoint it saved (validation metrics, step, config), or None."""
    file = Path(path) / METRICS_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else None


def save_checkpoint(model, processor, out: Path, metrics: dict | None = None) -> None:
    """``save_pretrained`` model (float32 safetensors) and processor into ``out``, atomically; `metrics` (what
    `train` knows about the model) go into ``out/training.json``. Only a checkpoint directory is replaced."""
    out = Path(out)
    check_output(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if metrics is not None:
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


@dataclass
class TrainResult:
    """best: this run's best validation metrics; saved: whether `out` now holds this run's model; existing:
    the validation accuracy of the checkpoint that was at `out` before (None: there was none)."""

    best: dict[str, float]
    saved: bool
    existing: float | None = None
    log: list[str] = field(default_factory=list)


def _existing_accuracy(out: Path, cfg: TrainConfig, val, log) -> float | None:
    """The validation accuracy of the checkpoint at `out` (None: none there): recorded by `train` on the same
    validation set, or measured now."""
    if not is_checkpoint(out):
        return None
    recorded = checkpoint_metrics(out)
    if recorded is not None and recorded.get("val_size") == cfg.val_size and recorded.get("seed") == cfg.seed:
        return float(recorded["metrics"]["all"])
    from vtprune.testbed.model import load_testbed

    log(f"measuring the checkpoint already at {out} on the validation set")
    model, processor = load_testbed(out)
    return float(accuracy(val, predict(model, processor, val))["all"])


def train(
    cfg: TrainConfig,
    work_dir: Path = DEFAULT_WORK_DIR,
    out: Path = DEFAULT_OUT,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train (or resume) a testbed model into `out` (see the module docstring for what protects it).

    force: replace a checkpoint at `out` even with a worse model."""
    work_dir, out = Path(work_dir), Path(out)
    check_work_dir(work_dir)
    check_output(out)
    torch.set_num_threads(2)
    state_path, cfg_path = work_dir / "state.pt", work_dir / "config.json"
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None:
        saved_cfg = TrainConfig(**json.loads(cfg_path.read_text()))
        changed = {
            k: (v, getattr(cfg, k))
            for k, v in asdict(saved_cfg).items()
            if k not in ("steps", "workers", "eval_every", "log_every") and getattr(cfg, k) != v
        }
        if changed:
            detail = ", ".join(f"{k}={new} (saved run: {old})" for k, (old, new) in changed.items())
            raise ValueError(
                f"work dir {work_dir} holds a run with other settings ({detail}): rerun with the same settings to "
                "resume it, or choose a new --work-dir"
            )
        cfg = TrainConfig(
            **{**asdict(saved_cfg), **{k: getattr(cfg, k) for k in ("steps", "workers", "eval_every", "log_every")}}
        )
        log(f"resuming from step {state['step']} of {cfg.steps} in {work_dir}")
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = build_model(
        processor,
        vision_hidden=cfg.vision_hidden,
        vision_layers=cfg.vision_layers,
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        heads=cfg.heads,
        seed=cfg.seed,
    )
    aux = AuxHeads(cfg.vision_hidden)
    features: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    params = list(model.named_parameters()) + [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    step, best = 0, {"all": -1.0}
    if state is not None:
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
    val = make_split("val", cfg.val_size, seed=cfg.seed)
    existing = _existing_accuracy(out, cfg, val, log)
    floor = float("-inf") if force or existing is None else existing
    if existing is not None:
        log(
            f"{out} holds a checkpoint with validation accuracy {existing:.3f}: "
            + ("--force: this run replaces it" if force else "only a better model replaces it (--force: any)")
        )
    saved = False
    loader = DataLoader(
        _Stream(processor, cfg.batch_size, cfg.seed, step, cfg.steps, cfg.extra_questions, cfg.caption),
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None,
    )
    t0, ema, aux_ema = time.time(), None, None
    for batch in loader:
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        colour, shape = batch.pop("patch_colour"), batch.pop("patch_shape")
        features.clear()
        lm_loss = model(**batch).loss
        aux_loss = aux.loss(features[0], colour, shape) if cfg.aux_weight else torch.zeros(())
        loss = lm_loss + cfg.aux_weight * aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = lm_loss.item() if ema is None else 0.98 * ema + 0.02 * lm_loss.item()
        aux_ema = aux_loss.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_loss.item()
        if progress is not None:
            progress(step, cfg.steps, ema)
        if cfg.log_every and step % cfg.log_every == 0:
            log(f"step {step} lm loss {ema:.4f} aux loss {aux_ema:.4f} [{time.time() - t0:.0f}s]")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = accuracy(val, predict(model, processor, val))
            improved = metrics["all"] > best["all"] and metrics["all"] > floor
            if improved:
                best = metrics
                save_checkpoint(
                    model,
                    processor,
                    out,
                    {
                        "metrics": metrics,
                        "step": step,
                        "val_size": cfg.val_size,
                        "seed": cfg.seed,
                        "config": asdict(cfg),
                    },
                )
                saved = True
            elif metrics["all"] > best["all"]:
                best = metrics
            torch.save(
                {
                    "model": model.state_dict(),
                    "aux": aux.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "best": best,
                    "torch_rng": torch.get_rng_state(),
                },
                state_path,
            )
            detail = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k != "all")
            log(
                f"step {step} loss {ema:.4f} val {metrics['all']:.3f} "
                f"{'(saved) ' if improved else ''}[{time.time() - t0:.0f}s] {detail}"
            )
    saved = saved or (
        is_checkpoint(out) and (checkpoint_metrics(out) or {}).get("metrics") == best and best["all"] >= 0
    )
    return TrainResult(best=best, saved=saved, existing=existing)
