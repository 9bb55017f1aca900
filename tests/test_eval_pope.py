import json
import random
from dataclasses import dataclass

import pytest
from eval_fixtures import CATEGORIES, file_name, write_coco, write_jsonl
from PIL import Image

from neverfade.cli import main
from neverfade.data.coco import AnnotationError
from neverfade.eval import pope

NAMES = ["person", "car", "dog", "cat", "bird", "bus", "cup", "bed", "sink", "tv", "apple", "umbrella"]


def random_dataset(n=120, seed=7):
    rng = random.Random(seed)
    objects = {i: set(rng.sample(NAMES, rng.randint(1, 6))) for i in range(1, n + 1)}
    return {i: file_name(i) for i in objects}, objects


def category(question):
    text = question["text"]
    return text.split(" ", 3)[3].rsplit(" in the image?", 1)[0]


def per_image(questions):
    grouped = {}
    for q in questions:
        grouped.setdefault(q["image"], []).append((category(q), q["label"]))
    return grouped


@pytest.mark.parametrize("strategy", pope.STRATEGIES)
def test_question_sets_have_the_published_shape(strategy):
    files, objects = random_dataset()
    questions = pope.build(files, objects, strategy, n_images=40, per_image=3, seed=1)
    assert len(questions) == 40 * 6
    assert [q["question_id"] for q in questions] == list(range(1, 241))
    assert [q["label"] for q in questions] == ["yes", "no"] * 120
    assert set(questions[0]) == {"question_id", "image", "text", "label"}
    by_file = {files[i]: objects[i] for i in objects}
    for image, asked in per_image(questions).items():
        present = by_file[image]
        assert len(present) >= 3
        assert len(asked) == 6 and len({c for c, _ in asked}) == 6  # no category asked twice about one image
        assert all((c in present) == (label == "yes") for c, label in asked)  # negatives never in the image


@pytest.mark.parametrize("strategy", pope.STRATEGIES)
def test_question_sets_follow_the_seed(strategy):
    files, objects = random_dataset()
    first = pope.build(files, objects, strategy, n_images=40, seed=3)
    assert pope.build(files, objects, strategy, n_images=40, seed=3) == first
    assert pope.build(files, objects, strategy, n_images=40, seed=4) != first


SMALL = {1: {"person", "car"}, 2: {"person", "car"}, 3: {"person", "dog"}, 4: {"cat", "bird"}}
SMALL_FILES = {i: f"{i}.jpg" for i in SMALL}


def test_popular_negatives_are_the_most_frequent_absent_objects():
    # frequencies over the 4 images: person 3, car 2, then bird, cat, dog 1 each (ties by name)
    questions = pope.build(SMALL_FILES, SMALL, "popular", n_images=4, per_image=2, seed=0)
    negatives = {image: [c for c, label in asked if label == "no"] for image, asked in per_image(questions).items()}
    assert negatives == {
        "1.jpg": ["bird", "cat"],
        "2.jpg": ["bird", "cat"],
        "3.jpg": ["car", "bird"],
        "4.jpg": ["person", "car"],
    }


def test_adversarial_negatives_co_occur_most_with_their_positive():
    # co-occurrence over the 4 images, most first (ties by name)
    ranked = {"person": ["car", "dog"], "car": ["person"], "dog": ["person"], "cat": ["bird"], "bird": ["cat"]}
    seen_co_occurring = 0
    for seed in range(6):
        questions = pope.build(SMALL_FILES, SMALL, "adversarial", n_images=4, per_image=2, seed=seed)
        for image, asked in per_image(questions).items():
            present, done = SMALL[int(image[0])], set()
            for (positive, _), (negative, _) in zip(asked[::2], asked[1::2]):
                done.add(positive)
                candidates = [c for c in ranked[positive] if c not in present and c not in done]
                if candidates:
                    assert negative == candidates[0]
                    seen_co_occurring += 1
                assert negative not in present and negative not in done  # random fallback otherwise
                done.add(negative)
    assert seen_co_occurring >= 6  # e.g. "person" in image 3 always draws "car"


def test_images_with_too_few_objects_are_refused():
    with pytest.raises(ValueError, match="only 1 images have 3 or more"):
        pope.build({1: "a", 2: "b"}, {1: {"a", "b", "c"}, 2: {"a"}}, "random", n_images=2)


def test_question_wording():
    assert pope.question_text("dog") == "Is there a dog in the image?"
    assert pope.question_text("umbrella") == "Is there an umbrella in the image?"


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("No.", "no"),
        ("no", "no"),
        ("I do not see one", "no"),
        ("Nope", "yes"),  # POPE's word rule, kept as published
    ],
)
def test_answer_parsing(text, parsed):
    assert pope.parse_answer(text) == parsed


def test_scores_by_hand():
    answers = [
        {"image": "a", "label": "yes", "answer": "Yes"},  # TP
        {"image": "a", "label": "yes", "answer": "No"},  # FN
        {"image": "a", "label": "no", "answer": "No"},  # TN
        {"image": "b", "label": "no", "answer": "Yes"},  # FP
        {"image": "b", "label": "no", "answer": "No."},  # TN
        {"image": "b", "label": "yes", "answer": "Yes, there is."},  # TP
    ]
    result = pope.score(answers, n_boot=100)
    assert result["counts"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert result["overall"] == pytest.approx(
        {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5, "n": 6}
    )
    unlabelled = [{"question_id": i, "image": a["image"], "answer": a["answer"]} for i, a in enumerate(answers)]
    labels = {i: a["label"] for i, a in enumerate(answers)}
    assert pope.score(unlabelled, labels, n_boot=0)["counts"] == result["counts"]
    with pytest.raises(ValueError, match="no yes/no label"):
        pope.score(unlabelled, n_boot=0)


def test_published_question_files_are_read_and_checked(tmp_path):
    good = {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?",
        "label": "yes",
    }
    assert pope.read_questions(write_jsonl(tmp_path / "q.json", [good])) == [good]
    with pytest.raises(AnnotationError, match=r"q\.json: line 2 has no 'label' field"):
        pope.read_questions(write_jsonl(tmp_path / "q.json", [good, {k: good[k] for k in list(good)[:3]}]))
    with pytest.raises(AnnotationError, match="line 1 has label 'maybe'"):
        pope.read_questions(write_jsonl(tmp_path / "q.json", [{**good, "label": "maybe"}]))


@dataclass
class Reply:
    text: str
    new_tokens: int = 1


class FakeCaptioner:
    """Says yes exactly to the objects in its scene table; describes each image by its size."""

    def __init__(self, scenes):
        self.scenes, self.calls = scenes, []

    def caption(self, images, prompt, max_new_tokens=512, do_sample=False):
        prompts = [prompt] * len(images) if isinstance(prompt, str) else prompt
        self.calls.append((len(images), prompts, max_new_tokens, do_sample))
        replies = []
        for image, text in zip(images, prompts):
            if "?" not in text:
                replies.append(Reply(f"A picture {image.width} wide."))
            else:
                scene = self.scenes[image.width]
                asked = text.split("Is there ")[1].split(" in the image?")[0].split(" ", 1)[1]
                replies.append(Reply("Yes, there is." if asked in scene else "No, there is not."))
        return replies


@pytest.fixture
def questions_and_images(tmp_path):
    questions = pope.build(
        {1: "one.png", 2: "two.png"},
        {1: {"dog", "cat", "cup"}, 2: {"car", "bus", "tv"}},
        "random",
        n_images=2,
        per_image=3,
        seed=0,
    )
    Image.new("RGB", (11, 8)).save(tmp_path / "one.png")
    Image.new("RGB", (22, 8)).save(tmp_path / "two.png")
    return questions, tmp_path


def test_answering_with_any_captioner(questions_and_images):
    questions, images = questions_and_images
    model = FakeCaptioner({11: {"dog", "cat", "cup"}, 22: {"car", "bus", "tv"}})
    answers = list(pope.answer(model, questions, images, batch_size=5, max_new_tokens=7))
    assert [a["prediction"] for a in answers] == [q["label"] for q in questions]
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    assert [(n, tokens, sample) for n, _, tokens, sample in model.calls] == [
        (5, 7, False),
        (5, 7, False),
        (2, 7, False),
    ]
    assert pope.score(answers, n_boot=0)["overall"]["accuracy"] == 1.0


def test_caption_then_answer_describes_each_image_once(questions_and_images):
    questions, images = questions_and_images
    model = FakeCaptioner({11: {"dog"}, 22: {"car"}})
    answers = list(pope.answer(model, questions, images, caption_first=True, batch_size=4, caption_tokens=99))
    caption_calls = [call for call in model.calls if call[2] == 99]
    assert [call[1] for call in caption_calls] == [[pope.CAPTION_PROMPT], [pope.CAPTION_PROMPT]]  # once per image
    widths = {"one.png": 11, "two.png": 22}
    assert all(a["caption"] == f"A picture {widths[a['image']]} wide." for a in answers)
    first = answers[0]
    assert first["prompt"] == (
        f"Here is a description of the image:\nA picture {widths[first['image']]} wide.\n\n"
        + questions[0]["text"]
        + " Answer yes or no."
    )


def test_cli_builds_and_scores(tmp_path, capsys):
    root = write_coco(tmp_path / "ann", {i: (CATEGORIES[i : i + 3], ["x"]) for i in range(8)})
    assert (
        main(
            [
                "eval",
                "pope",
                "build",
                "--coco",
                str(root),
                "--out-dir",
                str(tmp_path / "q"),
                "--images",
                "3",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    for strategy in pope.STRATEGIES:
        questions = pope.read_questions(tmp_path / "q" / f"coco_pope_{strategy}.json")
        assert len(questions) == 18 and len({q["image"] for q in questions}) == 3
    answers = [{**q, "answer": "yes"} for q in pope.read_questions(tmp_path / "q" / "coco_pope_random.json")]
    path = write_jsonl(tmp_path / "answers.jsonl", answers)
    capsys.readouterr()
    assert main(["eval", "pope", "score", str(path), "--out", str(tmp_path / "r.json"), "--bootstrap", "0"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row == ["answers", "50.00", "50.00", "100.00", "66.67", "100.00", "18"]
    assert json.loads((tmp_path / "r.json").read_text())["counts"] == {"tp": 9, "fp": 9, "tn": 0, "fn": 0}


def test_cli_build_names_the_file_when_too_few_images(tmp_path, capsys):
    root = write_coco(tmp_path / "ann", {1: (["dog", "cat", "cup"], ["x"])})
    assert main(["eval", "pope", "build", "--coco", str(root), "--out-dir", str(tmp_path)]) == 2
    assert "instances_val2014.json: only 1 images have 3 or more" in capsys.readouterr().err


def test_cli_answers_with_a_tiny_random_model_and_resumes(questions_and_images, capsys):
    questions, images = questions_and_images
    qfile = write_jsonl(images / "q.jsonl", questions)
    out = images / "answers.jsonl"
    args = [
        "eval",
        "pope",
        "answer",
        str(qfile),
        "--images",
        str(images),
        "--model",
        "random:llava",
        "--method",
        "sparc",
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["prediction"] == pope.parse_answer(a["answer"]) for a in answers)
    assert {a["model"] for a in answers} == {"random:llava"}
    assert {a["methods"][0]["name"] for a in answers} == {"sparc"}
    assert main(args) == 0  # resumed: nothing left to answer
    assert "12 of 12 questions already answered" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 12
