# Common settings of up.sh / down.sh / check.sh (sourced). A single-node Kubernetes cluster
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubelet,
# containerd + runc, CNI bridge) that lives entirely inside:
#   * network namespace  $NETNS  (lo; k8n0 = an ifb "sink" device with the node IP and the
#     default route: whatever is routed there is dropped; cni0 + pod veths) -- no interface
#     of it is connected to the host's network, so nothing can leave the machine;
#   * a private mount namespace bound to $NS_DIR/mnt (tmpfs on /run, /tmp, /var/log;
#     /var/lib/kubelet and /var/lib/cni bound to dirs under $STATE), so every mount the
#     cluster makes disappears with it.
# shellcheck shell=bash
KACC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${TSNET2_CLUSTER_NAME:-tsnet2-cluster}
NETNS=$NAME
STATE=${TSNET2_CLUSTER_STATE:-/var/lib/$NAME}           # persistent state (pki, etcd, containerd, kubelet)
NS_DIR=/run/$NAME-ns                          # holds the mount namespace file (a private bind mount)
LOGS=$STATE/logs
PIDS=$STATE/pids
CGROUP_ROOT=/$NAME                            # kubelet cgroupRoot (cgroup v1 hierarchies)
# The cluster's binaries, built by build.sh from the pinned wrapper module tools/kube and cached
# by version outside the repo (next to tests/k8s/build-tools.sh's apiserver, etcd and helm).
K8S_VERSION=$(awk '$1=="require" && $2=="k8s.io/kubernetes"{print $3; exit} $1=="k8s.io/kubernetes"{print $2; exit}' "$KACC_DIR/tools/kube/go.mod")
K8S_VERSION=${K8S_VERSION#v}
BIN=${TSNET2_CLUSTER_BIN:-${TSNET2_TOOLS_CACHE:-/var/cache/tsnet2-tools}/cluster-k8s-$K8S_VERSION}
KUBECONFIG_OUT=$STATE/admin.kubeconfig        # admin kubeconfig (server https://127.0.0.1:6443 in the netns)

NODE_NAME=k8n-node
NODE_IP=172.29.0.1          # on k8n0 (sink) in the netns; apiserver advertise + kubelet node IP
POD_CIDR=10.244.0.0/24
POD_GW=10.244.0.1
SVC_CIDR=10.96.0.0/24
SVC_APISERVER=10.96.0.1
DNS_IP=$NODE_IP             # CoreDNS (if built) listens on the node IP :53
CLUSTER_DOMAIN=cluster.local

PAUSE_IMAGE=k8n.local/pause:1
# The project's two images (tests/image/build.sh): the full one (operator, sample apps) and
# the sidecar one (the injected tsnet2d: the chart's default, operator repository + -sidecar).
PROJECT_IMAGE=${TSNET2_IMAGE:-localhost/tsnet2:test}
PROJECT_SIDECAR_IMAGE=${TSNET2_SIDECAR_IMAGE:-localhost/tsnet2-sidecar:test}

# kin CMD...: run CMD inside the cluster's network + mount namespaces.
kin() { nsenter --mount="$NS_DIR/mnt" --net="/run/netns/$NETNS" -- "$@"; }
# kctl ARGS...: kubectl (the one built with the cluster) as cluster-admin, inside the netns.
kctl() { local k=$BIN/kubectl; [[ -x $k ]] || k=kubectl; kin "$k" --kubeconfig "$KUBECONFIG_OUT" "$@"; }
# kctr ARGS...: containerd's ctr in the k8s.io namespace.
kctr() { kin ctr --address /run/containerd/containerd.sock -n k8s.io "$@"; }
say() { echo "[$NAME] $*" >&2; }
