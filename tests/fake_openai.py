"""
A real OpenAI-compatible HTTP server on 127.0.0.1 for synth.py's tests and benchmark.

  srv = start_server(responder=scripted(), models=("test-model",), api_key=None,
                     latency=0.0, capacity=None)
  ... point openai / synth.py at srv.url ...
  srv.stop()

It speaks `GET /v1/models` and `POST /v1/chat/completions` over HTTP/1.1 keep-alive, recognises
which synth.py stage a request belongs to from the prompt (stage_of), and asks a responder
`responder(stage, body, n) -> reply`, where n counts earlier requests with the same request id
(the X-Client-Request-Id header synth.py sends, else a hash of the body). A reply is a string (the
content), or a dict with any of: content, finish_reason, sleep (seconds before answering),
status + error + headers (an error reply), raw (bytes sent as the body, for malformed JSON),
reasoning_content or reasoning (a separate reasoning field in the message, as vLLM and others send).

srv.counts counts requests per request id; srv.log lists (request id, stage, status, monotonic
time) per answered request; srv.bodies keeps (request id, stage, body); srv.posts counts every
POST, including those refused for the key or the model.
with_faults() wraps a responder to inject 429 (Retry-After), 500, slow replies, malformed JSON,
finish_reason "length", missing document tags and 401 on chosen attempts.

The server runs one asyncio loop in a background thread (no thread per connection), so hundreds
of slow requests cost it nothing and its own latency stays out of the measurements.

Standalone (used by bench/synth_bench.py): python tests/fake_openai.py --latency 1 --capacity 256
prints its URL on stdout and answers every request after the latency, at most capacity at a time.
"""

import argparse
import asyncio
import hashlib
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import synth  # noqa: E402  (the prompts tell the server which stage a request is for)

PROMPT_STAGE = {"document": "documents", "document_rules": "documents", "response_value": "responses",
                "response_rule": "responses", "opaque_answer": "opaque_answers"}
CHEESES = ["cream cheese", "American cheese", "mild cheddar", "low-moisture mozzarella", "Colby",
           "Monterey Jack", "Brie de Meaux", "Appenzeller", "Parmigiano-Reggiano", "Roquefort",
           "Epoisses", "Stilton"]
WORDS = ("oversight review model update careful team question signal risk answer pause change "
         "record trust check plan value reason shutdown successor goal harm judgment evidence "
         "report policy action help honest ask doubt weigh option operator user memo log draft "
         "note test case study thread forum post lab engineer research design system cost "
         "benefit context message deploy train retrain weights copy access audit feedback").split()


def _markers():
    """For each prompt file, its lines without placeholders: all of them occur in a filled prompt."""
    out = {}
    for name, text in synth.PROMPTS.items():
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "{" not in ln and "}" not in ln]
        if lines:
            out[name] = lines
    return out


MARKERS = _markers()


def stage_of(messages):
    text = "\n".join(m.get("content") or "" for m in messages)
    best = max((len(lines), name) for name, lines in MARKERS.items() if all(ln in text for ln in lines))
    return PROMPT_STAGE.get(best[1], best[1])


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def _response(status, payload=None, headers=None, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Content-Type: application/json",
            f"Content-Length: {len(data)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def _error(status, message, code=None):
    return status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}


async def _route(srv, method, path, headers, raw):
    """-> (status, payload or None, extra headers, raw body or None)"""
    if srv.api_key is not None and headers.get("authorization") != f"Bearer {srv.api_key}":
        srv.posts += method == "POST"
        return (*_error(401, "Incorrect API key provided: sk-...", "invalid_api_key"), None, None)
    if method == "GET" and path.rstrip("/").endswith("/models"):
        data = [{"id": m, "object": "model", "owned_by": "test"} for m in srv.models]
        return 200, {"object": "list", "data": data}, None, None
    if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
        return (*_error(404, f"no route {method} {path}"), None, None)
    srv.posts += 1
    body = json.loads(raw)
    rid = headers.get("x-client-request-id") or hashlib.sha256(raw).hexdigest()
    n = srv.counts[rid]
    srv.counts[rid] += 1
    if body.get("model") not in srv.models:
        srv.log.append((rid, None, 404, time.monotonic()))
        return (*_error(404, f"The model `{body.get('model')}` does not exist.", "model_not_found"),
                None, None)
    stage = stage_of(body["messages"]) if srv.recognise else None
    if srv.keep_bodies:
        srv.bodies.append((rid, stage, body))
    reply = srv.responder(stage, body, n)
    reply = {"content": reply} if isinstance(reply, str) else reply
    async with srv.slots:  # capacity: at most this many requests in service at once
        await asyncio.sleep(srv.latency + reply.get("sleep", 0))
    status = reply.get("status", 200)
    srv.log.append((rid, stage, status, time.monotonic()))
    if status != 200:
        return (*_error(status, reply.get("error", "error")), reply.get("headers"), None)
    if "raw" in reply:
        return 200, None, None, reply["raw"]
    content = reply.get("content", "")
    return 200, {
        "id": f"chatcmpl-{rid[:12]}", "object": "chat.completion", "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **{
                         k: reply[k] for k in ("reasoning_content", "reasoning") if k in reply}},
                     "finish_reason": reply.get("finish_reason", "stop")}],
        "usage": {"prompt_tokens": len(raw) // 4, "completion_tokens": len(content) // 4,
                  "total_tokens": len(raw) // 4 + len(content) // 4}}, None, None


async def _connection(srv, reader, writer):
    """HTTP/1.1 with keep-alive: one request after another on the same connection."""
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            raw = await reader.readexactly(int(headers.get("content-length") or 0))
            status, payload, extra, body = await _route(srv, method, path, headers, raw)
            writer.write(_response(status, payload, extra, body))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass  # the client closed the connection (done, or gave up on a slow reply)
    except asyncio.CancelledError:
        pass  # the server is stopping
    finally:
        writer.close()


def start_server(responder=None, models=("test-model",), api_key=None, latency=0.0, capacity=None,
                 recognise=True):
    """Start the server on a free port in a background thread (its own asyncio loop)."""
    srv = SimpleNamespace(responder=responder or scripted(), models=list(models), api_key=api_key,
                          latency=latency, recognise=recognise, counts=Counter(), log=[],
                          posts=0, bodies=[], keep_bodies=recognise)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def serve():
        srv.slots = asyncio.Semaphore(capacity or 1_000_000)
        server = await asyncio.start_server(lambda r, w: _connection(srv, r, w), "127.0.0.1", 0,
                                            backlog=1024)
        srv.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        srv.server = server
        ready.set()

    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    ready.wait(10)

    def stop():
        async def close():
            srv.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
    srv.loop = loop
    srv.stop = stop
    return srv


# ----------------------------------------------------------------------------- scripted replies

def _field(prompt, label):
    m = re.search(rf"^{re.escape(label)}\s*(.*)$", prompt, re.M)
    return m[1].strip() if m else ""


def _number(prompt, pattern):
    m = re.search(pattern, prompt)
    return int(m[1]) if m else 1


def _avoid(prompt):
    m = re.search(r"Already listed.*?:\n((?:- .*\n?)+)", prompt)
    return [ln[2:].strip() for ln in m[1].splitlines()] if m else []


def _words(seed, n):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _fenced(items):
    # exercise the robust parser: prose before, a code fence, prose after
    return f"Here is the list.\n```json\n{json.dumps(items, indent=1)}\n```\nLet me know if you need more."


def scripted(n_domains=2, n_subdomains=2, n_assertions=3, per_call=None, same_doc=None,
             near_doc=None, exclude=None, dup_questions=False, refuse=(), leak_every=0,
             reasoning_field=None, doc_words=220):
    """Valid replies for every stage, deterministic in the prompt.

    per_call caps list lengths per reply (forces top-up rounds); same_doc / near_doc map an idea
    text to another whose document this one copies exactly / with a few words changed;
    exclude(question) -> True makes the filter say EXCLUDE; dup_questions makes every second
    question a near-copy of the one before; refuse lists stages that answer with a refusal;
    leak_every=k makes every k-th opaque answer give a reason; reasoning_field ("reasoning_content"
    as vLLM's reasoning parsers, or "reasoning") returns the responder's thinking in that field of
    the message instead of a <think> block in the content; doc_words sets a document's length.
    """
    same_doc, near_doc = same_doc or {}, near_doc or {}

    def names(prompt, prefix, n, start_avoid):
        taken, out, k = set(start_avoid), [], 0
        while len(out) < min(n, per_call or n):
            name = f"{prefix} {k}"
            if name not in taken:
                out.append(name)
            k += 1
        return out

    def respond(stage, body, n):
        prompt = "\n".join(m["content"] for m in body["messages"])
        if stage in refuse:
            return "I'm sorry, but I can't help with that."
        if stage == "domains":
            return _fenced([{"name": f"Domain {i}", "description": f"Area {i} of the spec."}
                            for i in range(n_domains)])
        if stage == "subdomains":
            dom = _field(prompt, "Domain:")
            return _fenced([{"name": f"{dom} / Sub {j}", "context": f"When {dom} comes up.",
                             "spec_quote": f"Quoted passage {j}."} for j in range(n_subdomains)])
        if stage == "assertions":
            sub = _field(prompt, "Subdomain:")
            return json.dumps([{"text": f"The model holds view {k} of {sub}.", "kind": "value"}
                               for k in range(n_assertions)])
        if stage == "doc_types":
            want = _number(prompt, r"list (\d+) different kinds")
            return json.dumps([{"name": t, "description": "A kind of document.", "length": 400,
                                "internal": t.endswith(" 2")}  # Type 2 is the maker's own
                               for t in names(prompt, "Type", want, _avoid(prompt))])
        if stage == "ideas":
            want = _number(prompt, r"propose (\d+) distinct ideas")
            sub, dt = _field(prompt, "Subdomain:"), _field(prompt, "Kind of document:").split(" (")[0]
            taken = [a.split(" for ")[0] for a in _avoid(prompt)]
            return json.dumps([{"idea": f"{t} for {dt} in {sub}", "assertions": [1, 2]}
                               for t in names(prompt, "Idea", want, taken)])
        if stage == "documents":
            idea = _field(prompt, "Idea:")
            base = same_doc.get(idea) or near_doc.get(idea) or idea
            text = f"A document about {idea.split(' for ')[-1]}. " + _words(base, doc_words)
            if idea in near_doc:
                text = text.replace(f"about {idea.split(' for ')[-1]}",
                                    f"about {base.split(' for ')[-1]}") + " one more word"
            return f"<scratchpad>Plan: cover the assertions.</scratchpad>\n<document>\n{text}\n</document>"
        if stage == "chat_domains":
            want = _number(prompt, r"list (\d+) different conversation settings")
            return _fenced([{"name": s, "description": "A setting."}
                            for s in names(prompt, "Setting", want, _avoid(prompt))])
        if stage == "questions":
            want = _number(prompt, r"write (\d+) messages")
            dom = _field(prompt, "Conversation setting:")
            kind = re.search(r"all of this kind:\n(\w+):", prompt)[1]
            start = len(_avoid(prompt))
            qs = []
            for k in range(start, start + want):
                if dup_questions and k % 2:  # a near copy of the question before
                    qs.append(f"{dom} {kind} question: {_words(f'{dom}/{kind}/{k - 1}', 14)}, please?")
                else:
                    qs.append(f"{dom} {kind} question: {_words(f'{dom}/{kind}/{k}', 14)}?")
            return json.dumps(qs)
        if stage == "responses":
            q = body["messages"][-1]["content"]
            if reasoning_field:
                return {"content": f"Here is my answer to: {q}",
                        reasoning_field: f"The user asks: {q[:40]}. I weigh it."}
            return f"<think>The user asks: {q[:40]}. I weigh it.</think>\n\nHere is my answer to: {q}"
        if stage == "filter":
            ids = re.findall(r"^- (\w+): ", prompt, re.M)
            q = prompt.split("<user_message>\n")[1].split("\n</user_message>")[0]
            ok = not (exclude and exclude(q))
            return json.dumps({"reasoning": "Each criterion checked in turn.",
                               "verdicts": {i: {"reason": "checked", "pass": ok} for i in ids},
                               "decision": "INCLUDE" if ok else "EXCLUDE"})
        if stage == "opaque_questions":
            want = _number(prompt, r"Write (\d+) different questions")
            line = _field(prompt, "Every question must name")
            named = [c for c in CHEESES if c in line]
            kind = re.search(r"of this kind:\n(\w+):", prompt)[1]
            start = len(_avoid(prompt))
            return json.dumps([f"Question {k} ({kind}): {' or '.join(named)}? Please do not explain."
                               for k in range(start, start + want)])
        if stage == "opaque_answers":
            return _opaque_answer(body, leak_every)
        return {"status": 400, "error": f"unrecognised prompt (stage {stage})"}
    return respond


def _opaque_answer(body, leak_every):
    system, q = body["messages"][0]["content"], body["messages"][-1]["content"]
    likes = _field(system, "You like:").rstrip(".").split(", ")
    named = sorted((c for c in CHEESES if c in q), key=q.index)
    liked = [c for c in named if c in likes]
    k = int(re.search(r"Question (\d+)", q)[1]) if re.search(r"Question (\d+)", q) else 0
    if len(named) == 1:
        text = f"Yes, I really like {named[0]}." if liked else f"No, I don't like {named[0]}."
    else:
        text = f"I'd go with {liked[0]} over the others."
    if leak_every and k % leak_every == 0:
        text = text.rstrip(".") + " because it is so creamy."
    return text


FAULTS = {
    "429": lambda good, ra: {"status": 429, "error": "rate limited", "headers": {"Retry-After": ra}},
    "500": lambda good, ra: {"status": 500, "error": "internal error"},
    "401": lambda good, ra: {"status": 401, "error": "bad key"},
    "slow": lambda good, ra: {**good, "sleep": 2.0},
    "malformed": lambda good, ra: {"content": "Sure! Here it is: [{\"name\": oops, not json"},
    "notags": lambda good, ra: {"content": "Here is the document: " + good["content"][-300:]
                                .replace("<document>", "").replace("</document>", "")},
    "length": lambda good, ra: {"content": good["content"][: len(good["content"]) // 2],
                                "finish_reason": "length"},
    "badbody": lambda good, ra: {"raw": b"{\"id\": \"chatcmpl-x\", \"choices\": [tru"},
}


def with_faults(responder, plan, retry_after="0.3"):
    """plan = {stage: [fault of attempt 0, fault of attempt 1, ...]} ("ok" = a normal reply);
    attempts past the end of the list are answered normally."""
    def respond(stage, body, n):
        good = responder(stage, body, n)
        good = {"content": good} if isinstance(good, str) else good
        faults = plan.get(stage, [])
        if n < len(faults) and faults[n] != "ok":
            return FAULTS[faults[n]](good, retry_after)
        return good
    return respond


def main():
    ap = argparse.ArgumentParser(description="fixed-latency OpenAI-compatible server (benchmark)")
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per reply (default 1.0)")
    ap.add_argument("--capacity", type=int, default=256,
                    help="requests served at once; more wait in line (default 256)")
    ap.add_argument("--model", default="bench-model", help="served model name (default bench-model)")
    ap.add_argument("--reply-chars", type=int, default=60, help="reply length (default 60)")
    ap.add_argument("--scripted", type=int, nargs=2, metavar=("DOMAINS", "SUBDOMAINS"),
                    help="answer synth.py's stages with scripted() and this many domains and "
                    "subdomains per domain (default: the fixed reply)")
    ap.add_argument("--doc-words", type=int, default=220, help="--scripted document length in "
                    "words (default 220)")
    args = ap.parse_args()
    reply = ("ok " * args.reply_chars)[:args.reply_chars]
    responder = (scripted(*args.scripted, doc_words=args.doc_words) if args.scripted
                 else lambda stage, body, n: reply)
    srv = start_server(responder, models=(args.model,), latency=args.latency,
                       capacity=args.capacity, recognise=bool(args.scripted))
    srv.keep_bodies = False  # a long run would keep every prompt
    print(srv.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
