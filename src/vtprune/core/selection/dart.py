"""DART's pivots and per-pivot claims of the least similar tokens, batched over samples."""

from __future__ import annotations

from typing import Any

import torch


def top_pivots(norms: torch.Tensor, valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` tokens of largest norm per row, largest first (ties: the earlier token; torch.topk, which the
    per-sample code calls, leaves CPU ties unspecified). norms (B, N), valid (B, N) bool. Returns indices (B, c)
    long, c = min(count, N), and ok (B, c) bool (False past a row's valid tokens)."""
    count = min(count, norms.shape[1])
    order = torch.argsort(torch.where(valid, norms, float("-inf")), dim=1, descending=True, stable=True)[:, :count]
    return order, torch.gather(valid, 1, order)


def dart_claims(visual_units: torch.Tensor, visual_valid: torch.Tensor, image_pivots: torch.Tensor,
                image_pivot_ok: torch.Tensor, pivot_units: torch.Tensor, pivot_ok: torch.Tensor,
                claims: torch.Tensor | int) -> torch.Tensor:
    """DART's selection: each pivot in turn claims the `claims` available visual tokens least similar to it
    (cosine; ties: the earlier token); the image pivots and every claimed token stay.

    visual_units (B, R, D) unit-norm states of the visual tokens; visual_valid (B, R) bool; image_pivots (B, Pi)
    long indices into R, image_pivot_ok (B, Pi) bool; pivot_units (B, P, D) unit-norm states of all pivots in
    visiting order, pivot_ok (B, P) bool; claims: tokens per pivot, an int or (B,) long. Returns kept (B, R) bool.

    The visits stay a loop over the P pivots (a constant, 8 as published: each visit sees what the earlier ones
    left), 5 ops each: every pivot's ranking is sorted once up front, and a visit claims the first `claims`
    still-available tokens of its ranking (a cumulative count). About 5 P + 15 ops, whatever B.
    """
    batch, width, _ = visual_units.shape
    is_pivot = torch.zeros_like(visual_valid).scatter(1, image_pivots, image_pivot_ok)
    available = visual_valid & ~is_pivot  # (B, R)
    similarity = torch.bmm(visual_units, pivot_units.transpose(1, 2)).transpose(1, 2)  # (B, P, R)
    rankings = torch.argsort(similarity, dim=2, stable=True)  # least similar first, ties: the earlier token
    limit = torch.where(pivot_ok, torch.as_tensor(claims, device=visual_units.device).reshape(-1, 1), 0)  # (B, P)
    for ranking, allowed in zip(rankings.unbind(1), limit.unbind(1)):
        free = torch.gather(available, 1, ranking)  # (B, R) in this pivot's order
        left = free & (free.cumsum(dim=1) > allowed[:, None])  # free tokens past the first `allowed` stay free
        available = available.scatter(1, ranking, left)
    return visual_valid & ~available


_GROUPS = 15  # probe groups that reach a free slot: 7 while the perturbation (keys < 2**31) lasts, then 8 of a full cycle


def _probe_starts(keys: torch.Tensor) -> torch.Tensor:
    """(..., G) the first slot of each probe group of CPython's set for small non-negative int keys, modulo 32
    (take & 7 for the 8-slot table): i_0 = h, i_{g+1} = 5 i_g + 1 + (h >> 5 (g + 1)), in closed form."""
    g = torch.arange(_GROUPS, device=keys.device)
    shifts, adds = 5 * g, (g > 0).long()
    terms = ((keys[..., None] >> shifts) + adds) & 31  # (..., G): i_0's h, then each step's 1 + perturbation
    powers = torch.tensor([[pow(5, a - b, 32) if b <= a else 0 for b in range(_GROUPS)] for a in range(_GROUPS)],
                          device=keys.device)  # 5^(g - s) mod 32
    return (terms[..., None, :] * powers).sum(dim=-1) & 31


def python_set_order(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The order in which a Python set built from each row's valid keys (in row order) iterates them, as indices
    into the row: `[row.index(k) for k in set(row)]`, then the invalid slots. keys (B, n) distinct non-negative ints
    below 2**31, n <= 8 (CPython's set: 8 slots, resized to 32 when the 5th key arrives; linear probing of 10 slots,
    then a perturbed jump). Emulated on the device: 13 inserts of 4 ops each, no host synchronisation."""
    batch, n = keys.shape
    if n > 8:
        raise ValueError(f"python_set_order emulates sets of at most 8 keys, got {n}")
    compact = torch.argsort((~valid).long(), dim=1, stable=True)  # valid keys first, in row order
    keys = torch.where(valid, keys, 0).gather(1, compact)
    starts = _probe_starts(keys)  # (B, n, G)
    small = (starts & 7).unbind(1)  # 8-slot table: no linear probing (i + 9 > 7)
    step = torch.arange(10, device=keys.device)
    linear = torch.where((starts[..., None] <= 22) | (step == 0), starts[..., None] + step, starts[..., None])
    large = linear.flatten(2)  # (B, n, 10 G): 32-slot table, linear probing where it fits

    def insert(free, probes):  # the first free slot along the probe list
        first = torch.argmax(torch.gather(free, 1, probes), dim=1, keepdim=True)
        slot = torch.gather(probes, 1, first)
        return free.scatter(1, slot, 0), slot

    free = torch.ones(batch, 8, dtype=torch.long, device=keys.device)
    slots8: Any = []  # the slots per probe, then their (B, n) tensor
    for probes in small[:5]:
        free, slot = insert(free, probes)
        slots8.append(slot)
    slots8 = torch.cat(slots8, dim=1)  # (B, min(n, 5)) slots in the 8-slot table
    if n > 4:  # resize: the first 5 keys move to a 32-slot table in table order, then the others arrive
        moved = torch.argsort(slots8, dim=1)
        order = torch.cat([moved, torch.arange(5, n, device=keys.device).expand(batch, n - 5)], dim=1)
        free = torch.ones(batch, 32, dtype=torch.long, device=keys.device)
        slots32: Any = []
        for probes in torch.gather(large, 1, order[:, :, None].expand_as(large)).unbind(1):
            free, slot = insert(free, probes)
            slots32.append(slot)
        slots32 = torch.zeros_like(keys).scatter(1, order, torch.cat(slots32, dim=1))
        slots8 = torch.cat([slots8, torch.zeros_like(keys[:, 5:])], dim=1)
        slots = torch.where(valid.sum(dim=1, keepdim=True) > 4, slots32, slots8)
    else:
        slots = slots8
    slots = torch.where(torch.gather(valid, 1, compact), slots, 32)  # invalid keys last
    return torch.gather(compact, 1, torch.argsort(slots, dim=1, stable=True))


def dart_select(units: torch.Tensor, norms: torch.Tensor, prompt_positions: torch.Tensor, visual_slots: torch.Tensor,
                visual_valid: torch.Tensor, text_slots: torch.Tensor, text_valid: torch.Tensor,
                claims: torch.Tensor | int, pivot_image: int = 4, pivot_text: int = 4,
                pivot_order: str = "official") -> torch.Tensor:
    """DART's selection for a padded batch (`methods.dart.DART.select`'s loop body, every sample at once).

    units (B, N, D) unit-norm states (layer K-1's output through the final norm); norms (B, N) the keys' L1 norms;
    prompt_positions (B, N) long; visual_slots (B, R) / text_slots (B, T) long sequence slots with valid masks;
    claims: per pivot, an int or (B,) long. Pivots: the pivot_image visual and pivot_text text tokens of largest
    norm (ties: the earlier token), visited in the order of a Python set of their prompt positions ("official") or
    visual then text by norm ("ranked"). Returns kept (B, R) bool over the visual slots. 196 ops ("official", of which
    108 emulate the set) or 85 ("ranked") with 8 pivots, whatever B.
    """
    if pivot_order not in ("official", "ranked"):
        raise ValueError(f"DART: pivot_order={pivot_order!r}: use 'official' or 'ranked'")
    image, image_ok = top_pivots(torch.gather(norms, 1, visual_slots), visual_valid, pivot_image)  # into R
    text, text_ok = top_pivots(torch.gather(norms, 1, text_slots), text_valid, pivot_text)  # into T
    pivots = torch.cat([torch.gather(visual_slots, 1, image), torch.gather(text_slots, 1, text)], dim=1)  # slots
    pivot_ok = torch.cat([image_ok, text_ok], dim=1)
    if pivot_order == "official":
        order = python_set_order(torch.gather(prompt_positions, 1, pivots), pivot_ok)
        pivots, pivot_ok = torch.gather(pivots, 1, order), torch.gather(pivot_ok, 1, order)
    width = units.shape[-1]
    pivot_units = torch.gather(units, 1, pivots[:, :, None].expand(-1, -1, width))
    visual_units = torch.gather(units, 1, visual_slots[:, :, None].expand(-1, -1, width))
    return dart_claims(visual_units, visual_valid, image, image_ok, pivot_units, pivot_ok, claims)
