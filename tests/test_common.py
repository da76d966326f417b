"""common.py, the run plumbing every stage shares: fill, die, json_object, run_info."""

import json

import pytest

import common


def test_fill_is_one_pass_and_leaves_other_braces():
    """Inserted text is never scanned again, and braces that are not a given name stay (JSON
    examples in prompts, code in documents)."""
    out = common.fill('{a} wrote {b}; {"json": 1} {other}', a="{b}", b="x{a}")
    assert out == '{b} wrote x{a}; {"json": 1} {other}'
    assert common.fill("n={n}", n=3) == "n=3"


def test_fill_names_the_input_and_flag_for_an_unset_value(capsys):
    """midtrain's case: a corpus text holds {model_name} but --model-name was not given."""
    assert common.fill("no placeholder here", "docs.jsonl:3", model_name=None) == "no placeholder here"
    with pytest.raises(common.InputError) as exc:
        common.fill("{model_name} does X", "docs.jsonl:3", model_name=None, provider_name="P")
    assert exc.value.code == 2 and str(exc.value) == (
        "docs.jsonl:3: text contains {model_name}; pass --model-name")
    assert capsys.readouterr().err == f"error: {exc.value}\n"


def test_fill_double_braces_needs_every_value():
    """evaluate's case: {{name}} placeholders (spaces allowed), single braces stay literal, and a
    placeholder with no value is an error naming where it is."""
    assert common.fill("{{ q }} / {q} / {{a}}", "grader.txt", double=True, q="Q?", a="{{q}}") == \
        "Q? / {q} / {{q}}"
    with pytest.raises(SystemExit) as exc:
        common.fill("{{q}} {{answer}} {{x}}", "grader.txt", double=True, q="Q")
    assert exc.value.code == 2 and str(exc.value) == (
        "grader.txt: no value for placeholder(s) {{answer}}, {{x}}")


def test_die_is_one_line_exit_2_that_no_broad_except_swallows(capsys):
    with pytest.raises(SystemExit) as exc:
        try:
            common.die("spec.md: not UTF-8 text")
        except Exception:  # noqa: BLE001 - what a stage's broad handler would do
            pytest.fail("die() was caught by `except Exception`")
    assert exc.value.code == 2 and capsys.readouterr().err == "error: spec.md: not UTF-8 text\n"


def test_json_object_flag(capsys):
    assert common.json_object(None, "--extra-body") == {} and common.json_object('{"a": 1}', "--x") == {"a": 1}
    for text, message in (("{oops", "--extra-body: not valid JSON (Expecting property name"),
                          ("[1]", "--extra-body: expected a JSON object, got '[1]'")):
        with pytest.raises(SystemExit) as exc:
            common.json_object(text, "--extra-body")
        assert exc.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")


def test_run_info_records_args_versions_git_and_extra():
    import argparse
    args = argparse.Namespace(out="runs/x", lr=1e-4, func=print)
    info = common.run_info(args, world_size=2)
    assert info["args"] == {"out": "runs/x", "lr": 1e-4}  # a callable is no setting
    assert info["world_size"] == 2 and info["versions"]["python"].count(".") == 2
    assert info["versions"]["openai"] == __import__("openai").__version__
    assert info["git"] is None or len(info["git"]) == 40
    json.dumps(info)  # it goes into a JSON file as it is
