import json
from pathlib import Path

import pytest
from eval_fixtures import file_name, write_coco, write_jsonl

from neverfade.data.coco import AnnotationError, coco2014
from neverfade.data.docci import docci
from neverfade.data.iiw import iiw400

IMAGES = {i: (["dog"], [f"caption {i} a", f"caption {i} b"]) for i in range(101, 111)}


def test_coco_sample_by_seed(tmp_path):
    root = write_coco(tmp_path / "ann", IMAGES)
    items = coco2014(root, "/data/val2014", n=4, seed=1)
    assert len(items) == 4 and len({it.id for it in items}) == 4
    ids = [int(it.id) for it in items]
    assert ids == sorted(ids) and set(ids) <= set(IMAGES)
    first = items[0]
    assert first.image == f"/data/val2014/{file_name(ids[0])}"
    assert first.meta == {"coco_id": ids[0], "references": [f"caption {ids[0]} a", f"caption {ids[0]} b"]}
    assert coco2014(root, "/data/val2014", n=4, seed=1) == items
    assert {it.id for it in coco2014(root, "", n=4, seed=2)} != {it.id for it in items}
    assert [it.id for it in coco2014(root, "", n=None)] == [str(i) for i in range(101, 111)]


def test_coco_errors_name_the_file(tmp_path):
    root = write_coco(tmp_path / "ann", IMAGES)
    with pytest.raises(AnnotationError, match=r"captions_val2014\.json: 500 images asked for, the file lists 10"):
        coco2014(root, "", n=500)
    with pytest.raises(AnnotationError, match=r"captions_train2014\.json: no such file"):
        coco2014(root, "", split="train")
    data = json.loads((root / "captions_val2014.json").read_text())
    data["images"][3].pop("file_name")
    (root / "captions_val2014.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"captions_val2014\.json: images\[3\] has no 'file_name' field"):
        coco2014(root, "")
    (root / "captions_val2014.json").write_text("[]")
    with pytest.raises(AnnotationError, match="expected a JSON object, found list"):
        coco2014(root, "")


def test_iiw400_fields_and_variants(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image/key": "aar_test_04600", "IIW": "A red kite.", "IIW-P5B": "model text", "objects": []},
            {"image": "photo.png", "description": "A cat."},
        ],
    )
    a, b = iiw400(path, "/imgs")
    assert (a.id, a.image, a.meta) == ("aar_test_04600", "/imgs/aar_test_04600.jpg", {"references": ["A red kite."]})
    assert (b.id, b.image, b.meta["references"]) == ("photo", "/imgs/photo.png", ["A cat."])
    write_jsonl(path, [{"image/key": "k", "IIW-P5B": "machine text only"}])
    with pytest.raises(AnnotationError, match=r"data\.jsonl: line 1 has no description \(looked for IIW, iiw"):
        iiw400(path)
    path.write_text('{"image/key": "k", "IIW": "x"}\n{oops\n')
    with pytest.raises(AnnotationError, match="line 2 is not valid JSON"):
        iiw400(path)


def test_docci_split_and_sampling(tmp_path):
    records = [
        {
            "example_id": f"{split}_{i:05d}",
            "split": split,
            "image_file": f"{split}_{i:05d}.jpg",
            "description": f"{split} {i}",
        }
        for split in ("train", "test")
        for i in range(5)
    ]
    path = write_jsonl(tmp_path / "docci_descriptions.jsonlines", records)
    test = docci(path, "/docci/images")
    assert [it.id for it in test] == [f"test_{i:05d}" for i in range(5)]
    assert test[2].image == "/docci/images/test_00002.jpg"
    assert test[2].meta == {"references": ["test 2"], "split": "test"}
    assert len(docci(path, split=None)) == 10
    sampled = docci(path, split=None, n=3, seed=0)
    assert len(sampled) == 3 and sampled == docci(path, split=None, n=3, seed=0)
    order = [r["example_id"] for r in records]
    positions = [order.index(it.id) for it in sampled]
    assert positions == sorted(positions)  # file order kept
    with pytest.raises(AnnotationError, match=r"no records of split 'qual_dev' \(splits found: test, train\)"):
        docci(path, split="qual_dev")
    write_jsonl(path, [{"example_id": "x", "split": "test", "description": "d"}])
    with pytest.raises(AnnotationError, match="line 1 has no image file"):
        docci(path)
    with pytest.raises(AnnotationError, match="no such file"):
        docci(Path(tmp_path / "missing.jsonl"))


def test_manifests_for_the_caption_command(tmp_path, capsys):
    from neverfade.cli import main
    from neverfade.data.images import read_items

    root = write_coco(tmp_path / "ann", IMAGES)
    out = tmp_path / "m" / "coco.jsonl"
    assert (
        main(
            [
                "eval",
                "manifest",
                "coco",
                "--annotations",
                str(root),
                "--images",
                str(tmp_path / "val2014"),
                "--n",
                "3",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    items = read_items(out)
    assert [it.id for it in items] == [it.id for it in coco2014(root, "", n=3, seed=1)]
    assert items[0].image == str(tmp_path / "val2014" / file_name(int(items[0].id)))
    iiw = write_jsonl(tmp_path / "iiw.jsonl", [{"image/key": f"k{i}", "IIW": "d"} for i in range(6)])
    assert (
        main(["eval", "manifest", "iiw", "--annotations", str(iiw), "--images", "imgs", "--n", "4", "--out", str(out)])
        == 0
    )
    ids = [it.id for it in read_items(out)]
    assert len(ids) == 4 and ids == sorted(ids) and set(ids) <= {f"k{i}" for i in range(6)}
    assert (
        main(["eval", "manifest", "iiw", "--annotations", str(iiw), "--images", "imgs", "--n", "7", "--out", str(out)])
        == 2
    )
    assert "iiw.jsonl: 7 records asked for, 6 found" in capsys.readouterr().err
