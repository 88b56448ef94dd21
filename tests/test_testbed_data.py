"""Testbed: synthetic data, tokenizer/processor, model construction and one training step."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from vtprune.testbed.data import ANSWER_VOCAB, SHAPES, plural, make_sample, make_split, prompt_for, sample_digest
from vtprune.testbed.model import GRID, IMAGE_TOKEN, build_model, build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def train_samples():
    return make_split("train", 300, seed=0)


def test_deterministic():
    a, b = make_split("val", 20, seed=3), make_split("val", 20, seed=3)
    assert [sample_digest(s) for s in a] == [sample_digest(s) for s in b]
    assert [s.answer for s in a] == [s.answer for s in b]
    assert make_sample("val", 3, 7).meta == a[7].meta
    assert [sample_digest(s) for s in make_split("val", 20, seed=4)] != [sample_digest(s) for s in a]


def test_splits_disjoint():
    digests = {split: {sample_digest(s) for s in make_split(split, 100)} for split in ("train", "val", "test")}
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_images_non_square_and_varied(train_samples):
    sizes = [s.image.size for s in train_samples]
    ratios = [w / h for w, h in sizes]
    assert all(1.2 <= max(r, 1 / r) <= 2.6 for r in ratios)
    assert any(r > 1 for r in ratios) and any(r < 1 for r in ratios)
    assert len(set(sizes)) > 100
    assert all(s.image.mode == "RGB" for s in train_samples)


def test_answers_single_word_in_vocab(train_samples):
    assert all(s.answer in ANSWER_VOCAB and " " not in s.answer for s in train_samples)
    kinds = Counter(s.meta["kind"] for s in train_samples)
    assert len(kinds) == 5 and min(kinds.values()) > 30
    answers = Counter(s.answer for s in train_samples)
    assert answers.most_common(1)[0][1] < 0.15 * len(train_samples)


def test_top_bottom_evidence_balanced():
    halves = Counter(s.meta["evidence_half"] for s in make_split("test", 600))
    top, bottom = halves["top"], halves["bottom"]
    assert top + bottom > 300
    assert abs(top - bottom) < 4 * math.sqrt(top + bottom)


def test_meta_consistent_with_answer(train_samples):
    for s in train_samples:
        objs, kind = s.meta["objects"], s.meta["kind"]
        if kind == "count":
            shape = next(x for x in SHAPES if s.question.split()[2] == plural(x))
            assert ["zero", "one", "two", "three"][sum(o["shape"] == shape for o in objs)] == s.answer
        elif kind == "exists":
            _, _, _, colour, shape = s.question[:-1].split()
            found = any(o["shape"] == shape and o["colour"] == colour for o in objs)
            assert ("yes" if found else "no") == s.answer
        elif kind == "colour_of_shape":
            shape = s.question[:-1].split()[-1]
            assert [o["colour"] for o in objs if o["shape"] == shape] == [s.answer]


def test_tokenizer_roundtrip(processor, train_samples):
    tok = processor.tokenizer
    for s in train_samples[:50]:
        ids = tok(prompt_for(s.question) + f" {s.answer}</s>")["input_ids"]
        assert tok.unk_token_id not in ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[-2:-1]) == s.answer
        assert tok.decode(ids, skip_special_tokens=True).split()[-1] == s.answer
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != tok.unk_token_id


def test_chat_template_matches_prompt(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == prompt_for("What colour is the star?")


def test_processor_pads_and_expands_image_tokens(processor, train_samples):
    samples = train_samples[:4]
    enc = processor(images=[s.image for s in samples], text=[prompt_for(s.question) for s in samples],
                    return_tensors="pt", padding=True)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (enc["input_ids"] == image_id).sum(1).tolist() == [GRID * GRID] * 4
    assert tuple(enc["pixel_values"].shape) == (4, 3, GRID * 14, GRID * 14)
    assert processor.image_processor.do_pad


def test_small_model_one_training_step(processor, train_samples):
    from vtprune.testbed.train import encode_batch, predict

    torch.manual_seed(0)
    model = build_model(processor, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=4, heads=2)
    assert model.config.text_config.num_hidden_layers >= 4
    batch = encode_batch(processor, train_samples[:4])
    assert (batch["labels"] != -100).sum().item() == 8  # answer + EOS per row
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    preds = predict(model, processor, train_samples[:2])
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)


def test_save_and_load_roundtrip(processor, tmp_path):
    from vtprune.testbed.model import load_testbed
    from vtprune.testbed.train import save_checkpoint

    model = build_model(processor, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=4, heads=2)
    save_checkpoint(model, processor, tmp_path / "ck")
    loaded, proc = load_testbed(tmp_path / "ck")
    assert type(proc.image_processor).__name__ == "LlavaImageProcessorPil" and proc.image_processor.do_pad
    assert loaded.dtype == torch.float32 and loaded.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_patch_targets_follow_the_processor_geometry(processor):
    """The training-only patch labels sit under the objects as the processor places them."""
    from vtprune.adapters.geometry import geometry_from_processor
    from vtprune.testbed.data import COLOURS
    from vtprune.testbed.train import patch_targets

    geometry = geometry_from_processor(processor, patch_size=14, image_size=GRID * 14)
    for index in range(30):
        sample = make_sample("train", 0, index)
        colour, shape = patch_targets(sample)
        assert colour.shape == shape.shape == (GRID * GRID,)
        assert ((colour == 0) == (shape == 0)).all()
        (_, _), (x0, y0, x1, y1) = geometry.trace(sample.image.size)
        scale = (x1 - x0) / sample.image.size[0]
        for obj in sample.meta["objects"]:
            bx0, by0, bx1, by1 = obj["box"]
            cx, cy = x0 + (bx0 + bx1) / 2 * scale, y0 + (by0 + by1) / 2 * scale
            patch = int(cy // 14) * GRID + int(cx // 14)
            neighbours = {patch, patch + 1, patch - 1, patch + GRID, patch - GRID} & set(range(GRID * GRID))
            labels = {(int(colour[p]), int(shape[p])) for p in neighbours}
            assert (1 + list(COLOURS).index(obj["colour"]), 1 + SHAPES.index(obj["shape"])) in labels
        assert (colour > 0).sum() < GRID * GRID / 2  # mostly background


def test_packed_branches_equal_separate_prompts(processor, train_samples):
    """Every branch of a packed training row sees exactly what the evaluation prompt of its question sees:
    same tokens, same labels, same logits as a separate forward of that question alone."""
    from vtprune.testbed.train import encode_batch, encode_packed

    torch.manual_seed(0)
    model = build_model(processor, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, heads=2).eval()
    samples = train_samples[:2]
    branches = [[(s.question, s.answer), ("What colour is the star?", "red"), ("How many circles are there?", "two")]
                for s in samples]
    branches[1] = branches[1][:2]  # rows of different lengths: right padding
    packed = encode_packed(processor, samples, branches)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        for b, sample in enumerate(samples):
            prefix = int((packed["input_ids"][b] == image_id).nonzero().max()) + 1
            position = prefix
            for question, answer in branches[b]:
                alone = encode_batch(processor, [type(sample)(sample.image, question, answer, sample.meta)])
                n = alone["input_ids"].shape[1] - prefix
                span = slice(position, position + n)
                assert torch.equal(packed["input_ids"][b, span], alone["input_ids"][0, prefix:])
                assert torch.equal(packed["labels"][b, span], alone["labels"][0, prefix:])
                assert torch.equal(packed["position_ids"][b, span], torch.arange(prefix, prefix + n))
                expected = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0, prefix:]
                torch.testing.assert_close(logits[b, span], expected, atol=1e-5, rtol=0)
                position += n


def test_extra_training_questions_are_balanced_and_correct(train_samples):
    """The extra questions teach no prior the test split punishes: yes/no about even, 'no' a hard negative,
    counts not dominated by 'zero', and every answer true of the scene."""
    import numpy as np

    from vtprune.testbed.data import scene_questions

    answers, hard = Counter(), 0
    for i, sample in enumerate(train_samples[:200]):
        objects = sample.meta["objects"]
        for question, answer in scene_questions(sample, 8, np.random.default_rng(i)):
            assert question != sample.question
            answers[answer] += 1
            words = question.rstrip("?").split()
            if question.startswith("Is there"):
                colour, shape = words[-2], words[-1]
                assert (answer == "yes") == any(o["colour"] == colour and o["shape"] == shape for o in objects)
                hard += answer == "no" and any(o["colour"] == colour or o["shape"] == shape for o in objects)
            elif question.startswith("How many"):
                shape = next(s for s in SHAPES if plural(s) == words[2])
                assert answer == ("zero", "one", "two", "three")[sum(o["shape"] == shape for o in objects)]
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    assert hard == answers["no"]
    counts = sum(answers[w] for w in ("zero", "one", "two", "three"))
    assert answers["zero"] < 0.5 * counts and answers["two"] + answers["three"] > 0.15 * counts
