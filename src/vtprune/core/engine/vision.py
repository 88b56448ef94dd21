"""Vision-side work: the press's vision stages inside the vision tower, recording vision-layer activations, and
the visual features some families add after their first decoder layers (Qwen3-VL's deepstack)."""

from __future__ import annotations

import torch

from ..context import VisionStageContext
from ..stages import VisionStage
from .request import _Request


class _VisionSide:
    """PruningSession's part that works inside the vision tower."""

    def _vision_stages(self) -> list:
        """The press's vision stages, with layer indices >= 0, checked against the vision tower."""
        try:
            count = len(self.adapter.vision_layers)
        except ValueError:
            count = 0
        declared = self.press.vision_stages(count)
        if declared and not count:
            raise ValueError(
                f"{type(self.press).__name__} has vision stages but {type(self.adapter).__name__} gives no vision layers"
            )
        stages = [VisionStage(layer=s.layer + count if s.layer < 0 else s.layer, merge=s.merge) for s in declared]
        feature = self.adapter.vision_feature_layer if stages else 0
        for previous, stage in zip([None] + stages[:-1], stages):
            if not 0 <= stage.layer <= feature:
                raise ValueError(
                    f"{type(self.press).__name__}: vision stage at layer {stage.layer}: only layers up to the one the "
                    f"language model's features come from (0..{feature}) reach the language model"
                )
            if previous is not None and stage.layer <= previous.layer:
                raise ValueError(f"{type(self.press).__name__}: vision stage layers must increase")
        if stages and self.stages[0].layer != 0:
            raise ValueError(
                f"{type(self.press).__name__}: with vision stages, the first stage must be at layer 0 (it removes the "
                "tokens the vision tower dropped from the language model's input)"
            )
        return stages

    def _take_visual_additions(self, request: _Request, kwargs: dict) -> dict:
        """Families that add features to the visual tokens after their first decoder layers (Qwen3-VL's deepstack):
        the engine takes the additions out of the language model's call and adds them itself after each of those
        layers, to the visual tokens still present (the kept ones, by their original visual rank). Returns the
        keyword arguments the language model is called with (`kwargs` itself when there is nothing to take)."""
        if not self.adapter.adds_visual_features:
            return kwargs
        taken = self.adapter.visual_additions(kwargs)
        if taken is None:
            return kwargs
        new_kwargs, mask, additions = taken
        layout = request.layout
        counts = mask.sum(dim=1).tolist()
        if counts != layout.num_visual or any(
            not torch.equal(torch.nonzero(mask[b]).flatten().to(p.device), p) for b, p in enumerate(layout.positions)
        ):
            raise ValueError(
                f"{type(self.adapter).__name__}: the visual features added inside the decoder belong to "
                f"{counts} tokens per sample, but the prompt's visual tokens are {layout.num_visual}: pass the "
                "image/video inputs the processor returned with these input_ids."
            )
        width = max(layout.num_visual) + 1
        tables = []
        for addition in additions:  # (V_total, D) -> (B, max V + 1, D), the last row zero (no addition)
            table = addition.new_zeros(len(counts), width, addition.shape[-1])
            start = 0
            for b, count in enumerate(counts):
                table[b, :count] = addition[start : start + count]
                start += count
            tables.append(table)
        request.additions = tables
        return new_kwargs

    def _make_addition_hook(self, index: int):
        def hook(module, args, output):
            request = self._request
            if request is None or request.phase != "prefill":
                return None
            tables = request.additions
            if not tables or index >= len(tables):
                return None
            if index == len(tables) - 1:
                request.additions = None  # the last one: free them
            hidden = output[0] if isinstance(output, tuple) else output
            table = tables[index]
            rank = request.ids.at("rank", request.slots, -1)  # original visual rank of each slot (-1: none)
            limit = torch.tensor(request.layout.num_visual, device=rank.device)[:, None]
            row = torch.where((rank >= 0) & (rank < limit), rank, table.shape[1] - 1)
            added = torch.gather(
                table.to(hidden.device, hidden.dtype), 1, row[:, :, None].expand(-1, -1, table.shape[-1])
            )
            hidden = hidden + added
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _make_vision_hook(self, index: int):
        # generate() encodes the images before the first forward (mm_encoder_outputs): the vision tower may run
        # before the request exists, so its activations wait in `_pending_vision` for the next prefill
        def hook(module, args, kwargs):
            self._record_vision("input", index, args[0] if args else kwargs["hidden_states"])
            return None

        return hook

    def _on_vision_tower_input(self, module, args):
        self._vision_pass = {"tokens": None, "input": {}, "attention": {}, "outputs": {}, "length": None}
        return None

    def _make_vision_stage_input(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            state = self._vision_pass
            if state["tokens"] is None:
                images, length = hidden.shape[:2]
                state["tokens"] = torch.arange(length, device=hidden.device).expand(images, length)
                state["length"] = length
            state["input"][index] = hidden
            return None

        return hook

    def _make_vision_attention_hook(self, index: int):
        def hook(module, args, output):
            self._vision_pass["attention"][index] = output[0] if isinstance(output, tuple) else output
            return None

        return hook

    def _make_vision_stage(self, stage_index: int, stage):
        def hook(module, args, output):
            state = self._vision_pass
            hidden = output[0] if isinstance(output, tuple) else output
            tokens = state["tokens"]
            patches = tokens.shape[1] - int(self.adapter.vision_cls_index is not None)
            merge = round(stage.merge * patches) if isinstance(stage.merge, float) else int(stage.merge)
            if not 0 <= merge < patches:
                raise ValueError(f"vision stage {stage_index}: cannot merge {merge} of {patches} patches")
            vctx = VisionStageContext(
                adapter=self.adapter,
                stage_index=stage_index,
                layer=module,
                merge=merge,
                tokens=tokens,
                input=state["input"][stage.layer],
                attention_output=state["attention"][stage.layer],
                output=hidden,
            )
            keep, values = self.press.select_vision(vctx)
            images, width = hidden.shape[0], hidden.shape[-1]
            if keep.dim() != 2 or keep.shape[0] != images or keep.dtype != torch.long:
                raise RuntimeError(f"{type(self.press).__name__}.select_vision must return (N, T') long token indices")
            new = (
                torch.gather(hidden, 1, keep[:, :, None].expand(-1, -1, width))
                if values is None
                else values.to(hidden.dtype)
            )
            state["tokens"] = torch.gather(tokens, 1, keep)
            state["outputs"][stage.layer] = new  # the model's own output capture may have seen the unmerged one
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _on_vision_tower_output(self, module, args, output):
        """Restore every hidden state of the vision tower to the full token count (zeros where tokens left), so the
        model's own feature selection and projector work unchanged; the language model's input loses those
        tokens at the press's layer-0 stage."""
        state = self._vision_pass
        tokens = state.get("tokens") if state else None
        if tokens is None:
            return None

        def restore(hidden):
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] == state["length"]:
                return hidden
            full = hidden.new_zeros(hidden.shape[0], state["length"], hidden.shape[-1])
            return full.scatter(1, tokens[:, :, None].expand(-1, -1, hidden.shape[-1]), hidden)

        if getattr(output, "hidden_states", None) is not None:
            captured = list(output.hidden_states)
            for layer, merged in state["outputs"].items():  # hidden_states[i + 1] is layer i's output
                if layer + 1 < len(captured) and captured[layer + 1] is not None:
                    captured[layer + 1] = merged
            output.hidden_states = tuple(restore(h) for h in captured)
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = restore(output.last_hidden_state)
        self._record_vision("tokens", -1, tokens)
        self._vision_pass = {}
        return output

    def _record_vision(self, kind: str, index: int, hidden: torch.Tensor) -> None:
        """Into the request being prefilled (the vision tower ran inside its forward), or else kept for the next
        request (generate() encodes the images before its first forward)."""
        request = self._request
        if request is not None and request.phase == "prefill" and not request.decided:
            if kind == "tokens":
                request.vision_tokens = hidden
            else:
                (request.vision_inputs if kind == "input" else request.vision_outputs)[index] = hidden
        else:
            self._pending_vision[(kind, index)] = hidden

    def _make_vision_output_hook(self, index: int):
        def hook(module, args, output):
            self._record_vision("output", index, output[0] if isinstance(output, tuple) else output)
            return None

        return hook
