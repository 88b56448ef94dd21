"""`vllm serve` with the plugin answers OpenAI-style chat requests with images, as vtprune's transformers press."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from conftest import ARCHITECTURE, hf_answers

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vllm_serve.py"


def _bench():
    spec = importlib.util.spec_from_file_location("vllm_serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_serve_answers_chat_requests_like_the_press(checkpoint, processor, samples, hf_model):
    import vtprune

    bench = _bench()
    questions = samples[:8]
    options = {"method": "visionzip", "dominant": 30, "contextual": 6, "debias_padding": True}
    press = vtprune.VisionZip(dominant=30, contextual=6, debias=vtprune.Debias(padding=True))
    expected = [processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids, _, _ in hf_answers(hf_model, processor, questions, press)]
    port = bench.free_port()
    with tempfile.TemporaryFile("w+") as log:
        server = bench.start_server(checkpoint, port, {"architectures": [ARCHITECTURE], "vtprune": options}, log)
        try:
            bench.wait_healthy(server, port, timeout=600)
            answers = [bench.chat_request(port, bench.data_url(s.image), s.question, 3)[2].strip() for s in questions]
        finally:
            bench.stop_server(server)
    assert answers == expected
