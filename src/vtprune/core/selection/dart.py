"""DART's pivots and per-pivot claims of the least similar tokens, batched over samples."""

from __future__ import annotations

from typing import Any

import torch


def top_pivots(norms: torch.Tensor, valid: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `count` tokens of largest norm per row, largest first (ties: the earlier token; torch.topk, which the
    per-sample code calls, leaves CPU ties unspecified). norms (B, N), valid (B, N) bool (None: every token).
    Returns indices (B, c) long, c = min(count, N), and ok (B, c) bool (False past a row's valid tokens; None
    without a mask)."""
    count = min(count, norms.shape[1])
    if valid is None:
        return torch.argsort(norms, dim=1, descending=True, stable=True)[:, :count], None
    order = torch.argsort(torch.where(valid, norms, float("-inf")), dim=1, descending=True, stable=True)[:, :count]
    return order, torch.gather(valid, 1, order)


def dart_claims(
    visual_units: torch.Tensor,
    visual_valid: torch.Tensor | None,
    image_pivots: torch.Tensor,
    image_pivot_ok: torch.Tensor | None,
    pivot_units: torch.Tensor,
    pivot_ok: torch.Tensor | None,
    claims: torch.Tensor | int,
) -> torch.Tensor:
    """DART's selection: each pivot in turn claims the `claims` available visual tokens least similar to it
    (cosine; ties: the earlier token); the image pivots and every claimed token stay.

    visual_units (B, R, D) unit-norm states of the visual tokens; visual_valid (B, R) bool; image_pivots (B, Pi)
    long indices into R, image_pivot_ok (B, Pi) bool; pivot_units (B, P, D) unit-norm states of all pivots in
    visiting order, pivot_ok (B, P) bool; claims: tokens per pivot, an int or (B,) long. The masks may be None
    (every token, every pivot real). Returns kept (B, R) bool.

    The visits stay a loop over the P pivots (a constant, 8 as published: each visit sees what the earlier ones
    left), 4 ops each: every pivot's ranking is sorted once up front, and a visit claims the first `claims`
    still-available tokens of its ranking (a cumulative count). About 4 P + 12 ops, whatever B.
    """
    # an image pivot stays; an invalid one points at an invalid slot, where nothing is available anyway
    batch, width, _ = visual_units.shape
    available = (
        torch.ones(batch, width, dtype=torch.long, device=visual_units.device)
        if visual_valid is None
        else visual_valid.long()
    )
    available = available.scatter(1, image_pivots, 0)  # (B, R) 1 where a token can still be claimed
    similarity = torch.bmm(visual_units, pivot_units.transpose(1, 2)).transpose(1, 2)  # (B, P, R)
    rankings = torch.argsort(similarity, dim=2, stable=True)  # least similar first, ties: the earlier token
    # a free token stays free past the first `allowed` ones: cumulative count // (allowed + 1) >= 1
    claims = claims if isinstance(claims, int) else claims.reshape(-1, 1)
    divisors: Any
    if pivot_ok is None:
        divisors = [claims + 1] * rankings.shape[1]
    else:
        divisors = (torch.where(pivot_ok, claims, 0) + 1)[:, :, None].unbind(1)
    for ranking, divisor in zip(rankings.unbind(1), divisors):
        free = torch.gather(available, 1, ranking)  # (B, R) 0 / 1 in this pivot's order
        available = available.scatter_reduce(1, ranking, free.cumsum(dim=1) // divisor, "amin")
    return available == 0 if visual_valid is None else visual_valid > available  # valid and no longer available


_GROUPS = (
    15  # probe groups that reach a free slot: 7 while the perturbation (keys < 2**31) lasts, then 8 of a full cycle
)
_SHIFTS = [5 * g for g in range(_GROUPS)]  # h >> 5 g: the perturbation of group g
_ADDS = [int(g > 0) for g in range(_GROUPS)]  # each jump adds 1
_POWERS = [[pow(5, a - b, 32) if b <= a else 0 for b in range(_GROUPS)] for a in range(_GROUPS)]  # 5^(a - b) mod 32


def _probe_starts(keys: torch.Tensor) -> torch.Tensor:
    """(..., G) the first slot of each probe group of CPython's set for small non-negative int keys, modulo 32
    (take & 7 for the 8-slot table): i_0 = h, i_{g+1} = 5 i_g + 1 + (h >> 5 (g + 1)), in closed form."""
    device = keys.device
    terms = (keys[..., None] >> torch.tensor(_SHIFTS, device=device)) + torch.tensor(_ADDS, device=device)
    return (terms[..., None, :] * torch.tensor(_POWERS, device=device)).sum(dim=-1) & 31


def _first_free(priority: torch.Tensor, rows: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Insert n keys in turn into a table, each into its free slot of least priority (its earliest probe).
    priority (B, n, S) long (overwritten), rows (B, 1) = arange(B), taken: a long scalar above every priority.
    Returns the slots (B, n): 2 ops a key."""
    slots = []
    for key, row in enumerate(priority.unbind(1)):  # views: they see the slots taken since
        slots.append(torch.argmin(row, dim=1, keepdim=True))
        if key + 1 < priority.shape[1]:
            priority[rows, :, slots[-1]] = taken  # for every key
    return torch.cat(slots, dim=1)


def _priority(probes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, n, size) the first position of each slot in each key's probe list (B, n, Q), Q where it never comes."""
    batch, n, count = probes.shape
    position = torch.arange(count, device=probes.device).expand(batch, n, count)
    return torch.full((batch, n, size), count, device=probes.device).scatter_reduce(2, probes, position, "amin")


def python_set_order(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The order in which a Python set built from each row's valid keys (in row order) iterates them, as indices
    into the row: `[row.index(k) for k in set(row)]`, then the invalid slots (valid None: none). keys (B, n) distinct non-negative ints
    below 2**31, n <= 8 (CPython's set: 8 slots, resized to 32 when the 5th key arrives; linear probing of 10 slots,
    then a perturbed jump). Emulated on the device: 13 inserts of 2 ops each, no host synchronisation."""
    batch, n = keys.shape
    if n > 8:
        raise ValueError(f"python_set_order emulates sets of at most 8 keys, got {n}")
    if valid is not None:
        compact = torch.argsort(valid, dim=1, descending=True, stable=True)  # valid keys first, in row order
        keys = torch.gather(keys, 1, compact)  # the invalid keys come last: what they do changes no valid key's slot
        count = valid.sum(dim=1, keepdim=True)
    starts = _probe_starts(keys)  # (B, n, G)
    rows, taken = torch.arange(batch, device=keys.device)[:, None], torch.tensor(1 << 20, device=keys.device)
    slots8 = _first_free(_priority(starts[:, :5] & 7, 8), rows, taken)  # (B, min(n, 5)) 8-slot table: no linear probing
    # up to 4 keys: the 8-slot table's order; from 5: the order in which they move to the 32-slot table
    if valid is not None:
        position = torch.arange(n, device=keys.device)
        slots8 = torch.where(position[: slots8.shape[1]] < count, slots8, 8)
    order = torch.sort(slots8, dim=1, stable=True).indices
    if n > 4:  # resize: the first 5 keys move to a 32-slot table in table order, then the others arrive
        if n > 5:
            order = torch.cat([order, torch.arange(5, n, device=keys.device).expand(batch, n - 5)], dim=1)
        starts = starts[..., None]
        linear = starts + torch.arange(10, device=keys.device) * (starts <= 22)  # (B, n, G, 10)
        priority = _priority(linear.flatten(2), 32)  # linear probing where it fits, then a perturbed jump
        slots32 = _first_free(
            torch.gather(priority, 1, order[:, :, None].expand(batch, n, 32)), rows, taken
        )  # insertion order
        if valid is not None:
            moved = position < torch.where(count > 4, count, 0)  # valid keys once the table has grown; else none
            slots32 = torch.where(moved, slots32, 32 + position)
        order = torch.gather(order, 1, torch.argsort(slots32, dim=1))
    return order if valid is None else torch.gather(compact, 1, order)


def dart_select(
    units: torch.Tensor,
    norms: torch.Tensor,
    prompt_positions: torch.Tensor,
    visual_slots: torch.Tensor,
    visual_valid: torch.Tensor,
    text_slots: torch.Tensor,
    text_valid: torch.Tensor,
    claims: torch.Tensor | int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    pivot_order: str = "official",
) -> torch.Tensor:
    """DART's selection for a padded batch (`methods.dart.DART.select`'s loop body, every sample at once).

    units (B, N, D) unit-norm states (layer K-1's output through the final norm); norms (B, N) the keys' L1 norms;
    prompt_positions (B, N) long; visual_slots (B, R) / text_slots (B, T) long sequence slots with valid masks
    (None: every slot);
    claims: per pivot, an int or (B,) long. Pivots: the pivot_image visual and pivot_text text tokens of largest
    norm (ties: the earlier token), visited in the order of a Python set of their prompt positions ("official") or
    visual then text by norm ("ranked"). Returns kept (B, R) bool over the visual slots. 157 ops ("official", of which
    88 emulate the set) or 69 ("ranked") with 8 pivots, whatever B.
    """
    if pivot_order not in ("official", "ranked"):
        raise ValueError(f"DART: pivot_order={pivot_order!r}: use 'official' or 'ranked'")
    image, image_ok = top_pivots(torch.gather(norms, 1, visual_slots), visual_valid, pivot_image)  # into R
    text, text_ok = top_pivots(torch.gather(norms, 1, text_slots), text_valid, pivot_text)  # into T
    pivots = torch.cat([torch.gather(visual_slots, 1, image), torch.gather(text_slots, 1, text)], dim=1)  # slots
    pivot_ok = None
    if image_ok is not None or text_ok is not None:
        pivot_ok = torch.cat(
            [
                torch.ones_like(image, dtype=torch.bool) if image_ok is None else image_ok,
                torch.ones_like(text, dtype=torch.bool) if text_ok is None else text_ok,
            ],
            dim=1,
        )
    if pivot_order == "official":
        order = python_set_order(torch.gather(prompt_positions, 1, pivots), pivot_ok)
        pivots = torch.gather(pivots, 1, order)
        pivot_ok = None if pivot_ok is None else torch.gather(pivot_ok, 1, order)
    width = units.shape[-1]
    pivot_units = torch.gather(units, 1, pivots[:, :, None].expand(-1, -1, width))
    visual_units = torch.gather(units, 1, visual_slots[:, :, None].expand(-1, -1, width))
    return dart_claims(visual_units, visual_valid, image, image_ok, pivot_units, pivot_ok, claims)
