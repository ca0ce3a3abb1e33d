# Shared by scripts/bench-cluster and scripts/bench-snapshot (sourced, not
# run): release cores on loopback in a scratch directory, three of them
# as a cluster, and a check that they have caught up.
#   needs: $bin, $scratch; sets ports, peers, urls (after start_cluster)
#   CPU_PER_NODE=0.5 runs every node in a cgroup of its own allowed that
#   many cores (root and a cgroup cpu controller needed; cleaned up by
#   cpu_groups_cleanup, which the caller's exit trap runs).
bench() { # bench URL TOPIC: `tributary bench http` with the usual load
  "$bin" bench http --url "$1" --connections "${CONNECTIONS:-8}" --batch "${BATCH:-100}" \
    --payload "${PAYLOAD:-100}" --duration "${DURATION:-10s}" --partitions 4 --topic "$2"
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_groups=()
cpu_group() { # cpu_group NAME: a new cgroup allowed $CPU_PER_NODE cores; prints its directory
  local root quota
  quota=$(python3 -c "print(int(float('$CPU_PER_NODE') * 100000))")
  if [ -d /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cgroup.procs ]; then # cgroup v1
    root=/sys/fs/cgroup/cpu/tributary-bench-$$-$1
    mkdir -p "$root" && echo 100000 >"$root/cpu.cfs_period_us" && echo "$quota" >"$root/cpu.cfs_quota_us"
  else # cgroup v2
    grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || echo +cpu >/sys/fs/cgroup/cgroup.subtree_control
    root=/sys/fs/cgroup/tributary-bench-$$-$1
    mkdir -p "$root" && echo "$quota 100000" >"$root/cpu.max"
  fi
  echo "$root"
}
cpu_groups_cleanup() { local g; for g in "${cpu_groups[@]}"; do rmdir "$g" 2>/dev/null || true; done; }
start() { # start DIR [env…]: starts a core (or $MODE) in DIR (pid in DIR/pid)
  local dir=$1 run=(); shift
  mkdir -p "$dir"
  if [ -n "${CPU_PER_NODE:-}" ]; then
    local g; g=$(cpu_group "$(basename "$dir")"); cpu_groups+=("$g")
    run=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$g")
  fi
  "${run[@]}" env TRIBUTARY_DATA_DIR="$dir" TRIBUTARY_HTTP__LISTEN=127.0.0.1:0 TRIBUTARY_MQTT__LISTEN=127.0.0.1:0 \
    TRIBUTARY_AMQP__LISTEN=127.0.0.1:0 TRIBUTARY_KAFKA__LISTEN=127.0.0.1:0 TRIBUTARY_LOG="${NODE_LOG:-warn}" "$@" \
    "$bin" "${MODE:-core}" >"$dir/out" 2>>"$dir/err" &
  echo $! >"$dir/pid"
}
url_of() { for _ in $(seq 1 300); do grep -q 'http=' "$1/out" 2>/dev/null && break; sleep 0.1; done
  echo "http://$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$1/out")"; }
declare -A urls
http_ports=()
node() { # node ID [env…]: starts cluster node ID (1-3) in $scratch/$prefix$ID (HTTP on http_ports[ID-1] if set)
  local i=$1 http=(); shift
  if [ ${#http_ports[@]} -ge "$i" ]; then http=(TRIBUTARY_HTTP__LISTEN="127.0.0.1:${http_ports[$((i - 1))]}"); fi
  start "$scratch/${prefix:-n}$i" TRIBUTARY_CLUSTER__NODE_ID="$i" \
    TRIBUTARY_CLUSTER__LISTEN="127.0.0.1:${ports[$((i - 1))]}" TRIBUTARY_CLUSTER__PEERS="$peers" "${http[@]}" "$@"
}
cluster_ports() { # new node-to-node ports and the peers list for three nodes
  ports=("$(port)" "$(port)" "$(port)")
  peers="1@127.0.0.1:${ports[0]},2@127.0.0.1:${ports[1]},3@127.0.0.1:${ports[2]}"
}
start_nodes() { # start_nodes [env…]: nodes 1-3 on the current ports, their URLs in urls[1..3]
  for i in 1 2 3; do node "$i" "$@"; done
  for i in 1 2 3; do urls[$i]=$(url_of "$scratch/${prefix:-n}$i"); done
}
start_cluster() { # start_cluster [env…]: three new nodes, their URLs in urls[1..3]
  cluster_ports
  start_nodes "$@"
}
leader() { curl -s "${urls[1]}/v1/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])'; }
caught_up() { # every node is the leader's, with nothing left to replicate
  for u in "${urls[@]}"; do curl -s -m 2 "$u/v1/cluster"; echo; done | python3 -c '
import json, sys
views = [json.loads(l) for l in sys.stdin if l.strip()]
lead = [v for v in views if v["role"] == "leader"]
ok = len(views) == 3 and len(lead) == 1 and all(v["leader"] == lead[0]["node_id"] for v in views) \
    and all(n["lag"] == 0 for n in lead[0]["nodes"])
sys.exit(0 if ok else 1)'
}
