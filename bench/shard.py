"""What one Redis shard sustains of the gateway's write pattern (issue: Redis Cluster capacity plan).

    .venv/bin/python bench/shard.py [--rate 50] [--streams 200,600,1000] [--seconds 10] [--shards 1,2,3]

The load is the gateway's own store code (`RedisStore`), as a gateway instance drives it, minus
HTTP: N answers at `--rate` tokens per second each (a frame every 1/rate s, random phase), each
answer `--length` frames long and then ended and replaced by a new one (create, running, frames,
end: every script of a real answer, group commit included). The load runs pinned to core 0, every
redis-server to core 1 (no persistence, as in `make bench`).

Configurations: one Redis (`redis://`: one script call per writer round for every stream), and
Redis Clusters of 1, 2 and 3 primaries (`redis+cluster://`: one script call per stream per
round, pipelined to each shard), made with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (redis-cli
refuses clusters of fewer than three).

Per configuration and load it prints the frames per second written, each shard's CPU (from
/proc) and frames, Redis CPU µs per frame (all of it, and above what the shards cost idle: cron
and cluster bus, measured for 3 s before each level), and what a shard would sustain at a full
core (1e6 / µs per frame above idle); also the load process's own CPU µs per frame (the gateway's share of the
store work). Redis CPU per frame, not the throughput, is what carries over to other machines:
several shards here share core 1, so their sum is bounded by one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from sse_gateway.store import StreamState  # noqa: E402
from sse_gateway.store.redis import RedisStore  # noqa: E402

IDLE_SECONDS = 3.0  # seconds the shards' idle CPU is measured before each level
FRAME = (b'id: %s:%d\ndata: {"id":"chatcmpl-9xYz","object":"chat.completion.chunk","created":1764000000,'
         b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Shard:
    port: int
    bus: int  # the cluster bus port
    proc: subprocess.Popen[bytes]

    def cpu(self) -> float:
        """Seconds of CPU this redis-server has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def frames(self) -> int:
        """Frames in the logs on this shard (XADD calls so far)."""
        with redis.Redis(port=self.port) as client:
            stats = client.info("commandstats").get("cmdstat_xadd", {})
        return int(stats.get("calls", 0))


def start_redis(folder: Path, cluster: bool) -> Shard:
    port, bus = free_port(), free_port()
    folder.mkdir(parents=True)
    args = ["taskset", "-c", "1", "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", "--appendonly", "no", "--logfile", "redis.log"]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf"]
    proc = subprocess.Popen(args)
    for _ in range(200):
        try:
            with redis.Redis(port=port) as client:
                client.ping()
            return Shard(port, bus, proc)
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def make_cluster(shards: list[Shard]) -> None:
    """Slots split evenly, nodes introduced to each other, until every node says ok."""
    per = 16384 // len(shards)
    for i, shard in enumerate(shards):
        last = 16383 if i == len(shards) - 1 else (i + 1) * per - 1
        with redis.Redis(port=shard.port) as client:
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # as redis-cli does: no epoch collisions
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for other in shards:
                if other is not shard:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port, other.bus)
    deadline = time.monotonic() + 30
    for shard in shards:
        with redis.Redis(port=shard.port) as client:
            while client.cluster("info")["cluster_state"] != "ok" or int(client.cluster("info")["cluster_known_nodes"]) < len(shards):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not form")
                time.sleep(0.05)


class Load:
    """N answers at `rate` frames/s each, through the store's real write path."""

    def __init__(self, store: RedisStore, answers: int, rate: float, length: int) -> None:
        self.store = store
        self.answers = answers
        self.rate = rate
        self.length = length
        self.behind = 0  # appends the writer asked to pause (queue full): the load is too much

    async def answer(self, first_phase: float) -> None:
        await asyncio.sleep(first_phase)
        logs = self.store.logs
        while True:
            stream_id = os.urandom(8).hex()
            await logs.create(stream_id, "bench", readers=1, model="bench")
            await logs.set_running(stream_id)
            start = time.monotonic()
            for seq in range(1, self.length + 1):
                delay = start + seq / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not logs.append(stream_id, [FRAME % (stream_id.encode(), seq)]):
                    self.behind += 1
            await logs.end(stream_id, StreamState.DONE, [b"data: [DONE]\n\n"], retention=10)

    async def run(self, warmup: float, seconds: float, shards: list[Shard]) -> dict[str, float]:
        idle0, t_idle = [s.cpu() for s in shards], time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)  # what the shards cost doing nothing (cron, cluster bus)
        idle = [(s.cpu() - c) / (time.monotonic() - t_idle) for s, c in zip(shards, idle0, strict=True)]
        tasks = [asyncio.ensure_future(self.answer(random.random() * self.length / self.rate))
                 for _ in range(self.answers)]
        await asyncio.sleep(warmup + self.length / self.rate)  # every answer running, phases spread
        cpu0, frames0 = [s.cpu() for s in shards], [s.frames() for s in shards]
        usage0, t0, behind0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), self.behind
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1, frames1 = [s.cpu() for s in shards], [s.frames() for s in shards]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        frames = [b - a for a, b in zip(frames0, frames1, strict=True)]
        busy = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        total = sum(frames)
        load_cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        return {
            "offered": self.answers * self.rate, "frames_s": total / elapsed,
            "shard_cpu": [b / elapsed for b in busy], "shard_frames_s": [f / elapsed for f in frames],
            "redis_us": 1e6 * sum(busy) / max(total, 1), "load_cpu": load_cpu / elapsed,
            "marginal_us": 1e6 * max(0.0, sum(busy) - sum(idle) * elapsed) / max(total, 1),
            "load_us": 1e6 * load_cpu / max(total, 1), "behind": self.behind - behind0,
        }


async def measure(url: str, shards: list[Shard], answers: int, args: argparse.Namespace) -> dict[str, float]:
    store = RedisStore(url)
    try:
        return await Load(store, answers, args.rate, args.length).run(args.warmup, args.seconds, shards)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="tokens (frames) per second per answer")
    parser.add_argument("--streams", default="200,600,1000", help="concurrent answers, comma-separated")
    parser.add_argument("--length", type=int, default=200, help="frames per answer")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--shards", default="single,1,2,3", help="`single` (one Redis) and cluster sizes")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as the gateway runs
    except ImportError:
        pass
    print(f"# {args.rate:g} frames/s per answer, {args.length} frames per answer, {args.seconds:g} s per level; "
          "load on core 0, every redis-server on core 1\n")
    print("| Redis | answers | offered fr/s | written fr/s | Redis CPU per shard | frames/s per shard "
          "| Redis µs/frame (all / above idle) | one shard at a full core (fr/s) | load CPU | load µs/frame |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.shards.split(","):
        folder = Path(tempfile.mkdtemp(prefix="shard-bench-"))
        single = config == "single"
        count = 1 if single else int(config)
        shards = [start_redis(folder / f"node{i}", cluster=not single) for i in range(count)]
        try:
            if single:
                url = f"redis://127.0.0.1:{shards[0].port}/0"
            else:
                make_cluster(shards)
                url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in shards)
            for answers in map(int, args.streams.split(",")):
                r = asyncio.run(measure(url, shards, answers, args))
                name = "one Redis" if single else f"cluster, {count} shard{'s' if count > 1 else ''}"
                late = f" ({r['behind']} appends over the queue)" if r["behind"] else ""
                print(f"| {name} | {answers:,} | {r['offered']:,.0f} | {r['frames_s']:,.0f}{late} "
                      f"| {' / '.join(f'{c:.0%}' for c in r['shard_cpu'])} "
                      f"| {' / '.join(f'{f:,.0f}' for f in r['shard_frames_s'])} "
                      f"| {r['redis_us']:.2f} / {r['marginal_us']:.2f} | {1e6 / max(r['marginal_us'], 1e-9):,.0f} "
                      f"| {r['load_cpu']:.0%} | {r['load_us']:.1f} |", flush=True)
        finally:
            for shard in shards:
                shard.proc.kill()
                shard.proc.wait()
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
