"""
llm.py: the project's one client for OpenAI-compatible endpoints (vLLM, SGLang, `transformers
serve`, hosted APIs). synth.py makes its data through it, evaluate.py its policy and grader calls.

The idea: every request is a line of the OpenAI Batch API format whose id is a hash of (stage,
model, messages, sampling, index); every reply that passes the caller's check is appended to a
JSONL cache as it arrives; ids already in the cache are never sent again. So a crash, kill -9 or
Ctrl-C loses only the requests in flight, and rerunning the same command resumes.

  ep = open_endpoint("http://localhost:8000/v1", "my-model")   # settings only: nothing is sent
  reqs = [make_request("answers", "my-model", [{"role": "user", "content": q}],
                       sampling_for(0.7, 512)) for q in questions]  # {custom_id, method, url, body}
  out = run_requests(ep, reqs, "runs/x/cache/answers.jsonl", "answers", validate=None)
  out[reqs[0]["custom_id"]]  # {custom_id, content, finish_reason, usage, model, reasoning, value}

The first run_requests with work probes GET /models and exits with one line for an unreachable
endpoint, a 401 (naming the key's environment variable, never the key) or an unlisted model.
validate(result) returns the value or raises ValueError, which asks again; HTTP 408/409/429/5xx,
timeouts and connection errors are retried with backoff and jitter, honouring Retry-After; after
max_retries a request goes to failed_path. Memory holds the requests in flight and one cache
offset per id, not the replies (validate must be pure: it runs again on each read). With
open_endpoint(..., batch_file=PATH) the pending requests are written there instead and the run
stops; ingest_batch_results(paths, cache_dir) brings the provider's output into the cache.

Also here: request bodies (sampling_for), reply checks (check_finished, parse_json) and the
endpoint flags spelled the same in every script (add_endpoint_args, add_client_args,
add_batch_args; add_args adds a script's own flags from a table). The run plumbing every stage
shares (die, fill, run_info, write_jsonl) is in common.py.

Reading order: request ids -> endpoint and probe -> one attempt (send, classify, back off) ->
the async pool -> the cache and run_requests -> batch files -> reply checks -> flags.
"""

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx2  # the HTTP library under the pinned openai SDK (3.x)
import openai
from tqdm import tqdm

from common import die


def sha256_hex(data):
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------
# Request ids, endpoints and the probe

def make_request(stage, model, messages, sampling, index=0):
    """OpenAI batch line with a deterministic custom_id (see the module notes)."""
    assert re.fullmatch(r"[a-z0-9_]+", stage), f"stage names are [a-z0-9_]: {stage!r}"
    key = json.dumps([stage, model, messages, sampling, index], sort_keys=True, ensure_ascii=False)
    return {"custom_id": f"{stage}-{sha256_hex(key)[:24]}", "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, **sampling}}


def sampling_for(temperature, max_tokens, token_field="max_tokens", extra_body=None, **more):
    """A request's sampling settings: part of its body, hence of its id. token_field is
    max_completion_tokens for reasoning models that refuse max_tokens; extra_body (server
    options) wins over the rest; more: e.g. seed."""
    return {"temperature": temperature, token_field: max_tokens, **more, **(extra_body or {})}


def open_endpoint(base_url, model, api_key_env="OPENAI_API_KEY", timeout=600.0, check_model=True,
                  retry_base_delay=1.0, retry_max_delay=60.0, batch_file=None,
                  batch_max_bytes=190_000_000, batch_max_lines=50_000):
    """Endpoint settings for run_requests (see the module notes)."""
    return {"base_url": base_url, "model": model, "api_key_env": api_key_env,
            "timeout": float(timeout), "check_model": check_model,
            "retry_base_delay": retry_base_delay, "retry_max_delay": retry_max_delay,
            "batch_file": batch_file, "batch_max_bytes": batch_max_bytes,
            "batch_max_lines": batch_max_lines, "probed": False, "stats": Counter()}


def _api_key(endpoint):
    return os.environ.get(endpoint["api_key_env"]) or "EMPTY"


def probe_endpoint(endpoint):
    """GET /models once; exit with a one-line error if the endpoint cannot serve the model."""
    url, env, models = endpoint["base_url"], endpoint["api_key_env"], None
    with openai.OpenAI(base_url=url, api_key=_api_key(endpoint), max_retries=0,
                       timeout=min(endpoint["timeout"], 30.0)) as client:
        try:
            models = [m.id for m in client.models.list()]
        except openai.AuthenticationError:
            unset = "" if os.environ.get(env) else f" ({env} is not set)"
            die(f"{url} rejected the API key (HTTP 401); put a valid key in the environment "
                f"variable {env}{unset}, or name another variable with --api-key-env")
        except openai.APIConnectionError as exc:
            die(f"cannot reach the endpoint {url} ({type(exc).__name__}); is the server "
                f"running, and does --base-url end in /v1?")
        except openai.NotFoundError:
            print(f"warning: {url} has no /models route; not checking the model name",
                  file=sys.stderr)
        except openai.APIStatusError as exc:
            die(f"{url}/models answered HTTP {exc.status_code}")
    if endpoint["check_model"] and models is not None and endpoint["model"] not in models:
        shown = ", ".join(models[:10]) + (" ..." if len(models) > 10 else "")
        die(f"model {endpoint['model']!r} is not served at {url} (it lists: {shown or 'none'});"
            f" fix --model, or pass --no-model-check for a server that loads models on demand")
    endpoint["probed"] = True


def _retry_after(headers):
    """Seconds from retry-after-ms / retry-after (seconds or an HTTP date), or None."""
    with contextlib.suppress(TypeError, ValueError):
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value:
            with contextlib.suppress(ValueError):
                return float(value)
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _classify(exc):
    """-> (retryable, reason, retry_after seconds or None) for an exception from one attempt."""
    if isinstance(exc, ValueError):
        return True, f"invalid reply: {exc}", None
    if isinstance(exc, openai.APITimeoutError):
        return True, "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return True, f"connection error ({type(exc).__name__})", None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code in (408, 409, 429) or code >= 500:
            return True, f"HTTP {code}", _retry_after(exc.response.headers)
        # The body of a 401/403 may echo part of the key: never repeat it.
        message = re.sub(r"^Error code: \d+ - ", "", str(exc.message))
        detail = "" if code in (401, 403) else f": {message[:200]}"
        return False, f"HTTP {code}{detail}", None
    if isinstance(exc, openai.APIResponseValidationError):
        return True, "malformed response", None
    return False, f"{type(exc).__name__}: {exc}", None


# Connections per client. httpx2's pool scans all its connections twice per request
# (_assign_requests_to_connections, linear per pass since pydantic/httpx2#974 and #1075), so one
# pool of 256 connections cost 2.06 ms of client CPU per request and reached 88.7% of the bound in
# bench/synth_bench.py; workers spread over clients of 32 connections: 1.37 ms and 96.6%.
POOL_SIZE = 32
# Worker i sends its first request after i * RAMP seconds (0.5 s for 256 workers). Starting all
# at once opens every connection and sends every prompt in one burst; against a server with a
# steady latency the replies then come back in the same burst, wave after wave, each one queueing
# behind the client's CPU. The ramp spreads them (bench at 256: 94.4% -> 96.6% of the bound).
RAMP = 0.002


def _async_client(endpoint, connections, ssl_context):
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=endpoint["timeout"],
                                          verify=ssl_context)
    return openai.AsyncOpenAI(base_url=endpoint["base_url"], api_key=_api_key(endpoint),
                              max_retries=0, timeout=endpoint["timeout"], http_client=http)


async def _send(client, endpoint, req):
    """One HTTP call -> result dict (content, finish_reason, usage, ...)."""
    stats = endpoint["stats"]
    stats["calls"] += 1
    # client.post is the SDK's documented way to send a raw body: it skips the typed-parameter
    # transform and the pydantic parse of chat.completions.create(), which at 256 concurrent
    # requests cost 2.01 instead of 1.37 ms of client CPU per request (bench/synth_bench.py).
    # Status errors, auth and timeouts are still the SDK's own.
    resp = await client.post("/chat/completions", body=req["body"], cast_to=httpx2.Response,
                             options={"headers": {"X-Client-Request-Id": req["custom_id"]},
                                      "timeout": endpoint["timeout"]})
    try:
        result = _to_record(req["custom_id"], json.loads(resp.content))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise openai.APIResponseValidationError(resp, None, message=f"malformed reply: {exc}") from exc
    stats["tokens_in"] += result["usage"]["prompt_tokens"] or 0
    stats["tokens_out"] += result["usage"]["completion_tokens"] or 0
    return result


def _to_record(custom_id, body):
    """A chat completion (an HTTP reply, or a line of a batch output file) -> a cache record."""
    choice, usage = body["choices"][0], body.get("usage") or {}
    message = choice.get("message") or {}
    return {"custom_id": custom_id, "content": message.get("content") or "",
            "finish_reason": choice.get("finish_reason"), "model": body.get("model"),
            "usage": {"prompt_tokens": usage.get("prompt_tokens"),
                      "completion_tokens": usage.get("completion_tokens")},
            # servers with a reasoning parser (vLLM, transformers serve) send the thinking apart
            "reasoning": message.get("reasoning_content") or message.get("reasoning")}


def _validated(result, validate):
    try:
        return validate(result)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc


async def _attempts(client, endpoint, req, validate, max_retries):
    """Try one request up to max_retries + 1 times -> (result, None) or (None, failure)."""
    stats = endpoint["stats"]
    for attempt in range(max_retries + 1):
        try:
            result = await _send(client, endpoint, req)
            result["value"] = _validated(result, validate)
            return result, None
        except Exception as exc:  # noqa: BLE001 - every error is classified; none stops the run
            retryable, reason, retry_after = _classify(exc)
        stats["invalid" if reason.startswith("invalid") else "errors"] += 1
        if not retryable or attempt == max_retries:
            return None, {"reason": reason, "attempts": attempt + 1}
        stats["retries"] += 1
        if retry_after is not None:
            delay = min(retry_after, 600.0)
        elif reason.startswith("invalid"):
            delay = 0.0  # the server is fine; just draw another sample
        else:
            delay = min(endpoint["retry_max_delay"], endpoint["retry_base_delay"] * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)  # jitter: spread retries of a burst of failures
        await asyncio.sleep(delay)


async def _engine(endpoint, queue, validate, concurrency, max_retries, on_result):
    """concurrency workers pull from one iterator of requests until it is empty."""
    ssl_context = httpx2.create_ssl_context()  # shared: loading the CA bundle costs ~25 ms each
    clients = [_async_client(endpoint, POOL_SIZE, ssl_context)
               for _ in range(math.ceil(concurrency / POOL_SIZE))]

    async def worker(i, client):
        # next() never awaits, so the workers share the iterator without a lock. A worker takes
        # its first request before the ramp, so idle workers of a short list end at once.
        req = next(queue, None)
        if req is not None:
            await asyncio.sleep(i * RAMP)
        while req is not None:
            on_result(req, *await _attempts(client, endpoint, req, validate, max_retries))
            req = next(queue, None)
    try:
        await asyncio.gather(*(worker(i, clients[i % len(clients)]) for i in range(concurrency)))
    finally:
        for client in clients:
            await client.close()


# -----------------------------------------------------------------------------
# The cache: one append-only JSONL file per stage. Memory holds byte offsets, never replies, so a
# run of 10^5-10^6 requests stays small (bench/synth_bench.py --memory measures it).

CACHE_FIELDS = ("custom_id", "content", "finish_reason", "usage", "model", "reasoning")


def iter_cache(path):
    """-> (byte offset, record) per good line. A torn last line (kill -9) is skipped."""
    if not Path(path).exists():
        return
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "custom_id" in rec:
                    yield offset, rec
            offset += len(line)


def load_cache(path):
    """custom_id -> list of cached records, in file order (whole records: for small caches)."""
    cached = {}
    for _, rec in iter_cache(path):
        cached.setdefault(rec["custom_id"], []).append(rec)
    return cached


def read_record(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())


class Results(Mapping):
    """custom_id -> result {custom_id, content, ..., value}, read from the cache file when asked
    for. It holds one offset per id; validate runs again on each read, so it must be pure."""

    def __init__(self, path, validate):
        self.path, self.validate, self.offsets = Path(path), validate, {}

    def __getitem__(self, cid):
        rec = read_record(self.path, self.offsets[cid])
        return {**rec, "value": _validated(rec, self.validate)}

    def __iter__(self):
        return iter(self.offsets)

    def __len__(self):
        return len(self.offsets)


def open_append(path, binary=False):
    """Open a JSONL file for appending; first end a line torn by a kill so lines never merge."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = open(path, "ab") if binary else open(path, "a", encoding="utf-8")
    if torn:
        f.write(b"\n" if binary else "\n")
    return f


def _uncached(requests, cache_path, validate, results, stats):
    """The requests to send, found lazily (a body lives only until its reply is cached); those
    with a cached reply that validates go into results instead (the first such record wins)."""
    index = {}  # custom_id -> offsets of its cached records
    for offset, rec in iter_cache(cache_path):
        index.setdefault(rec["custom_id"], []).append(offset)
    seen = set()
    for req in requests:
        cid = req["custom_id"]
        if cid in seen:  # the same request twice in one list is asked once
            continue
        seen.add(cid)
        for offset in index.pop(cid, ()):
            try:
                _validated(read_record(cache_path, offset), validate)
            except ValueError:
                continue
            results.offsets[cid] = offset
            stats["cached"] += 1
            break
        else:
            yield req


def run_requests(endpoint, requests, cache_path, desc, validate=None, concurrency=64,
                 max_retries=5, failed_path=None, total=None):
    """Cached, concurrent, retried calls (see the module notes) -> Results {custom_id: result}.

    requests may be any iterable (a generator keeps only the requests in flight in memory);
    total: their number for the progress bar (default: len(requests) where it has one)."""
    validate = validate or (lambda r: r["content"])
    stats, results, cache_path = endpoint["stats"], Results(cache_path, validate), Path(cache_path)
    failed_before = stats["failed"]
    queue = _uncached(requests, cache_path, validate, results, stats)
    first = next(queue, None)
    if first is None:
        return results
    queue = itertools.chain([first], queue)
    if endpoint.get("batch_file"):
        write_batch_file(endpoint, queue, desc)
    if not endpoint["probed"]:
        probe_endpoint(endpoint)

    total = len(requests) if total is None and hasattr(requests, "__len__") else total
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, initial=len(results), desc=desc, unit="req",
                                       mininterval=0.5, dynamic_ncols=True))
        cache_f, failed_f = stack.enter_context(open_append(cache_path, binary=True)), None

        def on_result(req, result, failure):
            nonlocal failed_f
            if failure is None:
                results.offsets[req["custom_id"]] = cache_f.tell()
                line = json.dumps({k: result[k] for k in CACHE_FIELDS}, ensure_ascii=False) + "\n"
                cache_f.write(line.encode("utf-8"))
                cache_f.flush()  # in the kernel now: survives kill -9 of this process
                stats["ok"] += 1
            else:
                stats["failed"] += 1
                if failed_path:
                    failed_f = failed_f or stack.enter_context(open_append(failed_path))
                    line = {"custom_id": req["custom_id"], "desc": desc, **failure, "request": req}
                    failed_f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    failed_f.flush()
            failed = stats["failed"] - failed_before
            bar.set_postfix_str(f"failed={failed} tok_in={stats['tokens_in']} "
                                f"tok_out={stats['tokens_out']}", refresh=False)
            # the cached ones too, found as the queue is drawn
            bar.update(len(results) + failed - bar.n)
        asyncio.run(_engine(endpoint, queue, validate, concurrency, max_retries, on_result))
    return results


# -----------------------------------------------------------------------------
# Batch files: write the pending requests instead of calling; ingest the provider's output.

def write_batch_file(endpoint, pending, desc):
    """Write pending requests as OpenAI batch lines and stop the run (exit 0). Files are split so
    each stays under endpoint["batch_max_bytes"] and endpoint["batch_max_lines"] (hosted batch
    APIs refuse files over 200 MB or 50,000 requests): one part is written to batch_file itself,
    more to NAME.part1.jsonl, NAME.part2.jsonl, ..."""
    path = Path(endpoint["batch_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"{path.stem}.part*{path.suffix}"):
        old.unlink()  # parts of an earlier, larger write would be sent twice
    parts, f, size, lines, n = [], None, 0, 0, 0
    with contextlib.ExitStack() as stack:  # holds the part being written
        for req in pending:
            line = (json.dumps(req, ensure_ascii=False) + "\n").encode("utf-8")
            if f is None or size + len(line) > endpoint["batch_max_bytes"] \
                    or lines >= endpoint["batch_max_lines"]:
                stack.close()
                parts.append(path.with_name(f"{path.stem}.part{len(parts) + 1}{path.suffix}"))
                f, size, lines = stack.enter_context(open(parts[-1], "wb")), 0, 0
            f.write(line)
            size, lines, n = size + len(line), lines + 1, n + 1
    if len(parts) == 1:
        os.replace(parts[0], path)
        parts = [path]
    else:
        path.unlink(missing_ok=True)
    names = " ".join(str(p) for p in parts)
    print(f"wrote {n} pending requests ({desc}) to {names}.\n"
          f"Run them with the OpenAI Batch API or `vllm run-batch -i FILE -o results.jsonl "
          f"--model MODEL` (one per file), then rerun this command with --batch-results "
          f"RESULTS... (keep --batch-file to get the next stage's requests as a file too).")
    raise SystemExit(0)


def ingest_batch_results(paths, cache_dir):
    """Append Batch API / vllm run-batch output lines to cache_dir/<stage>.jsonl."""
    counts, files = Counter(), {}
    with contextlib.ExitStack() as stack:
        for rec in _batch_records(paths):
            if rec is None:
                counts["errored"] += 1
                continue
            stage = rec["custom_id"].rsplit("-", 1)[0]
            if stage not in files:
                cache = Path(cache_dir) / f"{stage}.jsonl"
                files[stage] = (stack.enter_context(open_append(cache)),
                                {_record_key(r) for _, r in iter_cache(cache)})
            f_out, have = files[stage]
            # Skip only a record already there word for word (a file ingested twice). A new reply
            # for a cached id is kept: the cached one may be invalid (cut by the token limit,
            # say), which is why the request was batched again.
            key = _record_key(rec)
            if key in have:
                counts["already cached"] += 1
                continue
            have.add(key)
            f_out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts["ingested"] += 1
    return counts


def _batch_records(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from (_batch_line_to_record(json.loads(line)) for line in f if line.strip())


def _record_key(rec):
    return sha256_hex(json.dumps([rec.get(k) for k in CACHE_FIELDS], ensure_ascii=False))


def _batch_line_to_record(line):
    """One output line of the OpenAI Batch API or vllm run-batch -> a cache record, or None."""
    resp = line.get("response") or {}
    if line.get("error") or resp.get("status_code", 200) != 200:
        return None
    body = resp.get("body", resp)  # some vLLM versions put the completion directly in response
    return _to_record(line["custom_id"], body) if body.get("choices") else None


# -----------------------------------------------------------------------------
# Parsing and validation of replies (each raises ValueError, which makes the request retry)

def check_finished(result):
    if result.get("finish_reason") == "length":
        raise ValueError("cut by the token limit (finish_reason=length)")


def parse_json(text):
    """The first JSON value in a reply: tolerates <think> blocks, code fences and prose around it."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    candidates = [m[1] for m in re.finditer(r"```(?:json|JSON)?\s*\n?(.*?)```", text, re.S)]
    candidates.append(text)
    decoder = json.JSONDecoder()
    for cand in candidates:
        cand = cand.strip()
        for start in [i for i, ch in enumerate(cand) if ch in "[{"][:50]:
            try:
                return decoder.raw_decode(cand, start)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON value in the reply")


# -----------------------------------------------------------------------------
# Command-line flags, spelled the same in every script that calls an endpoint

def add_args(parser, rows):
    """rows: (flag, help, other add_argument settings): the flags of a script as one table."""
    for flag, text, settings in rows:
        parser.add_argument(flag, help=text, **settings)


def add_endpoint_args(parser, prefix="", who="the generator", base_url=None, model_help=None):
    """--{prefix}model, --{prefix}base-url, --{prefix}api-key-env, --{prefix}extra-body.

    prefix tells two endpoints of one script apart (evaluate.py: "policy-" and "grader-").
    --{prefix}extra-body stays a string (default None); the caller parses it."""
    add_args(parser, [
        (f"--{prefix}model", model_help or f"{who}: the model name as the endpoint knows it "
         "(default: none)", {}),
        (f"--{prefix}base-url", f"OpenAI-compatible base URL of {who}, ending in /v1 (default: "
         f"{base_url or 'none'})", {"default": base_url}),
        (f"--{prefix}api-key-env", f"environment variable holding the API key of {who}; unset "
         "means 'EMPTY', fine for local servers (default OPENAI_API_KEY)",
         {"default": "OPENAI_API_KEY"}),
        (f"--{prefix}extra-body", f"JSON merged into every request body to {who}, for server "
         "options, e.g. '{\"chat_template_kwargs\": {\"enable_thinking\": false}}' (default: "
         "none); part of the request ids", {"default": None})])


def add_client_args(parser, retries_note=""):
    """Client settings shared by every endpoint of a script: concurrency, timeout, retries,
    the token-limit field and the model check. retries_note ends the --max-retries help."""
    add_args(parser, [
        ("--concurrency", "requests in flight per endpoint (default 64)",
         {"type": int, "default": 64}),
        ("--timeout", "seconds per request before it is retried (default 600)",
         {"type": float, "default": 600.0}),
        ("--max-retries", "retries per request after the first try, for HTTP 408/409/429/5xx, "
         f"timeouts, connection errors and invalid replies{retries_note} (default 5)",
         {"type": int, "default": 5}),
        ("--token-field", "request field for the token limit; OpenAI's reasoning models "
         "(o-series, gpt-5) refuse max_tokens and want max_completion_tokens (default "
         "max_tokens)", {"default": "max_tokens",
                         "choices": ["max_tokens", "max_completion_tokens"]}),
        ("--no-model-check", "do not check model names against the endpoint's /models list, "
         "for servers that load models on demand such as `transformers serve` (default: check)",
         {"action": "store_true"})])


def add_batch_args(parser):
    """--batch-file, --batch-max-mb, --batch-max-lines, --batch-results: the batch-file mode of
    run_requests (write_batch_file) and ingest_batch_results, for a script that offers them."""
    add_args(parser, [
        ("--batch-file", "write the pending requests of the next stage to this file as OpenAI "
         "batch lines and stop, instead of calling; split into NAME.part1.jsonl, ... when over "
         "the limits below (default: call)", {}),
        ("--batch-max-mb", "largest batch file part in MB (10^6 bytes); hosted batch APIs take "
         "up to 200 (default 190)", {"type": float, "default": 190.0}),
        ("--batch-max-lines", "most requests per batch file part; the OpenAI Batch API takes up "
         "to 50,000 (default 50000)", {"type": int, "default": 50_000}),
        ("--batch-results", "ingest OpenAI Batch API / vllm run-batch output files into the "
         "cache before running (default: none)", {"nargs": "+", "metavar": "FILE"})])
