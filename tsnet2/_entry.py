"""Console entry points that name a missing extra instead of printing a traceback.

``pip install tsnet2`` gives an app the client library (it needs only h11); the daemon and
the coordination server need ``tsnet2[daemon]``, the operator ``tsnet2[operator]``.
"""

from __future__ import annotations

import importlib.util
import sys

EXTRA_MODULES = {
    "daemon": frozenset({"aiohttp", "pyroute2", "cryptography"}),
    "operator": frozenset({"kopf", "kubernetes", "prometheus_client"}),
}
"""The top-level modules each extra installs (``tsnet2[operator]`` includes ``daemon``)."""


def extra_for(exc: ModuleNotFoundError) -> str | None:
    """The extra that would have installed the module ``exc`` is about, if any."""
    top = (exc.name or "").partition(".")[0]
    return next((extra for extra, mods in EXTRA_MODULES.items() if top in mods), None)


def missing_extra(exc: ModuleNotFoundError, command: str) -> int:
    """Print what to install for ``command`` and return exit status 1, when ``exc`` is a
    module of an extra; re-raise ``exc`` otherwise (a real bug)."""
    extra = extra_for(exc)
    if extra is None:
        raise exc
    print(f"{command}: needs the {extra!r} extra (module {exc.name!r} is not installed): "
          f"pip install 'tsnet2[{extra}]'", file=sys.stderr)
    return 1


def check_extra(extra: str, command: str) -> int | None:
    """Before ``command`` starts processes that need ``extra``: exit status 1 (after saying
    what to install) if one of its modules is missing, else None."""
    for name in sorted(EXTRA_MODULES[extra]):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return missing_extra(ModuleNotFoundError(f"No module named {name!r}", name=name),
                                 command)
    return None


def tsnet2d() -> int:
    """``tsnet2d``: :func:`tsnet2.daemon.cli.main`."""
    try:
        from tsnet2.daemon.cli import main
    except ModuleNotFoundError as exc:
        return missing_extra(exc, "tsnet2d")
    return main()


def tsnet2_operator() -> int:
    """``tsnet2-operator``: :func:`tsnet2_operator.__main__.main`."""
    try:
        from tsnet2_operator.__main__ import main
    except ModuleNotFoundError as exc:
        return missing_extra(exc, "tsnet2-operator")
    return main()
