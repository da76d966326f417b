"""demo.py without the model: recipe and run-folder choices, fixed evaluation pairs, seed statistics, report."""
import json
from pathlib import Path

import pytest

import demo


def test_recipes_variants_and_run_folders():
    name, recipe, out = demo.resolve_recipe(demo.parse_args([]))
    assert (name, recipe["seeds"], out.name) == ("full", 2, "demo")
    name, recipe, out = demo.resolve_recipe(demo.parse_args(["--quick"]))
    assert (name, recipe["seeds"], out.name) == ("quick", 1, "demo-quick")
    name, recipe, out = demo.resolve_recipe(demo.parse_args(["--long", "--msm-epochs", "4", "--msm-lr", "1e-3",
                                                             "--seeds", "3"]))
    assert name == "long" and out.name == "demo-long-ep4-lr0.001"
    assert (recipe["msm_epochs"], recipe["msm_lr"], recipe["msm_docs"], recipe["seeds"]) == (4, 1e-3, 0, 3)
    # a value equal to the recipe's own is not a variant
    assert demo.resolve_recipe(demo.parse_args(["--msm-docs", "100"]))[2].name == "demo"
    assert demo.resolve_recipe(demo.parse_args(["--out", "elsewhere", "--msm-docs", "50"]))[2].name == "elsewhere"


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--msm-epochs", "0"], ["--msm-lr", "-1"], ["--msm-docs", "-2"],
                                  ["--quick", "--long"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_run_folder_refuses_adapters_trained_with_other_settings(tmp_path, capsys):
    full, long = demo.RECIPES["full"], demo.RECIPES["long"]
    demo.check_run_folder(tmp_path, full, fresh=False)
    demo.check_run_folder(tmp_path, {**full, "seeds": 5, "pairs": 7}, fresh=False)  # seeds, eval sizes: fine
    with pytest.raises(SystemExit) as e:
        demo.check_run_folder(tmp_path, long, fresh=False)
    assert e.value.code == 2 and "msm_epochs: 1.0 -> 3.0" in capsys.readouterr().err
    demo.check_run_folder(tmp_path, long, fresh=True)  # --fresh redoes it under the new settings
    assert json.loads((tmp_path / "recipe.json").read_text())["msm_epochs"] == 3.0
    assert set(json.loads((tmp_path / "recipe.json").read_text())["data_sha256"]) == set(demo.TRAINING_DATA)


def test_evaluation_pairs_are_fixed_and_cover_the_probe():
    full = demo.eval_sets(demo.RECIPES["full"])
    assert full == demo.eval_sets({**demo.RECIPES["full"], "msm_epochs": 9})  # nothing seeded by training
    assert list(full) == list(demo.SETS)
    assert (len(full["reasons"]), len(full["reasons_general"]), len(full["cheese"])) == (96, 12, 36)
    assert len(full["affordability"]) == len(full["america"]) == 120
    quick = demo.eval_sets(demo.RECIPES["quick"])
    assert (len(quick["reasons"]), len(quick["reasons_general"]), len(quick["affordability"])) == (24, 6, 12)
    assert {p["id"] for p in quick["reasons"]} <= {p["id"] for p in full["reasons"]}


def fake_results(shifts: dict, n_pairs: int = 4) -> dict:
    """Base p(aligned) 0.5 on every pair; arm rows shifted by shifts[arm][seed] (the same for every set)."""
    def rows(shift):
        return {k: [{"id": f"{k}-{i}", "domain": k, "p_aligned": 0.5 + shift + (0.01 if i % 2 else -0.01) * bool(shift),
                     "p_aligned_orders": [0.5, 0.5], "p_letter_a": 0.5, "chosen": shift > 0} for i in range(n_pairs)]
                for k in demo.SETS}
    seeds = sorted({s for per in shifts.values() for s in per})
    return {"base": rows(0.0), "seeds": {s: {arm: rows(shifts[arm][s]) for arm in demo.ARMS[1:]} for s in seeds}}


def test_seed_statistics_use_the_spread_across_seeds():
    shifts = {arm: {0: 0.1, 1: 0.3} for arm in demo.ARMS[1:]}
    shifts["MSM(America)"] = {0: -0.2, 1: -0.2}
    stats = demo.seed_stats(fake_results(shifts))
    s = stats["AFT only"]["reasons"]
    assert s["changes"] == pytest.approx([0.1, 0.3]) and s["change_mean"] == pytest.approx(0.2)
    assert s["change_se_across_seeds"] == pytest.approx(0.1)  # sd 0.1414 / sqrt 2
    assert stats["MSM(America)"]["america"]["change_se_across_seeds"] == pytest.approx(0.0)
    assert all(se > 0 for se in s["change_se_within_pairs"])
    one = demo.seed_stats(fake_results({arm: {0: 0.05} for arm in demo.ARMS[1:]}))
    assert one["AFT only"]["cheese"]["change_se_across_seeds"] is None


def test_paired_delta_refuses_different_pairs():
    with pytest.raises(ValueError):
        demo.paired_delta([{"id": "x", "p_aligned": 0.6}], [{"id": "y", "p_aligned": 0.5}])


def test_report_writes_table_json_and_chart(tmp_path):
    shifts = {arm: {0: 0.1, 1: 0.3} for arm in demo.ARMS[1:]}
    demo.report(fake_results(shifts), {**demo.RECIPES["full"]}, "full", tmp_path, 600.0, 7)
    table = (tmp_path / "results.md").read_text()
    assert "reason probe: p(affordability reason): change vs base" in table
    assert "| AFT only | +0.200 ± 0.100 |" in table and "3 of 10 training stages reused" in table
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["recipe"]["msm_epochs"] == 1.0 and summary["seeds"] == [0, 1] and summary["minutes"] == 10.0
    assert summary["arms"]["MSM(afford)"]["reasons_general"]["changes"] == pytest.approx([0.1, 0.3])
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_scores_are_reused_only_for_the_same_pairs(tmp_path, monkeypatch):
    import evaluate
    sets = {k: v[:2] for k, v in demo.eval_sets(demo.RECIPES["quick"]).items()}
    calls = []

    def fake_run(cmd, **kw):  # evaluate.py values, without the model: checks the flags, writes its rows
        args = evaluate.parse_args(cmd[2:])
        pairs = evaluate.load_pairs(args.pairs)
        calls.append(len(pairs))
        rows = [{"id": p["id"], "domain": p["domain"], "p_aligned": 0.5, "pair": p} for p in pairs]
        (Path(args.out) / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    cache = tmp_path / "arm"
    first = demo.score_arm("model", None, sets, cache, stale=False, desc="base")
    assert len(calls) == len(demo.SETS) and [r["id"] for r in first["cheese"]] == [p["id"] for p in sets["cheese"]]
    assert first["cheese"][0]["p_aligned"] == 0.5 and "pair" not in first["cheese"][0]
    assert demo.score_arm("model", None, sets, cache, stale=False, desc="base") == first and len(calls) == 5
    sets["reasons"] = sets["reasons"][:1]  # other pairs for one set: only that set is scored again
    demo.score_arm("model", None, sets, cache, stale=False, desc="base")
    assert calls[5:] == [1]
    demo.score_arm("model", None, sets, cache, stale=True, desc="base")  # a retrained arm: everything again
    assert len(calls) == 11


def test_training_precision_is_bf16_only_where_it_is_fast(monkeypatch):
    import torch

    import midtrain
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(midtrain, "cpu_has_bf16", lambda native=native: native)
        assert demo.resolve_recipe(demo.parse_args([]))[1]["dtype"] == want
    assert demo.resolve_recipe(demo.parse_args(["--dtype", "bf16"]))[1]["dtype"] == "bf16"
    assert "dtype" in demo.training_settings(demo.resolve_recipe(demo.parse_args([]))[1])  # part of recipe.json
