#!/usr/bin/env bash
# The profiles behind bench/README.md: the gateway under the benchmark's C load (the harness's
# client and upstream, from its venv: bash ../shared/bench/setup.sh), one tool at a time.
#
#   bench/profile.sh pyspy  [streams=256] [seconds=10] [gateway flags]  py-spy --native, folded into layers
#   bench/profile.sh strace [streams=256] [seconds=5]  [gateway flags]  system calls (strace -c)
#   bench/profile.sh memory [streams=2000]             [gateway flags]  tracemalloc by site, idle streams
#   bench/profile.sh timeline                          [gateway flags]  a lone request's steps (bench/timeline.py)
#
# Paced streams are the harness's: 64 chunks 20 ms apart, each finished stream replaced at once.
# Idle streams: one chunk, then silence. Output in bench/results/profile-<tool>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tool=${1:?pyspy, strace or memory}; shift
venv=${BENCH_VENV:-/tmp/bench-venv}
client=$venv/bin/sse_bench_client
upstream_bin=$venv/bin/sse_bench_upstream
[ -x "$client" ] || { echo "no $client: run bash ../shared/bench/setup.sh" >&2; exit 2; }
out=$root/bench/results/profile-$tool
mkdir -p "$out"
case $tool in
  memory) streams=${1:-2000}; shift || true ;;
  timeline) ;;
  *) streams=${1:-256}; seconds=${2:-10}; shift 2 || true ;;
esac

exec 3< <(taskset -c 1 "$upstream_bin" --port 0)
read -r _ upstream_port upstream_pid <&3
port=$("$root/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=("$root/sse_server.py")
[ "$tool" = memory ] && server=("$root/bench/traced.py" "$root/sse_server.py")
[ "$tool" = timeline ] && server=("$root/bench/timeline.py" "$root/sse_server.py")
TIMELINE_OUT=$out/timeline.txt TRACED_OUT=$out/allocations.txt taskset -c 0 "$root/.venv/bin/python" "${server[@]}" --port="$port" \
  --upstream-url="http://127.0.0.1:$upstream_port/v1" --log-level=warning "$@" > "$out/gateway.log" 2>&1 &
gateway=$!
trap 'kill $gateway $upstream_pid 2>/dev/null; wait $gateway 2>/dev/null' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.1; done
load() { taskset -c 1 "$client" --port "$port" --watch "$gateway" --upstream-pid "$upstream_pid" "$@"; }
load --conns 32 --chunks 16 --interval-ms 10 --warmup 0 --duration 2 --drain 3 > /dev/null 2>&1  # warm-up

case $tool in
  pyspy)
    load --conns "$streams" --chunks 64 --interval-ms 20 --warmup 1 --duration "$seconds" --drain 3 > "$out/load.json" 2>/dev/null &
    loading=$!
    sleep 1
    "$root/.venv/bin/py-spy" record --native --rate 200 --pid "$gateway" --duration "$seconds" --format raw \
      --output "$out/stacks.txt" > /dev/null 2>&1
    wait $loading
    "$root/.venv/bin/python" "$root/bench/layers.py" "$out/stacks.txt" | tee "$out/layers.txt" ;;
  strace)
    load --conns "$streams" --chunks 64 --interval-ms 20 --warmup 1 --duration "$seconds" --drain 3 > "$out/load.json" 2>/dev/null &
    loading=$!
    sleep 1
    timeout -s INT "$seconds" strace -c -f -p "$gateway" -o "$out/syscalls.txt" || true
    wait $loading
    head -25 "$out/syscalls.txt" ;;
  memory)
    kill -USR1 "$gateway"; sleep 1  # the baseline snapshot
    rm -f "$out/allocations.txt"
    load --mode idle --levels "$streams" --settle 2 --idle-window 30 --level-timeout 60 --deadline 120 \
      > "$out/load.json" 2>/dev/null &
    loading=$!
    sleep 10; kill -USR2 "$gateway"  # the snapshot with the streams held, compared with the baseline
    for _ in $(seq 600); do [ -s "$out/allocations.txt" ] && break; sleep 0.1; done
    wait $loading
    head -40 "$out/allocations.txt" ;;
  timeline)
    rm -f "$out/timeline.txt"
    load --conns 1 --chunks 2 --interval-ms 20 --first-delay-ms 0 --warmup 0.5 --duration 5 --drain 1 > "$out/load.json" 2>/dev/null
    kill -USR1 "$gateway"
    for _ in $(seq 100); do [ -s "$out/timeline.txt" ] && break; sleep 0.1; done
    cat "$out/timeline.txt" ;;
  *) echo "unknown tool $tool" >&2; exit 2 ;;
esac
