"""Applications built on the core: loading models and data, running presses over examples, calibration, analysis,
evaluation, reproduction, figures and the demo. Nothing in `core`, `methods`, `debias` or `adapters` imports them;
the testbed, the lmms-eval and vLLM plugins and the command line (`vtprune.cli`) sit on top of them."""
