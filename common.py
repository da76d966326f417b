"""
common.py: the run plumbing every stage script shares (synth.py, midtrain.py, finetune.py,
evaluate.py): one error style for bad input (die: one `error:` line that names the input, exit 2),
one placeholder filler (fill), one JSON-object flag check, one atomic JSONL writer and one record
of how a run was made (run_info). Nothing here talks to a model or an endpoint.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

class InputError(SystemExit):
    """Bad input, raised by die(): exits with status 2 when nothing catches it (a SystemExit, so
    no `except Exception` swallows it); str() is the message."""

    def __init__(self, msg):
        super().__init__(2)
        self.msg = msg

    def __str__(self):
        return self.msg


def die(msg):
    """The project's one error style for bad input: prints "error: MSG" (one line that names the
    input: a file, a flag, a record) and exits 2. Used by every stage and by llm.py's endpoint probe."""
    print(f"error: {msg}", file=sys.stderr)
    raise InputError(msg)


PLACEHOLDER = {False: re.compile(r"\{(\w+)\}"), True: re.compile(r"\{\{\s*(\w+)\s*\}\}")}


def fill(template, where="template", double=False, **values):
    """Fill the placeholders {name} (double=True: {{name}}) whose name is in values, in one pass:
    inserted text is never scanned again (a spec or a model reply may hold braces). Other braces
    stay as they are (JSON examples in prompts, code in documents).

    Errors name `where`: a value of None means a flag that was not given, so a placeholder whose
    value is None ends the run naming that flag (midtrain: {model_name} in a corpus without
    --model-name); with double=True, a syntax nothing else uses, a placeholder with no value at
    all is an error too (evaluate's data files). Used by synth.py (prompts, the spec, criteria,
    templates), midtrain.py (corpus texts) and evaluate.py (eval prompts)."""
    unset, unknown = set(), set()

    def one(m):
        if m[1] not in values:
            unknown.add(m[0])
            return m[0]
        if values[m[1]] is None:
            unset.add(m[1])
            return m[0]
        return str(values[m[1]])
    out = PLACEHOLDER[double].sub(one, template)
    if unset:
        die(f"{where}: text contains {{{min(unset)}}}; pass --{min(unset).replace('_', '-')}")
    if double and unknown:
        die(f"{where}: no value for placeholder(s) {', '.join(sorted(unknown))}")
    return out


def json_object(text, flag):
    """A flag's JSON object (None or "" -> {}), or die naming the flag. Used by synth.py
    (--extra-body) and evaluate.py (--*-extra-body, --chat-template-kwargs)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        die(f"{flag}: not valid JSON ({exc.msg})")
    if not isinstance(value, dict):
        die(f"{flag}: expected a JSON object, got {text!r}")
    return value


def write_jsonl(path, rows):
    """Write a whole output file atomically (a kill never leaves a half-written output)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def git_hash(root=None):
    """The checkout's commit, or None outside a git checkout."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Versions worth knowing to rerun a run: the pinned packages that shape its outputs.
RUN_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "datasets", "openai", "datasketch")


def run_info(args, **extra):
    """What a run folder records about how it was made: the flags (API keys are never flags, only
    the names of their variables), the command line, the package versions, the git commit, the
    python version and the time; extra adds a stage's own facts. Every stage writes it: synth.py
    as OUT/run.json, midtrain.py and finetune.py in each checkpoint, evaluate.py as config.json."""
    from importlib import metadata
    versions = {"python": sys.version.split()[0]}
    for name in RUN_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"args": {k: v for k, v in vars(args).items() if not callable(v)}, "argv": sys.argv,
            "versions": versions, "git": git_hash(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra}
