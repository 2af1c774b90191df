#!/usr/bin/env bash
# up.sh (`make cluster-up`): build what is missing (build.sh, unless
# TSNET2_CLUSTER_SKIP_BUILD=1), start the single-node cluster inside its own network + mount
# namespaces (see lib.sh), import the project images (tests/image/build.sh) from podman,
# write $STATE/admin.kubeconfig, wait for the node Ready. Then: tests/e2e/cluster/kubectl ...
# Idempotent: a running component is left alone; a second run only starts what is down.
# Needs root, Go >= 1.26 (GOTOOLCHAIN=local) and the Go module proxy for the first build.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
T0=$(date +%s.%N)
elapsed() { python3 -c "import time; print(f'{time.time()-$T0:.1f}')"; }

# ---- 0. binaries, packages, images --------------------------------------------------------
[[ ${TSNET2_CLUSTER_SKIP_BUILD:-0} == 1 ]] || "$KACC_DIR/build.sh" >/dev/null
mkdir -p "$STATE" "$LOGS" "$PIDS"
IMG_DIR=$(dirname "$BIN")/images; mkdir -p "$IMG_DIR"
if [[ ! -f $IMG_DIR/pause.tar ]]; then
    say "building $PAUSE_IMAGE (static Go binary, one layer)"
    r=$(mktemp -d)
    (cd "$KACC_DIR/pause" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags '-s -w' -o "$r/pause" .)
    python3 "$KACC_DIR/pause/oci_archive.py" "$r" "$PAUSE_IMAGE" "$IMG_DIR/pause.tar" /pause >/dev/null
    rm -rf "$r"
fi

# ---- 1. PKI ----------------------------------------------------------------------------------
"$KACC_DIR/pki.sh" "$STATE/pki"
P=$STATE/pki

# ---- 2. network namespace: lo, k8n0 (ifb sink: node IP + default route), nothing else ----
if ! ip netns list | grep -qw "^$NETNS"; then
    ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" link add k8n0 type ifb     # no CONFIG_DUMMY here; ifb drops what it is sent
    ip -n "$NETNS" addr add "$NODE_IP/32" dev k8n0
    ip -n "$NETNS" link set k8n0 up
    ip -n "$NETNS" route add default dev k8n0
fi
nsx() { ip netns exec "$NETNS" "$@"; }
nsx sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.ipv4.conf.all.route_localnet=1
# Safety: the netns must have no link to the outside, and ClusterIPs / the host's gateway and
# resolver must route to the sink.
links=$(ip -n "$NETNS" -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -Ev '^(lo|k8n0|cni0|veth[0-9a-f]+)$' || true)
[[ -z $links ]] || { say "unexpected interfaces in $NETNS: $links"; exit 1; }
for dst in "$SVC_APISERVER" 10.96.0.200 192.0.2.1 10.255.255.53 8.8.8.8; do
    dev=$(ip -n "$NETNS" route get "$dst" | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -1)
    [[ $dev == k8n0 ]] || { say "route to $dst goes via '$dev', expected the sink k8n0"; exit 1; }
done

# ---- 3. mount namespace (private): tmpfs /run /tmp /var/log; /var/lib/{kubelet,cni} bound --
mkdir -p "$NS_DIR" "$STATE/kubelet" "$STATE/cni" "$STATE/containerd" "$STATE/etcd"
if ! mountpoint -q "$NS_DIR"; then mount --bind "$NS_DIR" "$NS_DIR"; mount --make-private "$NS_DIR"; fi
if ! findmnt -n -o FSTYPE "$NS_DIR/mnt" 2>/dev/null | grep -q nsfs; then
    for d in /var/lib/kubelet /var/lib/cni; do   # hard-coded paths (device-plugins socket, CNI cache)
        if [[ ! -e $d ]]; then mkdir -p "$d"; echo "$d" >>"$STATE/created-host-dirs"; fi
    done
    touch "$NS_DIR/mnt"
    unshare --mount="$NS_DIR/mnt" --propagation private sh -euc "
        mount -t tmpfs -o mode=755 $NAME-run /run
        mount -t tmpfs -o mode=1777 $NAME-tmp /tmp
        mount -t tmpfs -o mode=755 $NAME-log /var/log
        mount --bind $STATE/kubelet /var/lib/kubelet
        mount --bind $STATE/cni /var/lib/cni
        mkdir -p /run/netns /var/log/pods /var/log/containers"
fi

# ---- 4. cgroups (v1 hierarchies of this hybrid host + the unified one): $CGROUP_ROOT --------
for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    [[ -d $h/$NAME ]] && continue
    mkdir "$h/$NAME"
    if [[ $(basename "$h") == cpuset ]]; then
        cat "$h/cpuset.cpus" >"$h/$NAME/cpuset.cpus"; cat "$h/cpuset.mems" >"$h/$NAME/cpuset.mems"
    fi
done

# put FILE: stdin -> FILE, only if the content changed (kube-proxy exits when its config
# file is rewritten, so a second up.sh must not touch unchanged files).
put() { local t; t=$(mktemp "$1.XXXXXX"); cat >"$t"; if cmp -s "$t" "$1"; then rm -f "$t"; else mv -f "$t" "$1"; fi; }

# start NAME CMD...: run CMD in the namespaces, detached, pid in $PIDS/NAME, log in $LOGS/NAME.log.
running() { [[ -f $PIDS/$1 ]] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }
start() {
    local n=$1; shift
    if running "$n"; then return 0; fi
    if [[ $1 == /* && ! -x $1 ]]; then say "SKIP $n: $1 missing"; return 0; fi
    (exec setsid nsenter --mount="$NS_DIR/mnt" --net="/run/netns/$NETNS" -- "$@" >>"$LOGS/$n.log" 2>&1 </dev/null) &
    echo $! >"$PIDS/$n"
    say "started $n (pid $!)"
}
# wait_for WHAT TIMEOUT CMD...: poll CMD until it succeeds.
wait_for() {
    local what=$1 t=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || { say "timeout waiting for $what"; return 1; }
        sleep 0.5
    done
    say "$what ready at $(elapsed) s"
}

# ---- 5. etcd, kube-apiserver ------------------------------------------------------------------
start etcd "$BIN/etcd" --name "$NAME" --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NAME=http://127.0.0.1:2380" --unsafe-no-fsync --log-level warn
wait_for etcd 60 nsx curl -sf http://127.0.0.1:2379/health
start kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$NODE_IP" \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-cluster-ip-range="$SVC_CIDR" \
    --service-account-issuer="https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false --v=1
wait_for kube-apiserver 180 nsx curl -sf --cacert "$P/ca.crt" https://127.0.0.1:6443/readyz

# ---- 6. controller-manager, scheduler -------------------------------------------------------
start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr="$POD_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SVC_CIDR" \
    --enable-hostpath-provisioner=true --flex-volume-plugin-dir="$STATE/kubelet-plugins" --v=1
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --v=1

# ---- 7. containerd (+ runc, CNI bridge) -------------------------------------------------------
mkdir -p "$STATE/cni/net.d" "$STATE/cni/networks"
put "$STATE/cni/net.d/10-k8n.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "k8n",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni/networks",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
put "$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  restrict_oom_score_adj = true   # root has no CAP_SYS_RESOURCE here: runc cannot set the sandbox's -998
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
EOF
start containerd containerd --config "$STATE/containerd.toml"
wait_for containerd 60 kctr version
for tar in "$IMG_DIR/pause.tar"; do
    ref=$(tar -xOf "$tar" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["annotations"]["io.containerd.image.name"])')
    kctr images ls -q | grep -qxF "$ref" || kctr images import --no-unpack=false "$tar" >/dev/null
done
# The project's images (tests/image/build.sh, podman store) when they exist: the full one
# and the sidecar one, each imported again only when podman's copy changed.
for image in "$PROJECT_IMAGE" "$PROJECT_SIDECAR_IMAGE"; do
    command -v podman >/dev/null && podman image exists "$image" 2>/dev/null || continue
    key=$(printf '%s' "$image" | tr -c 'A-Za-z0-9._-' '_')
    pid=$(podman image inspect --format '{{.Id}}' "$image")
    have=$(cat "$STATE/image-$key.id" 2>/dev/null || true)
    if [[ $pid != "$have" ]] || ! kctr images ls -q | grep -qxF "$image"; then
        say "importing $image from podman"
        podman save --format docker-archive -o "$STATE/image-$key.tar" "$image" >/dev/null
        kctr images import "$STATE/image-$key.tar" >/dev/null
        rm -f "$STATE/image-$key.tar"; echo "$pid" >"$STATE/image-$key.id"
    fi
done

# ---- 8. kubelet ------------------------------------------------------------------------------
put "$STATE/resolv.conf" <<EOF
search svc.$CLUSTER_DOMAIN $CLUSTER_DOMAIN
nameserver $DNS_IP
EOF
put "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false             # this host has hybrid cgroups (v1 controllers)
cgroupDriver: cgroupfs          # no systemd; containerd's runc uses cgroupfs too
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $P/kubelet-server.crt
tlsPrivateKeyFile: $P/kubelet-server.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $P/ca.crt}
authorization: {mode: Webhook}
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_IP]
resolvConf: $STATE/resolv.conf
podLogsDir: $STATE/pod-logs
imageGCHighThresholdPercent: 100   # never GC the locally imported images (no registry)
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
maxPods: 50
volumePluginDir: $STATE/kubelet-plugins   # not /usr/libexec/kubernetes/... on the host
EOF
start kubelet "$BIN/kubelet" --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/kubelet.kubeconfig" \
    --root-dir=/var/lib/kubelet --cert-dir="$STATE/kubelet-pki" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1

# ---- 9. kube-proxy (nftables mode) -----------------------------------------------------------
put "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $STATE/proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
start kube-proxy "$BIN/kube-proxy" --config="$STATE/kube-proxy.yaml" --v=1

# ---- 10. CoreDNS (optional: only if built) ---------------------------------------------------
if [[ -x $BIN/coredns ]]; then
    put "$STATE/Corefile" <<EOF
.:53 {
    bind $DNS_IP
    errors
    kubernetes $CLUSTER_DOMAIN in-addr.arpa {
        kubeconfig $STATE/coredns.kubeconfig $NAME
        pods insecure
        fallthrough in-addr.arpa
    }
    cache 5
}
EOF
    start coredns "$BIN/coredns" -conf "$STATE/Corefile"
fi

# ---- 11. wait for the node; cluster-wide objects ---------------------------------------------
wait_for "node $NODE_NAME Ready" 240 kctl wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
kctl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: k8n-hostpath
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: k8n-coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: k8n-coredns}]
EOF
wait_for "default ServiceAccount" 60 kctl get serviceaccount default -n default
say "cluster up in $(elapsed) s; kubeconfig $KUBECONFIG_OUT (use inside the netns: ip netns exec $NETNS ...)"
