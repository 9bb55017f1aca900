from pathlib import Path

from neverfade.data.samples import sample_scene_items
from neverfade.eval import chair
from neverfade.paths import cache_dir


def test_cache_folder_is_neverfade_cache_else_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NEVERFADE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "neverfade"
    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == chair.default_cache_dir() == tmp_path / "mine"
    assert Path(sample_scene_items(1)[0].image).is_relative_to(tmp_path / "mine" / "scenes")
