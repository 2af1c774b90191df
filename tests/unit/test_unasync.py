"""The sync face is generated from the asyncio face; a hand edit to it fails here."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "unasync.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_generated_sync_face_is_up_to_date() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_hand_edit_to_the_sync_face_is_caught(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    unasync = load()
    copy = tmp_path / "_sync"
    shutil.copytree(unasync.TARGET, copy)
    edited = copy / "channel.py"
    edited.write_text(edited.read_text().replace("CLOSE_WAIT = 5.0", "CLOSE_WAIT = 50.0"))
    monkeypatch.setattr(unasync, "TARGET", copy)
    monkeypatch.setattr(unasync, "ROOT", tmp_path)
    assert unasync.main(["--check"]) == 1
    assert "-CLOSE_WAIT = 50.0" in capsys.readouterr().out
    (copy / "extra.py").write_text("# not generated\n")
    edited.write_text(edited.read_text().replace("CLOSE_WAIT = 50.0", "CLOSE_WAIT = 5.0"))
    assert unasync.main(["--check"]) == 1  # a file without an asyncio source


def test_the_rewrite_rules() -> None:
    unasync = load()
    src = (
        "async def f(x: AsyncServer) -> AsyncIterator[AsyncConn]:\n"
        "    async with lock:\n"
        "        await x.aclose()\n"
        "    # unasync: async-only\n"
        "    async def aclose(self) -> None: ...\n"
        "    # unasync: end\n"
        "    raise StopAsyncIteration\n"
    )
    assert unasync.transform(src) == (
        "def f(x: Server) -> Iterator[TailnetSocket]:\n"
        "    with lock:\n"
        "        x.close()\n"
        "    raise StopIteration\n"
    )
