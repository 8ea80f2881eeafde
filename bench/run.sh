#!/usr/bin/env bash
# `make bench`: the gateway measured beside its peers, in one run of the side-by-side harness
# (../shared/bench, or $BENCH_HARNESS), on the memory store, on one Redis and on a Redis Cluster.
#
#   bench/run.sh [run.py flags...]       e.g.  bench/run.sh --phases paced --concurrency 256,1024
#
# Placement is the harness's: the gateway pinned to core 0; the C upstream, the C load client and
# (for the Redis candidates) the redis-servers on core 1. Tables: bench/results/latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
harness=${BENCH_HARNESS:-$root/../shared/bench}
out=${BENCH_OUT:-$root/bench/results}
peers=${BENCH_PEERS:-raw_floor,naive_tornado,aiohttp_sse}
venv=${BENCH_VENV:-/tmp/bench-venv}
if [ ! -f "$harness/run.py" ]; then
  echo "bench: no harness at $harness (set BENCH_HARNESS); a quick in-repository latency check instead:" >&2
  exec "$root/.venv/bin/python" "$root/bench/latency.py"
fi
BENCH_VENV=$venv bash "$harness/setup.sh"

# A redis-server of its own for the Redis candidate, and a three-primary Redis Cluster for the
# cluster candidate: without persistence, next to the load generator on core 1.
data=$(mktemp -d)
free_port() { "$root/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
start_redis() {  # folder port [redis-server flags...]
  mkdir -p "$data/$1"
  taskset -c 1 redis-server --port "$2" --bind 127.0.0.1 --dir "$data/$1" --save "" --appendonly no "${@:3}" > "$data/$1/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$2" ping > /dev/null 2>&1 && break; sleep 0.1; done
}
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$data"' EXIT
port=$(free_port)
start_redis single "$port"
nodes=()
for i in 1 2 3; do
  node=$(free_port)
  start_redis "node$i" "$node" --cluster-enabled yes --cluster-port "$(free_port)" --cluster-config-file nodes.conf
  nodes+=("127.0.0.1:$node")
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes > "$data/cluster-create.log"
until redis-cli -p "${nodes[0]#*:}" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
cluster_url="redis+cluster://$(IFS=,; echo "${nodes[*]}")"

gateway="exec $root/.venv/bin/python $root/sse_server.py --port={port} --upstream-url={upstream_url} --heartbeat-interval={heartbeat}"
BENCH_VENV=$venv "$venv/bin/python" "$harness/run.py" --out "$out" --peers "$peers" --litellm off \
  --candidate "gateway=$gateway" \
  --candidate "gateway-redis=$gateway --redis-url=redis://127.0.0.1:$port/0" \
  --candidate "gateway-cluster=$gateway --redis-url=$cluster_url" \
  "$@"
echo "bench: tables in $out/latest.md"
