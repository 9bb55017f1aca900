import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import neverfade

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "neverfade.__version__"}
    assert importlib.metadata.version("neverfade") == neverfade.__version__  # as installed


def test_typed_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (Path(neverfade.__file__).parent / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["neverfade"]


def test_import_neverfade_and_its_version_load_no_heavy_module():
    code = "import sys, neverfade; neverfade.__version__; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
