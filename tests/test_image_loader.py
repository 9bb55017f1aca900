"""The runner's batch loader: each batch's images (or the error of one that cannot be used) in order, loaded on
worker threads one batch ahead of the batch being described, and the model's inputs prepared from those that load
on another thread."""

import threading

from PIL import Image

from neverfade import runner
from neverfade.data.images import ImageError
from neverfade.data.items import Item


class _Captioner:
    """What the loader uses of a Captioner: `prepare`, and the image processor with its lock (refusing wide images,
    as Qwen-VL's refuses an aspect ratio beyond 200)."""

    def __init__(self):
        self.processor_lock = threading.Lock()
        self.prepared, self.threads = [], set()
        self.processor = type("P", (), {"image_processor": staticmethod(self._image_processor)})()

    @staticmethod
    def _image_processor(images, return_tensors):
        if any(im.size[0] > 10 * im.size[1] for im in images):
            raise ValueError("absolute aspect ratio must be smaller than 10")

    def prepare(self, images, prompts):
        self.threads.add(threading.current_thread().name)
        self._image_processor(images, "pt")
        self.prepared.append(([im.size for im in images], prompts))
        return {"sizes": [im.size for im in images], "prompts": prompts}


def test_batches_come_in_order_one_ahead_prepared_on_worker_threads(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8 + i, 8), (i, 0, 0)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.new("RGB", (200, 8)).save(tmp_path / "wide.png")
    items = [Item(f"i{i}", p) for i, p in enumerate(paths)] + [Item("bad", str(tmp_path / "bad.png"))]
    items.insert(3, Item("wide", str(tmp_path / "wide.png"), prompt="Its own prompt."))
    batches = [items[:2], items[2:5], items[5:]]
    threads, real = {}, runner.load_or_error

    def watched(path):
        threads[path] = threading.current_thread().name
        return real(path)

    monkeypatch.setattr(runner, "load_or_error", watched)
    captioner = _Captioner()
    with runner.BatchLoader(captioner, batches, "Describe.", workers=2) as loader:
        first = loader.next_batch()
        assert loader.ahead is not None  # the second batch is already on its way
        second, third = loader.next_batch(), loader.next_batch()
        assert loader.ahead is None
    (images1, prepared1), (images2, prepared2), (images3, prepared3) = first, second, third
    assert list(images1) == ["i0", "i1"] and list(images2) == ["i2", "wide", "i3"] and list(images3) == ["i4", "bad"]
    assert [im.size for im in (images1["i0"], images2["i3"], images3["i4"])] == [(8, 8), (11, 8), (12, 8)]
    assert isinstance(images3["bad"], ImageError)  # unreadable: not prepared
    assert isinstance(images2["wide"], ImageError) and "refuses" in str(images2["wide"])  # the processor's refusal
    assert prepared1 == (["i0", "i1"], {"sizes": [(8, 8), (9, 8)], "prompts": ["Describe.", "Describe."]})
    assert prepared2[0] == ["i2", "i3"] and prepared2[1]["sizes"] == [(10, 8), (11, 8)]  # the batch without it
    assert prepared3[0] == ["i4"]
    assert ([(10, 8), (200, 8), (11, 8)], ["Describe.", "Its own prompt.", "Describe."]) not in captioner.prepared
    assert all(name.startswith("neverfade-images") for name in threads.values()) and len(threads) == 7
    assert captioner.threads == {"neverfade-prepare_0"} and loader.prepare_s > 0


def test_caption_items_describes_the_prepared_batches_as_captioning_them_directly(tiny_models, tmp_path, monkeypatch):
    """Each batch is prepared once, on the loader's thread, for every run; the captions are those of
    `Captioner.caption` on the same images and prompts; `timings` has each stage."""
    import neverfade
    from tests.conftest import make_images

    c = neverfade.load(tiny_models["llava"], device="cpu")
    items = []
    for i, image in enumerate(make_images()):
        image.save(tmp_path / f"{i}.png")
        items.append(Item(f"i{i}", str(tmp_path / f"{i}.png"), prompt="What is this?" if i == 1 else None))
    generate = {"max_new_tokens": 5, "do_sample": False}
    runs = runner.prepare_runs(c, [([], None), (["naive"], None)], "Describe.", generate)
    calls, real = [], c.prepare

    def counted(images, prompts):
        calls.append((len(images), threading.current_thread().name))
        return real(images, prompts)

    monkeypatch.setattr(c, "prepare", counted)
    seen, timings = {}, {}
    runner.caption_items(
        c, items, runs, prompt="Describe.", generate=generate, batch_size=2, timings=timings,
        on_batch=lambda batch, records: seen.update(records),
    )  # fmt: skip
    assert calls == [(2, "neverfade-prepare_0"), (1, "neverfade-prepare_0")]  # per batch, not per run
    for run_index, run in enumerate(runs):
        c.use(run.methods)
        for batch in (items[:2], items[2:]):
            images = [Image.open(it.image).convert("RGB") for it in batch]
            direct = c.caption(images, [it.prompt or "Describe." for it in batch], **generate)
            assert [seen[it.id][run_index]["caption"] for it in batch] == [d.text for d in direct]
    assert seen["i0"][0]["caption"] != seen["i0"][1]["caption"], "naive must change the caption here"
    assert set(timings) == {"waiting for images", "describing", "writing", "preparing (meanwhile)"}
    assert timings["describing"] > 0 and timings["preparing (meanwhile)"] > 0
