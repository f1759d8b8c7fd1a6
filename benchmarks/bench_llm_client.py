"""Time the explainer's LLM stage: sequential requests against bounded concurrency, and a rerun.

A real ``LocalOpenAIServer`` on 127.0.0.1, in its own process (an endpoint does not share the
client's CPU), answers every request after ``--latency`` seconds (a stand-in for a hosted model's
response time). The same ``--n`` chat requests are sent

* sequentially (``concurrency=1``),
* concurrently (``--concurrency``, default 8 16 32),
* again from the disk cache of the concurrency=16 run (a resumed run: nothing is sent),

optionally with injected faults (``--fault-rate``; every run then retries).

The speed-ups are printed side by side; the target is >= 10x for the concurrent run at 200 ms.

    python benchmarks/bench_llm_client.py
    python benchmarks/bench_llm_client.py --n 120 --latency 0.2 --concurrency 32 --fault-rate 0.3
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interp_lib.explain.client import ChatRequest, LLMClient  # noqa: E402
from interp_lib.explain.local_server import LocalOpenAIServer  # noqa: E402


def requests_for(n: int) -> list[ChatRequest]:
    return [ChatRequest([{"role": "system", "content": "You explain attention heads."},
                         {"role": "user", "content": f"Explain head L{i // 12}H{i % 12}: it "
                                                     "attends from each token to the previous one."}],
                        max_tokens=64) for i in range(n)]


def _serve(conn, kwargs: dict) -> None:
    """Child process: run a server, answer "stats" with its counters, stop on "stop"."""
    with LocalOpenAIServer(**kwargs) as server:
        conn.send(server.url)
        while conn.recv() != "stop":
            conn.send({"n_requests": server.n_requests, "max_in_flight": server.max_in_flight})


class ServerProcess:
    """A LocalOpenAIServer in its own process, like a real endpoint on another machine: its
    request handling does not compete with the client for this process's GIL."""

    def __init__(self, **kwargs):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, kwargs), daemon=True)

    def __enter__(self) -> "ServerProcess":
        self._process.start()
        self.url = self._conn.recv()
        return self

    def stats(self) -> dict:
        self._conn.send("stats")
        return self._conn.recv()

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self._process.join(timeout=10)


def timed_run(server: ServerProcess, requests: list[ChatRequest], **options) -> tuple[float, LLMClient, list]:
    # --fault-rate 0.3 with the default 5 retries fails a request now and then (0.3**6 per
    # request adds up over hundreds): allow more so a run measures speed, not bad luck
    options.setdefault("max_retries", 15)
    client = LLMClient("local-model", base_url=server.url, progress=False, **options)
    start = time.perf_counter()
    results = client.chat_many(requests)
    return time.perf_counter() - start, client, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="number of requests")
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16, 32],
                        help="concurrency levels to time; the cache rerun uses the middle one")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repeats of each concurrent run (the median is shown)")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="fraction of requests faulted (429 / 500 / malformed; timeouts "
                             "and truncation are left out so every run gets the same answers)")
    args = parser.parse_args()
    requests = requests_for(args.n)
    faults = ("429", "500", "malformed")
    print(f"{args.n} chat requests, server latency {args.latency * 1000:.0f} ms, "
          f"fault rate {args.fault_rate:.0%}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    server_options = dict(latency=args.latency, fault_rate=args.fault_rate, faults=faults,
                          retry_after=0.05)
    with ServerProcess(**server_options) as server:
        # warm-up, untimed: the first request pays one-off costs (importing openai, ~1-3 s)
        timed_run(server, requests_for(1), concurrency=1)
        before = server.stats()["n_requests"]
        t_seq, seq_client, seq_results = timed_run(server, requests, concurrency=1,
                                                   backoff_base=0.05)
        rows = [("sequential (concurrency=1)", t_seq, server.stats()["n_requests"] - before,
                 f"{seq_client.usage.retries} retries")]
    cache_level = args.concurrency[len(args.concurrency) // 2]
    with ServerProcess(**server_options) as server, \
            tempfile.TemporaryDirectory(prefix="bench_llm_cache_") as cache:
        for level in args.concurrency:
            times, sent, retries = [], [], []
            for rep in range(args.repeat):
                before = server.stats()["n_requests"]
                # only the last repeat of the middle level fills the cache used below
                use_cache = level == cache_level and rep == args.repeat - 1
                seconds, client, results = timed_run(server, requests, concurrency=level,
                                                     backoff_base=0.05,
                                                     cache_dir=cache if use_cache else None)
                assert [r.content for r in results] == [r.content for r in seq_results], \
                    "concurrent answers must match the sequential ones, in order"
                times.append(seconds)
                sent.append(server.stats()["n_requests"] - before)
                retries.append(client.usage.retries)
            rows.append((f"concurrency={level}", statistics.median(times), round(
                statistics.median(sent)), f"median of {args.repeat} "
                f"({min(times):.2f}-{max(times):.2f} s), {statistics.median(retries):g} retries"))
        before = server.stats()["n_requests"]
        t_cache, _, cache_results = timed_run(server, requests, concurrency=cache_level,
                                              cache_dir=cache)
        assert [r.content for r in cache_results] == [r.content for r in seq_results]
        rows.append(("rerun from disk cache", t_cache, server.stats()["n_requests"] - before,
                     f"cache of concurrency={cache_level}"))
        max_in_flight = server.stats()["max_in_flight"]

    print(f"{'run':<28} {'seconds':>8} {'sent':>5} {'speed-up vs sequential':>23}  note")
    for name, seconds, n_sent, note in rows:
        print(f"{name:<28} {seconds:>8.3f} {n_sent:>5d} {t_seq / seconds:>22.1f}x  {note}")
    ideal = args.latency * math.ceil(args.n / cache_level)
    print(f"max requests in flight at the server: {max_in_flight} "
          f"(lower bound for concurrency={cache_level}: {ideal:.2f} s)")
    ratio = t_seq / next(r[1] for r in rows if r[0] == f"concurrency={cache_level}")
    verdict = "meets" if ratio >= 10 else "MISSES"
    print(f"concurrency={cache_level} vs sequential: {ratio:.1f}x, {verdict} the 10x target")


if __name__ == "__main__":
    main()
