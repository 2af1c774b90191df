"""The sidecar socket's group and mode, chosen from the pod's groups (`socket_access`)."""

from __future__ import annotations

from typing import Any

import pytest
from tsnet2_operator.config import SidecarConfig
from tsnet2_operator.inject import SocketAccess, inject, socket_access

from tsnet2.daemon import cli

CFG = SidecarConfig(image="img:1", control_url="http://control:8080")


def spec(pod_sc: dict[str, Any] | None = None, *containers: dict[str, Any],
         init: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"containers": list(containers) or [{"name": "app", "image": "a"}]}
    if pod_sc is not None:
        out["securityContext"] = pod_sc
    if init is not None:
        out["initContainers"] = init
    return out


def c(name: str, **sc: Any) -> dict[str, Any]:
    return {"name": name, "image": "a", **({"securityContext": sc} if sc else {})}


@pytest.mark.parametrize(("pod_spec", "want"), [
    (spec(), SocketAccess("0666", None, "")),
    (spec({"runAsNonRoot": True, "runAsUser": 10001}), SocketAccess("0666", None, "")),
    (spec({"fsGroup": 2000}), SocketAccess("0660", 2000, "fsGroup")),
    (spec({"fsGroup": 0}), SocketAccess("0660", 0, "fsGroup")),
    # fsGroup is every container's; it wins over differing runAsGroups.
    (spec({"fsGroup": 2000}, c("a", runAsGroup=1), c("b", runAsGroup=2)),
     SocketAccess("0660", 2000, "fsGroup")),
    (spec({"runAsGroup": 3000}), SocketAccess("0660", 3000, "runAsGroup")),
    # A container's runAsGroup overrides the pod's.
    (spec({"runAsGroup": 3000}, c("a"), c("b", runAsGroup=4000)),
     SocketAccess("0666", None, "")),
    (spec(None, c("a", runAsGroup=4000), c("b", runAsGroup=4000)),
     SocketAccess("0660", 4000, "runAsGroup")),
    (spec(None, c("a", runAsGroup=4000), c("b")), SocketAccess("0666", None, "")),
    # A native sidecar of the app's counts, a plain init container does not.
    (spec({"runAsGroup": 3000}, init=[{**c("log", runAsGroup=5), "restartPolicy": "Always"}]),
     SocketAccess("0666", None, "")),
    (spec({"runAsGroup": 3000}, init=[c("migrate", runAsGroup=5)]),
     SocketAccess("0660", 3000, "runAsGroup")),
    # Values that are not GIDs are not trusted (the API server rejects them anyway).
    (spec({"fsGroup": True}), SocketAccess("0666", None, "")),
    (spec({"fsGroup": -1}), SocketAccess("0666", None, "")),
    (spec({"fsGroup": "2000"}), SocketAccess("0666", None, "")),
    (spec({"fsGroup": 2**32 - 1}), SocketAccess("0666", None, "")),
    (spec({"runAsGroup": 3000}, c("a", runAsGroup="x")), SocketAccess("0666", None, "")),
    (spec([]), SocketAccess("0666", None, "")),  # type: ignore[arg-type]
])
def test_socket_access(pod_spec: dict[str, Any], want: SocketAccess) -> None:
    assert socket_access(pod_spec) == want


@pytest.mark.parametrize("pod_spec", [spec(), spec({"fsGroup": 2000}),
                                      spec({"runAsGroup": 0}),
                                      spec(None, c("a", runAsGroup=4000))])
def test_sidecar_args_are_what_tsnet2d_accepts(pod_spec: dict[str, Any]) -> None:
    """The injector's flags parse with tsnet2d's own parser and validators."""
    d = inject({"metadata": {"name": "web", "annotations": {"tsnet2.io/inject": "enabled"}},
                "spec": pod_spec}, CFG, native_sidecar=True)
    sidecar = next(op["value"] for op in d.patch if op["path"] == "/spec/initContainers")[0]
    args = cli.build_parser().parse_args(sidecar["args"])
    access = socket_access(pod_spec)
    assert args.allow_any_uid
    assert cli.parse_socket_mode(args.socket_mode) == int(access.mode, 8)
    if access.group is None:
        assert args.socket_group is None
        assert "runAsGroup" not in sidecar["securityContext"]
    else:
        assert cli.parse_socket_group(args.socket_group) == access.group
        # tsnet2d has no CAP_CHOWN: it runs in that group, so the group is its own to give.
        assert sidecar["securityContext"]["runAsGroup"] == access.group
    assert access.describe() in d.message
