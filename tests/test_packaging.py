"""Packaging metadata: one version, an SPDX license with its text, the Lightning range that is tested,
the console scripts."""

from __future__ import annotations

import configparser
import email
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import lit_accel
from helpers import REPO_ROOT

# Builds the metadata as pip does (setuptools' PEP 517 hook), from a copy of the source tree, so
# the check sees pyproject.toml as it is now, not the metadata of an earlier install.
PREPARE_METADATA = r"""
import sys
from setuptools import build_meta
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def test_the_version_is_the_installed_distributions() -> None:
    assert lit_accel.__version__ == importlib.metadata.version("lit-accel")


def test_built_metadata_has_one_version_an_spdx_license_its_text_and_the_commands(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "lit_accel", source / "lit_accel", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "meta"
    out.mkdir()
    built = subprocess.run(
        [sys.executable, "-c", PREPARE_METADATA, str(out)], cwd=source, capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr[-3000:]
    dist_info = out / built.stdout.strip().splitlines()[-1]
    metadata = email.message_from_string((dist_info / "METADATA").read_text())

    assert metadata["Version"] == lit_accel.__version__, "the version is written once, in lit_accel/__init__.py"
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert (REPO_ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    requirements = metadata.get_all("Requires-Dist")
    assert any(r.replace(" ", "") in ("lightning<2.7,>=2.6", "lightning>=2.6,<2.7") for r in requirements), requirements
    # One command; lit-accel-export stays as an alias of `lit-accel export` for existing scripts.
    entry_points = configparser.ConfigParser()
    entry_points.read(dist_info / "entry_points.txt")
    assert dict(entry_points["console_scripts"]) == {
        "lit-accel": "lit_accel.commands:run",
        "lit-accel-export": "lit_accel.export:main",
    }


def test_every_shipped_config_is_package_data() -> None:
    """pyproject.toml's package-data patterns take every config file into the wheel (``--config
    NAME`` after a pip install); tools/wheel_smoke.sh (CI) checks a built wheel."""
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is Python 3.11+

    patterns = read_configuration(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]["lit_accel"]
    packaged = {path for pattern in patterns for path in (REPO_ROOT / "lit_accel").glob(pattern)}
    shipped = set((REPO_ROOT / "lit_accel" / "configs").rglob("*.yaml"))
    assert shipped and shipped <= packaged, sorted(map(str, shipped - packaged))
