#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, for `make e2e-k8s` (docs/operations.md#a-real-cluster-here).
#
#   cluster.sh build    install Debian's packages, build the binaries from Debian's source (cached)
#   cluster.sh up       build if needed, start etcd, the control plane, containerd and a kubelet;
#                       wait for the node to be Ready (a running cluster is reused)
#   cluster.sh down     stop what `up` started, by PID, and undo the kubelet's host changes
#   cluster.sh status   say what runs
#   cluster.sh env      print the KUBECONFIG line for a shell
#
# Everything lives under $ESSP_K8S_STATE (default ~/.local/state/essp/k8s); the binaries under
# $ESSP_K8S_CACHE (default ~/.cache/essp/k8s/<source version>), outside any clone, so that a fresh
# clone reuses them. Needs root (containerd and the kubelet) and Debian's package archive.
set -euo pipefail
# umask 022: the daemons' files (containerd's layer snapshots, the kubelet's volumes) must be readable by
# the pods' non-root users whatever the caller's umask: with 077 every layer's root became 0700 and the
# pods' user could not find `essp` (files that must stay private are written in a subshell with 077).
umask 022

K8S_VERSION=1.20.2
# Debian bookworm's source package of it (its version says "really 1.20.2").
DEBIAN_SOURCE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
STATE=${ESSP_K8S_STATE:-$HOME/.local/state/essp/k8s}
CACHE_ROOT=${ESSP_K8S_CACHE:-$HOME/.cache/essp/k8s}
CACHE=$CACHE_ROOT/$K8S_VERSION
BIN=$CACHE/bin
# The node is this machine under its host name, which must resolve to a loopback address: the API server
# reaches the kubelet (logs, exec) by it, and the kubelet refuses 127.0.0.1 as a node IP.
NODE=$(hostname | tr '[:upper:]' '[:lower:]')
APISERVER_PORT=${ESSP_K8S_APISERVER_PORT:-16443}
ETCD_CLIENT_PORT=${ESSP_K8S_ETCD_PORT:-12379}
ETCD_PEER_PORT=$((ETCD_CLIENT_PORT + 1))
KUBELET_PORT=${ESSP_K8S_KUBELET_PORT:-10250}
PACKAGES=(containerd runc containernetworking-plugins etcd-server golang-go debootstrap buildah
          iptables openssl dpkg-dev make gcc libc6-dev rsync conntrack ca-certificates)

log() { printf '[k8s %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[k8s] error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "this needs root (containerd and the kubelet run as root)"; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# Debian's source package, fetched with a private sources list (no change to /etc/apt).
fetch_source() {
    [ -f "$CACHE/src/.fetched" ] && return 0
    local apt=$CACHE/apt
    rm -rf "$CACHE/src"
    mkdir -p "$apt/lists/partial" "$CACHE/src"
    local uri=http://deb.debian.org/debian
    uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1 || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "deb-src $uri bookworm main" > "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    log "fetching Debian's source package kubernetes"
    opts+=(-o APT::Sandbox::User=root)  # the cache is under root's home, which _apt cannot read
    apt-get "${opts[@]}" update -qq >/dev/null
    (cd "$CACHE/src" && apt-get "${opts[@]}" source -qq --download-only "kubernetes=$DEBIAN_SOURCE_VERSION" >/dev/null \
        && dpkg-source -x --no-check kubernetes_*.dsc tree >/dev/null)
    rm -rf "$apt"
    touch "$CACHE/src/.fetched"
}

build_binaries() {
    local want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
    local have=1
    for b in "${want[@]}"; do [ -x "$BIN/$b" ] || have=0; done
    [ -x "$BIN/pause" ] || have=0
    [ $have = 1 ] && return 0
    install_packages
    fetch_source
    local tree=$CACHE/src/tree
    log "building ${want[*]} from Debian's source (cold: ~10 min on 2 cores)"
    local t0=$SECONDS
    (cd "$tree" && GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 GO111MODULE=on \
        make WHAT="cmd/kubelet cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl" \
        > "$CACHE/build.log" 2>&1) || die "the Go build failed: see $CACHE/build.log"
    mkdir -p "$BIN"
    for b in "${want[@]}"; do cp "$tree/_output/local/bin/linux/"*/"$b" "$BIN/$b"; done
    # The pause image's program, static, from the same tree.
    gcc -Os -static -DVERSION=v3.4-essp -o "$BIN/pause" "$tree/build/pause/linux/pause.c"
    echo "$K8S_VERSION" > "$BIN/VERSION"
    log "built in $((SECONDS - t0)) s; removing the source tree and Go cache (~2.7 GB)"
    rm -rf "$CACHE/src"
}


# --------------------------------------------------------------------------------------------------
# Host snapshot: what the kubelet, containerd and CNI may change outside $STATE, recorded before the
# first start and put back by `down`.
HOST_PATHS=(/var/log/pods /var/log/containers /var/lib/kubelet /usr/libexec/kubernetes /run/containerd
            /run/netns /var/lib/cni /etc/cni /opt/cni /var/lib/containerd /etc/kubernetes)
SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys
         kernel/keys/root_maxbytes)
CGROUP_ROOT=/essp-e2e

iptables_chains() {
    local table
    for table in filter nat mangle raw; do
        iptables -w -t "$table" -S 2>/dev/null | sed "s/^/$table /" || true
    done
}

host_state() {  # one line per fact; `down` compares it with the snapshot
    local p s
    for p in "${HOST_PATHS[@]}"; do [ -e "$p" ] && echo "path $p"; done
    for s in "${SYSCTLS[@]}"; do [ -r "/proc/sys/$s" ] && echo "sysctl $s $(cat "/proc/sys/$s")"; done
    iptables_chains | sed 's/^/iptables /'
    ip -o link show 2>/dev/null | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
    for p in /sys/fs/cgroup/*/; do [ -d "$p${CGROUP_ROOT#/}" ] && echo "cgroup $p${CGROUP_ROOT#/}"; done
    awk '{print "mount " $5}' /proc/self/mountinfo | grep -E "^mount ($STATE|$CACHE_ROOT|/var/lib/kubelet|/run/containerd|/run/netns)" | sort || true
}

snapshot_host() {
    mkdir -p "$STATE"
    [ -f "$STATE/host-before.txt" ] || host_state > "$STATE/host-before.txt"
}

# --------------------------------------------------------------------------------------------------
# Processes: started detached (they outlive make), each with a PID file and a log under $STATE.
pid_of() { local f=$STATE/run/$1.pid; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; }

start_proc() {  # name, command...
    local name=$1; shift
    if pid_of "$name" >/dev/null; then return 0; fi
    mkdir -p "$STATE/run" "$STATE/log"
    setsid "$@" >>"$STATE/log/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/run/$name.pid"
}

stop_proc() {  # name [seconds]
    local name=$1 wait=${2:-30} pid
    pid=$(pid_of "$name") || { rm -f "$STATE/run/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((wait * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in ${wait} s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
    rm -f "$STATE/run/$name.pid"
}

wait_for() {  # seconds, description, command...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up in ${seconds} s (logs: $STATE/log/)"
}

KUBECTL() { "$BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

# --------------------------------------------------------------------------------------------------
# Certificates, tokens, kubeconfigs (made once per state folder).
make_pki() {
    local pki=$STATE/pki
    [ -f "$pki/done" ] && grep -q ",system:node:$NODE," "$pki/tokens.csv" 2>/dev/null && return 0
    rm -rf "$pki"
    mkdir -p "$pki"; chmod 700 "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=essp-e2e-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    cat > "$pki/apiserver.ext" <<EXT
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EXT
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" \
        -out "$pki/apiserver.csr" 2>/dev/null
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
    # The API server's client certificate for the kubelet (logs, exec): a member of system:masters.
    echo "extendedKeyUsage=clientAuth" > "$pki/client.ext"
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
        -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" 2>/dev/null
    openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 3650 -extfile "$pki/client.ext" -out "$pki/kubelet-client.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    local admin node cm sched
    admin=$(openssl rand -hex 16); node=$(openssl rand -hex 16); cm=$(openssl rand -hex 16); sched=$(openssl rand -hex 16)
    cat > "$pki/tokens.csv" <<TOK
$admin,essp-e2e-admin,essp-e2e-admin,"system:masters"
$node,system:node:$NODE,system:node:$NODE,"system:nodes"
$cm,system:kube-controller-manager,system:kube-controller-manager
$sched,system:kube-scheduler,system:kube-scheduler
TOK
    chmod 600 "$pki"/*.key "$pki/tokens.csv"
    kubeconfig admin "$admin"; kubeconfig node "$node"; kubeconfig controller-manager "$cm"; kubeconfig scheduler "$sched"
    touch "$pki/done"
}

kubeconfig() {  # name token (a subshell: the umask must not reach the daemons started after this)
    (umask 077
    cat > "$STATE/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: essp-e2e
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: $1
  user: {token: "$2"}
contexts:
- name: essp-e2e
  context: {cluster: essp-e2e, user: $1}
current-context: essp-e2e
KC
    )
}

# --------------------------------------------------------------------------------------------------
# containerd, its CNI configuration, the pause image.
write_containerd_config() {
    local c=$STATE/containerd
    mkdir -p "$c/root" "$c/state" "$STATE/cni/net.d" "$STATE/cni/ipam"
    cat > "$c/config.toml" <<TOML
version = 2
root = "$c/root"
state = "$c/state"
oom_score = 0
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "essp.local/pause:3.4"
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
TOML
    # The pods of the e2e use the host's network; the kubelet still wants a network to call Ready.
    cat > "$STATE/cni/net.d/10-essp.conflist" <<CNI
{"cniVersion": "0.4.0", "name": "essp-e2e", "plugins": [
  {"type": "bridge", "bridge": "essp-cni0", "isGateway": false, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "dataDir": "$STATE/cni/ipam"}}]}
CNI
}

CTR() { ctr --address "$STATE/containerd/containerd.sock" -n k8s.io "$@"; }

import_pause() {
    CTR images ls -q 2>/dev/null | grep -qx 'essp.local/pause:3.4' && return 0
    local d=$STATE/pause-image
    rm -rf "$d"; mkdir -p "$d/rootfs"
    cp "$BIN/pause" "$d/rootfs/pause"
    python3 "$(dirname "$0")/image_tar.py" --rootfs "$d/rootfs" --tag essp.local/pause:3.4 \
        --entrypoint /pause --out "$d/pause.tar"
    CTR images import "$d/pause.tar" >/dev/null
    rm -rf "$d"
}

# --------------------------------------------------------------------------------------------------
make_cgroups() {
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -L "${h%/}" ] && continue
        case $h in */unified/) continue ;; esac
        mkdir -p "$h${CGROUP_ROOT#/}" 2>/dev/null || continue
        if [ -f "${h}cpuset.cpus" ]; then
            cat "${h}cpuset.cpus" > "$h${CGROUP_ROOT#/}/cpuset.cpus"
            cat "${h}cpuset.mems" > "$h${CGROUP_ROOT#/}/cpuset.mems"
        fi
    done
}

write_kubelet_config() {
    local k=$STATE/kubelet
    mkdir -p "$k/root" "$k/pki" "$k/volume-plugins"
    cat > "$k/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$STATE/pki/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
makeIPTablesUtilChains: false
serializeImagePulls: false
evictionHard: {memory.available: "200Mi", nodefs.available: "2%", imagefs.available: "2%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 40
YAML
}

up() {
    need_root
    case $(getent hosts "$NODE" | awk '{print $1; exit}') in
        127.*|::1) ;;
        *) die "the host name $NODE does not resolve to a loopback address (/etc/hosts): the API server reaches the kubelet by it" ;;
    esac
    install_packages
    build_binaries
    snapshot_host
    if node_ready; then log "the cluster runs (node $NODE Ready); reusing it"; return 0; fi
    make_pki
    mkdir -p "$STATE/etcd"
    start_proc etcd etcd --name essp-e2e --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "essp-e2e=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
        --quota-backend-bytes 1073741824
    wait_for 30 etcd curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
    local pki=$STATE/pki
    start_proc kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" --insecure-port 0 \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" --client-ca-file "$pki/ca.crt" \
        --token-auth-file "$pki/tokens.csv" --authorization-mode Node,RBAC \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local --api-audiences https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none \
        --kubelet-client-certificate "$pki/kubelet-client.crt" --kubelet-client-key "$pki/kubelet-client.key" \
        --kubelet-preferred-address-types Hostname --enable-admission-plugins NodeRestriction \
        --profiling=false --v 1
    wait_for 90 "the API server" KUBECTL get --raw /readyz
    start_proc kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --port 0 --leader-elect=false --use-service-account-credentials \
        --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
        --controllers '*,-nodeipam,-service,-route,-cloud-node-lifecycle' --profiling=false --v 1
    start_proc kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --port 0 --leader-elect=false --profiling=false --v 1
    write_containerd_config
    start_proc containerd containerd --config "$STATE/containerd/config.toml"
    wait_for 30 containerd CTR version
    import_pause
    make_cgroups
    write_kubelet_config
    start_proc kubelet "$BIN/kubelet" --config "$STATE/kubelet/config.yaml" --kubeconfig "$STATE/node.kubeconfig" \
        --container-runtime remote --container-runtime-endpoint "unix://$STATE/containerd/containerd.sock" \
        --root-dir "$STATE/kubelet/root" --cert-dir "$STATE/kubelet/pki" --volume-plugin-dir "$STATE/kubelet/volume-plugins" \
        --v 1
    wait_for 120 "node $NODE Ready" node_ready
    log "node $NODE is Ready; KUBECONFIG=$STATE/admin.kubeconfig"
}

node_ready() {
    [ -f "$STATE/admin.kubeconfig" ] && pid_of kubelet >/dev/null || return 1
    KUBECTL get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True \
        && ! KUBECTL get node "$NODE" -o jsonpath='{.spec.taints}' 2>/dev/null | grep -q not-ready
}

# --------------------------------------------------------------------------------------------------
remove_containers() {
    CTR version >/dev/null 2>&1 || return 0
    local id
    for id in $(CTR tasks ls -q 2>/dev/null); do CTR tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(CTR tasks ls -q 2>/dev/null); do CTR tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(CTR containers ls -q 2>/dev/null); do CTR containers delete "$id" >/dev/null 2>&1 || true; done
}

unmount_under() {  # every mount point below the given paths, deepest first
    local m
    for m in $(awk '{print $5}' /proc/self/mountinfo | grep -E "^($(IFS='|'; echo "$*"))" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done
}

down() {
    need_root
    if [ -f "$STATE/admin.kubeconfig" ] && pid_of kube-apiserver >/dev/null && pid_of kubelet >/dev/null; then
        log "deleting every pod (their containers stop with them)"
        KUBECTL delete namespace essp --wait=true --timeout=90s >/dev/null 2>&1 || true
        KUBECTL delete pods --all --all-namespaces --grace-period=5 --wait=true --timeout=60s >/dev/null 2>&1 || true
    fi
    stop_proc kubelet 20
    remove_containers
    stop_proc containerd 20
    # Shims that outlived containerd (they serve its socket's containers).
    pkill -KILL -f "containerd-shim-runc-v2 .*-address $STATE/containerd/containerd.sock" 2>/dev/null || true
    stop_proc kube-scheduler 10
    stop_proc kube-controller-manager 10
    stop_proc kube-apiserver 30
    stop_proc etcd 20
    unmount_under "$STATE" /var/lib/kubelet /run/containerd /run/netns
    # The cluster's objects and the kubelet's pods go; the images in containerd's store stay for the next up.
    rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/containerd/state"
    restore_host
}

restore_host() {
    local before=$STATE/host-before.txt
    [ -f "$before" ] || { log "no host snapshot: nothing to put back"; return 0; }
    # cgroups: our root, deepest first.
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -d "$h${CGROUP_ROOT#/}" ] || continue
        grep -qx "cgroup $h${CGROUP_ROOT#/}" "$before" && continue
        find "$h${CGROUP_ROOT#/}" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    # sysctls
    local key value
    while read -r _ key value; do
        [ "$(cat "/proc/sys/$key" 2>/dev/null)" = "$value" ] || echo "$value" > "/proc/sys/$key" 2>/dev/null || log "could not restore $key"
    done < <(grep '^sysctl ' "$before")
    # iptables: delete the rules, then the chains, that were not there before.
    local now table rest
    now=$(iptables_chains)
    while read -r table rest; do
        case $rest in -A\ *) grep -qxF "iptables $table $rest" "$before" || eval "iptables -w -t $table -D ${rest#-A }" 2>/dev/null || true ;; esac
    done <<< "$now"
    while read -r table rest; do
        case $rest in -N\ *) grep -qxF "iptables $table $rest" "$before" || { iptables -w -t "$table" -F "${rest#-N }" 2>/dev/null; iptables -w -t "$table" -X "${rest#-N }" 2>/dev/null; } || true ;; esac
    done <<< "$now"
    # links (the CNI bridge and any veth left)
    local link
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//'); do
        grep -qxF "link $link" "$before" || ip link delete "$link" 2>/dev/null || true
    done
    # network namespaces made for pods, then the paths that were not there before
    for link in /run/netns/cni-*; do [ -e "$link" ] && { ip netns delete "$(basename "$link")" 2>/dev/null || rm -f "$link"; }; done
    local p
    for p in "${HOST_PATHS[@]}"; do
        [ -e "$p" ] || continue
        grep -qxF "path $p" "$before" && continue
        unmount_under "$p"
        rm -rf "$p"
    done
    local after
    after=$(host_state)
    if diff "$before" <(echo "$after") > "$STATE/host-diff.txt"; then
        log "the host is as before (paths, sysctls, iptables, links, cgroups, mounts)"
        rm -f "$before" "$STATE/host-diff.txt"
    else
        log "the host differs from before: $STATE/host-diff.txt"; cat "$STATE/host-diff.txt" >&2; return 1
    fi
}

status() {
    local name
    for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
        if pid_of "$name" >/dev/null; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; fi
    done
    if node_ready; then echo "node $NODE: Ready"; KUBECTL get pods -A -o wide 2>/dev/null || true; fi
}

case "${1:-}" in
    build) need_root; install_packages; build_binaries ;;
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export KUBECONFIG=$STATE/admin.kubeconfig" ;;
    kubectl) shift; KUBECTL "$@" ;;
    *) die "usage: $0 build|up|down|status|env|kubectl ARGS" ;;
esac
