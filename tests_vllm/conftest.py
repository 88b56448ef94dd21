"""Tests of vtprune's vLLM plugin against the real vLLM (run inside the venv `scripts/vllm_env.sh` builds):

    scripts/vllm_env.sh .ci/venv-vllm && .ci/venv-vllm/bin/python -m pytest -p no:cacheprovider tests_vllm

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), without torch.compile (compilation mode 0),
float32, so that its answers can be compared with vtprune's transformers presses on the same checkpoint.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHITECTURE = "VtpruneLlavaForConditionalGeneration"
#: questions compared per configuration (the issue asks for >= 40)
NUM_QUESTIONS = 40
MAX_NEW_TOKENS = 3


def pytest_collection_modifyitems(config, items):
    """Without vLLM (e.g. the main environment) these tests cannot run: skip them, unless CI demands them."""
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        if os.environ.get("VTPRUNE_REQUIRE_VLLM") == "1":
            raise RuntimeError(f"VTPRUNE_REQUIRE_VLLM=1 but vLLM does not import: {error}") from error
        skip = pytest.mark.skip(reason=f"vLLM is not installed here ({error}); run scripts/vllm_env.sh")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """testbed-lm exported in vLLM's layout ($VTPRUNE_VLLM_CHECKPOINT if set, else exported now)."""
    given = os.environ.get("VTPRUNE_VLLM_CHECKPOINT")
    if given:
        return given
    from vtprune.vllm.export import export

    return str(export("testbed-lm", tmp_path_factory.mktemp("vllm") / "testbed-lm"))


@pytest.fixture(scope="session")
def processor(checkpoint):
    """The processor vLLM uses for the checkpoint (AutoProcessor: here the torchvision backend), also used for the
    transformers reference, so both see the same pixels."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def samples():
    from vtprune.testbed.data import make_split

    return make_split("test", NUM_QUESTIONS)


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    """testbed-lm in transformers, loaded from the exported directory's source (vtprune's loader)."""
    from vtprune.apps.loading import load_model

    model, _ = load_model("testbed-lm")
    return model


@contextmanager
def engine(checkpoint, options: dict | None, architecture: str = ARCHITECTURE, **kwargs):
    """A vLLM engine on the checkpoint: the plugin's `architecture` with `options`, or the stock model (None)."""
    from vllm import LLM

    overrides = None if options is None else {"architectures": [architecture], "vtprune": options}
    llm = LLM(model=checkpoint, hf_overrides=overrides, dtype="float32", max_model_len=512, seed=0,
              limit_mm_per_prompt={"image": 1}, compilation_config={"mode": 0}, enforce_eager=True, **kwargs)
    try:
        yield llm
    finally:  # shut the in-process engine down now: a later collection would tear down the next engine's groups
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_answers(llm, processor, samples, *, one_by_one: bool = False, options=None):
    """[(generated token ids, their logprobs, prompt token ids)] greedy, MAX_NEW_TOKENS, per sample. options: the
    per-request vtprune options (mm_processor_kwargs {"vtprune": ...}), one dict for all or a list per sample."""
    from vllm import SamplingParams

    from vtprune.apps.loading import build_prompt

    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, logprobs=0)
    requests = [{"prompt": build_prompt(processor, s.question), "multi_modal_data": {"image": s.image}}
                for s in samples]
    per_sample = options if isinstance(options, list) else [options] * len(samples)
    for request, option in zip(requests, per_sample):
        if option is not None:
            request["mm_processor_kwargs"] = {"vtprune": option}
    if one_by_one:
        outputs = [llm.generate([r], params, use_tqdm=False)[0] for r in requests]
    else:
        outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        results.append((ids, logprobs, list(output.prompt_token_ids)))
    return results


def hf_answers(model, processor, samples, press=None):
    """The same with transformers' greedy generate (one sample at a time: no batch padding), `press` active:
    [(generated token ids up to and including EOS, their logprobs from the raw logits, kept prompt length)]."""
    import torch

    from vtprune.apps.loading import build_inputs

    eos = processor.tokenizer.eos_token_id
    results = []
    for sample in samples:
        inputs = build_inputs(processor, [sample.image], [sample.question])
        context = press(model, processor=processor, image_sizes=[sample.image.size]) if press else _null()
        with context, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item() for step, token in zip(out.logits, new)]
        results.append((new, logprobs, inputs["input_ids"][0].tolist()))
    return results


@contextmanager
def _null():
    yield
