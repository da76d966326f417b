"""
Throughput of the request engine (llm.py) against a local server of fixed latency and capacity.

  python bench/synth_bench.py                                  # concurrency 64 and 256
  python bench/synth_bench.py --concurrency 512 --capacity 512 --latency 2
  python bench/synth_bench.py --memory 100000                  # peak RSS of one big run
  python bench/synth_bench.py --docs 20000 --latency 0.05      # peak RSS of synth.py docs

For each concurrency it starts tests/fake_openai.py in its own process (so the server's CPU is
not counted as the client's), sends waves x concurrency requests through llm.run_requests
(request ids, cache file, progress bar and all), and prints:

  achieved requests/s, the bound min(concurrency, capacity) / latency, efficiency = achieved /
  bound, client CPU time per request, and client CPU as a share of one core (well below 100%
  means the client is not the bottleneck).

The whole run is timed, start-up and the last partial wave included.

--docs N runs `synth.py docs` itself (a subprocess, against the fake server answering every
stage with tests/fake_openai.py's scripted replies) for about N documents: 10 domains x 10
subdomains x 10 document types x N/1000 ideas, and prints the peak RSS of synth.py (wait4), the
documents written and the wall time.

--memory N instead sends N requests once (made by a generator, as a big stage would), then reads
every result back from the returned mapping and streams it to an output file, as a stage writing
its documents does, and prints the client's peak resident memory (ru_maxrss) before the run,
after the calls and after the read-back.
"""

import argparse
import json
import os
import resource
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


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory(n, args):
    """One run of n requests -> peak RSS (MB) at each step, wall time and file sizes."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--latency", str(args.latency),
         "--capacity", str(args.capacity), "--reply-chars", str(args.reply_chars)],
        stdout=subprocess.PIPE, text=True)
    concurrency = args.concurrency[0]
    filler = "x" * args.prompt_chars
    reqs = (llm.make_request("bench", "bench-model", [{"role": "user", "content": f"{i} {filler}"}],
                             {"temperature": 1.0, "max_tokens": 1024}) for i in range(n))
    row = {"requests": n, "concurrency": concurrency, "rss_start_mb": peak_rss_mb()}
    try:
        url = server.stdout.readline().strip()
        ep = llm.open_endpoint(url, "bench-model", timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            results = llm.run_requests(ep, reqs, Path(tmp) / "cache.jsonl", f"n={n}",
                                       concurrency=concurrency)
            row["call_s"], row["rss_calls_mb"] = time.perf_counter() - t0, peak_rss_mb()
            t1, written = time.perf_counter(), 0
            with open(Path(tmp) / "out.jsonl", "w", encoding="utf-8") as f:
                for cid in results:
                    f.write(json.dumps({"id": cid, "text": results[cid]["value"]}) + "\n")
                    written += 1
            row["read_s"], row["rss_end_mb"] = time.perf_counter() - t1, peak_rss_mb()
            row["cache_mb"] = (Path(tmp) / "cache.jsonl").stat().st_size / 1e6
    finally:
        server.kill()
        server.wait()
    assert written == n, f"only {written} of {n} requests succeeded"
    return row


def docs_run(n, args):
    """synth.py docs for ~n documents against the scripted fake -> its peak RSS and figures."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--latency", str(args.latency),
         "--capacity", str(args.capacity), "--model", "test-model", "--scripted", "10", "10",
         "--doc-words", str(args.doc_words)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "synth.py"), "docs", "--spec", args.spec, "--out",
                   tmp, "--model", "test-model", "--base-url", url, "--doc-types", "10",
                   "--ideas", str(max(1, n // 1000)), "--concurrency",
                   str(args.concurrency[0])]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - t0
            assert proc.returncode == 0, f"synth.py exited {proc.returncode}"
            out = Path(tmp)
            docs = sum(1 for _ in open(out / "documents.jsonl", encoding="utf-8"))
            return {"documents": docs, "wall_s": wall, "rss_mb": usage.ru_maxrss / 1024,
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "documents_mb": (out / "documents.jsonl").stat().st_size / 1e6,
                    "cache_mb": (out / "cache" / "documents.jsonl").stat().st_size / 1e6}
    finally:
        server.kill()
        server.wait()


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
    ap.add_argument("--memory", type=int, metavar="N", help="instead: one run of N requests at the"
                    " first --concurrency; print peak RSS (default: off)")
    ap.add_argument("--docs", type=int, metavar="N", help="instead: synth.py docs for ~N "
                    "documents; print its peak RSS (default: off)")
    ap.add_argument("--spec", default=str(ROOT / "specs" / "safety.md"), help="--docs spec "
                    "(default specs/safety.md, the longest shipped spec)")
    ap.add_argument("--doc-words", type=int, default=220, help="--docs document length in words "
                    "(default 220)")
    args = ap.parse_args()
    if args.docs:
        r = docs_run(args.docs, args)
        print(f"\ncommand: python bench/synth_bench.py {' '.join(sys.argv[1:])}")
        print(f"synth.py docs: {r['documents']} documents ({r['documents_mb']:.0f} MB; cache "
              f"{r['cache_mb']:.0f} MB) in {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU; "
              f"peak RSS {r['rss_mb']:.0f} MB; server latency {args.latency} s; "
              f"{os.cpu_count()} CPUs")
        return
    if args.memory:
        t0, r = time.perf_counter(), memory(args.memory, args)
        print(f"\ncommand: python bench/synth_bench.py {' '.join(sys.argv[1:])}")
        print(f"{r['requests']} requests at concurrency {r['concurrency']}; server latency "
              f"{args.latency} s, capacity {args.capacity}; prompt {args.prompt_chars} chars, reply "
              f"{args.reply_chars} chars; cache file {r['cache_mb']:.0f} MB; {os.cpu_count()} CPUs")
        print(f"peak RSS: {r['rss_start_mb']:.0f} MB at start, {r['rss_calls_mb']:.0f} MB after the "
              f"calls ({r['call_s']:.0f} s), {r['rss_end_mb']:.0f} MB after reading every result "
              f"back ({r['read_s']:.0f} s); wall {time.perf_counter() - t0:.0f} s")
        return
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
