"""Optional daemon profiling for `make bench` (``--profile DIR``): py-spy samples of both
daemons during the tsnet2 runs, and a summary of the collapsed stacks.

py-spy is not a project dependency: ``.venv/bin/pip install py-spy``. Without it the
benchmark runs as usual and records no profile.

``python -m tests.bench.profile FILE...`` prints the summary of saved raw profiles.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

PYSPY_RATE = 250  # samples per second


def pyspy_path() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_record(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` for ``seconds`` into ``out`` (collapsed stacks); None without py-spy."""
    exe = pyspy_path()
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(PYSPY_RATE), "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )


def finish(procs: list[subprocess.Popen[bytes] | None], timeout: float = 30.0) -> None:
    """Wait for the recorders (kill any that overrun)."""
    for p in procs:
        if p is None:
            continue
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function + file
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":")[0]
    return f"{name} ({file})" if file else name


def summarize(path: Path, top: int = 15) -> str:
    """Self and inclusive sample shares per function from a py-spy raw profile."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples",
             "  self%  incl%  function"]
    for f, n in self_n.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}  {100 * incl_n[f] / total:5.1f}  {f}")
    lines.append("  -- inclusive")
    for f, n in incl_n.most_common(top + 10):
        lines.append(f"  {100 * self_n[f] / total:5.1f}  {100 * n / total:5.1f}  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Summarize raw py-spy profiles given on the command line."""
    for name in argv if argv is not None else sys.argv[1:]:
        print(summarize(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
