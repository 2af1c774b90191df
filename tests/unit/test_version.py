"""The version lives in one place, tsnet2/_version.py.

Python code imports it (the package, the CLI, the daemon's LocalAPI and metrics, the
operator's default sidecar image) and the build reads it (pyproject.toml's dynamic version);
the files that cannot import it (the Containerfile's default VERSION, the chart's versions,
the README's example) are checked here to agree with it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from tsnet2_operator.config import SidecarConfig

import tsnet2
from tsnet2 import _version

REPO = Path(__file__).resolve().parents[2]
VERSION = _version.__version__


def test_version_is_a_release_number() -> None:
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", VERSION), VERSION


def test_python_code_takes_the_version_from_one_module() -> None:
    assert tsnet2.__version__ is VERSION
    init = (REPO / "tsnet2" / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r"^__version__\s*=", init, re.M), "tsnet2/__init__.py repeats it"
    assert SidecarConfig().image == f"tsnet2-sidecar:{VERSION}"


def test_the_build_reads_the_version_module() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tsnet2._version.__version__"}


def test_containerfile_default_version_agrees() -> None:
    text = (REPO / "Containerfile").read_text(encoding="utf-8")
    defaults = re.findall(r"^ARG VERSION=(\S*)$", text, re.M)
    assert defaults == [VERSION]
    build = (REPO / "tests" / "image" / "build.sh").read_text(encoding="utf-8")
    assert '--build-arg "VERSION=$VERSION"' in build and "tsnet2/_version.py" in build


def test_chart_versions_agree() -> None:
    chart = yaml.safe_load((REPO / "charts" / "tsnet2" / "Chart.yaml").read_text("utf-8"))
    assert chart["appVersion"] == VERSION  # the image tag when operator.image.tag is empty
    assert chart["version"] == VERSION  # bumped with the package, by the release
    values = yaml.safe_load((REPO / "charts" / "tsnet2" / "values.yaml").read_text("utf-8"))
    assert values["operator"]["image"]["tag"] == ""  # no tag of its own: appVersion
    assert values["sidecar"]["image"]["tag"] == ""  # the operator's


def test_readme_example_uses_the_version() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tags = re.findall(r"tsnet2(?:-sidecar)?:([0-9]+\.[0-9]+\.[0-9]+)\b", readme)
    tags += re.findall(r"image\.tag=([0-9]+\.[0-9]+\.[0-9]+)\b", readme)
    assert tags and set(tags) == {VERSION}
