"""llm.py, the endpoint engine, on its own: request ids, cache, retries, parsing, batch files
(against tests/fake_openai.py, a real local HTTP server)."""

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
