"""``tsnet2 log verify`` as a command, on a rotated set written by the real TrafficLog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.test_traffic_verify import _write
from tsnet2.traffic.verify import ordered


def test_the_command_on_a_rotated_set_and_on_damage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, max_bytes=400)
    files = sorted(str(p) for p in tmp_path.glob("t.jsonl*"))
    assert len(files) > 3  # rotated many times
    cmd = [sys.executable, "-c", "import sys; from tsnet2.cli import main; sys.exit(main())",
           "log", "verify"]
    ok = subprocess.run([*cmd, *reversed(files)], capture_output=True, text=True, timeout=60,
                        check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "flows: 3 opened, 3 closed" in ok.stdout and ok.stdout.endswith("OK\n")
    out = json.loads(subprocess.run([*cmd, "--json", *files], capture_output=True, text=True,
                                    timeout=60, check=False).stdout)
    assert out["ok"] is True and out["problems"] == []
    # Lose the oldest file: the chain begins late, which a rotated set may (the rest is
    # whole), unless the log must be there from its first record.
    oldest = ordered(files)[0]
    rest = [f for f in files if f != oldest]
    lost = subprocess.run([*cmd, *rest], capture_output=True, text=True, timeout=60,
                          check=False)
    assert lost.returncode == 0 and "begins late" in lost.stdout, lost.stdout
    strict = subprocess.run([*cmd, "--from-start", *rest], capture_output=True, text=True,
                            timeout=60, check=False)
    assert strict.returncode == 1 and "begins late" in strict.stdout, strict.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode == 1
    assert "tsnet2 log verify: " in missing.stderr and "No such file" in missing.stderr
