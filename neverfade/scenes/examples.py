"""Training examples for the embedded model: a scene's image, a prompt, and the answer the model should give.

Most examples ask for a detailed description (answer: the reference caption); a few ask a yes/no question
"Is there a <noun> in the image?" (POPE-style), where absent kinds are half the time a co-occurrence partner
of a present kind (the adversarial case) and half the time any absent kind.
"""

from __future__ import annotations

import numpy as np

from .caption import article
from .generator import make_scene
from .kinds import KINDS, NOUNS, PARTNERS
from .model import PIXEL_MEAN, PIXEL_STD

DESCRIBE_PROMPTS = (
    "Please describe this image in detail.",
    "Describe this image in detail.",
    "Give a detailed description of the picture.",
    "What do you see in this image? Describe everything.",
    "Write a long, detailed caption for this image.",
)
QUESTION = "Is there {a} {noun} in the image?"
QUESTION_SHARE = 0.1


def question(kind: str) -> str:
    noun = NOUNS[kind][0]
    return QUESTION.format(a=article(noun), noun=noun)


def answer(kind: str, present: bool) -> str:
    noun = NOUNS[kind][0]
    return f"Yes, there is {article(noun)} {noun} in the image." if present else f"No, there is no {noun} in the image."


def user_message(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def pixel_values(image) -> np.ndarray:
    """The processor's normalisation of a 192-pixel RGB image, as float32 (3, H, W), without a processor."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)).transpose(2, 0, 1)


def prompt_and_answer(scene, rng: np.random.Generator, question_share: float = QUESTION_SHARE) -> tuple[str, str]:
    if rng.random() >= question_share:
        return DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))], scene.caption
    if rng.random() < 0.5:
        kind = sorted(scene.kinds)[int(rng.integers(len(scene.kinds)))]
        return question(kind), answer(kind, True)
    partners = sorted({p for k in scene.kinds for p in PARTNERS.get(k, {})} - scene.kinds)
    absent = partners if partners and rng.random() < 0.5 else sorted(set(KINDS) - scene.kinds)
    kind = absent[int(rng.integers(len(absent)))]
    return question(kind), answer(kind, False)


class ExampleEncoder:
    """Token ids and labels for (prompt, answer) pairs, identical to what the processor gives at inference.

    The prompt ids come from the processor itself (chat template, image tokens expanded); the answer is the
    tokenizer's encoding of " " + answer + eos, appended, and it alone carries labels.
    """

    def __init__(self, processor, question_share: float = QUESTION_SHARE):
        self.processor, self.question_share = processor, question_share
        self.tokenizer = processor.tokenizer
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_ids:
            from PIL import Image

            text = self.processor.apply_chat_template(user_message(prompt), add_generation_prompt=True)
            ids = self.processor(text=text, images=Image.new("RGB", (192, 192)), return_tensors="np")["input_ids"]
            self._prompt_ids[prompt] = [int(i) for i in ids[0]]
        return self._prompt_ids[prompt]

    def encode(self, prompt: str, answer_text: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.prompt_ids(prompt)
        answer_ids = self.tokenizer(" " + answer_text, add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids

    def example(self, seed: int) -> dict:
        """The training example of scene `seed`: pixel values, input ids, labels."""
        scene = make_scene(seed)
        prompt, answer_text = prompt_and_answer(scene, np.random.default_rng([seed, 1]), self.question_share)
        input_ids, labels = self.encode(prompt, answer_text)
        return {"pixel_values": pixel_values(scene.image), "input_ids": input_ids, "labels": labels}


def yes_no_questions(scene, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """POPE-style probes of a scene: one present kind, one absent partner of a present kind (if any), one random
    absent kind; as (kind, present)."""
    present = sorted(scene.kinds)
    partners = sorted({p for k in scene.kinds for p in PARTNERS.get(k, {})} - scene.kinds)
    absent = sorted(set(KINDS) - scene.kinds)
    probes = [(present[int(rng.integers(len(present)))], True), (absent[int(rng.integers(len(absent)))], False)]
    if partners:
        probes.append((partners[int(rng.integers(len(partners)))], False))
    return probes


def tokenizer_corpus(seeds) -> list[str]:
    """Texts the tokenizer is trained on: reference captions, prompts, questions and answers, the chat words."""
    texts = [make_scene(s).caption for s in seeds]
    texts += list(DESCRIBE_PROMPTS) + [question(k) + " " + answer(k, True) + " " + answer(k, False) for k in KINDS]
    texts += ["USER: ASSISTANT:"] * 100
    return texts
