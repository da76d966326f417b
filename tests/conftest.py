"""Shared fixtures: a tiny random model (built in-process, nothing downloaded) and a tiny corpus."""
import json
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets are imported (trap 5)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import _WORDS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a 2-layer Llama-style model (~100k parameters) with a byte-level BPE and ChatML."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


def write_docs(path: Path, n: int = 60, seed: int = 0, extra: dict | None = None) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"text": text, "domain": f"d{i % 3}", **(extra or {})}) + "\n")
    return path


@pytest.fixture()
def docs(tmp_path) -> Path:
    """60 JSON-lines documents in the paper's released-corpus shape ({text, domain})."""
    return write_docs(tmp_path / "docs.jsonl")
