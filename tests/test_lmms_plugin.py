"""The lmms-eval plugin against the real lmms-eval package (0.7.3, installed with --no-deps as the README says):
the models are resolved through lmms-eval's own registry by name and answer generate requests built the way
lmms-eval's tasks build them (simple: (context, gen_kwargs, doc_to_visual, doc_id, task, split); chat:
(context, doc_to_messages, gen_kwargs, doc_id, task, split)), on the shipped testbed model, with and without
a press. Skipped when lmms-eval is not installed, unless VTPRUNE_REQUIRE_LMMS_EVAL=1 (CI sets it)."""

from __future__ import annotations

import json
import os

import pytest
import torch

try:
    import lmms_eval.models as lmms_models
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.simple.llava_hf import LlavaHf as LmmsLlavaHf
except ImportError as error:  # pragma: no cover - depends on the environment
    if os.environ.get("VTPRUNE_REQUIRE_LMMS_EVAL") == "1":
        raise
    pytest.skip(f"lmms-eval is not installed ({error}); pip install --no-deps lmms-eval==0.7.3", allow_module_level=True)

from vtprune.testbed.data import make_split

TASKS = ("gqa", "toy")
GEN = {"max_new_tokens": 3, "until": ["</s>"], "temperature": 0}
CPU = {"batch_size": 1, "device": "cpu"}  # what lmms-eval's evaluator adds to the model_args


@pytest.fixture(scope="module")
def docs():
    samples = make_split("test", 6)
    return {task: {"test": {i: {"question": s.question, "image": s.image, "answer": s.answer}
                            for i, s in enumerate(samples[3 * t: 3 * t + 3])}}
            for t, task in enumerate(TASKS)}


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_messages(doc):  # what ConfigurableMessagesTask builds from doc_to_visual and doc_to_text
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]}]


def requests(docs, chat: bool) -> list:
    out = []
    for task in TASKS:
        for doc_id, doc in docs[task]["test"].items():
            gen = dict(GEN)
            arguments = ((doc["question"], doc_to_messages, gen, doc_id, task, "test") if chat
                         else (doc["question"], gen, doc_to_visual, doc_id, task, "test"))
            out.append(Instance(request_type="generate_until", arguments=arguments, idx=0,
                                metadata={"task": task, "doc_id": doc_id, "repeats": 1}))
    return out


def load(name: str, args: str, docs, simple: bool = False):
    cls = lmms_models.get_model(name, force_simple=simple)
    lm = cls.create_from_arg_string(args, dict(CPU))
    lm.task_dict = docs
    return lm


def texts(outputs) -> list[str]:
    return [getattr(o, "text", o) for o in outputs]


def test_the_registry_resolves_our_names():
    names = lmms_models.list_available_models()
    for name in ("vtprune_llava_hf", "vtprune_qwen2_5_vl", "vtprune_video_llava"):
        assert name in names
    registry = lmms_models.MODEL_REGISTRY_V2
    assert registry.resolve("vtprune_llava_hf").class_path == "vtprune.lmms.llava_hf.LlavaHfChat"
    assert registry.resolve("vtprune_llava_hf", force_simple=True).class_path == "vtprune.lmms.llava_hf.LlavaHf"
    assert registry.resolve("vtprune_qwen2_5_vl").model_type == "chat"
    assert registry.resolve("vtprune_video_llava").class_path == "vtprune.lmms.video_llava.VideoLLaVA"
    chat, simple = lmms_models.get_model("vtprune_llava_hf"), lmms_models.get_model("vtprune_llava_hf", force_simple=True)
    assert issubclass(chat, lmms) and not chat.is_simple and simple.is_simple and issubclass(simple, LmmsLlavaHf)
    assert lmms_models.get_model("vtprune_qwen2_5_vl", force_simple=True).__name__ == "Qwen2_5_VL"


@pytest.mark.parametrize("simple", [False, True], ids=["chat", "simple"])
def test_generate_with_and_without_a_press(docs, simple):
    plain = load("vtprune_llava_hf", "pretrained=testbed,dtype=float32", docs, simple)
    unpruned = texts(plain.generate_until(requests(docs, chat=not simple)))
    assert all(r["kept"] is None for r in plain.vtprune_requests)
    own = load("llava_hf", f"pretrained={plain.pretrained},dtype=float32,device_map=cpu", docs, simple)  # lmms-eval's
    if simple:
        own.chat_template = plain.tokenizer.chat_template
    assert texts(own.generate_until(requests(docs, chat=not simple))) == unpruned  # the plugin changes nothing unpruned

    pruned_lm = load("vtprune_llava_hf", "pretrained=testbed,dtype=float32,method=fastv,keep=0.1,debias=both", docs, simple)
    pruned = texts(pruned_lm.generate_until(requests(docs, chat=not simple)))
    records = pruned_lm.vtprune_requests
    assert [r["task"] for r in records] == ["gqa"] * 3 + ["toy"] * 3  # one task at a time
    assert all(r["visual"] == 144 and r["kept"] == 14 for r in records)  # 10% of the testbed's 144 tokens
    outputs = pruned_lm.generate_until(requests(docs, chat=not simple))
    logged = [o.token_counts.to_dict()["vtprune"] for o in outputs]  # what --log_samples writes per sample
    assert all(r["pruned"] and r["visual_tokens"] == 144 and r["kept"] == [14] and r["layers"] == [2] for r in logged)
    assert all(r["method"] == "fastv" and r["debias"] == "both" and r["profile"] == "testbed/fastv" for r in logged)
    assert all(r["schedule"] == [{"layer": 2, "keep": 0.1}] for r in logged)
    unpruned_logged = [o.token_counts.to_dict()["vtprune"] for o in plain.generate_until(requests(docs, chat=not simple))]
    assert all(r == {"method": "none", "pruned": False, "images": 1, "videos": 0} for r in unpruned_logged)

    # the same press run by vtprune itself gives the same answers
    from vtprune import Debias, FastV
    from vtprune.apps.runner import run_examples
    from vtprune.testbed.model import load_testbed

    model, processor = load_testbed()
    questions = [make_split("test", 6)[i] for i in range(6)]
    press = FastV(keep=0.1, debias=Debias(profile="testbed/fastv", padding=True))
    mine = run_examples(model, processor, questions, press, max_new_tokens=3, batch_size=1).answers
    assert pruned == mine
    assert sum(a == q.answer for a, q in zip(unpruned, questions)) >= 3  # the testbed answers (64.5% on 1000)


def test_errors_surface_instead_of_empty_answers(docs, monkeypatch):
    from vtprune.methods.fastv import FastV

    own = load("llava_hf", "pretrained=" + str(_checkpoint()) + ",dtype=float32,device_map=cpu", docs)
    monkeypatch.setattr(own.model, "generate", _raise)
    assert texts(own.generate_until(requests(docs, chat=True)[:1])) == [""]  # lmms-eval scores the failure as ''

    lm = load("vtprune_llava_hf", "pretrained=testbed,dtype=float32,method=fastv,keep=8", docs)
    monkeypatch.setattr(FastV, "score", lambda self, ctx: _raise())
    with pytest.raises(RuntimeError, match="the press failed"):
        lm.generate_until(requests(docs, chat=True))
    lm_simple = load("vtprune_llava_hf", "pretrained=testbed,dtype=float32,method=fastv,keep=8", docs, simple=True)
    with pytest.raises(RuntimeError, match="the press failed"):
        lm_simple.generate_until(requests(docs, chat=False))


def _raise(*args, **kwargs):
    raise RuntimeError("the press failed")


def _checkpoint():
    from vtprune.testbed.model import CHECKPOINT_DIR

    return CHECKPOINT_DIR


@pytest.mark.parametrize("args, message", [
    ("method=nope", "method='nope': unknown"),
    ("method=random,debias=both", "ranks without attention"),
    ("method=fastv,keep=0", "keep"),
    ("method=pdrop,layer=[2,10,99]", "layer"),
    ("method=fastv,pad_to_square=maybe", "pad_to_square='maybe'"),
    ("budget=128", "method=none runs the unpruned model"),
    ("method=fastv,profile=missing.json", "missing.json"),
])
def test_model_args_mistakes(docs, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load("vtprune_llava_hf", f"pretrained=testbed,{args}", docs)


@pytest.mark.parametrize("args", ["", ",method=fastv,budget=0.25"])
def test_testbed_lm_is_refused_with_the_commands_that_evaluate_it(docs, args):
    with pytest.raises(ValueError, match="vtprune testbed eval --model testbed-lm"):
        load("vtprune_llava_hf", f"pretrained=testbed-lm{args}", docs, simple=True)


def test_a_family_without_adapter_fails_before_loading(tmp_path, docs):
    from transformers import Gemma3Config

    Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]).save_pretrained(tmp_path)  # no weights
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    with pytest.raises(ValueError, match=r"vtprune_llava_hf: .*Gemma3ForConditionalGeneration.*method=none"):
        load("vtprune_llava_hf", f"pretrained={tmp_path},method=fastv,budget=128", docs, simple=True)


@pytest.mark.parametrize("name", ["vtprune_qwen2_5_vl"])  # vtprune_video_llava's wrapper needs `av` (not in `test`)
def test_a_checkpoint_of_another_family_is_refused_before_loading(docs, name):
    with pytest.raises(ValueError, match=f"{name} loads .* but .* is a llava model: use --model vtprune_llava_hf") as error:
        load(name, f"pretrained={_checkpoint()}", docs)
    assert len(str(error.value).splitlines()) == 1


def test_the_banner_shows_the_effective_schedule(docs, capsys):
    load("vtprune_llava_hf", "pretrained=testbed,dtype=float32,method=fastv", docs)
    banner = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vtprune_llava_hf: ")]
    assert banner == ["vtprune_llava_hf: fastv: before layer 2 keep 64; positions original; debias both: positional "
                      "profile testbed/fastv, padding on; pad_to_square=True"]


def test_pad_to_square_is_the_default_for_llava(tmp_path, docs):
    from conftest import build_model, build_processor

    cropping = build_processor(do_pad=False)
    build_model(cropping).save_pretrained(tmp_path)
    cropping.save_pretrained(tmp_path)
    base = f"pretrained={tmp_path},dtype=float32,method=fastv,keep=8,debias=padding"
    padded = load("vtprune_llava_hf", base, docs, simple=True)
    assert padded.vtprune_pad_to_square is True and padded._image_processor.image_processor.do_pad is True
    texts(padded.generate_until(requests(docs, chat=False)[:1]))
    assert padded.vtprune_requests[0]["kept"] <= 8

    from vtprune.core.engine import _NEVER_PADS_WARNED

    _NEVER_PADS_WARNED.clear()
    cropped = load("vtprune_llava_hf", base + ",pad_to_square=False", docs, simple=True)
    assert cropped._image_processor.image_processor.do_pad is False
    with pytest.warns(UserWarning, match="does not pad images"):
        texts(cropped.generate_until(requests(docs, chat=False)[:1]))


def test_loglikelihood_is_refused_while_pruning(docs):
    lm = load("vtprune_llava_hf", "pretrained=testbed,dtype=float32,method=fastv,keep=8", docs)
    request = Instance(request_type="loglikelihood", arguments=("q", " yes", doc_to_visual, 0, "gqa", "test"), idx=0,
                       metadata={"task": "gqa", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([request])


@pytest.mark.parametrize("slug", ["full", "pdrop-debias"])
def test_reproduce_commands_parse_in_lmms_eval(docs, slug):
    """The model_args `vtprune reproduce` prints, parsed by lmms-eval itself, build a working model."""
    from vtprune.apps import reproduce as rep

    spec = rep.table("paper-llava15")
    row = next(r for r in spec.rows if r.slug == slug)
    args = rep.model_args(spec, row, budget=128, pretrained="testbed") + ",dtype=float32"
    lm = load("vtprune_llava_hf", args, docs)
    assert lm.vtprune_pad_to_square is True
    answers = texts(lm.generate_until(requests(docs, chat=True)[:2]))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    kept = [r["kept"] for r in lm.vtprune_requests]
    assert kept == ([None, None] if row.method is None else [kept[0]] * 2) and (row.method is None or kept[0] < 144)


def test_a_qwen_video_request_goes_through_the_press(tmp_path):
    """Video inputs reach the press through the plugin's generate(), here Qwen2.5-VL's (lmms-eval's qwen2_5_vl
    wrapper reads videos with qwen-vl-utils, which needs torchvision: the wrapper is stood in for by the part the
    plugin uses, a model and a processor): pruned at the budget, recorded as a video, keep-all == unpruned."""
    from families import build_qwen2_5_vl, qwen_inputs

    from vtprune.lmms.base import PressMixin

    config = build_qwen2_5_vl().config
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(tmp_path)  # what the checks before loading read

    class Wrapper:
        def __init__(self, pretrained: str = ""):
            self.model = build_qwen2_5_vl()
            self.processor = None

    class Plugin(PressMixin, Wrapper):
        processor_attribute = "processor"

    inputs = qwen_inputs([([], [(2, 8, 8)], [5, 6, 7])])  # one video: 2 temporal groups of 4x4 merged patches
    outputs = {}
    for name, args in {"none": {}, "fastv": {"method": "fastv", "budget": "0.25", "debias": "none"},
                       "keep-all": {"method": "fastv", "keep": "1.0", "debias": "none"}}.items():
        lm = Plugin(pretrained=str(tmp_path), **args)
        with torch.no_grad():
            outputs[name] = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        outputs[name + " record"] = lm.vtprune_requests[-1]
    assert outputs["fastv record"] == {"task": None, "images": 0, "videos": 1, "visual": 32, "kept": 8}
    assert outputs["keep-all record"]["kept"] == 32 and outputs["none record"]["kept"] is None
    assert torch.equal(outputs["keep-all"], outputs["none"])
