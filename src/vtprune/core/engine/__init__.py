"""The pruning engine: the only code that cuts sequences.

`PruningSession` attaches a press to a model with forward hooks (removed on exit; the model's modules,
weights and attributes are never modified). Per forward call:

* **Prefill** (the prompt contains visual tokens): the input hook finds the visual tokens (adapter). For each
  stage, at the pre-hook of the layer it cuts before, the press decides (`press.select(ctx)`, from a
  `StageContext` that computes attention lazily from the scoring layer's recorded input and the keys that
  layer projected while it ran). The engine then gathers the kept tokens of the hidden states, writes merged
  values, inserts extra tokens, and from then on hands every later layer the matching rows/columns of the
  model's own attention mask and the RoPE tables and position ids: the original positions, or renumbered
  ones (`positions="compact"`). A stage at layer 0 cuts the language model's input instead (embeddings, 2-D
  mask, position ids), so every decoder layer runs on the shorter sequence. Samples of a batch that keep
  different numbers of tokens are left-padded with masked slots.
* **Decode** (no visual tokens, continuing the cache filled by that prefill): nothing is pruned; layers
  after a cut get the columns of the model's mask that match what their KV cache holds (kept prompt tokens,
  then every generated token), and, with compact positions, generated tokens continue each segment's
  numbering (as the official PyramidDrop/SparseVLM code does).

Index spaces: a *prompt position* is a token's index in the uncut prompt. The *base sequence* is what decoder
layer 0 receives: the prompt, or the prompt after a layer-0 cut. Each token of a request has an *id*: base
tokens have ids 0..base_len-1, tokens inserted later (merged/recycled) get further ids; every id has an
*anchor* (the base token whose row/column of the model's mask and whose position it shares) and a *sub*
order among tokens sharing an anchor. *Slots* are positions in the sequence as it is now; `slots` maps each
slot to its id (-1: padding inserted by the engine).

Parts: `session` (hooks, the per-forward flow), `request` (per-request state and its setup), `records`
(deciding and recording stages), `sequence` (cutting hidden states), `masks` (masks and positions), `cache`
(trimming the KV cache, decode steps), `vision` (vision-side stages).
"""

from .request import _NEVER_PADS_WARNED  # noqa: F401  (tests reset it)
from .session import PruningSession

__all__ = ["PruningSession"]
