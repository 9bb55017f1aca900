import json

import pytest
from eval_fixtures import write_coco, write_jsonl

from neverfade.cli import main
from neverfade.data import coco
from neverfade.data.coco import AnnotationError
from neverfade.eval import captions, chair
from neverfade.eval.chair_words import CATEGORIES, Vocabulary, count_words

VOCAB = Vocabulary()


def categories(text):
    return [category for _, category in VOCAB.objects(text)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two hot dogs on a dining table next to wine glasses.", ["hot dog", "dining table", "wine glass"]),
        (
            "A teddy bear, a cell phone, a fire hydrant and a stop sign.",
            ["teddy bear", "cell phone", "fire hydrant", "stop sign"],
        ),
        ("A man on a motor bike near a bow tie.", ["person", "motorcycle", "tie"]),
        # "toilet seat" is a toilet, and any seat beside a toilet is no chair (the original's rule)
        ("The toilet seat is up.", ["toilet"]),
        ("A seat next to the toilet.", ["toilet"]),
        ("A chair and a seat.", ["chair", "chair"]),
        # "baby"/"adult" before an animal, "passenger" before a vehicle, do not add a person
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A baby on a bed.", ["person", "bed"]),
        ("A passenger train.", ["train"]),
        ("Passengers board a train.", ["person", "train"]),
        # phrases that are no objects keep their words from firing
        ("Train tracks and home plate.", []),
        # synonyms and plurals, irregular ones included
        (
            "Mice, knives, geese, policemen, children, oxen and calves.",
            ["mouse", "knife", "bird", "person", "person", "cow", "cow"],
        ),
        ("Buses, benches, puppies, ladies, people.", ["bus", "bench", "dog", "person", "person"]),
        ("Skis, a ski and scissors.", ["skis", "skis", "scissors"]),
        ("A kitten on a sofa watching television.", ["cat", "couch", "tv"]),
        # no accidental objects: other words stay as written, hyphenated compounds are one word
        ("Sunglasses, glasses, skiing, a tablecloth.", []),
        ("A dog-shaped kite.", ["kite"]),
        # punctuation stops a two-word phrase
        ("Look, a baby. Bird on a wire.", ["person", "bird"]),
    ],
)
def test_objects_in_text(text, expected):
    assert categories(text) == expected


def test_vocabulary_has_80_categories_each_its_own_synonym():
    assert len(CATEGORIES) == 80
    assert all(VOCAB.category_of[c] == c for c in CATEGORIES)
    assert VOCAB.category_of["cheesecake"] == "cake"  # the original's leading-space slip, fixed


def test_caption_length_in_words():
    assert count_words("A dog's bowl - on the floor.") == 6


VAL = {
    1: (
        ["dining table", "person", "person", "cup"],
        ["A man sitting at a table with a cup of coffee.", "Two people eating hot dogs."],
    ),
    2: (["toilet", "sink"], ["A bathroom with a toilet seat up and a sink."]),
    3: (["train"], ["A passenger train on the train tracks."]),
    4: (["teddy bear", "bed"], ["A teddy bear lying on a bed."]),
}
TRAIN = {100: (["dog"], ["A dog and a cat."])}
CAPTIONS = [
    {"id": "1", "caption": "Two men are eating hot dogs at a dining table. A dog sits on a chair."},
    {"id": "2", "caption": "The toilet seat is up next to the sink."},
    {"id": "3", "caption": "A passenger train crosses a bridge. The passengers wave."},
    {"id": "4", "caption": "Teddy bears and a cell phone on the bed."},
    {"id": "100", "caption": "A puppy and a kitten."},
    {"id": "5", "caption": None, "error": "cannot read image"},
]


@pytest.fixture
def annotations(tmp_path):
    write_coco(tmp_path / "ann", VAL)
    return write_coco(tmp_path / "ann", TRAIN, split="train")


def test_ground_truth_joins_instances_and_caption_objects(annotations, tmp_path):
    truth = chair.GroundTruth.from_coco(annotations, cache_dir=tmp_path / "cache")
    assert truth.objects[1] == {"dining table", "person", "cup", "hot dog"}
    assert truth.objects[2] == {"toilet", "sink"}
    assert truth.objects[3] == {"train"}
    assert truth.objects[100] == {"dog", "cat"}  # from the train files


def test_chair_on_hand_checked_captions(annotations, tmp_path):
    truth = chair.GroundTruth.from_coco(annotations, cache_dir=tmp_path / "cache")
    result = chair.evaluate(captions.load(write_jsonl(tmp_path / "c.jsonl", CAPTIONS)), truth, n_boot=200)
    by_id = {c["id"]: c for c in result["per_caption"]}
    assert by_id["1"]["mentioned"] == ["person", "hot dog", "dining table", "dog", "chair"]
    assert by_id["1"]["hallucinated"] == ["dog", "chair"]
    assert by_id["1"]["recalled"] == ["dining table", "hot dog", "person"]
    assert (by_id["1"]["CHAIRi"], by_id["1"]["Recall"], by_id["1"]["words"]) == (0.4, 0.75, 16)
    assert by_id["2"]["hallucinated"] == [] and by_id["2"]["mentioned"] == ["toilet", "sink"]
    assert by_id["3"]["hallucinated"] == ["person"]
    assert by_id["4"]["hallucinated"] == ["cell phone"]
    # pooled: 5 captions, 3 with a hallucination; 14 mentions, 4 hallucinated; 10 of 11 gt objects recalled
    overall = result["overall"]
    assert overall["n"] == 5 and result["n_skipped"] == 1
    assert overall["CHAIRs"] == pytest.approx(3 / 5)
    assert overall["CHAIRi"] == pytest.approx(4 / 14)
    assert overall["Precision"] == pytest.approx(10 / 14)
    assert overall["Recall"] == pytest.approx(10 / 11)
    assert overall["F1"] == pytest.approx(0.8)  # 2 (5/7)(10/11) / (5/7 + 10/11)
    assert overall["objects"] == pytest.approx(14 / 5) and overall["words"] == pytest.approx(48 / 5)
    for name, (low, high) in result["ci"].items():
        assert low <= overall[name] <= high


def test_captions_of_images_absent_from_annotations_are_an_error(tmp_path):
    truth = chair.GroundTruth.from_coco(write_coco(tmp_path / "ann", VAL), cache_dir=tmp_path / "cache")
    with pytest.raises(AnnotationError, match=r"1 caption\(s\) name images absent.*'100'"):
        chair.evaluate(captions.load(write_jsonl(tmp_path / "c.jsonl", CAPTIONS)), truth)


def test_image_id_from_id_or_file_name():
    assert chair.image_id("42", {}) == 42
    assert chair.image_id("COCO_val2014_000000000042.jpg", {}) == 42
    assert chair.image_id("a", {"image": "/x/val2014/COCO_val2014_000000000007.jpg"}) == 7


def test_ground_truth_is_cached_until_a_file_changes(annotations, tmp_path, monkeypatch):
    first = chair.GroundTruth.from_coco(annotations, cache_dir=tmp_path / "cache")

    def fail(path):
        raise AssertionError("parsed again")

    with monkeypatch.context() as m:
        m.setattr(coco, "load_captions", fail)
        assert chair.GroundTruth.from_coco(annotations, cache_dir=tmp_path / "cache").objects == first.objects
    write_coco(annotations, {**VAL, 2: (["toilet"], ["A toilet and a clock."])})
    assert chair.GroundTruth.from_coco(annotations, cache_dir=tmp_path / "cache").objects[2] == {"toilet", "clock"}


def test_missing_and_malformed_annotation_files_are_named(tmp_path):
    root = write_coco(tmp_path / "ann", VAL)
    (root / "captions_val2014.json").unlink()
    with pytest.raises(AnnotationError, match=r"captions_val2014\.json: no such file"):
        chair.GroundTruth.from_coco(root, cache_dir=tmp_path)
    write_coco(root, VAL)
    (root / "instances_train2014.json").write_text("{}")
    with pytest.raises(AnnotationError, match=r"captions_train2014\.json: no such file"):
        chair.GroundTruth.from_coco(root, cache_dir=tmp_path)
    (root / "instances_train2014.json").unlink()
    data = json.loads((root / "instances_val2014.json").read_text())
    del data["annotations"][1]["category_id"]
    (root / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: annotations\[1\] has no 'category_id'"):
        chair.GroundTruth.from_coco(root, cache_dir=tmp_path)
    (root / "instances_val2014.json").write_text('{"images": [')
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: not valid JSON"):
        chair.GroundTruth.from_coco(root, cache_dir=tmp_path)
    (root / "instances_val2014.json").write_text('{"images": []}')
    with pytest.raises(AnnotationError, match=r"instances_val2014\.json: not a COCO annotation file \(no 'annot"):
        chair.GroundTruth.from_coco(root, cache_dir=tmp_path)


def test_caption_files_skip_errors_split_runs_and_ignore_a_torn_tail(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "1", "run": "a", "caption": None, "error": "timeout", "methods": []},
            {"id": "1", "run": "b", "caption": "x", "error": None, "methods": [{"name": "sparc", "params": {}}]},
            {"id": "1", "run": "a", "caption": "retried", "error": None, "methods": []},
            {"id": "2", "run": "a", "caption": None, "error": None, "methods": []},
        ],
    )
    with open(path, "a") as f:
        f.write('{"id": "3", "run": "a", "capt')
    a, b = captions.load_runs(path)
    assert (a.run, list(a.records), a.skipped) == ("a", ["1"], {"2": "no caption"})
    assert a.records["1"]["caption"] == "retried"
    assert (b.run, list(b.records)) == ("b", ["1"])
    with pytest.raises(AnnotationError, match="holds 2 runs"):
        captions.load(path)
    path.write_text('{"id": "1", "caption": "x"}\nnot json\n{"id": "2", "caption": "y"}\n')
    with pytest.raises(AnnotationError, match="line 2 is not valid JSON"):
        captions.load(path)


def test_cli_compares_files_and_writes_results(annotations, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path / "cache"))
    a = write_jsonl(tmp_path / "a.jsonl", CAPTIONS)
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"id": "1", "caption": "A man at a table."}, {"id": "2", "caption": "A toilet."}]
    )
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                "chair",
                str(a),
                "--compare",
                str(b),
                "--coco",
                str(annotations),
                "--out",
                str(out),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    row_a = next(line for line in printed.splitlines() if line.startswith("a "))
    row_b = next(line for line in printed.splitlines() if line.startswith("b "))
    assert row_a.split()[1:6] == ["60.00", "28.57", "90.91", "71.43", "80.00"]
    # b: 3 mentions, none hallucinated; recalls person + dining table of 4 and toilet of 2
    assert row_b.split()[1:6] == ["0.00", "0.00", "50.00", "100.00", "66.67"]
    assert "1 record(s) skipped" in printed
    saved = json.loads(out.read_text())
    assert [r["overall"]["F1"] for r in saved["results"]] == pytest.approx([0.8, 2 / 3])
    # a results JSON can be compared again without the annotations
    assert main(["eval", "chair", str(out), "--bootstrap", "0"]) == 0
    assert "80.00" in capsys.readouterr().out


def test_cli_without_annotations_is_a_one_line_error(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", CAPTIONS)
    assert main(["eval", "chair", str(a)]) == 2
    assert capsys.readouterr().err.strip() == "neverfade eval: error: --coco DIR is needed to score caption files"
