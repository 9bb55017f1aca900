"""The testbed model: the hard scene world, the hallucination profile, the shipped parts and their assembly."""

import importlib.util

import numpy as np
import pytest
import torch

from neverfade.models import testbed as tb
from neverfade.scenes import mentioned_objects
from neverfade.scenes.hard import HARD_TRAIN_SEED_START, THEMES, make_hard_scene, partners
from neverfade.scenes.kinds import KINDS
from neverfade.scenes.profile import check_profile, hallucination_profile

HAS_EXTRA = all(importlib.util.find_spec(name) is not None for name in tb.EXTRA)


def test_hard_world_exact_and_held_out():
    assert HARD_TRAIN_SEED_START >= 10_000
    assert sorted(k for kinds in THEMES.values() for k in kinds) == sorted(KINDS)
    scenes = [make_hard_scene(s) for s in range(40)]
    for scene in scenes:
        assert mentioned_objects(scene.caption) == scene.kinds  # the reference parse is exact
        assert 2 <= len(scene.objects) <= 10 and scene.image.size == (tb.IMAGE_SIZE,) * 2
        assert not any(ch.isdigit() for ch in scene.caption)
    again = make_hard_scene(7)
    assert again.caption == scenes[7].caption and np.array_equal(np.asarray(again.image), np.asarray(scenes[7].image))
    assert np.mean([len(s.objects) for s in scenes]) > 6


def test_profile_counts_first_mentions_by_rank_and_quarter():
    class S:
        kinds = {"cat", "ball"}

    text = "A cat sits here. A ball lies there. The cat plays. Some more words here now. A kite flies."
    p = hallucination_profile([text], [S()], partners)
    assert p["by_rank_counts"][:3] == [[0, 1], [0, 1], [1, 1]]
    assert p["by_quarter_counts"] == [[0, 1], [0, 1], [0, 0], [1, 1]]
    assert p["chair_s"] == 100 and round(p["chair_i"], 2) == 33.33 and p["recall"] == 100
    assert p["cooccurrence"] == 100  # kite shares the park theme with cat and ball
    assert check_profile(p)["first_object"] and not check_profile(p)["chair_s"]


def test_missing_extra_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(tb.MissingExtra) as err:
        tb.check_extra()
    assert "\n" not in str(err.value) and 'pip install "neverfade[testbed]"' in str(err.value)


def test_shipped_parts_fit_and_match_the_architecture():
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModel

    assert tb.TRAINED.stat().st_size <= 20_000_000
    with safe_open(str(tb.TRAINED), "pt") as f:
        keys = set(f.keys())
        lora = {k for k in keys if k.startswith("lora.")}
        assert len(lora) == 2 * 30 * len(tb.LORA_TARGETS)
        assert f.get_tensor("lora.layers.0.self_attn.q_proj.A").shape == (tb.LORA_RANK, 576)
        assert f.get_tensor("image_embedding").shape == (576,)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=tb.IMAGE_SIZE, patch_size=tb.PATCH_SIZE, **tb.VISION))
    assert {f"vision_tower.{k}" for k in tower.state_dict()} == {k for k in keys if k.startswith("vision_tower.")}


def _smollm2_shaped(vocab_words):
    """SmolLM2-135M's architecture (random weights) and a tiny ChatML tokenizer: no wheel needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(vocab_words, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    config = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return tok, config


def test_trained_parts_load_into_the_llava(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from neverfade.scenes.examples import user_message

    scene = make_hard_scene(3)
    tok, config = _smollm2_shaped([scene.caption, "user assistant Please describe this image in detail."])
    processor = tb.build_processor(tok)
    assert processor.image_token_id == len(tok) - 1
    model = tb.build_model(config, processor)
    state = load_file(tb.TRAINED)
    before = model.model.language_model.layers[0].self_attn.q_proj.weight.clone()
    tb.load_trained(model, state)
    delta = model.model.language_model.layers[0].self_attn.q_proj.weight - before
    expected = (
        tb.LORA_ALPHA
        / tb.LORA_RANK
        * (state["lora.layers.0.self_attn.q_proj.B"].float() @ state["lora.layers.0.self_attn.q_proj.A"].float())
    )
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    text = processor.apply_chat_template(
        user_message("Please describe this image in detail."), add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\n<image>\n") and text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[scene.image], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == tb.IMAGE_TOKENS == 576
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EXTRA, reason='the testbed extra is not installed: pip install "neverfade[testbed]"')
def test_testbed_assembles_and_describes_a_held_out_scene(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from neverfade.scenes.examples import user_message

    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path))
    path = tb.testbed_model_path()
    assert tb.testbed_model_path() == path  # cached
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    scene = make_hard_scene(0)
    text = processor.apply_chat_template(
        user_message("Please describe this image in detail."), add_generation_prompt=True
    )
    inputs = processor(text=[text], images=[scene.image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=60, do_sample=False)
    caption = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert mentioned_objects(caption) & scene.kinds
