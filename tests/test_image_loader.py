"""The runner's image loader: each batch's images (or the error of one that cannot be used) in order, loaded on
worker threads one batch ahead of the batch being described."""

import threading

from PIL import Image

from neverfade import runner
from neverfade.data.images import ImageError
from neverfade.data.items import Item


def test_batches_come_in_order_one_ahead_on_worker_threads(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8 + i, 8), (i, 0, 0)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items = [Item(f"i{i}", p) for i, p in enumerate(paths)] + [Item("bad", str(tmp_path / "bad.png"))]
    batches = [items[:2], items[2:4], items[4:]]
    threads, real = {}, runner.usable_image

    def watched(captioner, path):
        threads[path] = threading.current_thread().name
        return real(captioner, path)

    monkeypatch.setattr(runner, "usable_image", watched)
    with runner.ImageLoader(None, batches, workers=2) as loader:
        first = loader.next_batch()
        assert set(loader.ahead) == {"i2", "i3"}  # the second batch is already on its way
        second, third = loader.next_batch(), loader.next_batch()
        assert loader.ahead is None
    assert list(first) == ["i0", "i1"] and list(second) == ["i2", "i3"] and list(third) == ["i4", "bad"]
    assert [im.size for im in (first["i0"], second["i3"], third["i4"])] == [(8, 8), (11, 8), (12, 8)]
    assert isinstance(third["bad"], ImageError)
    assert all(name.startswith("neverfade-images") for name in threads.values()) and len(threads) == 6
