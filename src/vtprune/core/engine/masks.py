"""The model's attention mask, position ids and RoPE tables restricted to the tokens a cut keeps."""

from __future__ import annotations

import torch


def _compact_positions(
    position_ids0: torch.Tensor | None, base_valid: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(B, N_new) renumbered positions: each sample's real tokens count up from its first real position."""
    batch = valid.shape[0]
    if position_ids0 is None:
        start = torch.zeros(batch, dtype=torch.long, device=valid.device)
    else:
        first = base_valid.long().argmax(dim=1)
        start = torch.gather(position_ids0.expand(batch, -1), 1, first[:, None]).flatten()
    return torch.where(valid, start[:, None] + valid.long().cumsum(1) - 1, 0)


def _gather_seq(tensor: torch.Tensor, index: torch.Tensor, padded: bool = True) -> torch.Tensor:
    """Gather the sequence dimension of cos/sin (b, N, d) or position ids (b, N) / (k, b, N) at `index`
    (B, M) base positions; -1 (engine padding) takes position 0's values (they are masked anyway)."""
    batch = index.shape[0]
    if padded:
        index = index.clamp(min=0)
    if tensor.dim() == 3 and tensor.shape[0] in (1, batch) and tensor.shape[1] != batch:  # (b, N, d)
        expanded = tensor.expand(batch, -1, -1)
        return torch.gather(expanded, 1, index[:, :, None].expand(-1, -1, tensor.shape[-1]))
    if tensor.dim() == 2:  # (b, N)
        return torch.gather(tensor.expand(batch, -1), 1, index)
    if tensor.dim() == 3:  # (k, b, N) multimodal position ids
        expanded = tensor.expand(-1, batch, -1)
        return torch.gather(expanded, 2, index[None].expand(tensor.shape[0], -1, -1))
    raise ValueError(f"unexpected positional tensor shape {tuple(tensor.shape)}")


def _gather_embeddings(
    embeddings: tuple[torch.Tensor, ...], index: torch.Tensor, padded: bool
) -> tuple[torch.Tensor, ...]:
    """`_gather_seq` of the RoPE tables (cos, sin), each (b, N, d), at `index` (B, M), with one expanded index."""
    batch, width = index.shape[0], embeddings[0].shape[-1]
    if not all(
        t.dim() == 3 and t.shape[0] in (1, batch) and t.shape[1] != batch and t.shape[2] == width for t in embeddings
    ):
        return tuple(_gather_seq(t, index, padded) for t in embeddings)
    rows = (index.clamp(min=0) if padded else index)[:, :, None].expand(-1, -1, width)
    return tuple(torch.gather(t.expand(batch, -1, -1), 1, rows) for t in embeddings)


def _select_mask(
    mask0,
    rows: torch.Tensor,
    row_sub: torch.Tensor | None,
    cols: torch.Tensor,
    col_sub: torch.Tensor | None,
    *,
    prefill: bool,
    padded: bool,
):
    """The model's attention mask restricted to query `rows` and key `cols` (B, R) / (B, C) base positions
    (-1 = engine padding), in the model's own format. Tokens sharing a base position (inserted tokens and
    their anchor) are ordered causally by their sub order.

    mask0 is what the model built for the full sequence: None (sdpa's implicit causal mask), a 4-D bool
    mask (sdpa, True = attend), a 4-D additive float mask (eager), or a 2-D padding mask (flash attention).
    Engine-padding keys are masked; engine-padding queries attend only to themselves (no NaN rows).
    padded: whether rows/cols may hold engine padding; sub orders None: no inserted tokens (both host facts,
    so that nothing is read from the device).
    """
    inserted = row_sub is not None or col_sub is not None
    if mask0 is None and not padded:
        return None  # plain causal over the current order (inserted tokens sit in order): let the kernel do it
    if mask0 is not None and not isinstance(mask0, torch.Tensor):
        raise ValueError(
            f"vtprune cannot cut an attention mask of type {type(mask0).__name__} (flex attention); "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    if mask0 is not None and mask0.dim() == 2:  # flash attention: (B, K) padding mask
        if inserted:
            raise ValueError("inserted tokens need a 4-D attention mask: use attn_implementation='sdpa' or 'eager'")
        if not padded:
            return torch.gather(mask0, 1, cols)
        return torch.gather(mask0, 1, cols.clamp(min=0)).masked_fill(cols < 0, 0)
    if mask0 is None:
        allowed = cols[:, None, None, :] <= rows[:, None, :, None]  # (B, 1, R, C) causal on base positions
    else:
        full = mask0.expand(rows.shape[0], -1, -1, -1)
        if prefill:
            full = torch.gather(
                full, 2, rows.clamp(min=0)[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
            )
        else:
            full = full[:, :, -rows.shape[1] :]
        gathered = torch.gather(
            full, 3, cols.clamp(min=0)[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1)
        )
        allowed = gathered if gathered.dtype == torch.bool else gathered == 0
    if inserted:  # same base position: the earlier sub order does not see the later
        row_sub = torch.zeros(rows.shape, dtype=torch.float64, device=rows.device) if row_sub is None else row_sub
        col_sub = torch.zeros(cols.shape, dtype=torch.float64, device=cols.device) if col_sub is None else col_sub
        same = rows[:, None, :, None] == cols[:, None, None, :]
        allowed = allowed & ~(same & (col_sub[:, None, None, :] > row_sub[:, None, :, None]))
    if padded:
        allowed = allowed & (cols >= 0)[:, None, None, :]
        if prefill:
            eye = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
            allowed = allowed | (eye[None, None] & (rows < 0)[:, None, :, None])
    if mask0 is None or mask0.dtype == torch.bool:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(mask0.dtype).min).to(mask0.dtype)
