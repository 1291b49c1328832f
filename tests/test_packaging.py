"""The wheel holds the package and nothing else, even next to a first run's data directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_only_the_clickpulse_package_even_beside_a_data_directory(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "clickpulse", source / "clickpulse", ignore=shutil.ignore_patterns("__pycache__"))
    # What a first run leaves in the checkout: DATA_DIR's default, with chDB's tree of plain
    # directories, which setuptools' "clickpulse*" pattern took for namespace packages.
    store = source / "clickpulse-data" / "chdb" / "store" / "0a1"
    store.mkdir(parents=True)
    (store / "data.bin").write_bytes(b"\0")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("clickpulse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"clickpulse", wheel.name.split("-py")[0] + ".dist-info"}
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["clickpulse"]
    # Every module of the checkout's package is in it, the subpackages and py.typed included.
    expected = {str(path.relative_to(ROOT)) for path in (ROOT / "clickpulse").rglob("*.py")} | {"clickpulse/py.typed"}
    assert expected <= set(names)
