"""The embedded model: the shipped files load and caption on a CPU; the builder, the training examples, the script."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from neverfade.scenes import embedded_model_path, make_scene, mentioned_objects, scene_metrics
from neverfade.scenes.examples import ExampleEncoder, pixel_values, tokenizer_corpus, user_message
from neverfade.scenes.model import build_model, build_processor

PROMPT = "Please describe this image in detail."


@pytest.fixture(scope="module")
def embedded():
    path = embedded_model_path()
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def test_shipped_files_are_small_and_complete():
    path = embedded_model_path()
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "training_log.json",
    ):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 20_000_000
    log = json.loads((path / "training_log.json").read_text())
    assert log["final_held_out_loss"] == log["held_out"][-1]["loss"] < log["held_out"][0]["loss"]


def test_embedded_model_is_a_small_llava_in_float32(embedded):
    processor, model = embedded
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert model.config.text_config.num_hidden_layers >= 6 and model.config.text_config.num_attention_heads >= 4
    assert processor.tokenizer.padding_side == "left"
    text = processor.apply_chat_template(user_message(PROMPT), add_generation_prompt=True)
    assert text == f"<s>USER: <image>\n{PROMPT} ASSISTANT:"


def test_embedded_model_describes_held_out_scenes(embedded):
    processor, model = embedded
    scenes = [make_scene(s) for s in (0, 1, 2, 3)]
    text = processor.apply_chat_template(user_message(PROMPT), add_generation_prompt=True)
    inputs = processor(text=[text] * 4, images=[s.image for s in scenes], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=400, do_sample=False)
    captions = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(len(c.split()) > 40 for c in captions)
    metrics = scene_metrics(captions, scenes)
    assert metrics["precision"] > 0.7 and metrics["recall"] > 0.7, metrics
    # batching with left padding does not change a caption
    alone = processor(text=[text], images=[scenes[2].image], return_tensors="pt")
    out = model.generate(**alone, max_new_tokens=400, do_sample=False)
    single = processor.decode(out[0, alone["input_ids"].shape[1] :], skip_special_tokens=True)
    assert mentioned_objects(single) == mentioned_objects(captions[2])


def test_scene_world_still_matches_what_the_model_learned(embedded):
    """The shipped model's loss on held-out reference captions stays near its training log's (0.317 on 256 scenes):
    a change to the scene generator or its captions that the model never saw would raise it."""
    processor, model = embedded
    encoder = ExampleEncoder(processor)
    examples = [encoder.encode(PROMPT, make_scene(s).caption) for s in range(16)]
    length = max(len(ids) for ids, _ in examples)
    pad = processor.tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in examples])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in examples])
    pixels = torch.from_numpy(np.stack([pixel_values(make_scene(s).image) for s in range(16)]))
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), pixel_values=pixels, labels=labels).loss
    assert float(loss) < 0.4


def test_embedded_model_answers_questions_in_the_trained_form(embedded):
    """Yes/no questions are 10% of its training; its answers are weak (docs/embedded.md) but keep the form."""
    processor, model = embedded
    scene = make_scene(5)
    texts = [
        processor.apply_chat_template(user_message(f"Is there a {k} in the image?"), add_generation_prompt=True)
        for k in ("cat", "tree")
    ]
    inputs = processor(text=texts, images=[scene.image] * 2, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for answer, kind in zip(
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True), ("cat", "tree")
    ):
        assert answer.strip() in (f"Yes, there is a {kind} in the image.", f"No, there is no {kind} in the image.")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """An untrained model from the builder, saved and reloaded through the Auto classes."""
    path = tmp_path_factory.mktemp("fresh")
    processor = build_processor(tokenizer_corpus(range(2_000_000, 2_000_100)))
    build_model(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def test_builder_round_trip_generates(fresh):
    processor, model = fresh
    scenes = [make_scene(s) for s in (10, 11)]
    text = processor.apply_chat_template(user_message(PROMPT), add_generation_prompt=True)
    inputs = processor(
        text=[text, "USER: <image>\nHi ASSISTANT:"], images=[s.image for s in scenes], return_tensors="pt", padding=True
    )
    assert (inputs["input_ids"] == model.config.image_token_index).sum(1).tolist() == [144, 144]
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)


def test_training_examples_match_the_inference_inputs(fresh):
    processor, _ = fresh
    encoder = ExampleEncoder(processor)
    scene = make_scene(1_000_003)
    text = processor.apply_chat_template(user_message(PROMPT), add_generation_prompt=True)
    inputs = processor(text=[text], images=[scene.image], return_tensors="np")
    np.testing.assert_allclose(pixel_values(scene.image), inputs["pixel_values"][0], atol=1e-6)
    ids, labels = encoder.encode(PROMPT, scene.caption)
    prompt_len = inputs["input_ids"].shape[1]
    assert ids[:prompt_len] == inputs["input_ids"][0].tolist() and set(labels[:prompt_len]) == {-100}
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip() == scene.caption


def test_training_script_runs_end_to_end(tmp_path):
    path = Path(__file__).resolve().parent.parent / "scripts" / "train_embedded.py"
    spec = importlib.util.spec_from_file_location("train_embedded", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path / "m"), "--smoke", "--max-steps", "2", "--workers", "0"])
    log = json.loads((tmp_path / "m" / "training_log.json").read_text())
    assert log["steps"] == 2 and np.isfinite(log["final_held_out_loss"])
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "m").dtype == torch.float32
