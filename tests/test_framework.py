"""The method framework: what a press can ask for and return, checked against hand-built oracles.

A press decides; the engine cuts. These tests use small presses written here (fixed decisions, merges,
inserted tokens, a stage at the language model's input) and compare the engine's result with running the
decoder layers by hand on a sequence built directly from the same decisions."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from test_engine import oracle_logits

from vtprune import FastV, Kept, Press, Random, Stage
from vtprune.core.stages import equivalent_tokens

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, suppress_tokens=[4])


def run_by_hand(model, inputs, edits, new_tokens=None, hidden_from=None):
    """Logits of a single sample whose sequence is edited by hand before some decoder layers.

    edits: {layer: fn(hidden (1, N, D), ids (N,) prompt position or -1, positions (N,)) -> (hidden, ids, positions)}
    Causal attention over the edited sequence in order; RoPE at `positions`; appended tokens continue at the
    prompt length (original numbering). hidden_from: {layer: fn(ids) -> (N,) bool}, prompt tokens that the
    appended tokens may not see in that layer (a trimmed KV cache)."""
    base, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    if new_tokens is not None:
        ids = torch.cat([ids, new_tokens], dim=1)
    embeds = base.get_input_embeddings()(ids)
    features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    embeds[0, ids[0] == model.config.image_token_id] = features
    hidden, tokens, positions = embeds, torch.arange(ids.shape[1]), torch.arange(ids.shape[1])
    eager = model.config._attn_implementation == "eager"
    for index, layer in enumerate(lm.layers):
        if index in edits:
            hidden, tokens, positions = edits[index](hidden, tokens, positions)
        cos, sin = lm.rotary_emb(hidden, positions[None])
        n = hidden.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if hidden_from and index in hidden_from:
            appended = tokens >= inputs["input_ids"].shape[1]
            allowed &= ~(appended[:, None] & hidden_from[index](tokens)[None, :])
        mask = torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min)[None, None]
        custom = hidden_from and index in hidden_from
        hidden = layer(hidden, attention_mask=mask if eager or custom else None, position_embeddings=(cos, sin),
                       position_ids=positions[None])
    return model.lm_head(lm.norm(hidden))


@dataclass
class Fixed(Press):
    """Keeps given visual ranks at given layers; optionally merges and inserts (test press)."""

    plan: tuple = ()  # per stage: (layer, keep ranks, merge, insert)
    name: ClassVar[str] = "fixed"

    def stages(self, num_layers=32):
        return [Stage(layer=layer, keep=len(ranks), score_layer=None) for layer, ranks, *_ in self.plan]

    def select(self, ctx):
        layer, ranks, merge, insert = self.plan[ctx.stage_index]
        ranks = torch.tensor(ranks)
        hidden = ctx.hidden_states(ctx.stage.layer)[0]
        slot = {int(r): int(s) for r, s in zip(ctx.visual_ranks[0], ctx.visual_slots[0])}
        decision = Kept(ranks=ranks)
        if merge:  # each kept rank r absorbs rank r + 1: the mean of the two
            decision.values = torch.stack([(hidden[slot[int(r)]] + hidden[slot[int(r) + 1]]) / 2 for r in ranks])
        if insert:  # (vectors from ranks, after rank, position of rank)
            sources, after, position = insert
            decision.extra = torch.stack([hidden[slot[r]] * 0.5 for r in sources])
            decision.extra_after = torch.tensor([after] * len(sources))
            decision.extra_positions = torch.tensor([position] * len(sources))
        return [decision]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model5(request, processor):
    return build_model(processor, attn=request.param, layers=5, seed=2)


def sample_inputs(processor):
    return inputs_for(processor, [make_image(100, 100, seed=3)], [prompt("what shape is at the top left ?")])


def visual_mask(inputs, model):
    return inputs["input_ids"][0] == model.config.image_token_id


def test_merged_values_and_inserted_tokens_equal_hand_built_sequence(processor, model5):
    inputs = sample_inputs(processor)
    is_visual = visual_mask(inputs, model5)
    start = int(torch.nonzero(is_visual)[0])
    keep1, keep2 = list(range(0, 36, 2)), [0, 4, 8, 10, 30]
    # stage 1 (before layer 2): keep even ranks, each absorbing the next odd one; insert two tokens made from
    # ranks 5 and 7 after rank 12, at rank 20's position. Stage 2 (before layer 4): keep five originals and
    # the second inserted token (rank 37).
    press = Fixed(plan=((2, keep1, True, ([5, 7], 12, 20)), (4, keep2 + [37], False, None)))

    def stage1(hidden, tokens, positions):
        rank = tokens - start
        visual = (rank >= 0) & (rank < 36)
        rows, ids, pos = [], [], []
        for i in range(hidden.shape[1]):
            r = int(rank[i])
            if visual[i] and r % 2:
                continue
            row = (hidden[0, i] + hidden[0, i + 1]) / 2 if visual[i] else hidden[0, i]
            rows.append(row), ids.append(int(tokens[i])), pos.append(int(positions[i]))
            if visual[i] and r == 12:
                for source in (5, 7):
                    rows.append(hidden[0, start + source] * 0.5), ids.append(-1000 - source), pos.append(start + 20)
        return torch.stack(rows)[None], torch.tensor(ids), torch.tensor(pos)

    def stage2(hidden, tokens, positions):
        rank = tokens - start
        keep = ((rank < 0) & (tokens > -1000)) | torch.isin(rank, torch.tensor(keep2)) | (tokens == -1007) | (rank >= 36)
        return hidden[:, keep], tokens[keep], positions[keep]

    with torch.no_grad():
        with press(model5):
            logits = model5(**inputs).logits
            generated = model5.generate(**inputs, **GEN)
        assert press.last_selection[0].extra == [2] and press.last_selection[1].extra == [0]
        assert press.last_selection[1].kept[0].tolist() == keep2  # inserted tokens are not original ranks
        expected = run_by_hand(model5, inputs, {2: stage1, 4: stage2})
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):
            reference = run_by_hand(model5, inputs, {2: stage1, 4: stage2}, new_tokens[:, :step])[:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stage_at_language_model_input_equals_dropping_embeddings(processor, attn):
    model = build_model(processor, attn=attn, layers=4, seed=4)
    inputs = sample_inputs(processor)
    press = Random(keep=10, layer=0, seed=5)
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model.generate(**inputs, **GEN)
    assert len(kept) == 10
    cache_lengths = None
    with torch.no_grad():
        expected = oracle_logits(model, inputs, [(0, kept)])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):
            reference = oracle_logits(model, inputs, [(0, kept)], new_tokens[:, :step])[:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)
        with press(model):
            out = model(**inputs, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            cache_lengths = {layer.keys.shape[-2] for layer in cache.layers}
    assert cache_lengths == {inputs["input_ids"].shape[1] - 36 + 10}  # every layer runs on the shorter input


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_layer0_stage_in_a_left_padded_batch_equals_singles(processor, positions):
    model = build_model(processor, attn="sdpa", layers=4, seed=4)
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6)]
    texts = [prompt("what is the colour of the circle ?"), prompt("yes")]
    press = Random(keep=[12, 5], layer=[0, 2], seed=1, positions=positions)
    inputs = inputs_for(processor, images, texts)
    with torch.no_grad(), press(model):
        batch = model.generate(**inputs, **GEN)
        kept = [[s.kept[b] for s in press.last_selection] for b in range(2)]
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model):
            single = model.generate(**single_inputs, **GEN)
        assert all(torch.equal(x, s.kept[0]) for x, s in zip(kept[b], press.last_selection))
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, single_inputs["input_ids"].shape[1]:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


def test_compact_positions_renumber_and_decode_continues_each_segment(processor, model5):
    inputs = sample_inputs(processor)
    is_visual = visual_mask(inputs, model5)
    n = inputs["input_ids"].shape[1]
    press = FastV(keep=8, layer=2, positions="compact")
    with torch.no_grad(), press(model5):
        logits = model5(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model5.generate(**inputs, **GEN)
    rank = torch.cumsum(is_visual.long(), 0) - 1

    def cut(new_len_before=None):
        def edit(hidden, tokens, positions):
            keep = ~is_visual[tokens.clamp(max=n - 1)] | (tokens >= n) | torch.isin(rank[tokens.clamp(max=n - 1)], kept)
            keep &= ~(is_visual[tokens.clamp(max=n - 1)] & (tokens >= n))
            shift = n - (n - 36 + 8)
            new_positions = torch.where(tokens[keep] < n, torch.arange(int(keep.sum())), positions[keep] - shift)
            return hidden[:, keep], tokens[keep], new_positions
        return edit

    with torch.no_grad():
        torch.testing.assert_close(logits, run_by_hand(model5, inputs, {2: cut()}), atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, n:]
        for step, step_logits in enumerate(generated.logits):
            reference = run_by_hand(model5, inputs, {2: cut()}, new_tokens[:, :step])[:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_trimmed_cache_decode_equals_hand_built(processor, model5, positions):
    """A first stage with trim_cache: in decoding, the layers before the cut see only the kept prompt tokens (at
    their prompt positions); from the cut on, positions are original or renumbered as the stage says."""
    inputs = sample_inputs(processor)
    is_visual = visual_mask(inputs, model5)
    n = inputs["input_ids"].shape[1]
    rank = torch.cumsum(is_visual.long(), 0) - 1
    kept = torch.tensor([1, 4, 5, 9, 17, 20, 30, 33])

    @dataclass
    class Trim(Press):
        positions: str = "original"
        name: ClassVar[str] = "trim"

        def stages(self, num_layers=32):
            return [Stage(layer=2, keep=len(kept), score_layer=None, trim_cache=True)]

        def select(self, ctx):
            return [kept]

    def dropped(tokens):
        prompt = tokens < n
        return prompt & is_visual[tokens.clamp(max=n - 1)] & ~torch.isin(rank[tokens.clamp(max=n - 1)], kept)

    def cut(hidden, tokens, old_positions):
        keep = ~dropped(tokens)
        new_positions = old_positions[keep]
        if positions == "compact":
            count = int((keep & (tokens < n)).sum())
            new_positions = torch.where(tokens[keep] < n, torch.arange(int(keep.sum())), old_positions[keep] - (n - count))
        return hidden[:, keep], tokens[keep], new_positions

    press = Trim(positions=positions)
    with torch.no_grad(), press(model5):
        logits = model5(**inputs).logits
        generated = model5.generate(**inputs, **GEN)
    with torch.no_grad():
        torch.testing.assert_close(logits, run_by_hand(model5, inputs, {2: cut}), atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, n:]
        for step, step_logits in enumerate(generated.logits):
            reference = run_by_hand(model5, inputs, {2: cut}, new_tokens[:, :step],
                                    hidden_from={0: dropped, 1: dropped})[:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_context_token_kinds_and_attention_shapes(processor, model5):
    inputs = sample_inputs(processor)
    seen = {}

    @dataclass
    class Probe(FastV):
        def select(self, ctx):
            seen["kinds"] = {kind: ctx.tokens(kind)[0] for kind in ("visual", "text", "system", "instruction", "last")}
            seen["per_head"] = ctx.attention("instruction", heads="all")[0].shape
            seen["all_keys"] = ctx.attention("last", keys="all")[0]
            seen["keys"] = ctx.keys().shape
            seen["captured"] = ctx.inputs[ctx.stage.score_layer].projected_keys is not None
            return super().select(ctx)

    with torch.no_grad(), Probe(keep=6, layer=2)(model5):
        model5(**inputs)
    ids = inputs["input_ids"][0]
    kinds = seen["kinds"]
    visual = torch.nonzero(ids == model5.config.image_token_id).flatten()
    assert torch.equal(kinds["visual"], visual)
    assert torch.equal(kinds["system"], torch.arange(int(visual[0])))
    assert torch.equal(kinds["instruction"], torch.arange(int(visual[-1]) + 1, len(ids)))
    assert kinds["last"].tolist() == [len(ids) - 1]
    assert seen["per_head"] == (4, len(kinds["instruction"]), 36)
    assert seen["all_keys"].shape == (1, len(ids)) and abs(float(seen["all_keys"].sum()) - 1) < 1e-5
    assert seen["keys"] == (1, 2, len(ids), 16)
    assert seen["captured"]  # layer 1's keys come from its own key projection, not recomputed


def test_reused_keys_equal_recomputed_keys(processor, model5):
    """Scores from the keys a layer projected while it ran equal scores from keys recomputed from its input."""
    inputs = sample_inputs(processor)
    results = {}

    @dataclass
    class Both(FastV):
        def select(self, ctx):
            record = ctx.inputs[ctx.stage.score_layer]
            results["reused"] = ctx.attention("last")[0]
            ctx._keys.clear()
            record.projected_keys = None
            results["recomputed"] = ctx.attention("last")[0]
            return super().select(ctx)

    with torch.no_grad(), Both(keep=6, layer=3)(model5):
        model5(**inputs)
    assert torch.equal(results["reused"], results["recomputed"])


def test_dry_run_decides_but_cuts_nothing(processor, model5):
    inputs = sample_inputs(processor)
    press = FastV(keep=6, layer=2)
    with torch.no_grad():
        vanilla = model5(**inputs).logits
        with press(model5, dry_run=True):
            logits = model5(**inputs).logits
    assert torch.equal(logits, vanilla)
    assert len(press.last_selection[0].kept[0]) == 6


def test_equivalent_tokens():
    stages = [Stage(layer=2, keep=184, score_layer=2), Stage(layer=10, keep=92, score_layer=10),
              Stage(layer=20, keep=46, score_layer=20)]
    assert equivalent_tokens(stages, 576, 32) == 128.0  # PyramidDrop's published 128-token schedule
    assert FastV(keep=64, layer=2).equivalent_tokens() == (2 * 576 + 30 * 64) / 32


def test_press_errors(model5):
    with pytest.raises(TypeError, match="Debias"):
        FastV(debias=True)
    with pytest.raises(TypeError, match="layer"):
        FastV(layer=2.5)
    with pytest.raises(ValueError, match="not both"):
        FastV(keep=8, budget=64)
    with pytest.raises(ValueError, match="positions"):
        FastV(positions="shuffled")
    with pytest.raises(ValueError, match="stages"):
        FastV(keep=[8, 4], layer=2)(model5)


LAYERS = {  # the package's folders (and top-level modules), lowest first; a module imports only its own layer or lower
    0: {"io"},  # atomic writes and output locks: imports nothing of vtprune
    1: {"adapters"},  # one file per model family, and geometry (what a processor does to an image)
    2: {"debias"},  # profiles, fits, corrections
    3: {"core"},  # press, stages, context, scoring, selection, the engine
    4: {"methods"},  # one press per file
    5: {"apps"},  # loading, runner, datasets, calibration, analysis, evaluation, reproduce, figures, demo
    6: {"testbed", "lmms", "vllm"},  # the testbeds and the two plugins, built on the applications
    7: {"cli"},  # the command line assembles the applications' and the testbed's commands
}
SRC = Path(__file__).resolve().parents[1] / "src" / "vtprune"


def _layer_of(module: str) -> int:
    return next(level for level, names in LAYERS.items() if module in names)


def _imports() -> dict[str, set[str]]:
    """Every module of the package (dotted, below `vtprune`) -> the package modules it imports, lazily or not
    (an edge names the module imported, `adapters` for `from ..adapters import adapter_for`)."""
    def dotted(parts: tuple[str, ...]) -> str:
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {dotted(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")} - {""}
    graph = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        package = parts[:-1]
        name = dotted(parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = ".".join(package[: len(package) - node.level + 1] + tuple((node.module or "").split(".")))
                candidates = [f"{base}.{alias.name}".strip(".") for alias in node.names] + [base.strip(".")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vtprune."):
                base = node.module.removeprefix("vtprune.")
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [a.name.removeprefix("vtprune.") for a in node.names if a.name.startswith("vtprune.")]
            else:
                continue
            # `from .apps import sharding` imports the module apps.sharding; `from .x import name` the module x
            targets |= {next(c for c in candidates if c in modules)} if any(c in modules for c in candidates) else set()
        graph[name] = targets - {name}
    return graph


def test_lower_layers_never_import_higher_ones():
    for module, targets in _imports().items():
        if module == "":  # vtprune/__init__.py: the public names, imported lazily by name
            continue
        own = _layer_of(module.split(".")[0])
        for target in targets:
            assert _layer_of(target.split(".")[0]) <= own, f"{module} imports {target} (a higher layer)"


def test_no_import_cycles():
    """No circle of imports between the package's modules (lazy imports inside functions count: a circle is a
    design fault even where Python would resolve it). A package's __init__ importing its own submodules is not one."""
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                if not all(m == target or m.startswith(target + ".") for m in circle):  # __init__ -> own submodule
                    raise AssertionError("import circle: " + " -> ".join(circle))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
