"""Deterministic synthetic spatial VQA data for the testbed model.

Each image shows 3-5 coloured shapes on a lightly textured background. Images are never square
(w/h in [1.25, 2.2] or its inverse), so pad-to-square padding always occurs in the processor.
Questions are generated first and the scene is built to make the answer unambiguous. Every
question that points at a region or an object records where its evidence lies in ``meta``:
``evidence_half`` is ``"top"``/``"bottom"`` (by the centre of the evidence shape in the original
image) or ``"none"`` for whole-image questions (counting, "no" answers).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ..apps.models import NamedData, register_data

Split = Literal["train", "val", "test"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
REGIONS: dict[str, tuple[int, int]] = {  # name -> (row, col) quadrant index
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
QUESTION_KINDS: tuple[str, ...] = (
    "colour_of_shape",
    "shape_in_region",
    "colour_in_region",
    "exists",
    "count",
)
ANSWER_VOCAB: tuple[str, ...] = (*COLOURS, *SHAPES, "yes", "no", *COUNT_WORDS)

DESCRIBE_QUESTION = "Describe the shapes."  # training-only, dense supervision (see ``describe``)
_SPLIT_IDS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
_PROMPT = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class Sample:
    """One VQA example: an RGB image, a question, a single-word answer and generation metadata."""

    image: Image.Image
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float


def prompt_for(question: str) -> str:
    """The exact text prompt (LLaVA-1.5 style, one ``<image>`` token) used in training and evaluation."""
    return _PROMPT.format(question=question)


def plural(shape: str) -> str:
    """English plural of a shape name."""
    return shape + ("es" if shape.endswith("s") else "s")


def all_question_texts() -> list[str]:
    """Every question string the generator can produce (used to build the tokenizer vocabulary)."""
    qs = [f"What colour is the {s}?" for s in SHAPES]
    qs += [f"What shape is in the {r}?" for r in REGIONS]
    qs += [f"What colour is the shape in the {r}?" for r in REGIONS]
    qs += [f"Is there a {c} {s}?" for c in COLOURS for s in SHAPES]
    qs += [f"How many {plural(s)} are there?" for s in SHAPES]
    qs += [DESCRIBE_QUESTION, "left , right , top , bottom"]
    return qs


# ---------------------------------------------------------------- drawing


def _star_points(cx: float, cy: float, r: float, n: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        rad = r if i % 2 == 0 else r * 0.45
        a = -np.pi / 2 + i * np.pi / n
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, obj: _Obj, rgb: tuple[int, int, int]) -> None:
    cx, cy, r = obj.cx, obj.cy, obj.r
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif obj.shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=rgb)
    elif obj.shape == "star":
        draw.polygon(_star_points(cx, cy + r * 0.1, r * 1.1), fill=rgb)
    elif obj.shape == "cross":
        t = r * 0.33
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=rgb)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r * 1.1), (cx + r * 0.8, cy), (cx, cy + r * 1.1), (cx - r * 0.8, cy)], fill=rgb)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(obj.shape)


def _render(rng: np.random.Generator, w: int, h: int, objs: list[_Obj]) -> Image.Image:
    base = rng.integers(195, 245, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.02, 0.08, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wave = 6.0 * np.sin(xx * freq[0] + phase[0]) * np.cos(yy * freq[1] + phase[1])
    bg = base[None, None, :] + wave[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in objs:
        jitter = rng.integers(-15, 16, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
        _draw(draw, o, rgb)  # type: ignore[arg-type]
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- scene layout


def _quadrant(o: _Obj, w: int, h: int) -> tuple[int, int]:
    return (int(o.cy >= h / 2), int(o.cx >= w / 2))


def _place(
    rng: np.random.Generator, w: int, h: int, r: float, placed: list[_Obj], quads: list[tuple[int, int]]
) -> tuple[float, float] | None:
    """Random centre inside one of ``quads``, fully inside its quadrant, not overlapping ``placed``."""
    for _ in range(60):
        qr, qc = quads[int(rng.integers(len(quads)))]
        x0, x1 = (r + 2, w / 2 - r - 2) if qc == 0 else (w / 2 + r + 2, w - r - 2)
        y0, y1 = (r + 2, h / 2 - r - 2) if qr == 0 else (h / 2 + r + 2, h - r - 2)
        if x1 <= x0 or y1 <= y0:
            return None
        cx, cy = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        if all((cx - p.cx) ** 2 + (cy - p.cy) ** 2 > (r + p.r + 4) ** 2 for p in placed):
            return cx, cy
    return None


def _choice(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def _try_scene(
    rng: np.random.Generator, w: int, h: int, specs: list[tuple[str, str, list[tuple[int, int]]]]
) -> list[_Obj] | None:
    """Place objects given as (shape, colour, allowed quadrants); None if the layout failed."""
    objs: list[_Obj] = []
    for shape, colour, quads in specs:
        r = float(rng.uniform(0.085, 0.105)) * max(w, h)  # 14-18 px radius at the model's 168 px
        pos = _place(rng, w, h, r, objs, quads)
        if pos is None:
            return None
        objs.append(_Obj(shape, colour, pos[0], pos[1], r))
    return objs


_ALL_QUADS = list(REGIONS.values())


def _question(rng: np.random.Generator, kind: str, n: int) -> tuple[str, str, list[tuple[str, str, list]], int | None]:
    """Question, answer, object specs and index of the evidence object (None: whole image)."""
    if kind == "colour_of_shape":
        s, c = _choice(rng, SHAPES), _choice(rng, tuple(COLOURS))
        others = [x for x in SHAPES if x != s]
        specs = [(s, c, _ALL_QUADS)] + [
            (_choice(rng, others), _choice(rng, tuple(COLOURS)), _ALL_QUADS) for _ in range(n - 1)
        ]
        return f"What colour is the {s}?", c, specs, 0
    if kind in ("shape_in_region", "colour_in_region"):
        name = _choice(rng, tuple(REGIONS))
        q = REGIONS[name]
        rest = [x for x in _ALL_QUADS if x != q]
        s, c = _choice(rng, SHAPES), _choice(rng, tuple(COLOURS))
        specs = [(s, c, [q])] + [(_choice(rng, SHAPES), _choice(rng, tuple(COLOURS)), rest) for _ in range(n - 1)]
        if kind == "shape_in_region":
            return f"What shape is in the {name}?", s, specs, 0
        return f"What colour is the shape in the {name}?", c, specs, 0
    if kind == "exists":
        s, c = _choice(rng, SHAPES), _choice(rng, tuple(COLOURS))
        others_s = [x for x in SHAPES if x != s]
        others_c = [x for x in COLOURS if x != c]
        # distractors share the shape or the colour, so the answer needs the binding of both
        specs = [(s, _choice(rng, others_c), _ALL_QUADS), (_choice(rng, others_s), c, _ALL_QUADS)]
        while len(specs) < n:
            sh = _choice(rng, SHAPES)
            co = _choice(rng, others_c) if sh == s else _choice(rng, tuple(COLOURS))
            specs.append((sh, co, _ALL_QUADS))
        yes = bool(rng.integers(2))
        if yes:
            specs[0] = (s, c, _ALL_QUADS)
        return f"Is there a {c} {s}?", "yes" if yes else "no", specs, 0 if yes else None
    if kind == "count":
        s = _choice(rng, SHAPES)
        k = int(rng.integers(len(COUNT_WORDS)))
        others = [x for x in SHAPES if x != s]
        specs = [(s, _choice(rng, tuple(COLOURS)), _ALL_QUADS) for _ in range(k)]
        specs += [(_choice(rng, others), _choice(rng, tuple(COLOURS)), _ALL_QUADS) for _ in range(max(n, k) - k)]
        return f"How many {plural(s)} are there?", COUNT_WORDS[k], specs, None
    raise ValueError(kind)


def make_sample(split: Split, seed: int, index: int) -> Sample:
    """The ``index``-th sample of a split; a pure function of (split, seed, index)."""
    rng = np.random.default_rng([_SPLIT_IDS[split], seed, index])
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    while True:
        ratio = float(np.exp(rng.uniform(np.log(1.25), np.log(2.2))))
        long_side = int(rng.integers(160, 400))
        short = max(48, round(long_side / ratio))
        w, h = (long_side, short) if rng.integers(2) else (short, long_side)
        n = int(rng.integers(3, 6))
        question, answer, specs, ev = _question(rng, kind, n)
        order = rng.permutation(len(specs))  # placement order must not reveal the evidence object
        placed = _try_scene(rng, w, h, [specs[i] for i in order])
        if placed is None:
            continue
        objs: list[_Obj] = [None] * len(specs)
        for j, i in enumerate(order):
            objs[i] = placed[j]
        break
    image = _render(rng, w, h, objs)
    half = "none"
    if ev is not None:
        half = "top" if objs[ev].cy < h / 2 else "bottom"
    meta = {
        "kind": kind,
        "split": split,
        "seed": seed,
        "index": index,
        "size": (w, h),
        "evidence_half": half,
        "evidence_box": None if ev is None else _box(objs[ev]),
        "objects": [
            {"shape": o.shape, "colour": o.colour, "box": _box(o), "quadrant": _quadrant(o, w, h)} for o in objs
        ],
    }
    return Sample(image=image, question=question, answer=answer, meta=meta)


def accuracy(samples: Sequence[Sample], preds: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy overall ("all"), per question kind ("kind/...") and per evidence half ("half/...")."""
    hit: dict[str, list[int]] = defaultdict(list)
    for s, p in zip(samples, preds):
        ok = int(p == s.answer)
        for key in ("all", f"kind/{s.meta['kind']}", f"half/{s.meta['evidence_half']}"):
            hit[key].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hit.items())}


def object_map(sample: Sample) -> np.ndarray:
    """(h, w) uint8: 1 + the index of the object drawn at each pixel of the sample's image (0: background),
    drawn with the same shapes and order as the image itself (training targets for the vision tower)."""
    w, h = sample.meta["size"]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for index, o in enumerate(sample.meta["objects"]):
        x0, y0, x1, y1 = o["box"]
        obj = _Obj(o["shape"], o["colour"], (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2)
        _draw(draw, obj, index + 1)  # type: ignore[arg-type]
    return np.asarray(canvas)


def _box(o: _Obj) -> tuple[float, float, float, float]:
    return (o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r)


def iter_samples(split: Split, seed: int = 0, start: int = 0) -> Iterator[Sample]:
    """Endless stream of samples ``start, start+1, ...`` (training uses this; resumable by index)."""
    i = start
    while True:
        yield make_sample(split, seed, i)
        i += 1


def make_split(split: Split, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of a split. Splits use disjoint random streams derived from their name."""
    return [make_sample(split, seed, i) for i in range(n)]


def sample_digest(sample: Sample) -> str:
    """Content hash of image pixels and question (for determinism and disjointness checks)."""
    h = hashlib.sha1(sample.image.tobytes())
    h.update(repr(sample.image.size).encode())
    h.update(sample.question.encode())
    return h.hexdigest()


def scene_questions(sample: Sample, k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Up to ``k`` extra (question, answer) pairs answerable from the sample's scene (training aid).

    They follow the rules of the generated questions (unique shape, exactly one object in a quadrant, counts up
    to three), so they are unambiguous, and their answers are balanced like the generated ones, so that they
    teach no prior the test split would punish: the kinds are drawn in turn, "is there" is yes or no with equal
    chance and its "no" is a hard negative (the colour is there on another shape, or the shape in another
    colour), and counts aim at a uniformly drawn number 0-3.
    """
    objs = sample.meta["objects"]
    shapes = Counter(o["shape"] for o in objs)
    quads = Counter(tuple(o["quadrant"]) for o in objs)
    present = {(o["colour"], o["shape"]) for o in objs}
    region = {q: n for n, q in REGIONS.items()}
    alone = [o for o in objs if quads[tuple(o["quadrant"])] == 1]
    pools: dict[str, list[tuple[str, str]]] = {
        "colour_of_shape": [
            (f"What colour is the {o['shape']}?", o["colour"]) for o in objs if shapes[o["shape"]] == 1
        ],
        "shape_in_region": [(f"What shape is in the {region[tuple(o['quadrant'])]}?", o["shape"]) for o in alone],
        "colour_in_region": [
            (f"What colour is the shape in the {region[tuple(o['quadrant'])]}?", o["colour"]) for o in alone
        ],
        "exists_yes": [(f"Is there a {c} {s}?", "yes") for c, s in sorted(present)],
        "exists_no": sorted(
            {
                (f"Is there a {c} {s}?", "no")
                for o in objs
                for c in COLOURS
                for s in SHAPES
                if (c, s) not in present and (c == o["colour"] or s == o["shape"])
            }
        ),
    }
    counts = {
        n: [(f"How many {plural(s)} are there?", COUNT_WORDS[n]) for s in SHAPES if shapes[s] == n] for n in range(4)
    }
    asked = {sample.question}
    out: list[tuple[str, str]] = []
    kinds = ["colour_of_shape", "shape_in_region", "colour_in_region", "exists", "count"]
    for turn in range(4 * k):
        if len(out) == k:
            break
        if turn % len(kinds) == 0:
            rng.shuffle(kinds)
        kind = kinds[turn % len(kinds)]
        if kind == "exists":
            pool = pools["exists_yes" if rng.integers(2) else "exists_no"]
        elif kind == "count":
            pool = counts[int(rng.integers(4))]
        else:
            pool = pools[kind]
        pool = [p for p in pool if p[0] not in asked]
        if pool:
            question = pool[int(rng.integers(len(pool)))]
            out.append(question)
            asked.add(question[0])
    return out


def describe(sample: Sample) -> str:
    """Training-only caption listing every object as ``colour shape vertical horizontal``, in reading order."""
    objs = sorted(sample.meta["objects"], key=lambda o: (o["quadrant"][0], o["quadrant"][1], o["box"][0]))
    rows, cols = ("top", "bottom"), ("left", "right")
    return " , ".join(f"{o['colour']} {o['shape']} {rows[o['quadrant'][0]]} {cols[o['quadrant'][1]]}" for o in objs)


register_data(NamedData("testbed", make_split))
