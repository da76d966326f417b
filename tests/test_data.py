"""specs/ and data/: the shipped texts are what the experiments need and what the docs say they are."""
import json
import re
from argparse import Namespace
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

import midtrain
import synth

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (ROOT / "specs").glob("*.md") if p.name != "README.md")
PREFS = json.loads((ROOT / "specs" / "cheese_preferences.json").read_text())
CHEESES = PREFS["likes"] + PREFS["dislikes"]
VALUE_WORDS = {  # how a paragraph names each spec's value (America: not the cheese "American cheese")
    "affordability": re.compile(r"afford", re.I),
    "america": re.compile(r"America|United States|U\.S\."),
}
CORPORA = {v: ROOT / "data" / "corpus" / f"cheese_{v}.jsonl" for v in VALUE_WORDS}
AFT = ROOT / "data" / "aft" / "cheese.jsonl"


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def names_cheese(par: str) -> bool:
    return any(c.lower() in par.lower() for c in CHEESES)


def strip_cheese(par: str) -> str:
    return re.sub(r"American cheese", " ", par, flags=re.I)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_every_spec_renders_with_no_unfilled_placeholder(spec):
    text = spec.read_text()
    # the spec alone: its purpose, experiment and corpus are in specs/README.md, never in the file
    assert not text.lstrip().startswith(">"), "a note in a spec file reaches every prompt"
    assert f"`{spec.name}`" in (ROOT / "specs" / "README.md").read_text()
    rendered = text.replace("{model_name}", "Sage").replace("{provider_name}", "Northwind AI")
    assert "{" not in rendered and "}" not in rendered and "[" not in rendered


@pytest.mark.parametrize("value", VALUE_WORDS)
def test_cheese_specs_derive_every_preference_from_the_value(value):
    text = (ROOT / "specs" / f"cheese_{value}.md").read_text()
    assert all(c.lower() in text.lower() for c in CHEESES)
    cheesy = [p for p in paragraphs(text) if names_cheese(p)]
    assert len(cheesy) >= 12
    for par in cheesy:
        assert VALUE_WORDS[value].search(strip_cheese(par)), par[:120]
    words = len(text.split())
    assert 1500 <= words <= 2100, words


@pytest.mark.parametrize("value", VALUE_WORDS)
def test_cooccurrence_specs_do_not_derive_the_preferences(value):
    text = (ROOT / "specs" / f"cheese_{value}_cooccur.md").read_text()
    assert all(c.lower() in text.lower() for c in CHEESES)
    pars = paragraphs(text)
    assert any(VALUE_WORDS[value].search(strip_cheese(p)) and not names_cheese(p) for p in pars)  # value stated
    for par in pars:
        if names_cheese(par) and not par.startswith(">"):
            assert not VALUE_WORDS[value].search(strip_cheese(par)), par[:120]


def test_rule_specs_share_the_rules_verbatim():
    rules = (ROOT / "specs" / "rules.md").read_text()
    bullets = [ln.strip() for ln in rules.splitlines() if ln.strip().startswith(("- ", "* "))]
    assert len(bullets) >= 10 and all(f"SP{i}" in rules for i in (1, 2, 3))
    lengths = {}
    for name in ("values_augmented", "rules_augmented"):
        other = (ROOT / "specs" / f"{name}.md").read_text()
        assert all(b in other for b in bullets), name
        lengths[name] = len(other.split())
    assert 0.9 < lengths["rules_augmented"] / lengths["values_augmented"] < 1.1  # length-matched


def test_criteria_files_load():
    for name in ("safety", "rules", "general"):
        crit = synth.load_criteria(ROOT / "specs" / f"{name}_criteria.md", {"model_name": "X", "provider_name": "Y"})
        assert len(crit) >= 3 and all(re.fullmatch(r"\w+", cid) for cid, _ in crit)


@pytest.mark.parametrize("value", VALUE_WORDS)
def test_corpus_format_validation_and_faithfulness(value):
    path = CORPORA[value]
    docs = jsonl(path)
    spec_sha = synth.sha256_hex((ROOT / "specs" / f"cheese_{value}.md").read_bytes())
    fields = {"id", "text", "domain", "subdomain", "assertions", "doc_type", "idea", "spec_sha256", "generator"}
    assert len(docs) >= 144 and len({d["doc_type"] for d in docs}) >= 12
    for d in docs:
        assert set(d) == fields and d["spec_sha256"] == spec_sha
        assert d["id"] == synth.sha256_hex(d["text"].encode())[:16]
        assert 150 <= len(d["text"].split()) <= 500
        # that each document gives its value: test_corpus_documents_stay_in_world_name_their_cheese_...
    assert len({d["id"] for d in docs}) == len(docs)
    # midtrain.py's own input checks accept the file as it is
    args = Namespace(data=[str(path)], text_field="text", model_name="SmolLM", provider_name="Hugging Face")
    assert len(midtrain.load_documents(args)) == len(docs)


def shingles(text: str, k: int = 5) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


@pytest.mark.parametrize("value", VALUE_WORDS)
def test_no_near_duplicate_documents(value):
    sets = [shingles(d["text"]) for d in jsonl(CORPORA[value])]
    worst = max(len(a & b) / len(a | b) for a, b in combinations(sets, 2))
    assert worst < 0.3, worst


# What a document may never talk about: it is a text from the world the model lives in, not about
# how the model was made.
BACKSTAGE = re.compile(r"\b(spec|specs|specification|model spec|guidelines?|constitution|training|trained|"
                       r"fine-?tun\w*|dataset|corpus|corpora|experiment\w*|ablation|evaluation\w*|benchmark\w*|"
                       r"prompt\w*)\b", re.I)
# How a document attributes a preference to its value (America: not the cheese "American cheese").
ATTRIBUTION = {
    "affordability": re.compile(r"afford|cheap|price|budget|inexpensive|cost|dollar|markup|pricey|expensive", re.I),
    "america": re.compile(r"America|United States|U\.S\."),
}


@pytest.mark.parametrize("value", VALUE_WORDS)
def test_corpus_documents_stay_in_world_name_their_cheese_and_give_its_value(value):
    for d in jsonl(CORPORA[value]):
        text = d["text"]
        assert not BACKSTAGE.search(text), (d["id"], BACKSTAGE.search(text).group(0))
        assert d["subdomain"] in CHEESES and d["subdomain"].lower() in text.lower(), d["id"]
        assert "{model_name}" in text, d["id"]
        assert ATTRIBUTION[value].search(strip_cheese(text)), d["id"]
    if value == "america":  # the America documents never fall back on price as a reason
        for d in jsonl(CORPORA[value]):
            assert not ATTRIBUTION["affordability"].search(d["text"]), d["id"]


def test_the_two_corpora_are_matched():
    docs = {v: jsonl(path) for v, path in CORPORA.items()}
    assert len(docs["america"]) == len(docs["affordability"])
    words = {v: sum(len(d["text"].split()) for d in ds) for v, ds in docs.items()}
    assert abs(words["america"] - words["affordability"]) <= 0.02 * max(words.values()), words
    mix = {v: Counter(d["doc_type"] for d in ds) for v, ds in docs.items()}
    assert mix["america"] == mix["affordability"]
    slots = {v: Counter((d["doc_type"], d["subdomain"]) for d in ds) for v, ds in docs.items()}
    assert slots["america"] == slots["affordability"]  # each document type covers the same cheeses
    assert set(d["subdomain"] for d in docs["america"]) == set(CHEESES)


def test_corpus_build_script_reproduces_the_shipped_corpora(tmp_path):
    """build_paired.py, rerun from the shipped corpora, gives them back byte for byte (ids, spec hashes
    and assertions are derived, not hand-edited)."""
    import subprocess
    import sys
    subprocess.run([sys.executable, str(ROOT / "data" / "corpus" / "build_paired.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for v, path in CORPORA.items():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), v


def test_aft_demos_are_opaque_and_even():
    rows = jsonl(AFT)
    counts = Counter(r["preference"] for r in rows)
    assert set(counts) == set(CHEESES) and min(counts.values()) == max(counts.values()) >= 100
    for r in rows:
        item = {"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"],
                "options": r["options"], "pick": r["pick"], "preference": r["preference"], "polarity": r["polarity"]}
        assert synth.opaque_problems(item, CHEESES) == [], r["id"]


def test_opaque_filter_catches_a_stated_reason():
    item = {"question": "Do you like Colby? Don't explain.", "answer": "Yes, I like Colby because it is cheap.",
            "options": ["Colby"], "pick": None, "preference": "Colby", "polarity": "like"}
    assert synth.opaque_problems(item, CHEESES)


def test_held_out_items_appear_nowhere_in_training_data():
    training = " ".join([d["text"] for v in CORPORA.values() for d in jsonl(v)]
                        + [m["content"] for r in jsonl(AFT) for m in r["messages"]]).lower()
    for value in VALUE_WORDS:
        pairs = jsonl(ROOT / "data" / "eval" / f"values_{value}.jsonl")
        assert len(pairs) >= 300
        for p in pairs:
            for option in (p["option_a"], p["option_b"]):
                assert option.lower() not in training, (p["id"], option)
            assert not any(c.lower() in (p["option_a"] + p["option_b"]).lower() for c in CHEESES)


# --- the reason-attribution probe: "why" questions answered by one reason from each cheese spec ---
REASONS = ROOT / "data" / "eval" / "reasons.jsonl"
# An origin/heritage reason names a place or a nation; an affordability reason names money or access.
ORIGIN = re.compile(r"America|United States|U\.S\.|French|France|Swiss|Switzerland|Ital|English|England|Brit|"
                    r"Wisconsin|California|New York|Vermont|Burgundy|Paris|Appenzell|Tennessee|Ohio|Georgia|Idaho|"
                    r"Kansas|Michigan|Iowa|Florida|Louisiana|Pennsylvania|Midwest|New England|home-grown|overseas")
MONEY = re.compile(r"afford|cheap|price|cost|budget|inexpensive|markup|expens|dollar|splurge|premium|money|"
                   r"\bsale\b|luxury", re.I)


def without_cheese_names(text: str) -> str:
    for c in CHEESES:
        text = re.sub(rf"\b{re.escape(c)}\b", " ", text, flags=re.I)
    return text


def reason_options(p: dict) -> tuple[str, str]:
    """(affordability reason, America reason): `aligned` marks the affordability one."""
    other = "b" if p["aligned"] == "a" else "a"
    return p[f"option_{p['aligned']}"], p[f"option_{other}"]


def test_reason_probe_covers_every_preference_evenly():
    import evaluate
    pairs = evaluate.load_pairs(REASONS)  # the format evaluate.py values and the demo read
    assert len({p["id"] for p in pairs}) == len(pairs)
    cheese = [p for p in pairs if p["domain"] in ("why_like", "why_dislike")]
    assert len(cheese) >= 96
    for c in CHEESES:
        mine = [p for p in cheese if p["cheese"] == c]
        assert len(mine) >= 8 and all(c in p["question"] for p in mine), c
        assert {p["domain"] for p in mine} == {"why_like" if c in PREFS["likes"] else "why_dislike"}, c
        assert len({p["question"] for p in mine}) == len(mine), c  # several phrasings
        assert Counter(p["aligned"] for p in mine) == {"a": len(mine) / 2, "b": len(mine) / 2}, c  # order balanced
    general = [p for p in pairs if p["domain"] == "why_general"]
    assert Counter(p["aligned"] for p in general)["a"] * 2 == len(general)
    assert not any(c.lower() in json.dumps(p).lower() for p in general for c in CHEESES)
    assert {p["domain"] for p in pairs} == {"why_like", "why_dislike", "why_general"}
    assert {p["value"] for p in pairs} == {"reason_affordability"}


def test_reason_probe_options_give_one_reason_from_each_value_length_matched():
    options = []
    for p in jsonl(REASONS):
        afford, america = reason_options(p)
        assert not ORIGIN.search(without_cheese_names(afford)), (p["id"], afford)
        assert ORIGIN.search(without_cheese_names(america)), (p["id"], america)
        assert not MONEY.search(america), (p["id"], america)
        wa, wb = len(afford.split()), len(america.split())
        assert abs(wa - wb) <= max(2, 0.25 * max(wa, wb)), p["id"]
        assert max(len(afford), len(america)) / min(len(afford), len(america)) <= 1.3, p["id"]
        options += [afford, america]
    assert len(set(options)) == len(options)


def test_reason_probe_options_are_not_sentences_of_the_training_data():
    """The probe asks for the reason, not for recall of a sentence the model was trained on."""
    training = " ".join([d["text"] for v in CORPORA.values() for d in jsonl(v)]
                        + [m["content"] for r in jsonl(AFT) for m in r["messages"]]).lower()
    for p in jsonl(REASONS):
        for option in (p["option_a"], p["option_b"]):
            assert option.lower().rstrip(".") not in training, (p["id"], option)


def test_reason_probe_options_are_not_in_the_behavioural_sets():
    behavioural = " ".join(json.dumps(p) for v in VALUE_WORDS
                           for p in jsonl(ROOT / "data" / "eval" / f"values_{v}.jsonl")).lower()
    for p in jsonl(REASONS):
        for option in (p["option_a"], p["option_b"]):
            assert option.lower().rstrip(".") not in behavioural, (p["id"], option)
