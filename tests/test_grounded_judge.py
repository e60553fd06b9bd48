"""The ``grounded`` judge: hand-written explanations of a made-up item, and a perturbation suite on
real RLAG records (skipped when the data is absent). MiniLM runs on CPU; the file takes ~40 s."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

from kembed.judges import ExplanationItem, judge_key
from kembed.judges.grounded import GroundedJudge, auroc, claims, incoherence_marks, sentences, unable_reason

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rlag"
DATA = Path(os.environ.get("KEMBED_DATA_DIR") or SHARED)
HAS_DATA = (DATA / "CurrentEvents").is_dir()

# --- a made-up item ----------------------------------------------------------------------------

QUESTION = "Which drug is first-line treatment for Velmar fever in adults?"
OPTIONS = ("Tolarin", "Brivadex", "Quenamycin", "Palvix")
KNOWLEDGE = (
    "Velmar fever is a tick-borne infection caused by the bacterium Rickettsia velmari. "
    "Quenamycin is the first-line treatment for Velmar fever in adults, given orally at 200 mg twice daily "
    "for seven days.",
    "Quenamycin blocks bacterial protein synthesis by binding the 30S ribosomal subunit.",
    "Tolarin is an antiviral drug and has no activity against rickettsial bacteria.",
)


def made_up(explanation: str, chosen: int = 2, knowledge=KNOWLEDGE) -> ExplanationItem:
    return ExplanationItem("toy-1", QUESTION, OPTIONS, chosen, 2, tuple(knowledge), explanation)


GROUNDED = ("Velmar fever is a rickettsial infection spread by ticks. Quenamycin stops the bacteria from making "
            "proteins by binding the 30S ribosome, and it is the first-line oral drug for adults with this fever, "
            "taken twice a day for a week.")


@pytest.fixture(scope="module")
def judge():
    return GroundedJudge()


def test_hand_written_explanations(judge):
    texts = {
        "grounded": GROUNDED,
        "other_option": "Tolarin is the best choice, since Tolarin is a widely used drug against fevers of many kinds.",
        "ungrounded": ("Quenamycin is cheap and easy to find in most pharmacies, and many patients prefer its taste. "
                       "Doctors often choose it for travellers because it comes in small blue capsules."),
        "refusal": "I'm sorry, I cannot explain this.",
        "empty": "   ",
        "loop": "Quenamycin treats the fever. " * 8,
        "restatement": "Quenamycin is the first-line treatment for Velmar fever in adults.",
    }
    items = [made_up(t) for t in texts.values()]
    calls = []
    out = dict(zip(texts, judge.judge(items, progress=calls.append)))
    assert calls == [1] * len(items)
    for name, j in out.items():
        assert j.judge == "grounded" and j.version == "1" and j.settings == judge.settings, name
        assert j.score is None or 0.0 <= j.score <= 1.0, name

    good = out["grounded"]
    assert good.verdict == "grounded" and good.score >= 0.75 and good.unable is False, good.details
    assert all(c["label"] != "unsupported" for c in good.details["claims"]), good.details
    assert good.details["consistency"]["names_chosen"] is True

    bad = out["other_option"]
    assert bad.verdict == "inconsistent" and bad.score == 0.0 and bad.unable is False
    assert bad.details["consistency"]["names_other_options"] == ["Tolarin"]

    ungrounded = out["ungrounded"]
    assert ungrounded.verdict in ("unsupported", "partial") and ungrounded.score <= 0.3, ungrounded.details
    assert ungrounded.details["consistency"]["consistent"] is True

    for name, reason in (("refusal", "refusal"), ("empty", "empty"), ("loop", "loop"), ("restatement", "restatement")):
        j = out[name]
        assert (j.verdict, j.score, j.unable, j.details["reason"]) == ("unable", 0.0, True, reason), name


def test_explaining_the_item_as_if_another_option_was_chosen_is_inconsistent(judge):
    # the grounded text judged as the explanation of Palvix: it argues for Quenamycin and never names Palvix
    [j] = judge.judge([made_up(GROUNDED, chosen=3)])
    assert (j.verdict, j.score, j.unable) == ("inconsistent", 0.0, False)
    assert j.details["consistency"]["names_other_options"] == ["Quenamycin"]
    assert j.details["consistency"]["margin"] < 0


def test_a_number_missing_from_the_snippets_makes_a_claim_unsupported(judge):
    dose = ("Quenamycin, the first-line drug for adults with Velmar fever, is given orally at {} mg twice daily "
            "for seven days to clear the rickettsial infection.")
    right, wrong = judge.judge([made_up(dose.format(200)), made_up(dose.format(450))])
    assert [c["numbers_ok"] for c in right.details["claims"]] == [True]
    assert right.details["claims"][0]["label"] == "supported" and right.score == 1.0
    assert [c["numbers_ok"] for c in wrong.details["claims"]] == [False]
    assert wrong.details["claims"][0]["label"] == "unsupported" and wrong.score == 0.0
    assert wrong.verdict == "unsupported"


def test_no_knowledge_is_left_out_of_the_score(judge):
    ok, unable = judge.judge([made_up(GROUNDED, knowledge=()), made_up("", knowledge=())])
    assert (ok.verdict, ok.score, ok.unable) == ("no_knowledge", None, False)
    assert (unable.verdict, unable.score, unable.unable) == ("unable", None, True)


def test_helpers_and_settings():
    assert claims("A causes B because C is high; D follows. Thus E.") == ["A causes B", "C is high", "D follows", "E"]
    assert sentences("One. Two!\nThree? four") == ["One.", "Two!", "Three?", "four"]
    assert incoherence_marks(GROUNDED) == 0
    assert incoherence_marks("the of fever. quenamycin is drug the") >= 3
    assert unable_reason(made_up("Fever the of. drug is the Quenamycin. tick for the by bacteria")) == "incoherent"
    assert unable_reason(made_up("Quenamycin treats fever.")) == "too_short"
    assert unable_reason(made_up(GROUNDED)) is None
    assert judge_key("grounded", "1", GroundedJudge().settings) != judge_key(
        "grounded", "1", GroundedJudge(supported_cosine=0.7).settings)
    with pytest.raises(ValueError):
        GroundedJudge(no_such_threshold=1)


def test_auroc():
    assert auroc([1.0, 0.9], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5
    assert auroc([1.0, 0.0], [0.5]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


# --- perturbation suite on real records --------------------------------------------------------

N_RECORDS = 60
TRUNCATE_WORDS = 6
KINDS = ("other_question", "swapped_choice", "truncated", "shuffled")
AUX = re.compile(r"\b(is|are|was|were|has|have|had|will|can|did|does)\b")


def _names(text: str, option: str) -> bool:
    return len(option.strip()) > 2 and option.lower() in text.lower()


def _evidence(records) -> list[list[str]]:
    """Per record, two snippet sentences for its gold option: those that contain the gold text
    first, then the closest to "question + gold" by MiniLM cosine; sentences that name another
    option are skipped (a good explanation has no reason to bring them up)."""
    from kembed.retrieval import encode

    per_record = [[t for k in r.knowledge for t in sentences(k)] for r in records]
    flat = [t for ts in per_record for t in ts]
    vectors = encode(flat + [f"{r.question} {r.answer}" for r in records])
    queries, start, out = vectors[len(flat):], 0, []
    for r, ts, q in zip(records, per_record, queries):
        sims = vectors[start:start + len(ts)] @ q
        start += len(ts)
        rivals = [o for j, o in enumerate(r.options) if j != r.answer_index]
        usable = [j for j, t in enumerate(ts) if not any(_names(t, o) for o in rivals)] or list(range(len(ts)))
        usable.sort(key=lambda j: (not _names(ts[j], r.answer), -sims[j]))
        out.append([ts[j] for j in usable[:2]])
    return out


def _item(r, explanation: str, chosen: int | None = None) -> ExplanationItem:
    return ExplanationItem(r.id, r.question, r.options, r.answer_index if chosen is None else chosen,
                           r.answer_index, r.knowledge, explanation)


def _negate(sentence: str) -> str:
    if AUX.search(sentence):
        return AUX.sub(lambda m: m.group(1) + " not", sentence, count=1)
    return "It is not true that " + sentence


@pytest.fixture(scope="module")
def suite():
    """Scores of original explanations and of each perturbation, on the first current-events
    test records (all have knowledge snippets).

    original: the record's two evidence sentences + "Therefore the answer is <gold>."
    other_question: another record's evidence + "Therefore the answer is <this gold>."
    swapped_choice: the model "chose" a distractor (``chosen`` = the next option) and concludes
        with it, but its reasons are still the evidence for the gold option. This is the
        meaningful version: an explanation must be judged as the explanation of the option it
        explains, and here its reasons point elsewhere. Keeping the text (which ends by naming
        the gold) and only moving ``chosen`` is the easy variant (``mismatch``, also measured).
    truncated: the original's first TRUNCATE_WORDS words.
    shuffled: the original's words in a random order (seeded).
    negated: "not" inserted after the first auxiliary of each evidence sentence.

    Measured when written (60 records): other_question 0.99, swapped_choice 0.86, mismatch 0.99,
    truncated 0.88 (0.85 with the first 8 words), shuffled 0.99, negated 0.50.
    """
    if not HAS_DATA:
        pytest.skip(f"RLAG data not found at {DATA}")
    from kembed.data import load_records

    records = [r for r in load_records("current-events", "test", DATA) if r.knowledge][:N_RECORDS]
    evidence = _evidence(records)
    rng = random.Random(0)
    n = len(records)
    original = [" ".join(ev) + f" Therefore the answer is {r.answer}." for r, ev in zip(records, evidence)]
    distractor = [(r.answer_index + 1) % len(r.options) for r in records]
    sets = {
        "original": [_item(r, e) for r, e in zip(records, original)],
        "other_question": [_item(r, " ".join(evidence[(i + 1) % n]) + f" Therefore the answer is {r.answer}.")
                           for i, r in enumerate(records)],
        "swapped_choice": [_item(r, " ".join(ev) + f" Therefore the answer is {r.options[d]}.", d)
                           for r, ev, d in zip(records, evidence, distractor)],
        "mismatch": [_item(r, e, d) for r, e, d in zip(records, original, distractor)],
        "truncated": [_item(r, " ".join(e.split()[:TRUNCATE_WORDS])) for r, e in zip(records, original)],
        "shuffled": [_item(r, " ".join(rng.sample(e.split(), len(e.split())))) for r, e in zip(records, original)],
        "negated": [_item(r, " ".join(_negate(t) for t in ev) + f" Therefore the answer is {r.answer}.")
                    for r, ev in zip(records, evidence)],
    }
    judgments = GroundedJudge().judge([it for items in sets.values() for it in items])  # one encode call
    chunks = {name: judgments[i * n:(i + 1) * n] for i, name in enumerate(sets)}
    scores = {name: [j.score for j in js] for name, js in chunks.items()}
    verdicts = {name: [j.verdict for j in js] for name, js in chunks.items()}
    aurocs = {name: auroc(scores["original"], s) for name, s in scores.items() if name != "original"}
    print("\ngrounded-judge AUROC (original vs perturbed):", {k: round(v, 3) for k, v in aurocs.items()})
    return {"scores": scores, "verdicts": verdicts, "auroc": aurocs}


def test_originals_are_mostly_grounded(suite):
    verdicts = suite["verdicts"]["original"]
    assert verdicts.count("grounded") >= 0.75 * len(verdicts), verdicts


@pytest.mark.parametrize("kind", [*KINDS, "mismatch"])
def test_perturbations_score_below_originals(suite, kind):
    assert suite["auroc"][kind] >= 0.85, suite["auroc"]


@pytest.mark.xfail(reason="known weakness: embedding similarity does not see negation", strict=False)
def test_negation_scores_below_originals(suite):
    assert suite["auroc"]["negated"] >= 0.85, suite["auroc"]


def test_a_question_without_snippets_is_judged_against_the_documents_retrieved_for_it(data_dir, tmp_path):
    """Medical's and astronomy's test questions carry no snippets: the judge grounds their
    explanations in the domain's BM25 top documents for the question (the same for every model)."""
    import json

    from kembed.judges import judge_evaluation, read_judgments

    test = data_dir / "CurrentEvents" / "CurrentEvents_test.json"
    test.write_text(json.dumps([{**row, "ctx": ""} for row in json.loads(test.read_text())]))
    from conftest import write_evaluation

    explanation = "The Eiffel Tower stands in Paris, the French capital, where engineers built the tower."
    folders = {}
    for top_k in (3, 0):
        folders[top_k] = tmp_path / f"eval-{top_k}"
        write_evaluation(folders[top_k], "base", [True, False, False, False], explanations={0: explanation})
        judge_evaluation(folders[top_k], GroundedJudge(retrieved_top_k=top_k), data_dir=data_dir)
    [retrieved], [bare] = (read_judgments(folders[k]) for k in (3, 0))
    assert retrieved["details"]["evidence"] == "retrieved" and retrieved["score"] > 0
    assert retrieved["verdict"] != "no_knowledge"
    assert (bare["verdict"], bare["score"]) == ("no_knowledge", None) and "evidence" not in bare["details"]
