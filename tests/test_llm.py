"""llm.py, the endpoint engine, on its own: request ids, cache, retries, parsing, batch files
(against tests/fake_openai.py, a real local HTTP server)."""

import json

import pytest

import llm
from synth_testlib import read_jsonl, server


def test_run_requests_api_for_evaluate(tmp_path):
    """The small API evaluate.py uses: validate retries, cache, failed_path."""
    def responder(stage, body, n):
        text = body["messages"][0]["content"]
        if text == "boom":
            return {"status": 400, "error": "bad request"}
        return "no grade here" if n == 0 else f"GRADE {text[1:]}"

    def grade(result):
        if not result["content"].startswith("GRADE"):
            raise ValueError("no grade")
        return int(result["content"].split()[1])
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)] + [
        [{"role": "user", "content": "boom"}]]
    reqs = [llm.make_request("grade", "test-model", m, {"temperature": 0.0}) for m in msgs]
    with server(responder, recognise=False) as srv:
        srv.keep_bodies = False
        ep = llm.open_endpoint(srv.url, "test-model", retry_base_delay=0.01)
        res = llm.run_requests(ep, reqs, tmp_path / "c.jsonl", "grade", grade, concurrency=4,
                               max_retries=2, failed_path=tmp_path / "failed.jsonl")
        assert [res[r["custom_id"]]["value"] for r in reqs[:5]] == [0, 1, 2, 3, 4]
        assert reqs[5]["custom_id"] not in res
        assert all(srv.counts[r["custom_id"]] == 2 for r in reqs[:5])  # bad reply, then retried
        failed = read_jsonl(tmp_path / "failed.jsonl")
        assert failed[0]["reason"].startswith("HTTP 400") and failed[0]["attempts"] == 1
        posts = srv.posts
        again = llm.run_requests(ep, reqs[:5], tmp_path / "c.jsonl", "grade", grade)
        assert srv.posts == posts and {k: v["value"] for k, v in again.items()} == {
            k: v["value"] for k, v in res.items()}
        assert ep["stats"]["cached"] == 5 and ep["stats"]["retries"] == 5


def test_request_ids_are_deterministic():
    m = [{"role": "user", "content": "hello"}]
    a = llm.make_request("documents", "m", m, {"temperature": 1.0, "max_tokens": 10})
    assert a == llm.make_request("documents", "m", m, {"max_tokens": 10, "temperature": 1.0})
    others = [llm.make_request("documents", "m", m, {"temperature": 1.0, "max_tokens": 10}, 1),
              llm.make_request("ideas", "m", m, {"temperature": 1.0, "max_tokens": 10}),
              llm.make_request("documents", "m2", m, {"temperature": 1.0, "max_tokens": 10}),
              llm.make_request("documents", "m", m, {"temperature": 0.7, "max_tokens": 10})]
    assert len({a["custom_id"], *(o["custom_id"] for o in others)}) == 5
    assert a["body"] == {"model": "m", "messages": m, "temperature": 1.0, "max_tokens": 10}


@pytest.mark.parametrize("text,expected", [
    ('[{"a": 1}]', [{"a": 1}]),
    ('Sure!\n```json\n[1, 2]\n```\nAnything else?', [1, 2]),
    ('<think>maybe [3]?</think>\nHere: {"x": [1]} -- done.', {"x": [1]}),
    ('The list [of things] follows: ["a", "b"] and that is all.', ["a", "b"]),
])
def test_parse_json_is_robust(text, expected):
    assert llm.parse_json(text) == expected


def reqs_for(n, stage="grade", chars=0):
    return [llm.make_request(stage, "test-model", [{"role": "user", "content": f"q{i} " + "x" * chars}],
                             {"temperature": 0.0}) for i in range(n)]


def test_batch_file_is_split_by_bytes_and_by_lines(tmp_path):
    """Hosted batch APIs refuse files over 200 MB or 50,000 lines: parts stay under both limits,
    together hold every pending request once, and a later smaller write removes stale parts."""
    reqs = reqs_for(10, chars=300)  # each line ~470 bytes
    line_bytes = [len((json.dumps(r, ensure_ascii=False) + "\n").encode()) for r in reqs]
    path = tmp_path / "pending.jsonl"
    ep = llm.open_endpoint("http://127.0.0.1:9/v1", "test-model", batch_file=path,
                           batch_max_bytes=3 * max(line_bytes), batch_max_lines=2)
    with pytest.raises(SystemExit) as exc:  # no server: batch mode calls nothing, not even /models
        llm.run_requests(ep, reqs, tmp_path / "c.jsonl", "grade")
    assert exc.value.code == 0 and not path.exists()
    parts = sorted(tmp_path.glob("pending.part*.jsonl"))
    assert len(parts) == 5 and all(len(read_jsonl(p)) == 2 for p in parts)
    ep["batch_max_lines"] = 50_000  # now bytes decide: 3 lines per part
    with pytest.raises(SystemExit):
        llm.run_requests(ep, reqs, tmp_path / "c.jsonl", "grade")
    parts = sorted(tmp_path.glob("pending.part*.jsonl"))
    assert [len(read_jsonl(p)) for p in parts] == [3, 3, 3, 1]
    assert all(p.stat().st_size <= ep["batch_max_bytes"] for p in parts)
    assert sorted(r["custom_id"] for p in parts for r in read_jsonl(p)) == sorted(
        r["custom_id"] for r in reqs)
    ep["batch_max_bytes"] = 10**9
    with pytest.raises(SystemExit):
        llm.run_requests(ep, reqs, tmp_path / "c.jsonl", "grade")
    assert len(read_jsonl(path)) == 10 and not list(tmp_path.glob("pending.part*"))


def test_requests_are_drawn_lazily_and_results_read_from_the_cache(tmp_path):
    """Memory stays bounded: a generator of requests is consumed only as workers free up, and the
    returned mapping holds byte offsets into the cache file, not the replies."""
    drawn, seen_at_call = [0], []

    def gen(n):
        for r in reqs_for(n):
            drawn[0] += 1
            yield r

    def responder(stage, body, n):
        seen_at_call.append(drawn[0])
        return "reply to " + body["messages"][0]["content"]
    with server(responder, recognise=False) as srv:
        srv.keep_bodies = False
        ep = llm.open_endpoint(srv.url, "test-model")
        res = llm.run_requests(ep, gen(40), tmp_path / "c.jsonl", "grade", concurrency=4)
    assert len(res) == 40 and sorted(seen_at_call)[-1] == 40
    # when the server saw its k-th request, at most k + concurrency requests had been made
    assert all(d <= k + 4 for k, d in enumerate(sorted(seen_at_call), 1))
    assert all(isinstance(v, int) for v in res.offsets.values())
    assert {res[cid]["value"] for cid in res} == {f"reply to q{i} " for i in range(40)}
    # a rerun finds all 40 in the cache by offset and sends nothing
    again = llm.run_requests(ep, gen(40), tmp_path / "c.jsonl", "grade")
    assert dict(again.offsets) == dict(res.offsets) and ep["stats"]["calls"] == 40


def test_sampling_for_token_field_and_extra_body():
    assert llm.sampling_for(1.0, 100) == {"temperature": 1.0, "max_tokens": 100}
    s = llm.sampling_for(0.7, 50, "max_completion_tokens", {"temperature": 0.2, "top_k": 5}, seed=3)
    assert s == {"temperature": 0.2, "max_completion_tokens": 50, "top_k": 5, "seed": 3}
