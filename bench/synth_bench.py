"""
Throughput of the request engine (llm.py) against a local server of fixed latency and capacity.

  python bench/synth_bench.py                                  # concurrency 64 and 256
  python bench/synth_bench.py --concurrency 512 --capacity 512 --latency 2

For each concurrency it starts tests/fake_openai.py in its own process (so the server's CPU is
not counted as the client's), sends waves x concurrency requests through llm.run_requests
(request ids, cache file, progress bar and all), and prints:

  achieved requests/s, the bound min(concurrency, capacity) / latency, efficiency = achieved /
  bound, client CPU time per request, and client CPU as a share of one core (well below 100%
  means the client is not the bottleneck).

The whole run is timed, start-up and the last partial wave included.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llm  # noqa: E402


def bench(concurrency, args):
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--latency", str(args.latency),
         "--capacity", str(args.capacity), "--reply-chars", str(args.reply_chars)],
        stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        ep = llm.open_endpoint(url, "bench-model", timeout=60)
        llm.probe_endpoint(ep)
        filler = "x" * args.prompt_chars
        n = args.waves * concurrency
        reqs = [llm.make_request("bench", "bench-model",
                                   [{"role": "user", "content": f"{i} {filler}"}],
                                   {"temperature": 1.0, "max_tokens": 1024}) for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            results = llm.run_requests(ep, reqs, Path(tmp) / "cache.jsonl", f"c={concurrency}",
                                         concurrency=concurrency)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        server.kill()
        server.wait()
    assert len(results) == n, f"only {len(results)} of {n} requests succeeded"
    bound = min(concurrency, args.capacity) / args.latency
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "rps": n / wall,
            "bound": bound, "efficiency": n / wall / bound, "cpu_ms": 1000 * cpu / n,
            "cpu_share": cpu / wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256],
                    help="client concurrency levels to measure (default 64 256)")
    ap.add_argument("--latency", type=float, default=1.0, help="server seconds per reply "
                    "(default 1.0)")
    ap.add_argument("--capacity", type=int, default=256, help="requests the server serves at "
                    "once; more wait in line (default 256)")
    ap.add_argument("--waves", type=int, default=32, help="requests per level = waves x "
                    "concurrency (default 32)")
    ap.add_argument("--prompt-chars", type=int, default=8000, help="prompt size, about a spec "
                    "(default 8000)")
    ap.add_argument("--reply-chars", type=int, default=8000, help="reply size, about a 2k-token "
                    "document (default 8000)")
    args = ap.parse_args()
    rows = [bench(c, args) for c in args.concurrency]
    print(f"\ncommand: python bench/synth_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"server: latency {args.latency} s, capacity {args.capacity}; prompt {args.prompt_chars}"
          f" chars, reply {args.reply_chars} chars; {os.cpu_count()} CPUs\n")
    print(f"{'concurrency':>11} {'requests':>8} {'wall s':>7} {'req/s':>7} {'bound':>7} "
          f"{'efficiency':>10} {'CPU ms/req':>10} {'CPU share':>9}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['wall_s']:>7.1f} {r['rps']:>7.1f} "
              f"{r['bound']:>7.1f} {r['efficiency']:>10.1%} {r['cpu_ms']:>10.2f} "
              f"{r['cpu_share']:>9.0%}")


if __name__ == "__main__":
    main()
