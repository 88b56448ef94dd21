"""`vllm serve` with the plugin answers OpenAI-style chat requests with images, as vtprune's transformers press."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

from conftest import ARCHITECTURE, hf_answers

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vllm_serve.py"


def _bench():
    spec = importlib.util.spec_from_file_location("vllm_serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_serve_answers_chat_requests_like_the_press(checkpoint, processor, samples, hf_model):
    """The model's options, and a request's own (the body's mm_processor_kwargs), as the presses; a bad request
    option is an HTTP 400 naming it, and the server goes on."""
    import vtprune

    bench = _bench()
    questions = samples[:8]
    options = {"method": "visionzip", "dominant": 30, "contextual": 6, "debias_padding": True}
    press = vtprune.VisionZip(dominant=30, contextual=6, debias=vtprune.Debias(padding=True))

    def decoded(press, some):
        return [processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids, _, _ in hf_answers(hf_model, processor, some, press)]

    expected = decoded(press, questions)
    expected_divprune = decoded(vtprune.DivPrune(keep=18), questions[:4])
    per_request = {"mm_processor_kwargs": {"vtprune": {"method": "divprune", "keep": 18}}}
    port = bench.free_port()
    with tempfile.TemporaryFile("w+") as log:
        # vLLM's server takes a request's mm_processor_kwargs only with --trust-request-mm-kwargs
        server = bench.start_server(checkpoint, port, {"architectures": [ARCHITECTURE], "vtprune": options}, log,
                                    ["--trust-request-mm-kwargs"])
        try:
            bench.wait_healthy(server, port, timeout=600)
            answers = [bench.chat_request(port, bench.data_url(s.image), s.question, 3)[2].strip() for s in questions]
            divprune = [bench.chat_request(port, bench.data_url(s.image), s.question, 3, per_request)[2].strip()
                        for s in questions[:4]]
            with pytest.raises(RuntimeError) as refused:
                bench.chat_request(port, bench.data_url(questions[0].image), questions[0].question, 3,
                                   {"mm_processor_kwargs": {"vtprune": {"keep": 0}}})
            after = bench.chat_request(port, bench.data_url(questions[0].image), questions[0].question, 3)[2].strip()
        finally:
            bench.stop_server(server)
    assert answers == expected
    assert divprune == expected_divprune
    assert "HTTP 400" in str(refused.value) and "keep" in str(refused.value), refused.value
    assert after == expected[0]
