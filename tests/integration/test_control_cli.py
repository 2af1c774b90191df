"""``tsnet2 control serve`` / ``authkey create`` as real subprocesses, and the parser hook."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsnet2.control.cli import add_subcommands, parse_listen
from tsnet2.controlclient import AuthError, ControlClient

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsnet2.control", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
        check=False,
    )


class Serving:
    """A running ``control serve`` subprocess."""

    def __init__(self, db: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tsnet2.control",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"serve exited early: {self.lines}")
            self.lines.append(line)
            m = re.search(
                r"tsnet2 control: listening on (http://127\.0\.0\.1:(\d+))$", line.strip()
            )
            if m:
                self.url = m.group(1)
                assert int(m.group(2)) > 0
                break

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, "".join(self.lines) + err


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    s = Serving(tmp_path / "c.db", "--domain", "lab.test", "--ephemeral-timeout", "5")
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def test_authkey_create_prints_only_the_key(tmp_path: Path) -> None:
    res = ctl(
        "authkey",
        "create",
        "--db",
        str(tmp_path / "c.db"),
        "--reusable",
        "--ephemeral",
        "--tags",
        "tag:a,tag:b",
        "--expiry",
        "3600",
        "--user",
        "bob@lab.test",
    )
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"tskey-auth-[0-9a-f]{48}\n", res.stdout)
    assert res.stdout.strip() not in res.stderr


def test_authkey_create_json(tmp_path: Path) -> None:
    res = ctl("authkey", "create", "--db", str(tmp_path / "c.db"), "--json", "--reusable",
              "--tags", "tag:a", "--domain", "lab.test")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert re.fullmatch(r"tskey-auth-[0-9a-f]{48}", doc.pop("key"))
    assert doc == {"reusable": True, "ephemeral": False, "tags": ["tag:a"],
                   "expiry_seconds": None, "user": "admin@lab.test"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tags", "nope"], "invalid tag"),
        (["--expiry", "-5"], "positive"),
        (["--domain", "bad_domain"], "invalid tailnet domain"),
    ],
)
def test_authkey_create_bad_args(tmp_path: Path, args: list[str], message: str) -> None:
    res = ctl("authkey", "create", "--db", str(tmp_path / "c.db"), *args)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_serve_bad_arguments(tmp_path: Path) -> None:
    res = ctl("serve", "--listen", "nope", "--db", str(tmp_path / "c.db"))
    assert res.returncode == 2 and "HOST:PORT" in res.stderr
    res = ctl("serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--tls-cert", "x")
    assert res.returncode == 2 and "--tls-key" in res.stderr
    res = ctl("serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "no" / "c.db"))
    assert res.returncode == 1 and "cannot open sqlite store" in res.stderr


def test_serve_with_keys_from_the_cli(tmp_path: Path, serving: Serving) -> None:
    db = tmp_path / "c.db"
    key = ctl("authkey", "create", "--db", str(db), "--domain", "lab.test").stdout.strip()
    tagged = ctl(
        "authkey", "create", "--db", str(db), "--tags", "tag:web", "--domain", "lab.test"
    ).stdout.strip()

    async def main() -> None:
        async with ControlClient(serving.url) as client:
            await client.health()
            pub = base64.b64encode(os.urandom(32)).decode()
            res = await client.register(pub, "cli-node", ["127.0.0.1:1"], auth_key=key)
            assert res.domain == "lab.test" and res.node["fqdn"] == "cli-node.lab.test."
            assert res.node["user"]["login_name"] == "admin@lab.test"
            with pytest.raises(AuthError, match="already used"):
                await client.register(pub, "cli-node", auth_key=key)
            with pytest.raises(AuthError, match="tag:db"):
                await client.register(pub, "t", tags=["tag:db"], auth_key=tagged)
            nm = await client.netmap(res.node_credential, 0, 0)
            assert nm["self"]["name"] == "cli-node"

    asyncio.run(main())
    code, output = serving.stop(signal.SIGTERM)
    assert code == 0, output
    assert key not in output and "Traceback" not in output


def test_serve_exits_0_on_sigint(serving: Serving) -> None:
    code, output = serving.stop(signal.SIGINT)
    assert code == 0, output
    assert "Traceback" not in output


def test_add_subcommands_dispatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tsnet2")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(["control", "authkey", "create", "--db", str(tmp_path / "k.db")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("tskey-auth-")
    args = parser.parse_args(["control", "serve", "--listen", "[::1]:0", "--db", "x"])
    assert args.listen == ("::1", 0)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    for bad in ["8080", ":80", "host:", "h:99999"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)
