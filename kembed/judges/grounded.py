"""The ``grounded`` judge: checks an explanation against the question's knowledge snippets with
sentence embeddings and word overlap, no language model (it runs in CI).

Per explanation, in this order:

1. Unable to explain (verdict ``unable``, score 0.0, ``unable=True``): the text is empty; it has
   fewer than ``min_content_words`` content words (words outside the built-in stop-word list
   :data:`STOP_WORDS`, which also holds the meta words "answer", "option", "correct", ...); it
   matches a refusal pattern (:data:`REFUSALS`: "I cannot", "I'm not sure", "I don't know",
   "as an AI", "cannot determine", "no information", ...); it loops (distinct word bigrams /
   all word bigrams < ``loop_ratio``); or it only restates the choice (a share >=
   ``restatement`` of its content words occur in the question or the chosen option).
2. Records with no knowledge snippets: verdict ``no_knowledge``, score None, ``unable=False``
   (an unable explanation of such a record keeps verdict ``unable`` and ``unable=True`` but also
   gets score None). Score None is left out of the score's denominator by the caller: without
   snippets there is nothing to ground the claims in.
3. Consistency: the explanation's embedding must be closer (cosine) to the chosen option's
   than to every other option's (margin > ``consistency_margin``; options are embedded as
   ``"<question> <option>"``, see Calibration), and the explanation must not name another
   option verbatim (case-insensitive whole-phrase match; options of <= 2 characters, options
   without content words such as "None of the above", and options that occur inside the chosen
   one are ignored). Otherwise verdict ``inconsistent``, score 0.0, ``unable=False``.
4. Claims: the text is split into sentences, and sentences into clauses at "because",
   "therefore", "thus", "since", "so that" and ";". A claim is dropped when it has fewer than 2
   content words or restates the question: a share >= ``question_overlap`` of its content words
   occur in the question or the chosen option (so "Therefore the answer is X." is a conclusion,
   not a claim to check).
5. Support of each claim: the snippets are split into sentences the same way (not into
   clauses); ``cosine`` = the best all-MiniLM-L6-v2 cosine between the claim and any snippet
   sentence; ``overlap`` = the share of the claim's content words found in that best-cosine
   sentence (one piece of evidence, not words gathered over many sentences); ``numbers_ok`` =
   every number in the claim (digit runs such as years and doses, thousands separators removed)
   occurs in the snippets or the question. A claim is ``supported`` (1.0) when numbers_ok and
   (cosine >= ``supported_cosine`` or (cosine >= ``supported_cosine_low`` and overlap >=
   ``supported_overlap``)); ``weak`` (0.5) when numbers_ok and (cosine >= ``weak_cosine`` or
   overlap >= ``weak_overlap``); else ``unsupported`` (0.0).
6. Score = mean claim support of a consistent explanation (0 when no claim is left); verdict
   ``grounded`` when score >= ``grounded_at``, ``partial`` when >= ``partial_at``, else
   ``unsupported``.

Words: lower-cased ``[a-z0-9]+`` runs (apostrophe suffixes dropped); for matching, a trailing
plural "s" is removed from words longer than 3 letters (not "ss"/"us"/"is").

Calibration (defaults; measured on the RLAG data, see the tests' perturbation suite):
CALIBRATION_NOTES
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kembed.judges import ExplanationItem, Judgment

NAME = "grounded"
VERSION = "1"

DEFAULTS = {
    "min_content_words": 5,
    "loop_ratio": 0.5,
    "restatement": 0.9,
    "question_overlap": 0.8,
    "supported_cosine": 0.6,
    "supported_cosine_low": 0.45,
    "supported_overlap": 0.5,
    "weak_cosine": 0.4,
    "weak_overlap": 0.4,
    "consistency_margin": 0.0,
    "option_text": "option",
    "ordered_overlap": True,
    "grounded_at": 0.75,
    "partial_at": 0.25,
}

STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be been before being below between both
but by can could did do does doing done down during each either few for from further had has have having he
her here hers herself him himself his how however i if in into is it its itself just let me more most my
myself no nor not of off on once only or other our ours ourselves out over own same she should so some such
than that the their theirs them themselves then there these they this those through to too under until up
upon very was we were what when where which while who whom whose why will with within without would yet you
your yours yourself yourselves may might must shall one ones which thus therefore hence because since
answer answers option options choice choices correct question questions
""".split())

REFUSALS = re.compile(
    r"\bi (?:cannot|can't|can ?not|am unable|'m unable|am not able|'m not able)\b"
    r"|\bi(?: am|'m) not (?:sure|certain)\b|\bi (?:don't|do not) know\b|\bas an ai\b"
    r"|\bcannot (?:be )?determined?\b|\bno information\b|\b(?:not enough|insufficient) information\b"
    r"|\bi(?:'m| am) sorry\b|\bi apologi[sz]e\b|\bunable to (?:explain|determine|answer|provide)\b",
    re.IGNORECASE)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE = re.compile(r"\b(?:because|therefore|thus|since|so that)\b|;", re.IGNORECASE)


def _words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (apostrophe suffixes such as "'s" dropped)."""
    return [w.split("'")[0] for w in _WORD.findall(text.lower().replace("\u2019", "'"))]


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")) else word


def content_words(text: str) -> list[str]:
    """The content words of ``text``: its words outside :data:`STOP_WORDS` and single letters,
    plural "s" removed, in order (repeats kept)."""
    return [_stem(w) for w in _words(text) if w not in STOP_WORDS and not (len(w) == 1 and w.isalpha())]


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (at ., ! or ? followed by space, and at newlines), stripped,
    empty ones removed."""
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def claims(text: str) -> list[str]:
    """``text`` split into sentences and then into clauses at "because", "therefore", "thus",
    "since", "so that" and ";" (stripped of surrounding punctuation, empty ones removed)."""
    out = []
    for sentence in sentences(text):
        for part in _CLAUSE.split(sentence):
            part = part.strip(" ,.:;!?-\u2013\u2014")
            if part:
                out.append(part)
    return out


def _share(words: Sequence[str], vocabulary: set[str]) -> float:
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0


def _ordered_share(words: Sequence[str], reference: Sequence[str]) -> float:
    """Share of ``words`` found in ``reference`` in the same order (longest common subsequence)."""
    if not words or not reference:
        return 0.0
    row = [0] * (len(reference) + 1)
    for w in words:
        prev = 0
        for j, r in enumerate(reference):
            prev, row[j + 1] = row[j + 1], prev + 1 if w == r else max(row[j + 1], row[j])
    return row[-1] / len(words)


def _names_option(text: str, option: str) -> bool:
    phrase = " ".join(option.lower().split())
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", " ".join(text.lower().split())) is not None


def unable_reason(item: ExplanationItem, settings: dict | None = None) -> str | None:
    """Why ``item``'s explanation is unable to explain (``"empty"``, ``"too_short"``,
    ``"refusal"``, ``"loop"``, ``"restatement"``), or None when it is not; thresholds from
    ``settings`` (default :data:`DEFAULTS`)."""
    s = {**DEFAULTS, **(settings or {})}
    text = item.explanation.strip()
    if not text:
        return "empty"
    words = content_words(text)
    if len(words) < s["min_content_words"]:
        return "too_short"
    if REFUSALS.search(text.replace("\u2019", "'")):
        return "refusal"
    all_words = _words(text)
    bigrams = list(zip(all_words, all_words[1:]))
    if bigrams and len(set(bigrams)) / len(bigrams) < s["loop_ratio"]:
        return "loop"
    given = set(content_words(item.question)) | set(content_words(item.options[item.chosen]))
    if _share(words, given) >= s["restatement"]:
        return "restatement"
    return None


class GroundedJudge:
    """Judges explanations against the knowledge snippets with MiniLM embeddings and word overlap.

    See the module docstring for the procedure, the verdicts and the calibration of the defaults.

    Args (keyword only; every one is recorded in ``settings``, so :func:`~kembed.judges.judge_key`
    changes with them):
        min_content_words: fewer content words than this is ``unable`` (default 5).
        loop_ratio: distinct / all word bigrams below this is a loop, ``unable`` (0.5).
        restatement: share of content words in question + chosen option at or above which the
            explanation is a bare restatement, ``unable`` (0.9).
        question_overlap: share of a claim's content words in question + chosen option at or
            above which the claim is dropped (0.8).
        supported_cosine, supported_cosine_low, supported_overlap: a claim is supported when
            cosine >= supported_cosine (0.6), or cosine >= supported_cosine_low (0.45) and
            overlap >= supported_overlap (0.5).
        weak_cosine, weak_overlap: otherwise weak when cosine >= weak_cosine (0.4) or overlap >=
            weak_overlap (0.4).
        consistency_margin: cosine(explanation, chosen) - max cosine(explanation, other option)
            must exceed this (0.0).
        grounded_at, partial_at: score thresholds of the ``grounded`` (0.75) and ``partial``
            (0.25) verdicts.

    Raises:
        ValueError: an unknown setting name.
    """

    name = NAME
    version = VERSION

    def __init__(self, **settings):
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown grounded-judge settings: {', '.join(sorted(unknown))}")
        self.settings = {**DEFAULTS, **settings}

    def judge(self, items: list[ExplanationItem], progress=None) -> list[Judgment]:
        """One judgment per item, in order.

        All texts (explanations, options, claims, snippet sentences; duplicates once) are embedded
        in one batched :func:`kembed.retrieval.encode` call; ``progress`` (optional) is called
        with 1 after each item.

        Raises:
            KembedError: the MiniLM weights are not installed (see :func:`kembed.retrieval.encode`).
        """
        from kembed.retrieval import encode

        s = self.settings
        plans = []
        texts: dict[str, int] = {}

        def slot(text: str) -> int:
            return texts.setdefault(text, len(texts))

        for item in items:
            plan = {"reason": unable_reason(item, s)}
            if plan["reason"] is None and item.knowledge:
                given = set(content_words(item.question)) | set(content_words(item.options[item.chosen]))
                every = claims(item.explanation)
                kept = [c for c in every
                        if len(content_words(c)) >= 2 and _share(content_words(c), given) < s["question_overlap"]]
                evidence = " ".join(kept) or item.explanation
                option_texts = [o if s["option_text"] == "option" else f"{item.question} {o}" for o in item.options]
                plan.update(
                    every=every, evidence=(evidence, slot(evidence)),
                    options=[slot(t) for t in option_texts],
                    claims=[(c, slot(c)) for c in kept],
                    sentences=[(t, slot(t)) for k in item.knowledge for t in sentences(k)])
            plans.append(plan)
        vectors = encode(list(texts))
        out = []
        for item, plan in zip(items, plans):
            out.append(self._judgment(item, plan, vectors))
            if progress is not None:
                progress(1)
        return out

    def _judgment(self, item: ExplanationItem, plan: dict, vectors) -> Judgment:
        s = self.settings

        def make(verdict, score, unable, details):
            return Judgment(item.id, self.name, self.version, dict(s), verdict, score, unable, details)

        if plan["reason"] is not None:
            return make("unable", 0.0 if item.knowledge else None, True, {"reason": plan["reason"]})
        if not item.knowledge:
            return make("no_knowledge", None, False, {})
        # consistency: the evidence points to the chosen option, no claim argues for another one
        chosen = item.options[item.chosen]
        evidence, e = plan["evidence"]
        option_cos = [float(vectors[i] @ vectors[e]) for i in plan["options"]]
        others = [c for j, c in enumerate(option_cos) if j != item.chosen]
        margin = option_cos[item.chosen] - max(others) if others else 1.0
        rivals = [o for j, o in enumerate(item.options) if j != item.chosen and len(o.strip()) > 2
                  and content_words(o) and o.strip().lower() not in chosen.lower()]
        named = sorted({o for c in plan["every"] if not _names_option(c, chosen)
                        for o in rivals if _names_option(c, o)})
        names_chosen = _names_option(evidence, chosen)
        consistency = {"option_cosines": [round(c, 4) for c in option_cos], "margin": round(margin, 4),
                       "evidence_names_chosen": names_chosen, "names_other_options": named}
        # claims
        allowed_numbers = _numbers(" ".join(item.knowledge)) | _numbers(item.question)
        sent_vecs = vectors[[i for _, i in plan["sentences"]]] if plan["sentences"] else None
        claim_rows = []
        for claim, i in plan["claims"]:
            words = content_words(claim)
            if sent_vecs is None:
                cos, overlap, best = 0.0, 0.0, ""
            else:
                sims = sent_vecs @ vectors[i]
                j = int(sims.argmax())
                cos, best = float(sims[j]), plan["sentences"][j][0]
                overlap = (_ordered_share(words, content_words(best)) if s["ordered_overlap"]
                           else _share(words, set(content_words(best))))
            numbers_ok = _numbers(claim) <= allowed_numbers
            if numbers_ok and (cos >= s["supported_cosine"]
                               or (cos >= s["supported_cosine_low"] and overlap >= s["supported_overlap"])):
                label, support = "supported", 1.0
            elif numbers_ok and (cos >= s["weak_cosine"] or overlap >= s["weak_overlap"]):
                label, support = "weak", 0.5
            else:
                label, support = "unsupported", 0.0
            claim_rows.append({"claim": claim, "cosine": round(cos, 4), "overlap": round(overlap, 4),
                               "numbers_ok": numbers_ok, "label": label, "support": support, "evidence": best})
        support = sum(r["support"] for r in claim_rows) / len(claim_rows) if claim_rows else 0.0
        details = {"claims": claim_rows, "support": support, "consistency": consistency}
        if named or not (names_chosen or margin > s["consistency_margin"]):
            return make("inconsistent", 0.0, False, details)
        verdict = ("grounded" if support >= s["grounded_at"] else "partial" if support >= s["partial_at"]
                   else "unsupported")
        return make(verdict, support, False, details)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random ``positives`` score (e.g. an
    original explanation's) is above a random ``negatives`` score (a perturbed one's), ties
    counting 0.5. Pure Python, O(n*m).

    Raises:
        ValueError: either list is empty.
    """
    if not positives or not negatives:
        raise ValueError("auroc needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
