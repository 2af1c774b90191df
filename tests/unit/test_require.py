"""``TSNET2_REQUIRE``: an environment skip of a required part fails the run (tests/require.py,
the hook in tests/conftest.py), run on a small test file in a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.require import needs, required, required_part

REPO = Path(__file__).resolve().parents[2]
PROBE = '''
import pytest
from tests.require import needs

@pytest.mark.skipif(True, reason=needs("k8s", "kube-apiserver not built"))
def test_marked():
    pass

def test_called():
    pytest.skip(needs("netns", "no wireguard-go"))

def test_untagged():
    pytest.skip("nothing to do with the environment")
'''


def test_needs_tags_the_reason_and_required_reads_the_variable() -> None:
    assert needs("cluster", "no kubelet") == "[needs cluster] no kubelet"
    with pytest.raises(ValueError, match="unknown environment part 'gpu'"):
        needs("gpu", "x")
    assert required({"TSNET2_REQUIRE": " netns, k8s ,"}) == {"netns", "k8s"}
    assert required({}) == set()
    with pytest.raises(ValueError, match=r"unknown part.*netsn"):
        required({"TSNET2_REQUIRE": "netsn"})
    env = {"TSNET2_REQUIRE": "k8s"}
    assert required_part("[needs k8s] helm missing", env) == "k8s"
    assert required_part("[needs netns] no lab", env) is None
    assert required_part("helm missing", env) is None


def _run(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TSNET2_REQUIRE"}
    env["PYTHONPATH"] = str(REPO)
    if require is not None:
        env["TSNET2_REQUIRE"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), "-rA", str(probe)],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path)


def test_skips_pass_unless_their_part_is_required(tmp_path: Path) -> None:
    quiet = _run(tmp_path, None)
    assert quiet.returncode == 0, quiet.stdout
    assert "3 skipped" in quiet.stdout, quiet.stdout
    strict = _run(tmp_path, "k8s,netns")
    assert strict.returncode == 1, strict.stdout
    # A skip in setup (a skipif mark, a fixture) becomes an error, one in the test a failure.
    assert "1 failed, 1 skipped, 1 error" in strict.stdout, strict.stdout
    assert "TSNET2_REQUIRE requires 'k8s', but this test could not run: [needs k8s] " \
           "kube-apiserver not built" in strict.stdout, strict.stdout
    assert "TSNET2_REQUIRE requires 'netns'" in strict.stdout, strict.stdout
    typo = _run(tmp_path, "kube")
    assert typo.returncode == 4, typo.stdout + typo.stderr
    assert "TSNET2_REQUIRE: unknown part(s) kube" in typo.stderr, typo.stderr
