"""The comparison protocol: same knowledge for every method (no test snippet leaks in under
``knowledge: records``), taught / untaught splits, results over training seeds."""

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kembed.results import (ModelEntry, across_domains_table, collect, method_ranking, seed_rationality, seed_summary,
                            verdict_table)
from kembed.data import TAUGHT, UNTAUGHT, answer_knowledge, knowledge_coverage, load_records, training_sample
from kembed.train import TrainContext

REAL_DATA = Path(os.environ.get("KEMBED_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/datasets/rlag")


def _norm(text):
    return " ".join(text.split())


class _Log:
    def __init__(self):
        self.events = []

    def log(self, event, **fields):
        self.events.append((event, fields))


def context(records, knowledge="records", domain="current-events", data_dir=None):
    """Just enough of a TrainContext for its knowledge readers."""
    ctx = SimpleNamespace(config=SimpleNamespace(knowledge=knowledge, domain=domain, data_dir=data_dir),
                          records=records, run=_Log(), _knowledge_logged=-1)
    ctx.knowledge_documents = lambda: TrainContext.knowledge_documents(ctx)
    ctx.knowledge_index = lambda kind: TrainContext.knowledge_index(ctx, kind)
    return ctx


@pytest.mark.skipif(not (REAL_DATA / "CurrentEvents").is_dir(), reason="RLAG data not found")
def test_records_knowledge_never_shows_a_test_snippet_outside_the_training_records(tmp_path, monkeypatch):
    from kembed.methods import raft

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))  # the BM25 index of the documents
    sample = training_sample(load_records("current-events", "train", REAL_DATA), limit=120, validation=100, seed=42)
    trained = {_norm(z) for r in sample.train for z in r.knowledge}
    test_only = {_norm(z) for r in load_records("current-events", "test", REAL_DATA) for z in r.knowledge} - trained
    assert len(test_only) > 100  # the check has something to find
    ctx = context(sample.train, data_dir=str(REAL_DATA))
    documents = ctx.knowledge_documents()  # CPT's corpus, RAFT's pool, SimRAG's Stage-II documents
    assert ctx.run.events[0][0] == "knowledge" and ctx.run.events[0][1]["documents"] == len(documents)

    def leaks(text):  # a test-only snippet as the document, or inside it (passages, not titles like "FDP")
        text = _norm(text)
        return [z for z in test_only if z == text or (len(z) >= 40 and z in text)]

    assert not any(leaks(d) for d in documents)
    cfg = raft.Config(k=4, p=0.8, distractors="retrieved", index="bm25")
    examples = raft.build_examples(sample.train, cfg, documents, 42, ctx.knowledge_index("bm25"))
    assert not any(leaks(d) for e in examples for d in e["documents"])
    assert sum(e["answer_distractors_replaced"] for e in examples) > 0  # there were answer-bearing candidates
    # the knowledge base, as the papers read it, does hold test snippets: the setting is what keeps them out
    ctx = context(sample.train, knowledge="knowledge-base", data_dir=str(REAL_DATA))
    assert any(leaks(d) for d in ctx.knowledge_documents())


@pytest.mark.skipif(not (REAL_DATA / "CurrentEvents").is_dir(), reason="RLAG data not found")
def test_taught_classes_count_what_data_coverage_counts():
    sample = training_sample(load_records("current-events", "train", REAL_DATA), limit=120, validation=100, seed=42)
    test = load_records("current-events", "test", REAL_DATA)
    classes = answer_knowledge(sample.train, test)
    coverage = knowledge_coverage(sample.train, test)
    assert sum(k == TAUGHT for k in classes.values()) == coverage["answer_covered"] > 0
    assert sum(k != "no-answer-snippet" for k in classes.values()) == coverage["answer_in_snippets"]
    assert sum(k == UNTAUGHT for k in classes.values()) > 0


def write_eval(folder, correct, classes=None, scores=None):
    """An evaluation folder with ``correct[i]`` for question ``q{i}``; ``scores``: question index
    -> the grounded judge's score of its explanation."""
    folder.mkdir(parents=True)
    if scores:
        (folder / "judgments.jsonl").write_text("".join(json.dumps(
            {"id": f"q{i}", "judge": "grounded", "version": "1", "settings": {}, "verdict": "partial",
             "score": v, "unable": False, "details": {}}) + "\n" for i, v in scores.items()))
    rows = []
    for i, ok in enumerate(correct):
        row = {"id": f"q{i}", "correct": {"token_mean": ok}}
        if classes:
            row["knowledge"] = classes[i]
        rows.append(row)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps(
        {"n": len(rows), "accuracy": {"token_mean": sum(correct) / len(correct)}, "ci95": {"token_mean": [0, 1]},
         "mode": "closed-book", "format": "raw", "domain": "d", "split": "test"}))
    return folder


def test_seed_summary_and_taught_split_over_fake_evaluations(tmp_path):
    rng = random.Random(0)
    n = 60
    classes = [TAUGHT if i < 30 else UNTAUGHT for i in range(n)]
    base = [i % 5 == 0 for i in range(n)]  # 20% everywhere
    models = [ModelEntry("d", "base", None, None, "m", None, {"closed-book-raw": write_eval(tmp_path / "base", base)})]
    for seed in (1, 2, 3):  # a method that learns the taught questions, not the others
        correct = [(i < 30 and rng.random() < 0.8) or (i >= 30 and base[i]) for i in range(n)]
        models.append(ModelEntry("d", f"rlag (seed {seed})", "rlag", seed, "m", None,
                                 {"closed-book-raw": write_eval(tmp_path / f"rlag-{seed}", correct, classes)}))
    models.append(ModelEntry("d", "sft", "sft", 1, "m", None,
                             {"closed-book-raw": write_eval(tmp_path / "sft", base, classes)}))
    rows = collect(models)
    base_row = rows[0]["evals"]["closed-book-raw"]
    assert base_row["by_knowledge"][TAUGHT]["n"] == 30  # the base model is split by the runs' classes
    summary = {e["method"]: e for e in seed_summary(rows, ["closed-book-raw"])}
    rlag = summary["rlag"]
    assert rlag["seeds"] == 3 and rlag["sd"] > 0 and rlag["ci95"][0] > 0
    assert rlag["taught"]["n"] == 30 and rlag["taught"]["ci95"][0] > 0.2
    assert rlag["untaught"]["diff"] == 0 and rlag["untaught"]["ci95"] == [0.0, 0.0]
    assert summary["sft"]["diff"] == 0
    ranking = method_ranking(rows, "closed-book-raw")
    assert ranking == [{"domain": "d", "a": "rlag", "b": "sft", "diff": pytest.approx(rlag["diff"]),
                        "ci95": ranking[0]["ci95"], "decided": True}]


def test_method_ranking_lists_every_pair_once():
    from kembed.results import outcomes

    n = 40
    accuracy = {None: 0.2, "low": 0.1, "high": 0.9, "mid": 0.5}  # the first method loses to the next
    rows = [{"domain": "d", "name": m or "base", "method": m,
             "evals": {"closed-book-raw": {"outcomes": outcomes({f"q{i:02d}": i < acc * n for i in range(n)})}}}
            for m, acc in accuracy.items()]
    ranking = method_ranking(rows, "closed-book-raw")
    assert sorted((e["a"], e["b"]) for e in ranking) == [("high", "low"), ("high", "mid"), ("mid", "low")]
    assert all(e["diff"] > 0 and e["decided"] for e in ranking)


def invoke(*args):
    from typer.testing import CliRunner

    from kembed.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_tune_selection_never_reads_test(data_dir, tiny_model_dir, tmp_path):
    args = ["tune", "sft", f"model={tiny_model_dir}", "limit=4", "validation=2", "precision=fp32", "train.batch_size=2",
            "sft.epochs=1", "--lr-scales", "1,300"]
    first = invoke(*args, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    # poison the test split: every gold answer moves to another option
    path = data_dir / "CurrentEvents" / "CurrentEvents_test.json"
    rows = json.loads(path.read_text())
    for r in rows:
        labels = list(r["options"])
        r["answer_idx"] = labels[(labels.index(r["answer_idx"]) + 1) % len(labels)]
        r["answer"] = r["options"][r["answer_idx"]]
    path.write_text(json.dumps(rows))
    second = invoke(*args, "--out", tmp_path / "b")
    assert second.exit_code == 0, second.output
    a, b = (json.loads((tmp_path / x / "current-events" / "sft-tune.json").read_text()) for x in "ab")
    assert len(a["scores"]) == 2 and all(s["score"] is not None and s["n"] == 2 for s in a["scores"])
    assert a["scores"] == b["scores"] and a["selected"] == b["selected"]
    assert a["scores"][0]["label"] == "lr x1, epochs x1"  # the recipe's own configuration first
    assert "train.learning_rate=" in " ".join(a["overrides"])


def test_a_suite_with_a_tune_block_trains_the_selection_for_test(data_dir, tiny_model_dir, tmp_path):
    from kembed.bench import load_suite, plan
    from kembed.tune import GridPoint, select, summary_lines

    suite = tmp_path / "tuned.yaml"
    suite.write_text(json.dumps({
        "name": "tuned", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft", "cpt-sft"],
        "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2"]},
        "tune": {"lr_scales": [0.5, 1], "epoch_scales": [1, 2]}}))
    steps, models = plan(load_suite(str(suite)), tmp_path / "runs", seeds=2)
    tune = [s for s in steps if s.label.startswith("tune ")]
    assert len(tune) == 2 * 4  # the same grid shape for every method
    cpt_sft = [s.argv() for s in tune if "cpt-sft" in s.label]
    assert any("cpt-sft.cpt.epochs=4.0" in a and "cpt-sft.sft.epochs=6.0" in a for a in cpt_sft)  # every epochs field
    trains = [s for s in steps if s.label.endswith(": train") and not s.label.startswith("tune ")]
    assert all(set(s.needs) and set(s.needs) <= {t.label for t in tune} for s in trains)
    # ties go to the recipe's configuration, then the cheaper one
    points = [GridPoint("lr x1, epochs x1", [], 1, 1), GridPoint("lr x0.5, epochs x1", [], 0.5, 1)]
    score = {"score": 0.5, "n": 2, "ids": ["a", "b"], "correct": ["a"], "validation": 0.5}
    assert select(points, [score, dict(score)])["selected"] == "lr x1, epochs x1"
    # a selection at the end of the grid says so
    better = {**score, "score": 1.0, "correct": ["a", "b"]}
    at_edge = select(points, [score, better])
    assert at_edge["edge"] == ["smallest learning rate"] and select(points, [better, score])["edge"] == ["largest learning rate"]
    assert "the grid's smallest learning rate" in "\n".join(summary_lines("sft", at_edge))
    assert select(points + [GridPoint("lr x2, epochs x1", [], 2, 1)], [better, score, score])["edge"] == []


def test_the_test_run_that_tuning_already_trained_is_copied_not_trained_again(data_dir, tiny_model_dir, tmp_path):
    """Seed 42 on the tuning domain is the selected configuration's own run: the bench copies
    it. Trained again, the same configuration gives the same weights, bit for bit."""
    import filecmp
    import subprocess

    import yaml

    from safetensors.torch import load_file

    from kembed.bench import load_suite, plan
    from kembed.schedule import expected

    suite = tmp_path / "tuned.yaml"
    suite.write_text(json.dumps({
        "name": "tuned", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft"],
        "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2", "precision=fp32",
                              "train.batch_size=2", "sft.epochs=1"]},
        "tune": {"lr_scales": [1, 300], "epoch_scales": [1]}}))
    steps, models = plan(load_suite(str(suite)), tmp_path / "runs", seeds=2)
    first, second = (next(s for s in steps if s.label == f"current-events sft (seed {k}): train") for k in (42, 43))
    # --plan expects no training time for the copy, and the recorded time for the other seed
    took = expected(steps, {second.label: 60.0, first.label: 60.0}, ["current-events"])
    assert first.copies_tuning and not second.copies_tuning and (took[first.label], took[second.label]) == (0, 60)
    for step in steps:
        if step.label.startswith("tune "):
            subprocess.run(step.argv(), check=True, capture_output=True)
    assert "--output" in second.argv() and "seed=43" in second.argv()  # another seed trains
    subprocess.run(first.argv(), check=True, capture_output=True)
    run = next(m.run for m in models if m.seed == 42)
    source = Path(json.loads((run / "reused-from.json").read_text())["run"])
    selected = dict(o.split("=") for o in models[1].tuning()["overrides"])
    assert first.done() and source.parts[-3] == "tune" and source.name.startswith("sft-")
    assert filecmp.cmp(run / "model" / "model.safetensors", source / "model" / "model.safetensors", shallow=False)
    assert (source / "config.yaml").read_text() == (run / "config.yaml").read_text()
    trained_lr = yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"]
    assert trained_lr == float(selected["train.learning_rate"])  # the selection, whichever it was
    # what the step would have trained: the same weights
    again = tmp_path / "again"
    argv = [a if a != str(models[2].run) else str(again) for a in second.argv()]
    subprocess.run([a if a != "seed=43" else "seed=42" for a in argv], check=True, capture_output=True)
    trained, copied = load_file(again / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert trained.keys() == copied.keys() and all(torch.equal(trained[k], copied[k]) for k in trained)


def test_a_later_session_reuses_the_tuning_configurations_a_report_holds(data_dir, tiny_model_dir, tmp_path):
    from kembed.bench import earlier_tuning, load_suite, plan, tuning_section, write_report

    suite = tmp_path / "tuned.yaml"
    suite.write_text(json.dumps({
        "name": "tuned", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft", "cpt-sft"],
        "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2"]},
        "tune": {"lr_scales": [0.5, 1], "epoch_scales": [1]}}))
    spec = load_suite(str(suite))
    steps, models = plan(spec, tmp_path / "a", seeds=1)
    # session 1 finishes both sft configurations and one of cpt-sft's, then its machine is gone
    finished = [s for s in steps if s.label.startswith("tune ") and "cpt-sft (lr x0.5" not in s.label]
    assert len(finished) == 3
    for step in finished:
        run = Path(step.argv()[step.argv().index("--output") + 1])
        run.mkdir(parents=True)
        right = ["q1"] if "(lr x0.5" in step.label else ["q1", "q2"]
        (run / "metrics.jsonl").write_text(json.dumps({
            "event": "iteration_end", "dev_correct_ids": right, "dev_taught": {"ids": ["q1", "q2"], "n": 2},
            "dev_accuracy": {"token_mean": len(right) / 3}}) + "\n" + json.dumps({"event": "end"}) + "\n")
    tuning = tuning_section(models)
    assert tuning["cpt-sft"]["points"]["lr x0.5, epochs x1"] is None
    assert tuning["sft"]["selection"]["selected"] == "lr x1, epochs x1"
    write_report(spec, [], [], tmp_path / "results", [], tuning=tuning)
    report = tmp_path / "results" / "results.json"
    assert "No configuration" not in (tmp_path / "results" / "results.md").read_text()
    assert "so far: 1 of 2 configurations not scored" in (tmp_path / "results" / "results.md").read_text()

    tuned = earlier_tuning(report, spec)
    assert set(tuned["sft"]["points"]) == {"lr x1, epochs x1", "lr x0.5, epochs x1"}
    assert set(tuned["cpt-sft"]["points"]) == {"lr x1, epochs x1"}  # the configuration not scored runs again
    commit = json.loads(report.read_text())["commit"]
    steps, models = plan(spec, tmp_path / "b", seeds=1, carried_tuning=tuned)
    assert [s.label for s in steps if s.label.startswith("tune ")] == [
        "tune current-events cpt-sft (lr x0.5, epochs x1): train"]
    train = next(s for s in steps if s.label == "current-events sft: train")
    assert train.needs == [] and "train.learning_rate=2e-05" in train.argv()
    selection = next(m for m in models if m.method == "sft").tuning()
    assert all(s["carried_from"]["commit"] == commit for s in selection["scores"])
    assert next(s for s in steps if s.label == "current-events cpt-sft: train").needs == [
        "tune current-events cpt-sft (lr x0.5, epochs x1): train"]
    # the first session's own output folder: its runs count, not the report written meanwhile
    _, here = plan(spec, tmp_path / "a", seeds=1, carried_tuning=tuned)
    assert not any("carried_from" in s for s in next(m for m in here if m.method == "sft").tuning()["scores"])
    # a later report keeps the first report's mark on what it carried
    write_report(spec, [], [], tmp_path / "results2", [], tuning=tuning_section(models))
    again = earlier_tuning(tmp_path / "results2" / "results.json", spec)
    assert again["sft"]["points"]["lr x1, epochs x1"]["carried_from"]["commit"] == commit
    # another grid (a changed tuning block) is tuned again
    other = spec.model_copy(update={"tune": spec.tune.model_copy(update={"lr_scales": [1, 2]})})
    steps, _ = plan(other, tmp_path / "c", seeds=1, carried_tuning=tuned)
    assert sum(s.label.startswith("tune current-events sft ") for s in steps) == 2


def test_retention_scores_every_trained_model_on_the_other_domains(data_dir, tiny_model_dir, tmp_path):
    import shutil

    from kembed.bench import load_suite, plan

    astro = data_dir / "Astronomy"  # a second domain: the toy records under Astronomy's file names
    astro.mkdir()
    for split, name in (("train", "Astronomy_train.json"), ("dev", "astronomy_dev.json"), ("test", "Astronomy_test.json")):
        shutil.copy(data_dir / "CurrentEvents" / f"CurrentEvents_{split}.json", astro / name)
    suite = tmp_path / "retention.yaml"
    suite.write_text(json.dumps({
        "name": "retention", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft"],
        "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2"]},
        "retention": 3, "retention_domains": ["current-events", "astronomy"]}))
    steps, models = plan(load_suite(str(suite)), tmp_path / "runs", seeds=2)
    retention = [s for s in steps if "retention" in s.label]
    assert len(retention) == 3  # the base model once, each seed's run once; never its own domain
    assert all("--sample" in s.argv() and "astronomy" in s.argv() for s in retention)
    assert all(s.needs == [] if "base" in s.label else s.needs[0].endswith(": train") for s in retention)
    # a seeded sample: the same questions for every model
    out = [tmp_path / f"ev{i}" for i in range(2)]
    for folder in out:
        result = invoke("eval", "--domain", "astronomy", "--model", tiny_model_dir, "--sample", 3, "--output", folder,
                        "--precision", "fp32")
        assert result.exit_code == 0, result.output
    ids = [[json.loads(line)["id"] for line in (f / "samples.jsonl").read_text().splitlines()] for f in out]
    assert len(ids[0]) == 3 and ids[0] == ids[1]


def test_rationality_is_compared_on_questions_both_answered_correctly(tmp_path):
    from kembed.results import paired_rationality

    def judged(folder, scores):
        folder.mkdir()
        rows = [{"judge": "grounded", "version": 1, "settings": {}, "id": i, "score": s, "verdict": "ok",
                 "unable": False} for i, s in scores.items()]
        (folder / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    a = judged(tmp_path / "a", {"q1": 0.9, "q2": 0.7, "q3": 0.8})  # q3: only A answered it
    b = judged(tmp_path / "b", {"q1": 0.4, "q2": 0.5, "q4": 0.1})  # q4: only B answered it
    out = paired_rationality(a, b)
    assert out["n"] == 2 and out["diff"] == pytest.approx(0.35)
    assert 0.19 <= out["ci95"][0] <= out["ci95"][1] <= 0.51  # the two differences: 0.5 and 0.2
    assert paired_rationality(a, tmp_path) is None


def test_rationality_over_seeds_pairs_each_seed_with_the_base_model(tmp_path):
    """Each seed's difference to the base model is taken on the questions both explained."""
    n = 10
    base = {0: 0.2, 1: 0.4, 2: 0.0, 3: 0.6}
    seeds = {1: {0: 0.6, 1: 0.4, 5: 1.0}, 2: {2: 0.5, 3: 0.6, 4: 0.9}}  # pairs: q0, q1 | q2, q3
    models = [ModelEntry("d", "base", None, None, "m", None,
                         {"closed-book-raw": write_eval(tmp_path / "base", [i in base for i in range(n)], scores=base)})]
    for seed, scores in seeds.items():
        models.append(ModelEntry("d", f"rlag (seed {seed})", "rlag", seed, "m", None, {"closed-book-raw": write_eval(
            tmp_path / f"rlag-{seed}", [i in scores for i in range(n)], scores=scores)}))
    models.append(ModelEntry("d", "sft", "sft", 1, "m", None,
                             {"closed-book-raw": write_eval(tmp_path / "sft", [True] * n)}))  # not judged: left out
    rows = collect(models)
    [rlag] = seed_rationality(rows, ["closed-book-raw"])
    assert (rlag["method"], rlag["seeds"], rlag["n"]) == ("rlag", 2, [2, 2])
    assert rlag["mean"] == pytest.approx((2.0 / 3 + 2.0 / 3) / 2) and rlag["sd"] == pytest.approx(0.0)
    assert rlag["base"] == pytest.approx(0.3)
    assert rlag["diff"] == pytest.approx(((0.4 + 0.0) / 2 + (0.5 + 0.0) / 2) / 2)
    assert rlag["ci95"][0] <= rlag["diff"] <= rlag["ci95"][1]
    # the verdict: a line per method over its seeds, after the base model's
    summary = seed_summary(rows, ["closed-book-raw"])
    header, body = verdict_table("d", rows, ["closed-book-raw"], summary, [rlag])
    assert [line[0] for line in body] == ["base", "rlag", "sft"]
    assert body[0][2] == "40.0" and body[0][header.index("grounded rationality, vs base both correct")] == "0.30"
    acc = next(e for e in summary if e["method"] == "rlag")
    line = dict(zip(header, body[1]))
    assert line["seeds"] == "2" and line["vs base (pp) [two-level CI]"] == (
        f"{100 * acc['diff']:+.1f} [{100 * acc['ci95'][0]:+.1f}, {100 * acc['ci95'][1]:+.1f}]")
    assert line["grounded rationality, vs base both correct"].startswith(f"0.67, {rlag['diff']:+.2f} [")
    assert dict(zip(header, body[2]))["grounded rationality, vs base both correct"] == "-"  # sft: not judged
    assert verdict_table("other", rows, ["closed-book-raw"], summary, [rlag]) == ([], [])


def test_across_domains_counts_the_domains_where_a_method_gains_or_loses():
    """A CI wholly above zero is a gain, wholly below a loss; one holding zero is neither; a
    domain without the method's statistics is "-" and not counted."""
    def e(domain, method, diff, lo, hi, seeds=1, label="closed-book-raw"):
        return {"domain": domain, "method": method, "evaluation": label, "seeds": seeds, "diff": diff,
                "ci95": [lo, hi]}

    summary = [e("a", "rlag", 0.1, 0.02, 0.2, seeds=3), e("b", "rlag", -0.05, -0.1, -0.01),
               e("c", "rlag", 0.0, -0.1, 0.1),
               e("a", "sft", 0.01, -0.02, 0.04, seeds=3), e("a", "sft", 0.5, 0.4, 0.6, label="retrieved-context-chat")]
    header, body = across_domains_table(summary, "closed-book-raw")
    assert header[1:4] == [f"{d}: vs base (pp) [two-level CI] (seeds)" for d in "abc"]
    rows = {line[0]: line for line in body}
    assert rows["rlag"][1:] == ["+10.0 [+2.0, +20.0] (3)", "-5.0 [-10.0, -1.0] (1)", "+0.0 [-10.0, +10.0] (1)",
                                "1 / 1 of 3"]
    assert rows["sft"][2:] == ["-", "-", "0 / 0 of 1"]  # its retrieved-context gain is another evaluation
    assert across_domains_table(summary, "closed-book-rag") == ([], [])


def test_a_split_larger_than_eval_sample_is_scored_on_the_same_seeded_sample_for_every_model(data_dir, tiny_model_dir,
                                                                                             tmp_path):
    import subprocess

    from kembed.bench import load_suite, plan

    suite = tmp_path / "sampled.yaml"
    common = {"name": "sampled", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft"],
              "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2"]}}
    suite.write_text(json.dumps({**common, "eval_sample": 3}))  # the fixture's test split has 4 questions
    steps, models = plan(load_suite(str(suite)), tmp_path / "runs", seeds=1)
    evals = [s for s in steps if ": eval " in s.label]
    assert evals and all(s.argv()[s.argv().index("--sample"):][:4] == ["--sample", "3", "--sample-seed", "0"]
                         for s in evals)
    assert all(f.name.startswith("eval-test-sample3-") for m in models for f in m.evals.values())
    base = next(s for s in evals if s.label == "current-events base: eval closed-book-raw")
    subprocess.run(base.argv(), check=True, capture_output=True)
    assert base.done() and json.loads((models[0].evals["closed-book-raw"] / "results.json").read_text())["n"] == 3
    # a split no larger than the sample is scored whole, in the folders a suite without it uses
    suite.write_text(json.dumps({**common, "eval_sample": 4}))
    steps, models = plan(load_suite(str(suite)), tmp_path / "runs", seeds=1)
    assert not any("--sample" in s.argv() for s in steps if ": eval " in s.label)
    assert all(f.name.startswith("eval-test-closed") or f.name.startswith("eval-test-retrieved")
               for m in models for f in m.evals.values())
