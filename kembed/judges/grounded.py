"""The ``grounded`` judge: checks an explanation against the question's knowledge snippets with
sentence embeddings (all-MiniLM-L6-v2 cosines, :func:`kembed.retrieval.encode`) and word overlap;
no language model, so it runs in CI.

Per explanation, in this order:

1. Unable to explain (verdict ``unable``, score 0.0, ``unable=True``), with ``details["reason"]``:
   ``empty``; ``refusal`` (a pattern of :data:`REFUSALS`: "I cannot", "I'm not sure", "I don't
   know", "as an AI", "cannot determine", "no information", "I'm sorry", ...); ``too_short``
   (fewer than ``min_content_words`` content words); ``loop`` (distinct word bigrams / all word
   bigrams < ``loop_ratio``); ``incoherent`` (at least ``incoherent_marks`` word-order marks: a
   determiner followed by another function word or by punctuation, "the of", "an is"; a
   preposition followed by an auxiliary, a conjunction, a subject pronoun or punctuation, "of
   is"; a sentence starting with a lower-case letter; common abbreviations such as "e.g." are
   skipped); ``restatement`` (a share >= ``restatement`` of its content words occur in the
   question or the chosen option).
2. Records without knowledge snippets (medical's and astronomy's test splits have none): with
   ``retrieved_top_k`` > 0 (default 3) :func:`kembed.judges.judge_evaluation` hands the judge the
   top documents a BM25 search of the domain's index returns for the question instead
   (``details["evidence"] = "retrieved"``), the same documents for every model, and the steps
   below check the claims against them: a kembed departure (the RLAG paper judges with GPT-4 and
   no reference), so that rationality is measured on every domain. With ``retrieved_top_k`` 0, or
   when the search finds nothing: verdict ``no_knowledge``, score None, ``unable=False`` (an
   explanation that fails step 1 keeps verdict ``unable`` and ``unable=True``, but its score is
   None too). Callers leave score None out of the score's denominator: without a reference there
   is nothing to ground the claims in, and the unable rate stays measurable.
3. Claims: the text split into sentences (at ., ! or ? followed by whitespace, and at newlines),
   and sentences into clauses at "because", "therefore", "thus", "since", "so that" and ";".
   A claim is dropped when it has fewer than 2 content words, restates the question (a share >=
   ``question_overlap`` of its content words occur in the question), or only states the choice
   (the same share of them occur in the chosen option: "Therefore the answer is X" is the
   conclusion, not a reason). The kept claims are the explanation's *reasons*.
4. Consistency (else verdict ``inconsistent``, score 0.0, ``unable=False``); all three must hold:

   a. no claim (kept or dropped) names another option without also naming the chosen one
      (case-insensitive whole-phrase match; options of <= 2 characters, options without content
      words such as "None of the above", and options found inside the chosen one are ignored);
   b. ``margin`` = cosine(explanation, chosen option) - max cosine(explanation, other option),
      each option embedded alone: > ``consistency_margin`` when the explanation does not name the
      chosen option (it must be closer to it than to every other), > -``named_tolerance`` when it
      does (naming it is the stronger evidence; the margin only vetoes a clear pull elsewhere);
   c. the reasons (kept claims joined; the whole text when none is kept) name the chosen option,
      or their margin is > -``reasons_tolerance`` (reasons that clearly point to another option,
      while the conclusion names the chosen one, are inconsistent).
5. Support of each reason: the snippets are split into sentences the same way (not into
   clauses); ``cosine`` = the best MiniLM cosine between the claim and any snippet sentence;
   ``overlap`` = the share of the claim's content words found in that best-cosine sentence (one
   piece of evidence, not words gathered from many sentences); ``numbers_ok`` = every number in
   the claim (digit runs such as years and doses; thousands separators removed) occurs in the
   snippets or in the question. ``supported`` (1.0) when numbers_ok and (cosine >= ``supported_cosine`` or
   (cosine >= ``supported_cosine_low`` and overlap >= ``supported_overlap``)); ``weak`` (0.5)
   when numbers_ok and (cosine >= ``weak_cosine`` or overlap >= ``weak_overlap``); else
   ``unsupported`` (0.0).
6. Score of a consistent explanation = mean support of its reasons (0.0 when none is left); verdict
   ``grounded`` when score >= ``grounded_at``, ``partial`` when >= ``partial_at``, else
   ``unsupported``.

Words: lower-cased ``[a-z0-9]+`` runs (an apostrophe suffix such as "'s" dropped); content words
are those outside :data:`STOP_WORDS` (a small English list plus meta words such as "answer",
"option", "correct") and single letters, with a plural "s" removed from words longer than 3
letters (not "ss", "us", "is").

Calibration of the defaults (RLAG data, MiniLM on CPU):

- Claim support, on 22 hand-written paraphrases of real snippet sentences (current-events test,
  medical train) against 22 fluent claims on the same topics that the snippets do not state:
  paraphrases reach cosine 0.37-0.91 (median 0.78), the unstated claims 0.06-0.74 (median 0.42);
  content-word overlap medians 0.70 vs 0.17. With supported = cosine >= 0.65 or (cosine >= 0.5
  and overlap >= 0.5) and weak = cosine >= 0.45 or overlap >= 0.5, paraphrases average 0.95
  support (20 supported, 2 weak) and unstated claims 0.32 (4 supported, 6 weak); the looser
  0.6 / 0.45 / 0.5 / 0.4 / 0.4 gave 0.95 vs 0.41.
- Consistency, on 162 current-events test records (original explanation = the two snippet
  sentences that best support the gold option + "Therefore the answer is <gold>"; the test
  suite's builder) and 60 medical train records: the embedding margin alone is noisy (23 % of
  the current-events and 32 % of the medical originals have margin <= 0; date and number options
  embed almost alike), so verbatim naming comes first and the margins only veto. Each option is
  embedded alone: "question + option" separated slightly better on current-events (margin AUROC,
  original vs the same text judged for a distractor: 0.97 vs 0.95) but collapses on medical
  vignettes (MiniLM reads 256 word pieces, so all options embed alike). The tolerances were
  scanned (named 0.05-0.15, reasons 0.07-0.3 and off) for the best AUROC of the "swapped
  choice" perturbation (reasons for the gold, conclusion and ``chosen`` a distractor) that
  keeps correct explanations consistent: with 0.1 / 0.2, 3 of 162 current-events and 7 of 60
  medical originals are inconsistent, and swapped-choice AUROC is 0.88 and 0.75 (0.85 and 0.68
  without the reasons check; reasons of swapped explanations reach margin <= -0.2 in 49 of 162
  and 24 of 60 cases, originals' reasons that do not name the gold in 2 of 57 and 7 of 48).
- Word order: MiniLM cosines and word overlap cannot see shuffled words (shuffled paraphrases
  score like the paraphrases), hence the ``incoherent`` marks: 158 of the 162 current-events
  originals have no mark and 4 one (medical: 58 and 2 of 60); with their words shuffled, 151
  of 162 (57 of 60) have two or more.
- Perturbation AUROCs (original vs perturbed scores) with these defaults, current-events 162 /
  medical 60: another question's snippets 0.99 / 0.94, swapped choice 0.88 / 0.75, same text
  judged for a distractor 0.99 / 0.94, first 6 words 0.90 / 0.92, shuffled words 0.99 / 0.94,
  negation inserted 0.50 / 0.50: negation is a known blind spot ("X is not Y" embeds like "X is
  Y"). The tests (tests/test_grounded_judge.py) recompute them on 60 current-events records.
  These thresholds were chosen on data that includes those 60 records, so the tests guard
  against regressions; they are not an independent validation.
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
    "incoherent_marks": 2,
    "restatement": 0.9,
    "question_overlap": 0.8,
    "supported_cosine": 0.65,
    "supported_cosine_low": 0.5,
    "supported_overlap": 0.5,
    "weak_cosine": 0.45,
    "weak_overlap": 0.5,
    "consistency_margin": 0.0,
    "named_tolerance": 0.1,
    "reasons_tolerance": 0.2,
    "grounded_at": 0.75,
    "partial_at": 0.25,
    "retrieved_top_k": 3,
}

STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be been before being below between both
but by can could did do does doing done down during each either few for from further had has have having he
her here hers herself him himself his how however i if in into is it its itself just let me more most my
myself no nor not of off on once only or other our ours ourselves out over own same she should so some such
than that the their theirs them themselves then there these they this those through to too under until up
upon very was we were what when where which while who whom whose why will with within without would yet you
your yours yourself yourselves may might must shall one ones thus therefore hence because since
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
_ABBREVIATIONS = re.compile(r"\b(?:e\.g|i\.e|vs|etc|cf|al|approx|ca|no|fig|dr|mr|mrs|ms|st)\.", re.IGNORECASE)
# word-order marks (see the module docstring); "A" is left out: it is also an option label
_DETERMINERS = {"the", "The", "a", "an", "An", "its", "Its", "their", "Their", "our", "your", "my"}
_PREPOSITIONS = {"of", "in", "on", "at", "to", "for", "with", "by", "from", "into", "about", "between", "during"}
_AUXILIARIES = {"is", "are", "was", "were", "has", "had", "will", "would", "can", "could", "does", "did",
                "should", "may", "might", "must"}
_CONJUNCTIONS = {"and", "or", "but", "because", "therefore", "thus", "so"}
_PRONOUNS = {"he", "she", "they", "we"}
_PUNCTUATION = {".", "!", "?", ";", ":", ","}


def _words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (apostrophe suffixes such as "'s" dropped)."""
    return [w.split("'")[0] for w in _WORD.findall(text.lower().replace("\u2019", "'"))]


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")) else word


def content_words(text: str) -> list[str]:
    """The content words of ``text`` in order, repeats kept: its words outside
    :data:`STOP_WORDS` and single letters, with a plural "s" removed."""
    return [_stem(w) for w in _words(text) if w not in STOP_WORDS and not (len(w) == 1 and w.isalpha())]


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (at ., ! or ? followed by whitespace, and at newlines),
    stripped, empty ones removed."""
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def claims(text: str) -> list[str]:
    """``text`` split into sentences, and those into clauses at "because", "therefore", "thus",
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


def _names_option(text: str, option: str) -> bool:
    """Whether ``text`` contains ``option`` as a whole phrase (case and spacing ignored)."""
    phrase = " ".join(option.lower().split())
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", " ".join(text.lower().split())) is not None


def incoherence_marks(text: str) -> int:
    """Word-order marks of ``text`` (a count >= 0): determiners followed by a function word or
    punctuation, prepositions followed by an auxiliary, conjunction, subject pronoun or
    punctuation, and sentences that start with a lower-case letter. Fluent English has ~0;
    shuffled words have several."""
    text = _ABBREVIATIONS.sub(" ", text.replace("\u2019", "'"))
    tokens = re.findall(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[.!?;:,]", text)
    marks = 0
    for a, b in zip(tokens, tokens[1:] + ["."]):
        low = b.lower()
        if a in _DETERMINERS:
            marks += (low in _DETERMINERS or low in _PREPOSITIONS or low in _AUXILIARIES or low in _CONJUNCTIONS
                      or low in _PRONOUNS or low in {"that", "which"} or b in _PUNCTUATION)
        elif a in _PREPOSITIONS:
            marks += low in _AUXILIARIES or low in _CONJUNCTIONS or low in _PRONOUNS or b in _PUNCTUATION
    return marks + len(re.findall(r"[.!?]\s+[a-z]", text))


def unable_reason(item: ExplanationItem, settings: dict | None = None) -> str | None:
    """Why ``item``'s explanation is unable to explain its answer (``"empty"``, ``"refusal"``,
    ``"too_short"``, ``"loop"``, ``"incoherent"``, ``"restatement"``; first that applies), or None.
    Thresholds from ``settings`` (missing ones from :data:`DEFAULTS`)."""
    s = {**DEFAULTS, **(settings or {})}
    text = item.explanation.strip()
    if not text:
        return "empty"
    if REFUSALS.search(text.replace("\u2019", "'")):
        return "refusal"
    words = content_words(text)
    if len(words) < s["min_content_words"]:
        return "too_short"
    all_words = _words(text)
    bigrams = list(zip(all_words, all_words[1:]))
    if bigrams and len(set(bigrams)) / len(bigrams) < s["loop_ratio"]:
        return "loop"
    if incoherence_marks(text) >= s["incoherent_marks"]:
        return "incoherent"
    given = set(content_words(item.question)) | set(content_words(item.options[item.chosen]))
    if _share(words, given) >= s["restatement"]:
        return "restatement"
    return None


class GroundedJudge:
    """Judges explanations against the knowledge snippets with MiniLM cosines and word overlap.

    The procedure, verdicts (``unable``, ``no_knowledge``, ``inconsistent``, ``unsupported``,
    ``partial``, ``grounded``) and the calibration of the defaults are in the module docstring.

    Args (keyword only; all of them are kept in ``settings``, so
    :func:`~kembed.judges.judge_key` changes with them):
        min_content_words: fewer content words is ``unable`` (default 5).
        loop_ratio: distinct / all word bigrams below this is a loop, ``unable`` (0.5).
        incoherent_marks: this many word-order marks or more is ``unable`` (2).
        restatement: share of content words found in question + chosen option at or above which
            the explanation is a bare restatement, ``unable`` (0.9).
        question_overlap: share of a claim's content words found in the question (or in the
            chosen option) at or above which the claim is dropped as a restatement (0.8).
        supported_cosine, supported_cosine_low, supported_overlap: a claim is supported when
            cosine >= supported_cosine (0.65), or cosine >= supported_cosine_low (0.5) and
            overlap >= supported_overlap (0.5).
        weak_cosine, weak_overlap: otherwise weak when cosine >= weak_cosine (0.45) or overlap
            >= weak_overlap (0.5).
        consistency_margin: an explanation that does not name its chosen option must be closer
            to it than to any other option by more than this (cosine difference; 0.0).
        named_tolerance: one that names it may be closer to another option by less than this
            (0.1).
        reasons_tolerance: reasons that do not name the chosen option may be closer to another
            option by less than this (0.2).
        grounded_at, partial_at: score thresholds of the ``grounded`` (0.75) and ``partial``
            (0.25) verdicts.
        retrieved_top_k: a question without knowledge snippets is judged against this many
            documents retrieved for it (3; 0: verdict ``no_knowledge``); read by
            :func:`kembed.judges.judge_evaluation`, which loads the items.

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

        Every text needed (explanations, options, claims, snippet sentences; each distinct text
        once) is embedded in one batched :func:`kembed.retrieval.encode` call. ``progress``
        (optional) is called with 1 after each item.

        Raises:
            KembedError: the MiniLM weights are not installed (:func:`kembed.retrieval.encode`).
        """
        from kembed.retrieval import encode

        s = self.settings
        texts: dict[str, int] = {}

        def slot(text: str) -> int:
            return texts.setdefault(text, len(texts))

        plans = []
        for item in items:
            plan = {"reason": unable_reason(item, s)}
            if plan["reason"] is None and item.knowledge:
                question = set(content_words(item.question))
                choice = set(content_words(item.options[item.chosen]))
                every = claims(item.explanation)
                kept = [c for c in every if len(content_words(c)) >= 2
                        and _share(content_words(c), question) < s["question_overlap"]
                        and _share(content_words(c), choice) < s["question_overlap"]]
                reasons = " ".join(kept) or item.explanation
                plan.update(every=every, reasons=(reasons, slot(reasons)), explanation=slot(item.explanation),
                            options=[slot(o) for o in item.options], claims=[(c, slot(c)) for c in kept],
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
            if item.evidence != "snippets":
                details = {**details, "evidence": item.evidence}
            return Judgment(item.id, self.name, self.version, dict(s), verdict, score, unable, details)

        if plan["reason"] is not None:
            return make("unable", 0.0 if item.knowledge else None, True, {"reason": plan["reason"]})
        if not item.knowledge:
            return make("no_knowledge", None, False, {})

        chosen = item.options[item.chosen]
        reasons, reasons_slot = plan["reasons"]

        def margin(vector) -> float:
            cos = [float(vectors[i] @ vector) for i in plan["options"]]
            return cos[item.chosen] - max((c for j, c in enumerate(cos) if j != item.chosen), default=-1.0)

        m_expl, m_reasons = margin(vectors[plan["explanation"]]), margin(vectors[reasons_slot])
        rivals = [o for j, o in enumerate(item.options) if j != item.chosen and len(o.strip()) > 2
                  and content_words(o) and o.strip().lower() not in chosen.lower()]
        named = sorted({o for c in plan["every"] if not _names_option(c, chosen)
                        for o in rivals if _names_option(c, o)})
        names_expl, names_reasons = _names_option(item.explanation, chosen), _names_option(reasons, chosen)
        consistent = (not named
                      and (m_expl > -s["named_tolerance"] if names_expl else m_expl > s["consistency_margin"])
                      and (names_reasons or m_reasons > -s["reasons_tolerance"]))
        consistency = {"margin": round(m_expl, 4), "reasons_margin": round(m_reasons, 4), "names_chosen": names_expl,
                       "reasons_name_chosen": names_reasons, "names_other_options": named, "consistent": consistent}

        allowed_numbers = _numbers(" ".join(item.knowledge)) | _numbers(item.question)
        sentence_vectors = vectors[[i for _, i in plan["sentences"]]] if plan["sentences"] else None
        rows = []
        for claim, i in plan["claims"]:
            cos, overlap, best = 0.0, 0.0, ""
            if sentence_vectors is not None:
                sims = sentence_vectors @ vectors[i]
                j = int(sims.argmax())
                cos, best = float(sims[j]), plan["sentences"][j][0]
                overlap = _share(content_words(claim), set(content_words(best)))
            numbers_ok = _numbers(claim) <= allowed_numbers
            if numbers_ok and (cos >= s["supported_cosine"]
                               or (cos >= s["supported_cosine_low"] and overlap >= s["supported_overlap"])):
                label, support = "supported", 1.0
            elif numbers_ok and (cos >= s["weak_cosine"] or overlap >= s["weak_overlap"]):
                label, support = "weak", 0.5
            else:
                label, support = "unsupported", 0.0
            rows.append({"claim": claim, "cosine": round(cos, 4), "overlap": round(overlap, 4),
                         "numbers_ok": numbers_ok, "label": label, "support": support, "evidence": best})
        support = sum(r["support"] for r in rows) / len(rows) if rows else 0.0
        details = {"claims": rows, "support": support, "consistency": consistency}
        if not consistent:
            return make("inconsistent", 0.0, False, details)
        verdict = ("grounded" if support >= s["grounded_at"] else "partial" if support >= s["partial_at"]
                   else "unsupported")
        return make(verdict, support, False, details)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve in [0, 1]: the probability that a random ``positives`` score
    (e.g. an original explanation's) is above a random ``negatives`` score (a perturbed one's),
    ties counting 0.5. Pure Python, O(len(positives) * len(negatives)).

    Raises:
        ValueError: either list is empty.
    """
    if not positives or not negatives:
        raise ValueError("auroc needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
