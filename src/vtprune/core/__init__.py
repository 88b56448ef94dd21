"""The pruning core: presses (`press`), the stages they declare (`stages`), the per-forward context they score in
(`context`, `scoring`), the batched selection algorithms (`selection`, `selections`, `budgets`) and the engine that
cuts hidden states, positions, masks and caches (`engine`). It builds on `adapters` and `debias`; the methods sit
on top of it."""
