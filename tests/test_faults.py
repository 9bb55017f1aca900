"""The fault table: bad images, bad manifests, out-of-memory batches and a judge that is down, each tried end to end.

Every case ends in either the exact clear error expected (a per-image error record while the run goes on, or exit
status 2 with one line naming the file and line) or a correct result, and no input loses its record. The tests run
as root, so a file without read permission would still be readable: unreadable paths are a folder where an image
should be and a dangling symbolic link instead."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images
from eval_fixtures import write_jsonl
from neverfade.cli import main
from neverfade.data.images import load_image
from neverfade.results import read_records
from test_eval_clair import ChatServer

TOKENS = "8"


@dataclass
class Row:
    case: str
    expected: str
    got: str
    ok: bool


def caption(*args: str) -> int:
    return main(["caption", *args, "--max-new-tokens", TOKENS])


# --- images that cannot be used: an error record each, the run goes on ------------------------------------------

def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side x side pixels (beyond PIL's decompression-bomb limit), with no pixel data."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_bad_images(root: Path) -> dict[str, tuple[str, str]]:
    """case -> (image path relative to root, expected text in the error)."""
    noise(64, 100, 0).save(root / "whole.png")
    noise(64, 100, 1).save(root / "whole.jpg", quality=90)
    (root / "truncated.png").write_bytes((root / "whole.png").read_bytes()[:6000])
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:3000])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image at all\n")
    (root / "notes.txt").write_text("a text file listed as an image\n")
    (root / "folder.png").mkdir()
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    bomb_png(root / "bomb.png")
    return {
        "corrupt JPEG": ("corrupt.jpg", "cannot read image"),
        "truncated PNG": ("truncated.png", "cannot read image"),
        "truncated JPEG": ("truncated.jpg", "cannot read image"),
        "zero-byte file": ("zero.png", "cannot read image"),
        "text file named .png": ("text.png", "cannot read image"),
        "non-image file (.txt)": ("notes.txt", "cannot read image"),
        "folder in place of an image": ("folder.png", "Is a directory"),
        "dangling symbolic link": ("dangling.png", "no such image"),
        "missing file": ("missing.png", "no such image"),
        "decompression bomb (30000 x 30000)": ("bomb.png", "image too large"),
    }


# --- images that must give the caption of their RGB version -----------------------------------------------------

def write_convertible_images(root: Path) -> dict[str, tuple[str, np.ndarray]]:
    """case -> (image path, the RGB pixels the model must see), the pixels computed here without PIL's convert."""
    base = make_images()[1]
    rgb = np.array(base)
    grey = np.array(base.convert("L"))
    opaque = (np.indices(grey.shape).sum(0) // 7) % 2 == 0  # stripes of opaque and fully transparent pixels
    white = np.full_like(rgb, 255)
    cases = {}

    Image.fromarray(grey).save(root / "grey.png")
    cases["greyscale (L)"] = ("grey.png", np.stack([grey] * 3, -1))
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "grey16.png")
    cases["16-bit greyscale"] = ("grey16.png", np.stack([grey] * 3, -1))
    Image.fromarray(np.dstack([rgb, np.where(opaque, 255, 0).astype(np.uint8)])).save(root / "rgba.png")
    cases["RGBA, transparent stripes on white"] = ("rgba.png", np.where(opaque[..., None], rgb, white))
    Image.fromarray(np.dstack([grey, np.where(opaque, 255, 0).astype(np.uint8)]), "LA").save(root / "la.png")
    cases["greyscale with alpha (LA)"] = ("la.png", np.where(opaque[..., None], np.stack([grey] * 3, -1), white))
    palette = base.quantize(16)
    palette.save(root / "palette.png")
    lookup = np.array(palette.getpalette()[:48], dtype=np.uint8).reshape(16, 3)
    cases["palette (P)"] = ("palette.png", lookup[np.array(palette)])
    palette.save(root / "palette-t.png", transparency=0)
    cases["palette with a transparent index"] = ("palette-t.png", np.where((np.array(palette) == 0)[..., None],
                                                                           white, lookup[np.array(palette)]))
    base.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    cmyk = np.array(Image.open(root / "cmyk.jpg")).astype(int)  # the decoded samples; RGB = (255-C)(255-K)/255
    cases["CMYK JPEG"] = ("cmyk.jpg", np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8))
    large = np.repeat(np.repeat(rgb, 30, 0), 30, 1)
    Image.fromarray(large).save(root / "large.png", compress_level=1)
    cases["large image (1920 x 3000, allowed)"] = ("large.png", large)
    Image.new("RGB", (1, 1), (200, 30, 90)).save(root / "one-pixel.png")
    cases["one pixel"] = ("one-pixel.png", np.array([[[200, 30, 90]]], dtype=np.uint8))
    return cases


def image_cases(tiny_models, root: Path) -> list[Row]:
    """One manifest holding every bad and every convertible image, and for each convertible one its reference
    pixels as a plain RGB PNG; described in one run (batch size 1, so each caption is comparable)."""
    bad = write_bad_images(root)
    good = write_convertible_images(root)
    rows = []
    lines = [{"id": case, "image": path} for case, (path, _) in bad.items()]
    for case, (path, pixels) in good.items():
        seen = np.array(load_image(root / path))
        same = seen.shape == pixels.shape and np.array_equal(seen, pixels)
        rows.append(Row(f"{case}: pixels the model sees", "equal to the RGB computed here",
                        "equal" if same else f"differ: {seen.shape} vs {pixels.shape}", same))
        Image.fromarray(pixels).save(root / f"reference-{path}.png")
        lines += [{"id": case, "image": path}, {"id": f"reference: {case}", "image": f"reference-{path}.png"}]
    manifest = write_jsonl(root / "images.jsonl", lines)
    out = root / "images-out.jsonl"
    status = caption(str(manifest), "--model", tiny_models["llava"], "--batch-size", "1", "--out", str(out))
    records = {r["id"]: r for r in read_records(out)}
    rows.append(Row("one record per listed image (0 lost)", f"{len(lines)} records, status 1",
                    f"{len(records)} records, status {status}", len(records) == len(lines) and status == 1))
    for case, (path, message) in bad.items():
        r = records.get(case, {})
        error = r.get("error") or ""
        rows.append(Row(case, f"error record naming {path}: ...{message}...", f"error record: {error}",
                        message in error and path in error and r.get("caption") is None))
    for case in good:
        r, ref = records.get(case, {}), records.get(f"reference: {case}", {})
        same = r.get("error") is None and r.get("caption") is not None and r.get("caption") == ref.get("caption")
        rows.append(Row(case, "the caption of its RGB pixels",
                        f"{r.get('error') or r.get('caption')!r} vs {ref.get('caption')!r}", same))
    # the comparison has power: on this model, different pixels give different captions
    distinct = {records[f"reference: {case}"]["caption"] for case in good if f"reference: {case}" in records}
    rows.append(Row("captions tell the reference images apart", f"at least {len(good) - 2} distinct captions",
                    f"{len(distinct)} distinct", len(distinct) >= len(good) - 2))
    return rows


def folder_cases(tiny_models, root: Path) -> list[Row]:
    """A folder: a broken link is listed (and recorded as an error), a non-image file is not an input."""
    folder = root / "folder"
    folder.mkdir()
    make_images()[0].save(folder / "good.png")
    (folder / "broken-link.png").symlink_to(folder / "gone.png")
    (folder / "readme.txt").write_text("not an input")
    out = root / "folder-out.jsonl"
    status = caption(str(folder), "--model", tiny_models["llava"], "--out", str(out))
    records = {r["id"]: r for r in read_records(out)}
    good, link = records.get("good.png", {}), records.get("broken-link.png", {})
    ok = (set(records) == {"good.png", "broken-link.png"} and good.get("caption") is not None
          and "no such image" in (link.get("error") or "") and status == 1)
    return [Row("folder with a broken link and a text file", "2 records: good.png captioned, broken-link.png: "
                "no such image; status 1", f"{sorted(records)}: {good.get('caption')!r}, {link.get('error')!r}; "
                f"status {status}", ok)]


def processor_refusal_case(tiny_models, root: Path) -> list[Row]:
    """Qwen-VL's image processor refuses an aspect ratio beyond 200: that image's record, not a failed batch."""
    make_images()[0].save(root / "fine.png")
    Image.new("RGB", (3000, 10), (9, 99, 199)).save(root / "strip.png")
    manifest = write_jsonl(root / "strip.jsonl", [{"id": "strip", "image": "strip.png"},
                                                   {"id": "fine", "image": "fine.png"}])
    out = root / "strip-out.jsonl"
    status = caption(str(manifest), "--model", tiny_models["qwen2_vl"], "--batch-size", "2", "--out", str(out))
    records = {r["id"]: r for r in read_records(out)}
    strip, fine = records.get("strip", {}), records.get("fine", {})
    ok = ("absolute aspect ratio must be smaller than 200" in (strip.get("error") or "")
          and fine.get("error") is None and fine.get("caption") is not None and status == 1)
    return [Row("3000 x 10 strip (Qwen-VL refuses aspect ratios > 200)", "error record; its batch neighbour "
                "captioned; status 1", f"{strip.get('error')!r}; {fine.get('caption')!r}; status {status}", ok)]


# --- bad manifests and inputs: exit status 2, one line naming the file and line ----------------------------------

BAD_MANIFESTS = {
    "duplicate id": ('{"id": "a", "image": "x.png"}\n{"id": "b", "image": "y.png"}\n{"id": "a", "image": "z.png"}\n',
                     ":3: duplicate id 'a'"),
    "duplicate image without ids": ('{"image": "x.png"}\n{"image": "x.png"}\n', ":2: duplicate id 'x.png'"),
    "line without image": ('{"id": "a", "image": "x.png"}\n{"id": "b"}\n', ':2: each line needs an "image" field'),
    "image that is not a path": ('{"id": "a", "image": null}\n', ':1: each line needs an "image" field'),
    "line that is not JSON": ('{"id": "a", "image": "x.png"}\n{"id": "b", image: y.png}\n', ":2: not valid JSON"),
    "line that is a JSON list": ('["x.png"]\n', ':1: each line needs an "image" field'),
    "line that is not UTF-8": (b'{"id": "a", "image": "x.png"}\n{"id": "\xff\xfe"}\n', ":2: not UTF-8 text"),
    "empty manifest": ("\n\n", ": the manifest lists no images"),
}


def manifest_cases(root: Path, capsys) -> list[Row]:
    rows = []
    capsys.readouterr()
    for n, (case, (text, message)) in enumerate(BAD_MANIFESTS.items()):
        path = root / f"bad-{n}.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        status = caption(str(path), "--model", "random:llava")
        lines = capsys.readouterr().err.strip().splitlines()
        rows.append(Row(f"manifest: {case}", f"status 2, one line: ...{path.name}{message}",
                        f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
                        status == 2 and len(lines) == 1 and f"{path}{message}" in lines[0]))
    (root / "input-link.jsonl").symlink_to(root / "no-manifest.jsonl")
    status = caption(str(root / "input-link.jsonl"))
    lines = capsys.readouterr().err.strip().splitlines()
    rows.append(Row("input is a dangling link", "status 2, one line: no such file or folder",
                    f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
                    status == 2 and len(lines) == 1 and "no such file or folder" in lines[0]))
    return rows


# --- out of memory ---------------------------------------------------------------------------------------------

def oom_cases(tiny_models, root: Path, monkeypatch) -> list[Row]:
    """Captioner.caption raises torch.OutOfMemoryError for batches above 2 images, and always for one poisoned
    image (a 77 x 33 one); the run splits batches in halves and records the poisoned image's error."""
    from neverfade.api import Captioner

    folder = root / "oom"
    folder.mkdir()
    for i in range(8):
        make_images()[i % 3].rotate(90 * (i // 3)).save(folder / f"img{i}.png")
    args = [str(folder), "--model", tiny_models["llava"], "--method", "sparc", "--sparc-tau", "0.05"]
    assert caption(*args, "--batch-size", "2", "--out", str(root / "pairs.jsonl")) == 0
    pairs = {r["id"]: r["caption"] for r in read_records(root / "pairs.jsonl")}

    real, sizes = Captioner.caption, []

    def short_of_memory(self, images, *a, **kw):
        sizes.append(len(images))
        if len(images) > 2 or any(im.size == (77, 33) for im in images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(self, images, *a, **kw)

    monkeypatch.setattr(Captioner, "caption", short_of_memory)
    status = caption(*args, "--batch-size", "4", "--out", str(root / "split.jsonl"))
    split = {r["id"]: r["caption"] for r in read_records(root / "split.jsonl")}
    rows = [Row("out of memory on batches of 4: split into halves", "8 records, the captions of batches of 2; "
                "status 0; batch sizes tried [4, 2, 2, 4, 2, 2]", f"{len(split)} records, "
                f"{'the same' if split == pairs else 'other'} captions; status {status}; batch sizes tried {sizes}",
                len(split) == 8 and split == pairs and status == 0 and sizes == [4, 2, 2, 4, 2, 2])]

    Image.new("RGB", (77, 33), (1, 2, 3)).save(folder / "img9-poison.png")
    sizes.clear()
    status = caption(*args, "--batch-size", "4", "--out", str(root / "split.jsonl"))
    records = {r["id"]: r for r in read_records(root / "split.jsonl")}
    error = (records.get("img9-poison.png") or {}).get("error") or ""
    rows.append(Row("out of memory even alone: error record", "9 records, the new one: out of memory even as a "
                    "batch of one: CUDA out of memory...; status 1; batch sizes tried [1]",
                    f"{len(records)} records, the new one: {error}; status {status}; batch sizes tried {sizes}",
                    len(records) == 9 and error.startswith("out of memory even as a batch of one: CUDA out of memory")
                    and status == 1 and sizes == [1]))
    return rows


# --- the judge endpoint down during CLAIR ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge_cases(root: Path, capsys) -> list[Row]:
    """The judge answers 3 captions, then fails (HTTP 503), then is gone (connection refused), then is back: each
    failure is exit status 2 with one line, the answers so far are kept, and the rerun asks only the rest."""
    captions = write_jsonl(root / "caps.jsonl", [{"id": f"im{i}", "caption": f"caption {i}"} for i in range(8)])
    refs = write_jsonl(root / "refs.jsonl", [{"id": f"im{i}", "references": [f"reference {i}"]} for i in range(8)])

    def clair(url: str) -> tuple[int, list[str]]:
        status = main(["eval", "clair", str(captions), "--references", str(refs), "--judge-url", url,
                       "--cache", str(root / "answers.jsonl"), "--concurrency", "1", "--retries", "1",
                       "--timeout", "5", "--bootstrap", "0", "--out", str(root / "clair.json")])
        lines = capsys.readouterr().err.splitlines()
        return status, [line for line in lines if line.strip() and not line.startswith("CLAIR:")]  # not the bar

    def cached() -> int:
        return len((root / "answers.jsonl").read_text().splitlines()) if (root / "answers.jsonl").exists() else 0

    rows = []
    capsys.readouterr()
    server = ChatServer(lambda n, p: (200, '{"score": 70, "reason": "r"}', {}, 0) if n <= 3 else (503, {}, {}, 0))
    try:
        status, err = clair(server.url)
    finally:
        server.close()
    rows.append(Row("judge fails (HTTP 503) after 3 answers", "status 2, one line: ...failed 2 times, last: HTTP "
                    "503; 3 answers kept", f"status {status}, {len(err)} line(s): {' / '.join(err)}; {cached()} "
                    "answers kept", status == 2 and len(err) == 1 and "failed 2 times, last: HTTP 503" in err[0]
                    and cached() == 3))
    status, err = clair(f"http://127.0.0.1:{free_port()}/v1")
    rows.append(Row("judge down (connection refused)", "status 2, one line: neverfade eval: error: judge at ... "
                    "Connection refused; 3 answers kept", f"status {status}, {len(err)} line(s): {' / '.join(err)}; "
                    f"{cached()} answers kept", status == 2 and len(err) == 1 and cached() == 3
                    and err[0].startswith("neverfade eval: error: judge at") and "Connection refused" in err[0]))
    server = ChatServer(lambda n, p: (200, '{"score": 70, "reason": "r"}', {}, 0))
    try:
        status, _ = clair(server.url)
        asked = len(server.requests)
    finally:
        server.close()
    result = json.loads((root / "clair.json").read_text()) if (root / "clair.json").exists() else {}
    scored = len(result.get("per_caption", []))
    rows.append(Row("judge back: rerun resumes", "status 0, asks 5, 8 scored",
                    f"status {status}, asks {asked}, {scored} scored", status == 0 and asked == 5 and scored == 8))
    return rows


# --- the table ----------------------------------------------------------------------------------------------------

N_CASES = 46  # rows of the table below; the test checks the count, so the test name states it


@pytest.mark.parametrize("cases", [N_CASES], ids=[f"{N_CASES} cases"])
def test_fault_table(tiny_models, tmp_path, capsys, monkeypatch, cases):
    rows = (image_cases(tiny_models, tmp_path) + folder_cases(tiny_models, tmp_path)
            + processor_refusal_case(tiny_models, tmp_path) + manifest_cases(tmp_path, capsys)
            + oom_cases(tiny_models, tmp_path, monkeypatch) + judge_cases(tmp_path, capsys))
    table = "\n".join(f"{'ok ' if r.ok else 'BAD'} | {r.case} | expected: {r.expected} | got: {r.got}" for r in rows)
    with capsys.disabled():
        print(f"\nfault table, {len(rows)} cases:\n{table}")
    assert all(r.ok for r in rows), table
    assert len(rows) == cases, f"the table has {len(rows)} rows; update N_CASES"


def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    """A camera stores the sensor's pixels with an orientation tag; the model must see what a viewer shows."""
    from neverfade.data.images import load_image

    pixels = Image.new("RGB", (60, 20), (200, 10, 10))
    pixels.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    pixels.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 60)
    top, bottom = upright.getpixel((10, 2)), upright.getpixel((10, 57))
    assert top[2] > 150 and top[0] < 80, "the stored left edge is the top after turning"
    assert bottom[0] > 150 and bottom[2] < 80


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from neverfade.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["methods"]) == 2
    assert "does not run data-parallel" in capsys.readouterr().err
