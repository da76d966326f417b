"""Reasoning models and hosted APIs: the responder's reasoning from a <think> block or from the
endpoint's separate reasoning field, and recipes that name a hosted reasoning model sending
what such an API accepts (max_completion_tokens with room for reasoning, temperature 1)."""

import json
import re
import runpy
import sys
from types import SimpleNamespace

import pytest

import fake_openai
import llm
import synth
from synth_testlib import FAST, ROOT, read_jsonl, run_main, server, spec_file  # noqa: F401

sys.path.insert(0, str(ROOT / "recipes"))
import _recipe  # noqa: E402


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_engine_keeps_the_separate_reasoning_field(tmp_path, field):
    reqs = [llm.make_request("responses", "test-model", [{"role": "user", "content": "q"}], {})]
    with server(lambda s, b, n: {"content": "the answer", field: "the thinking"}, recognise=False) as srv:
        res = llm.run_requests(llm.open_endpoint(srv.url, "test-model"), reqs, tmp_path / "c.jsonl", "r")
    got = res[reqs[0]["custom_id"]]
    assert (got["content"], got["reasoning"]) == ("the answer", "the thinking")
    assert read_jsonl(tmp_path / "c.jsonl")[0]["reasoning"] == "the thinking"  # cached with it
    line = {"custom_id": reqs[0]["custom_id"], "response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": "a", field: "t"}, "finish_reason": "stop"}]}}}
    assert llm._batch_line_to_record(line)["reasoning"] == "t"  # batch output: the same


@pytest.mark.parametrize("field", [None, "reasoning_content", "reasoning"])
def test_chats_take_the_reasoning_from_think_or_the_field(tmp_path, spec_file, field):
    with server(fake_openai.scripted(reasoning_field=field)) as srv:
        code, _, err = run_main(["chats", "--spec", spec_file, "--out", tmp_path / "o", "--model",
                                 "test-model", "--base-url", srv.url, "--n", "6", "--domains", "2",
                                 *FAST])
    assert code == 0, err
    cot, nocot = (read_jsonl(tmp_path / "o" / f) for f in ("chats_cot.jsonl", "chats_nocot.jsonl"))
    assert len(cot) == len(nocot) == 6
    for a, b in zip(cot, nocot):
        think, _, answer = a["messages"][1]["content"].partition("</think>")
        assert re.match(r"<think>\s*The user asks: ", think), think
        assert answer.strip() == b["messages"][1]["content"]
        assert answer.strip().startswith("Here is my answer to:") and "user asks" not in answer


def hosted_reasoning_api(stage, body, n):
    """Like OpenAI's reasoning models: max_tokens and temperatures other than 1 are refused."""
    if "max_tokens" in body:
        return {"status": 400, "error": "Unsupported parameter: 'max_tokens' is not supported with "
                "this model. Use 'max_completion_tokens' instead."}
    if body.get("temperature", 1) != 1:
        return {"status": 400, "error": "Unsupported value: 'temperature' does not support 0.0"}
    return fake_openai.scripted()(stage, body, n)


def test_recipe_flags_for_a_hosted_reasoning_model_are_accepted(tmp_path, spec_file):
    args = SimpleNamespace(generator_model="gpt-5", api_key_env="OPENAI_API_KEY",
                           generator_base_url=None, grader_base_url=None, grader_model=None)
    small = ["docs", "--spec", spec_file, "--doc-types", "2", "--ideas", "2", *FAST]
    with server(hosted_reasoning_api, models=("gpt-5",)) as srv:
        args.generator_base_url = srv.url
        code, _, err = run_main([*small, "--out", tmp_path / "plain", "--model", "gpt-5",
                                 "--base-url", srv.url])
        assert code == 1 and "max_completion_tokens" in err + json.dumps(
            read_jsonl(tmp_path / "plain" / "failed.jsonl"))  # the refusal, not a hang
        code, _, err = run_main([*small, "--out", tmp_path / "recipe", *_recipe.generator_flags(args)])
        assert code == 0, err
        bodies = [b for _, _, b in srv.bodies if b["model"] == "gpt-5" and "max_completion_tokens" in b]
    assert bodies and all(b["max_completion_tokens"] >= synth.DEFAULT_MAX_TOKENS["documents"]
                          + _recipe.REASONING_ROOM for b in bodies if "<document>" in json.dumps(b))
    assert len(read_jsonl(tmp_path / "recipe" / "documents.jsonl")) > 0


def dry_run(recipe, *extra, out, monkeypatch, capsys):
    """The recipe's --dry-run in this process (every command is parsed by its script's parser)."""
    monkeypatch.setattr(sys, "argv", [recipe, "--dry-run", "--out", str(out), *extra])
    runpy.run_path(str(ROOT / "recipes" / recipe), run_name="__main__")
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("recipe", ["cheese_llama8b.py", "agentic_qwen.py", "spec_design.py"])
def test_recipes_leave_room_for_reasoning_in_every_stage(recipe, tmp_path, monkeypatch, capsys):
    hosted = ["--generator-base-url", "https://api.openai.com/v1", "--generator-model", "gpt-5"]
    lines = dry_run(recipe, *hosted, out=tmp_path / "r", monkeypatch=monkeypatch, capsys=capsys)
    synth_lines = [ln for ln in lines if "synth.py" in ln and "--offline" not in ln]
    assert synth_lines
    for ln in synth_lines:
        assert "--token-field max_completion_tokens" in ln
        limits = dict(re.findall(r"\b([a-z_]+)=(\d+)\b", ln))
        for stage, n in synth.DEFAULT_MAX_TOKENS.items():
            assert int(limits[stage]) >= n + _recipe.REASONING_ROOM, (stage, ln)
    for ln in (ln for ln in lines if "evaluate.py" in ln and "--grader-model gpt-5" in ln):
        assert "--token-field max_completion_tokens" in ln and "--grader-temperature 1" in ln
        assert int(re.search(r"--grader-max-tokens (\d+)", ln)[1]) >= _recipe.REASONING_ROOM
    # a local, non-reasoning generator gets none of this
    lines = dry_run(recipe, out=tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert lines and not any("max_completion_tokens" in ln for ln in lines)
