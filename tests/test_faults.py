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
from conftest import make_images
from eval_fixtures import write_jsonl
from PIL import Image
from test_eval_clair import ChatServer

from neverfade.cli import main
from neverfade.data.images import load_image
from neverfade.results import read_records

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
    cases["palette with a transparent index"] = (
        "palette-t.png",
        np.where((np.array(palette) == 0)[..., None], white, lookup[np.array(palette)]),
    )
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
        rows.append(
            Row(
                f"{case}: pixels the model sees",
                "equal to the RGB computed here",
                "equal" if same else f"differ: {seen.shape} vs {pixels.shape}",
                same,
            )
        )
        Image.fromarray(pixels).save(root / f"reference-{path}.png")
        lines += [{"id": case, "image": path}, {"id": f"reference: {case}", "image": f"reference-{path}.png"}]
    manifest = write_jsonl(root / "images.jsonl", lines)
    out = root / "images-out.jsonl"
    status = caption(str(manifest), "--model", tiny_models["llava"], "--batch-size", "1", "--out", str(out))
    records = {r["id"]: r for r in read_records(out)}
    rows.append(
        Row(
            "one record per listed image (0 lost)",
            f"{len(lines)} records, status 1",
            f"{len(records)} records, status {status}",
            len(records) == len(lines) and status == 1,
        )
    )
    for case, (path, message) in bad.items():
        r = records.get(case, {})
        error = r.get("error") or ""
        rows.append(
            Row(
                case,
                f"error record naming {path}: ...{message}...",
                f"error record: {error}",
                message in error and path in error and r.get("caption") is None,
            )
        )
    for case in good:
        r, ref = records.get(case, {}), records.get(f"reference: {case}", {})
        same = r.get("error") is None and r.get("caption") is not None and r.get("caption") == ref.get("caption")
        rows.append(
            Row(
                case,
                "the caption of its RGB pixels",
                f"{r.get('error') or r.get('caption')!r} vs {ref.get('caption')!r}",
                same,
            )
        )
    # the comparison has power: on this model, different pixels give different captions
    distinct = {records[f"reference: {case}"]["caption"] for case in good if f"reference: {case}" in records}
    rows.append(
        Row(
            "captions tell the reference images apart",
            f"at least {len(good) - 2} distinct captions",
            f"{len(distinct)} distinct",
            len(distinct) >= len(good) - 2,
        )
    )
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
    ok = (
        set(records) == {"good.png", "broken-link.png"}
        and good.get("caption") is not None
        and "no such image" in (link.get("error") or "")
        and status == 1
    )
    return [
        Row(
            "folder with a broken link and a text file",
            "2 records: good.png captioned, broken-link.png: no such image; status 1",
            f"{sorted(records)}: {good.get('caption')!r}, {link.get('error')!r}; status {status}",
            ok,
        )
    ]


def processor_refusal_case(tiny_models, root: Path) -> list[Row]:
    """Qwen-VL's image processor refuses an aspect ratio beyond 200: that image's record, not a failed batch."""
    make_images()[0].save(root / "fine.png")
    Image.new("RGB", (3000, 10), (9, 99, 199)).save(root / "strip.png")
    manifest = write_jsonl(
        root / "strip.jsonl", [{"id": "strip", "image": "strip.png"}, {"id": "fine", "image": "fine.png"}]
    )
    out = root / "strip-out.jsonl"
    status = caption(str(manifest), "--model", tiny_models["qwen2_vl"], "--batch-size", "2", "--out", str(out))
    records = {r["id"]: r for r in read_records(out)}
    strip, fine = records.get("strip", {}), records.get("fine", {})
    ok = (
        "absolute aspect ratio must be smaller than 200" in (strip.get("error") or "")
        and fine.get("error") is None
        and fine.get("caption") is not None
        and status == 1
    )
    return [
        Row(
            "3000 x 10 strip (Qwen-VL refuses aspect ratios > 200)",
            "error record; its batch neighbour captioned; status 1",
            f"{strip.get('error')!r}; {fine.get('caption')!r}; status {status}",
            ok,
        )
    ]


# --- bad manifests and inputs: exit status 2, one line naming the file and line ----------------------------------

BAD_MANIFESTS = {
    "duplicate id": (
        '{"id": "a", "image": "x.png"}\n{"id": "b", "image": "y.png"}\n{"id": "a", "image": "z.png"}\n',
        ":3: duplicate id 'a'",
    ),
    "duplicate image without ids": ('{"image": "x.png"}\n{"image": "x.png"}\n', ":2: duplicate id 'x.png'"),
    "line without image": ('{"id": "a", "image": "x.png"}\n{"id": "b"}\n', ':2: each line needs an "image" field'),
    "image that is not a path": ('{"id": "a", "image": null}\n', ':1: each line needs an "image" field'),
    "line that is not JSON": ('{"id": "a", "image": "x.png"}\n{"id": "b", image: y.png}\n', ":2: not valid JSON"),
    "line that is a JSON list": ('["x.png"]\n', ':1: each line needs an "image" field'),
    "line that is not UTF-8": (b'{"id": "a", "image": "x.png"}\n{"id": "\xff\xfe"}\n', ":2: not UTF-8 text"),
    "empty manifest": ("\n\n", ": the manifest lists no images"),
    "empty prompt": ('{"id": "a", "image": "x.png", "prompt": ""}\n', ":1: empty prompt"),
    "prompt of white space": ('{"image": "x.png"}\n{"image": "y.png", "prompt": " \\n "}\n', ":2: empty prompt"),
    "prompt that is not a text": ('{"image": "x.png", "prompt": 5}\n', ':1: "prompt" must be a text, got 5'),
}


def manifest_cases(root: Path, capsys) -> list[Row]:
    rows = []
    capsys.readouterr()
    for n, (case, (text, message)) in enumerate(BAD_MANIFESTS.items()):
        path = root / f"bad-{n}.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        status = caption(str(path), "--model", "random:llava")
        lines = capsys.readouterr().err.strip().splitlines()
        rows.append(
            Row(
                f"manifest: {case}",
                f"status 2, one line: ...{path.name}{message}",
                f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
                status == 2 and len(lines) == 1 and f"{path}{message}" in lines[0],
            )
        )
    (root / "input-link.jsonl").symlink_to(root / "no-manifest.jsonl")
    status = caption(str(root / "input-link.jsonl"))
    lines = capsys.readouterr().err.strip().splitlines()
    rows.append(
        Row(
            "input is a dangling link",
            "status 2, one line: no such file or folder",
            f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
            status == 2 and len(lines) == 1 and "no such file or folder" in lines[0],
        )
    )
    return rows


# --- what --out names, and the run's options: exit status 2, one line, before the model loads; files untouched ---


def refused(capsys, case: str, args: list[str], *messages: str, untouched: Path | None = None) -> Row:
    """Run `caption *args`: expect status 2 and one line holding each of `messages` (a "loaded ..." progress line
    aside, for checks that need the model), with `untouched`'s bytes as they were."""
    before = untouched.read_bytes() if untouched is not None else None
    capsys.readouterr()
    status = main(["caption", *args] + ([] if "--max-new-tokens" in args else ["--max-new-tokens", TOKENS]))
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loaded ")]
    kept = untouched is None or untouched.read_bytes() == before
    return Row(
        case,
        f"status 2, one line: ...{'...'.join(messages)}...{'; file untouched' if untouched else ''}",
        f"status {status}, {len(lines)} line(s): {' / '.join(lines)}{'' if kept else '; THE FILE CHANGED'}",
        status == 2 and len(lines) == 1 and all(m in lines[0] for m in messages) and kept,
    )


def out_cases(tiny_models, root: Path, capsys) -> list[Row]:
    folder = root / "out-cases"
    folder.mkdir()
    make_images()[0].save(folder / "a.png")
    manifest = write_jsonl(folder / "in.jsonl", [{"id": "a", "image": "a.png"}])
    args = [str(manifest), "--model", tiny_models["llava"], "--out"]
    not_results = {
        "one-line text file without a newline": ("notes.txt", b"my notes", ":1: not a neverfade results record"),
        "a bare JSON number": ("five.jsonl", b"5\n", ":1: not a neverfade results record"),
        "a JSON object without a newline (a config)": (
            "config.json",
            b'{"model": "x"}',
            ":1: not a neverfade results record",
        ),
        'a manifest (records without "run")': (
            "other.jsonl",
            b'{"id": "b", "image": "b.png"}\n',
            ":1: not a neverfade results record",
        ),
        "results, then a line of text": (
            "mixed.jsonl",
            b'{"id": "a", "run": "r"}\nsome text\n',
            ":2: not a neverfade results record",
        ),
    }
    rows = []
    for case, (name, data, message) in not_results.items():
        (folder / name).write_bytes(data)
        rows.append(
            refused(
                capsys,
                f"--out {case}",
                args + [str(folder / name)],
                f"{folder / name}{message}",
                untouched=folder / name,
            )
        )
    rows.append(
        refused(
            capsys,
            "--out is the input manifest",
            args + [str(manifest)],
            f"--out {manifest} is the input",
            untouched=manifest,
        )
    )
    rows.append(refused(capsys, "--out is a folder", args + [str(folder)], f"--out {folder} is a folder"))
    rows.append(
        refused(
            capsys,
            "--out under a regular file",
            args + [str(folder / "notes.txt" / "out.jsonl")],
            f"cannot write --out {folder / 'notes.txt' / 'out.jsonl'}: {folder / 'notes.txt'} is not a folder",
            untouched=folder / "notes.txt",
        )
    )
    rows.append(
        refused(
            capsys,
            "--out where nothing may be written (/sys)",
            args + ["/sys/neverfade-out.jsonl"],
            "cannot write --out /sys/neverfade-out.jsonl: ",
        )
    )
    return rows


def option_cases(tiny_models, root: Path, capsys, monkeypatch) -> list[Row]:
    make_images()[0].save(root / "opt.png")
    args = [str(root / "opt.png"), "--model", tiny_models["llava"]]
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
        rows = [
            refused(
                capsys,
                "--device cuda without CUDA",
                args + ["--device", "cuda"],
                "--device cuda: this machine has no cuda device",
            )
        ]
    rows.append(refused(capsys, "--device tpu", args + ["--device", "tpu"], "--device tpu: not a device torch knows"))
    capsys.readouterr()
    status, lines = main(["bench", "--device", "tpu"]), capsys.readouterr().err.strip().splitlines()
    rows.append(
        Row(
            "bench --device tpu",
            "status 2, one line: neverfade bench: error: --device tpu: not a device",
            f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
            status == 2
            and len(lines) == 1
            and lines[0].startswith("neverfade bench: error: --device tpu: not a device torch knows"),
        )
    )
    for n in ("0", "-3"):
        rows.append(
            refused(
                capsys,
                f"--samples {n}",
                ["--samples", n, "--model", tiny_models["llava"]],
                "--samples must be between 1 and ",
                f", got {n}",
            )
        )
    rows.append(
        refused(
            capsys,
            "--naive-alpha inf",
            args + ["--method", "naive", "--naive-alpha", "inf"],
            "alpha must be a finite number, got inf",
        )
    )
    rows.append(
        refused(
            capsys,
            "--sparc-tau nan",
            args + ["--method", "sparc", "--sparc-tau", "nan"],
            "tau must be a finite number, got nan",
        )
    )
    rows.append(refused(capsys, "--prompt of white space", args + ["--prompt", "  "], "--prompt is empty"))
    # the tiny models take 4096 positions; this tokenizer makes several tokens of each word
    rows.append(
        refused(
            capsys,
            "--prompt longer than the model's positions",
            args + ["--prompt", "tell me " * 2000],
            f"and {TOKENS} new tokens are asked for: ",
            "beyond the model's 4096 (max_position_embeddings)",
        )
    )
    rows.append(
        refused(
            capsys,
            "--max-new-tokens beyond the model's positions",
            args + ["--max-new-tokens", "5000"],
            "and 5000 new tokens are asked for: ",
            "beyond the model's 4096 (max_position_embeddings)",
        )
    )
    return rows


# --- reruns: one record per (id, run), for the item as it is now; errors left make status 1 ---------------------


def run_caption(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    status = caption(*args)
    return status, capsys.readouterr().err


def rerun_cases(tiny_models, root: Path, capsys, monkeypatch) -> list[Row]:
    """A manifest whose third image is missing, run and rerun: the error stays one record, --retry-errors replaces
    it, a changed prompt or image is described again in place of the old record; each record's caption is compared
    with a fresh run's."""
    from neverfade.api import Captioner

    folder = root / "rerun"
    folder.mkdir()
    for i in range(3):
        make_images()[i].save(folder / f"img{i}.png")
    lines = [
        {"id": "a", "image": "img0.png"},
        {"id": "b", "image": "img1.png", "prompt": "What is it?"},
        {"id": "c", "image": "img2-missing.png"},
    ]
    manifest = write_jsonl(folder / "in.jsonl", lines)
    out = folder / "out.jsonl"
    args = [str(manifest), "--model", tiny_models["llava"], "--out", str(out)]
    real, described = Captioner.caption, []
    with monkeypatch.context() as patch:
        patch.setattr(
            Captioner,
            "caption",
            lambda self, images, *a, **kw: (described.extend(images), real(self, images, *a, **kw))[1],
        )

        def state() -> tuple[dict, int]:
            records = read_records(out)
            keys = [(r["id"], r["run"]) for r in records]
            return {r["id"]: r for r in records}, len(keys) - len(set(keys))

        def fresh(name: str) -> dict:
            """The records of a run of the manifest as it is now into a new file."""
            assert caption(str(manifest), "--model", tiny_models["llava"], "--out", str(folder / name)) in (0, 1)
            return {r["id"]: r for r in read_records(folder / name)}

        rows = []
        caption(*args)
        status, err = run_caption(capsys, *args)
        records, repeats = state()
        rows.append(
            Row(
                "rerun with an error left, nothing new to do",
                "status 1; stderr: holding an error: 1; --retry-errors ...; 3 records",
                f"status {status}; {err.strip().splitlines()[-1]!r}; {len(records)} records, {repeats} repeated",
                status == 1
                and "holding an error: 1; --retry-errors tries them again" in err
                and len(records) == 3
                and not repeats,
            )
        )
        status, _ = run_caption(capsys, *args, "--retry-errors")
        records, repeats = state()
        rows.append(
            Row(
                "--retry-errors, the image still missing",
                "status 1, 3 records, none repeated, c: no such image",
                f"status {status}, {len(records)} records, {repeats} repeated, c: "
                f"{records.get('c', {}).get('error')!r}",
                status == 1
                and len(records) == 3
                and not repeats
                and "no such image" in (records.get("c", {}).get("error") or ""),
            )
        )
        make_images()[2].save(folder / "img2-missing.png")
        described.clear()
        status, _ = run_caption(capsys, *args, "--retry-errors")
        records, repeats, n = *state(), len(described)
        expected = fresh("fresh-1.jsonl")
        rows.append(
            Row(
                "--retry-errors, the image back",
                "status 0, 3 records, none repeated, c captioned as a fresh run does; 1 image described",
                f"status {status}, {len(records)} records, {repeats} "
                "repeated, c: "
                f"{records.get('c', {}).get('caption')!r}; {n} described",
                status == 0
                and len(records) == 3
                and not repeats
                and records["c"]["error"] is None
                and records["c"]["caption"] == expected["c"]["caption"]
                and n == 1,
            )
        )

        lines[0]["prompt"], lines[1]["image"] = "Name the colours.", "img0.png"  # a new prompt; b another image
        write_jsonl(manifest, lines)
        described.clear()
        status, _ = run_caption(capsys, *args)
        records, repeats, n = *state(), len(described)
        expected = fresh("fresh-2.jsonl")
        same = all(
            records[i]["caption"] == expected[i]["caption"]
            and records[i]["prompt"] == expected[i]["prompt"]
            and records[i]["image"] == expected[i]["image"]
            for i in "abc"
        )
        rows.append(
            Row(
                "the manifest changed a prompt and an image",
                "status 0, 3 records, none repeated, a and b described again (2), each as a fresh run does",
                f"status {status}, {len(records)} records, "
                f"{repeats} repeated, {n} described, {'as' if same else 'NOT as'} a fresh run",
                status == 0 and len(records) == 3 and not repeats and n == 2 and same,
            )
        )

        # a run killed after appending a retried record, before it replaced the old one: both are in the file
        old_c = {**records["c"], "caption": None, "new_tokens": 0, "error": "no such image: (an earlier run)"}
        with open(out, "a") as f:
            f.write(json.dumps(old_c) + "\n")  # a later line than the good one: the error must still not stand
        described.clear()
        status, _ = run_caption(capsys, *args)
        records, repeats = state()
        rows.append(
            Row(
                "a file left with an old and a new record of one item",
                "status 0, 3 records, none repeated, c captioned, nothing described",
                f"status {status}, {len(records)} records, {repeats} "
                f"repeated, c: {records['c']['caption']!r}, {len(described)} described",
                status == 0 and len(records) == 3 and not repeats and records["c"]["error"] is None and not described,
            )
        )
        return rows


def long_item_prompt_case(tiny_models, root: Path) -> list[Row]:
    """A manifest prompt beyond the model's 4096 positions: that item's error record; its batch neighbour
    captioned as it is alone."""
    folder = root / "long"
    folder.mkdir()
    make_images()[0].save(folder / "a.png")
    make_images()[1].save(folder / "b.png")
    manifest = write_jsonl(
        folder / "in.jsonl",
        [{"id": "long", "image": "a.png", "prompt": "tell me " * 2000}, {"id": "fine", "image": "b.png"}],
    )
    args = ["--model", tiny_models["llava"], "--batch-size", "2"]
    status = caption(str(manifest), *args, "--out", str(folder / "out.jsonl"))
    records = {r["id"]: r for r in read_records(folder / "out.jsonl")}
    caption(str(folder / "b.png"), *args, "--out", str(folder / "alone.jsonl"))
    alone = read_records(folder / "alone.jsonl")[0]["caption"]
    error = records.get("long", {}).get("error") or ""
    return [
        Row(
            "manifest prompt beyond the model's positions",
            "error record: the prompt is N tokens with its "
            f"image and {TOKENS} new tokens ... beyond the model's 4096; neighbour as alone; status 1",
            f"{error!r}; {records.get('fine', {}).get('caption')!r} vs {alone!r}; status {status}",
            status == 1
            and "the prompt is " in error
            and f"and {TOKENS} new tokens are asked for" in error
            and "beyond the model's 4096" in error
            and records.get("fine", {}).get("caption") == alone,
        )
    ]


def concurrent_run_case(tiny_models, root: Path, capsys) -> list[Row]:
    """Another process holds an flock on --out, as a run does while it lasts: this run refuses at once, naming it."""
    import subprocess
    import sys

    make_images()[0].save(root / "busy.png")
    out = root / "busy.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'ab'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        row = refused(
            capsys,
            "a second run on the same --out",
            [str(root / "busy.png"), "--model", tiny_models["llava"], "--out", str(out)],
            f"{out} is being written by another neverfade run (pid {holder.pid})",
            untouched=out,
        )
    finally:
        holder.communicate("", timeout=30)
    return [row]


def torchrun_lock_cases(tiny_models, root: Path, capsys, monkeypatch) -> list[Row]:
    """Under torchrun each rank locks the part file it writes, and rank 0 --out too: a rank whose file another run
    holds refuses before it joins the process group (and before it cuts anything from the file)."""
    import os

    from neverfade.results import lock, part_path

    make_images()[0].save(root / "ranked.png")
    out = root / "ranked.jsonl"
    args = [str(root / "ranked.png"), "--model", tiny_models["llava"], "--out", str(out)]
    rows = []
    for rank, held in ((1, part_path(out, 1, 2)), (0, out)):
        held.parent.mkdir(exist_ok=True)
        held.write_bytes(b'{"id": "x", "run": "r"}\n{"id": "y", "ru')  # a torn tail only the holder may cut
        with monkeypatch.context() as patch, lock(held):
            for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2)):
                patch.setenv(name, str(value))
            patch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: pytest.fail("joined the group"))
            rows.append(
                refused(
                    capsys,
                    f"under torchrun: rank {rank} while another run holds {held.name}",
                    args,
                    f"{held} is being written by another neverfade run (pid {os.getpid()})",
                    untouched=held,
                )
            )
    return rows


def non_finite_case(root: Path) -> list[Row]:
    from neverfade.results import ResultsFile

    with ResultsFile(root / "finite.jsonl") as results:
        results.append([{"id": "a", "run": "r", "caption": "fine"}])
        try:
            results.append([{"id": "b", "run": "r", "score": float("inf")}])
            got = "written"
        except ValueError as err:
            got = f"ValueError: {err}"
    text = (root / "finite.jsonl").read_text()
    return [
        Row(
            "a record holding inf",
            "refused (ValueError), the file holds the one finite record",
            f"{got}; file: {text.strip()}",
            got.startswith("ValueError") and text.count("\n") == 1 and "Infinity" not in text,
        )
    ]


def demo_prompt_cases(tiny_models, capsys, monkeypatch) -> list[Row]:
    """The demo refuses a --prompt beyond the model's positions before it serves; a request whose image takes the
    prompt past them gets that pane's error, not garbage."""
    import neverfade
    from neverfade.demo import server
    from neverfade.demo.stream import caption_events

    long = "tell me " * 2000
    with monkeypatch.context() as patch:
        patch.setattr(server, "make_server", lambda *a, **kw: pytest.fail("the demo served"))
        capsys.readouterr()
        status = main(["demo", "--model", tiny_models["llava"], "--prompt", long, "--max-new-tokens", TOKENS])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loaded ")]
    rows = [
        Row(
            "demo --prompt beyond the model's positions",
            "status 2, one line: ...--prompt: the prompt is ... beyond the model's 4096",
            f"status {status}, {len(lines)} line(s): {' / '.join(lines)}",
            status == 2
            and len(lines) == 1
            and "--prompt: the prompt is " in lines[0]
            and "beyond the model's 4096 (max_position_embeddings)" in lines[0],
        )
    ]
    captioner = neverfade.load(tiny_models["llava"], device="cpu")
    events = list(caption_events(captioner, make_images()[0], None, [("baseline", [], {})], long, int(TOKENS)))
    errors = [e["message"] for e in events if e["event"] == "error"]
    rows.append(
        Row(
            "demo request past the model's positions",
            "the pane's error: PromptTooLong: ... beyond the model's 4096; no caption",
            f"errors {errors}; {sum(e['event'] == 'done' for e in events)} done",
            len(errors) == 1
            and errors[0].startswith("PromptTooLong: the prompt is ")
            and "beyond the model's 4096" in errors[0]
            and not any(e["event"] == "done" for e in events),
        )
    )
    return rows


def demo_loader_cases(root: Path) -> list[Row]:
    """The demo reads an upload with the command line's loader: a 16-bit PNG keeps its tones, a phone photo turns
    upright as its EXIF orientation says."""
    from neverfade.demo.server import DemoApp

    app = DemoApp(captioner=None)
    grey = np.arange(0, 64 * 32, dtype=np.uint16).reshape(32, 64) * 30  # 0 .. 61410
    Image.fromarray(grey).save(root / "deep.png")
    seen = np.array(app.uploaded((root / "deep.png").read_bytes()))
    rows = [
        Row(
            "demo: 16-bit greyscale PNG",
            "the tones scaled to 8 bits (v / 257), as the command line sees them",
            f"mean {seen.mean():.1f} vs {(grey / 257).mean():.1f}; max difference to the command line "
            f"{np.abs(seen.astype(int) - np.array(load_image(root / 'deep.png'))).max()}",
            np.abs(seen[..., 0] - np.round(grey / 257)).max() <= 1
            and np.array_equal(seen, np.array(load_image(root / "deep.png"))),
        )
    ]
    pixels = Image.new("RGB", (60, 20), (200, 10, 10))
    pixels.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the stored left edge is the top
    pixels.save(root / "phone.jpg", exif=exif, quality=95)
    upright = app.uploaded((root / "phone.jpg").read_bytes())
    top = upright.getpixel((10, 2))
    rows.append(
        Row(
            "demo: JPEG with EXIF orientation 6",
            "20 x 60, blue at the top",
            f"{upright.size[0]} x {upright.size[1]}, top pixel {top}",
            upright.size == (20, 60) and top[2] > 150 and top[0] < 80,
        )
    )
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
    rows = [
        Row(
            "out of memory on batches of 4: split into halves",
            "8 records, the captions of batches of 2; status 0; batch sizes tried [4, 2, 2, 4, 2, 2]",
            f"{len(split)} records, "
            f"{'the same' if split == pairs else 'other'} captions; status {status}; batch sizes tried {sizes}",
            len(split) == 8 and split == pairs and status == 0 and sizes == [4, 2, 2, 4, 2, 2],
        )
    ]

    Image.new("RGB", (77, 33), (1, 2, 3)).save(folder / "img9-poison.png")
    sizes.clear()
    status = caption(*args, "--batch-size", "4", "--out", str(root / "split.jsonl"))
    records = {r["id"]: r for r in read_records(root / "split.jsonl")}
    error = (records.get("img9-poison.png") or {}).get("error") or ""
    rows.append(
        Row(
            "out of memory even alone: error record",
            "9 records, the new one: out of memory even as a "
            "batch of one: CUDA out of memory...; status 1; batch sizes tried [1]",
            f"{len(records)} records, the new one: {error}; status {status}; batch sizes tried {sizes}",
            len(records) == 9
            and error.startswith("out of memory even as a batch of one: CUDA out of memory")
            and status == 1
            and sizes == [1],
        )
    )
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
        status = main(
            [
                "eval",
                "clair",
                str(captions),
                "--references",
                str(refs),
                "--judge-url",
                url,
                "--cache",
                str(root / "answers.jsonl"),
                "--concurrency",
                "1",
                "--retries",
                "1",
                "--timeout",
                "5",
                "--bootstrap",
                "0",
                "--out",
                str(root / "clair.json"),
            ]
        )
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
    rows.append(
        Row(
            "judge fails (HTTP 503) after 3 answers",
            "status 2, one line: ...failed 2 times, last: HTTP 503; 3 answers kept",
            f"status {status}, {len(err)} line(s): {' / '.join(err)}; {cached()} answers kept",
            status == 2 and len(err) == 1 and "failed 2 times, last: HTTP 503" in err[0] and cached() == 3,
        )
    )
    status, err = clair(f"http://127.0.0.1:{free_port()}/v1")
    rows.append(
        Row(
            "judge down (connection refused)",
            "status 2, one line: neverfade eval: error: judge at ... Connection refused; 3 answers kept",
            f"status {status}, {len(err)} line(s): {' / '.join(err)}; {cached()} answers kept",
            status == 2
            and len(err) == 1
            and cached() == 3
            and err[0].startswith("neverfade eval: error: judge at")
            and "Connection refused" in err[0],
        )
    )
    server = ChatServer(lambda n, p: (200, '{"score": 70, "reason": "r"}', {}, 0))
    try:
        status, _ = clair(server.url)
        asked = len(server.requests)
    finally:
        server.close()
    result = json.loads((root / "clair.json").read_text()) if (root / "clair.json").exists() else {}
    scored = len(result.get("per_caption", []))
    rows.append(
        Row(
            "judge back: rerun resumes",
            "status 0, asks 5, 8 scored",
            f"status {status}, asks {asked}, {scored} scored",
            status == 0 and asked == 5 and scored == 8,
        )
    )
    return rows


# --- the table ----------------------------------------------------------------------------------------------------

N_CASES = 82  # rows of the table below; the test checks the count, so the test name states it


@pytest.mark.parametrize("cases", [N_CASES], ids=[f"{N_CASES} cases"])
def test_fault_table(tiny_models, tmp_path, capsys, monkeypatch, cases):
    rows = (
        image_cases(tiny_models, tmp_path)
        + folder_cases(tiny_models, tmp_path)
        + processor_refusal_case(tiny_models, tmp_path)
        + manifest_cases(tmp_path, capsys)
        + out_cases(tiny_models, tmp_path, capsys)
        + option_cases(tiny_models, tmp_path, capsys, monkeypatch)
        + rerun_cases(tiny_models, tmp_path, capsys, monkeypatch)
        + long_item_prompt_case(tiny_models, tmp_path)
        + concurrent_run_case(tiny_models, tmp_path, capsys)
        + torchrun_lock_cases(tiny_models, tmp_path, capsys, monkeypatch)
        + non_finite_case(tmp_path)
        + demo_loader_cases(tmp_path)
        + demo_prompt_cases(tiny_models, capsys, monkeypatch)
        + oom_cases(tiny_models, tmp_path, monkeypatch)
        + judge_cases(tmp_path, capsys)
    )
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
