"""recipes/: every experiment script runs in --dry-run (plan printed, every stage command parsed by its
own script's parser, nothing run), and the check really rejects a bad command."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@pytest.mark.parametrize("recipe,expect", [
    ("cheese_llama8b.py", ["GPU-hours", "midtrain.py", "finetune.py", "evaluate.py values", "--paper cheese"]),
    ("agentic_qwen.py", ["GPU-hours", "synth.py chats", "--init-adapter", "evaluate.py agentic", "--lora-modules"]),
    ("spec_design.py", ["GPU-hours", "specs/rules.md", "specs/values_augmented.md", "cheese_affordability_cooccur.md",
                        "--target-tokens 26970000 --tokenizer Qwen/Qwen2.5-14B-Instruct"]),  # arms token-matched
])
def test_recipe_dry_run(recipe, expect, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / recipe), "--dry-run", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in expect:
        assert needle in proc.stdout, needle
    assert "results land in" in proc.stdout and not (tmp_path / "r").exists()  # nothing was run or written


def test_dry_run_check_rejects_a_bad_flag():
    import _recipe
    _recipe.check(_recipe.py("midtrain.py", "--model", "m", "--data", "d.jsonl", "--out", "o"))
    with pytest.raises(SystemExit):
        _recipe.check(_recipe.py("midtrain.py", "--model", "m", "--data", "d.jsonl", "--out", "o", "--lora-rnk", 8))
    with pytest.raises(SystemExit):
        _recipe.check(_recipe.py("evaluate.py", "values", "--out", "o", "--scorer", "nope"))
