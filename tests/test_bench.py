"""Explanations, `kembed judge`, `kembed compare`, `kembed config check` and the benchmark runner,
on the tiny model and the tiny data directory of conftest."""

import json
import os
import sys

import pytest
from typer.testing import CliRunner

from kembed.bench import earlier_report, load_suite, plan
from kembed.schedule import Step, execute, expected, expected_memory
from kembed.runs import read_jsonl
from kembed.cli import app
from kembed.data import load_records
from kembed.judges import read_judgments

from conftest import write_evaluation

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_explain_then_judge_resumes_and_appends(data_dir, tiny_model_dir, tmp_path):
    folder = tmp_path / "eval"
    write_evaluation(folder, tiny_model_dir, [True, False, True, False])
    result = invoke("explain", folder, "--max-new-tokens", 8, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert ["explanation" in s for s in samples] == [True, False, True, False]
    assert "Answer: A. " in samples[0]["explanation"]["prompt"]  # the chosen (correct) option is named
    assert json.loads((folder / "results.json").read_text())["explanations"]["n"] == 2
    assert invoke("explain", folder, "--max-new-tokens", 16).exit_code == 2  # other settings: refused

    for _ in range(2):  # the second run finds everything judged and appends nothing
        result = invoke("judge", folder, "--judge", "grounded")
        assert result.exit_code == 0, result.output
    rows = read_judgments(folder)
    assert len(rows) == 2 and {r["judge"] for r in rows} == {"grounded"}
    assert all(r["version"] and r["settings"] for r in rows)


def test_judge_without_explanations_is_a_one_line_error(data_dir, tmp_path):
    folder = tmp_path / "eval"
    write_evaluation(folder, "m", [True, True, False, False])
    result = invoke("judge", folder)
    assert result.exit_code == 2 and "kembed explain" in result.output and "Traceback" not in result.output


GOOD = {0: "The Eiffel Tower is in Paris, so Paris is the answer.",
        1: "Mercury is the planet closest to the Sun.", 2: "Penicillin blocks cell wall synthesis."}


def test_compare_pairs_runs_and_plots(data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_evaluation(a, "model-a", [True, True, True, False], GOOD)
    write_evaluation(b, "model-b", [False, False, False, False], {})
    result = invoke("compare", a, b, "--markdown", "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "-75.0" in result.output  # b vs a: 0/4 against 3/4, paired
    assert "0.250" in result.output  # McNemar exact: 3 discordant pairs, two-sided p = 2/8
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0


def test_compare_pairwise_over_a_local_endpoint(data_dir, tmp_path, monkeypatch):
    from judge_server import JudgeServer

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))  # the judge cache

    a, b = tmp_path / "a", tmp_path / "b"
    write_evaluation(a, "model-a", [True, True, True, False], GOOD)
    write_evaluation(b, "model-b", [True, True, False, False], {0: "I don't know.", 1: "I don't know."})

    def prefer_grounded(prompt):  # the judge prefers whichever explanation is about the facts
        first = prompt.index("Explanation A")
        return json.dumps({"better": "B" if "I don't know" in prompt[first:prompt.index("Explanation B")] else "A"})

    with JudgeServer(default=prefer_grounded) as server:
        result = invoke("compare", a, b, "--judge", "pairwise", "--judge-url", server.url, "--judge-name", "gpt-test",
                        "--output", tmp_path / "pw")
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 4  # two shared questions, both orders
    saved = json.loads(next((tmp_path / "pw").glob("pairwise-*.json")).read_text())
    assert saved["stats"]["losses"] == 2 and saved["stats"]["wins"] == 0 and saved["order_flip_rate"] == 0.0


def test_pairwise_shows_a_question_without_snippets_its_retrieved_documents(data_dir, tmp_path, monkeypatch):
    """Medical's and astronomy's test questions carry no snippets: the pairwise judge's reference
    knowledge is then the domain's BM25 top documents for the question, as the grounded judge's."""
    from judge_server import JudgeServer

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    test = data_dir / "CurrentEvents" / "CurrentEvents_test.json"
    test.write_text(json.dumps([{**row, "ctx": ""} for row in json.loads(test.read_text())]))
    a, b = tmp_path / "a", tmp_path / "b"
    write_evaluation(a, "model-a", [True, False, False, False], GOOD)
    write_evaluation(b, "model-b", [True, False, False, False], {0: "Paris."})
    with JudgeServer(default=lambda prompt: json.dumps({"better": "tie"})) as server:
        result = invoke("compare", a, b, "--judge", "pairwise", "--judge-url", server.url, "--judge-name", "gpt-test",
                        "--output", tmp_path / "pw")
        assert result.exit_code == 0, result.output
        prompts = [json.dumps(r["body"]) for r in server.requests]
    assert len(prompts) == 2 and all("- The Eiffel Tower is in Paris." in p and "(none)" not in p for p in prompts)


def test_judge_rubric_over_a_local_endpoint(data_dir, tmp_path, monkeypatch):
    from judge_server import JudgeServer

    monkeypatch.setenv("KEMBED_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "eval"
    write_evaluation(folder, "model-a", [True, True, True, False], GOOD)
    answer = json.dumps({"logical_clarity": 5, "factual_accuracy": 3, "unable_to_explain": False})
    args = ["judge", folder, "--judge", "rubric", "--judge-url", None, "--judge-name", "gpt-test"]
    with JudgeServer(default=lambda prompt: answer) as server:
        args[5] = server.url
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 3
        assert invoke(*args, "--reparse").exit_code == 0 and len(server.requests) == 3  # from the cache
    rows = read_judgments(folder)
    assert len(rows) == 6 and {r["judge"] for r in rows} == {"rubric"} and rows[0]["score"] == 0.75
    assert "rationality 0.750" in result.output and "3 requests, 0 from the cache, 30 prompt + 15" in result.output
    own = tmp_path / "own"
    write_evaluation(own, "smollm2-135m-instruct", [True, False, False, False], GOOD)
    refused = invoke("judge", own, "--judge", "rubric", "--judge-url", server.url,
                     "--judge-name", "HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert refused.exit_code == 2 and "--allow-self-judge" in refused.output


def test_config_check(data_dir):
    result = invoke("config", "check", "sft", "limit=7")
    assert result.exit_code == 0 and "limit: 7" in result.output
    result = invoke("config", "check", "sft", "no_such_key=1")
    assert result.exit_code == 2 and "no_such_key" in result.output and "Traceback" not in result.output


def test_execute_reports_a_failure_and_goes_on(tmp_path):
    from rich.console import Console

    py = sys.executable
    ran = tmp_path / "ran"
    steps = [Step("train a", lambda: [py, "-c", "raise SystemExit(3)"]),
             Step("eval a", lambda: [py, "-c", f"open({str(ran / 'a')!r}, 'w')"], needs=["train a"]),
             Step("train b", lambda: [py, "-c", f"open({str(ran / 'b')!r}, 'w')"]),
             Step("done b", lambda: [py, "-c", "raise SystemExit(4)"], done=lambda: True)]
    ran.mkdir()
    failures = execute(steps, Console(file=open(tmp_path / "log", "w")), tmp_path)
    assert failures == [{"step": "train a", "returncode": 3}, {"step": "eval a", "blocked_by": "train a"}]
    assert sorted(p.name for p in ran.iterdir()) == ["b"]


def mini_suite(tmp_path, tiny_model_dir):
    suite = tmp_path / "mini.yaml"
    suite.write_text(json.dumps({
        "name": "mini", "model": str(tiny_model_dir), "domains": ["current-events"], "methods": ["sft"],
        "overrides": {"all": [f"model={tiny_model_dir}", "limit=4", "validation=2", "precision=fp32",
                              "train.batch_size=2", "eval.limit=2"], "sft": ["sft.epochs=1"]},
        "evals": [{"mode": "closed-book", "explain": True},
                  {"mode": "retrieved-context", "format": "chat", "top_k": 1}],
        "explain_max_new_tokens": 6}))
    return suite


def test_bench_runs_a_suite_and_resumes(data_dir, tiny_model_dir, tmp_path):
    suite, out, results = mini_suite(tmp_path, tiny_model_dir), tmp_path / "runs", tmp_path / "results"
    result = invoke("bench", suite, "--out", out, "--results", results)
    assert result.exit_code == 0, result.output
    report = earlier_report(results / "results.json")
    assert [r["name"] for r in report["rows"]] == ["base", "sft"] and report["failures"] == []
    sft = report["rows"][1]
    assert set(sft["evals"]) == {"closed-book-raw", "retrieved-context-chat"}
    assert "vs_reference" in sft["evals"]["closed-book-raw"] and sft["training_seconds"] is not None
    cell = sft["evals"]["closed-book-raw"]  # its outcomes: per question, no question text
    assert len(cell["outcomes"]["ids"]) == len(cell["outcomes"]["correct"]) == len(cell["outcomes"]["knowledge"]) \
        == cell["n"]
    assert report["invocations"][0]["command"] == "kembed bench mini" and "commit" in report["invocations"][0]
    assert (results / "accuracy.png").is_file() and "| sft |" in (results / "results.md").read_text()
    assert "(`kembed bench SUITE --seeds K` trains K seeds per method)" in (results / "results.md").read_text()
    times = {r["model"]: r for r in report["time_breakdown"]}  # every step's wall time and peak memory
    assert times["current-events sft"]["training"] > 0 and times["current-events sft"]["max_rss_mb"] > 100
    assert len(report["steps"]) == 9 and "## Where the time goes" in (results / "results.md").read_text()

    # interrupt: one evaluation lost, the training run cut short after its start
    run = next((out / "current-events").glob("sft-s42-*"))
    rag = run / "eval-test-retrieved-context-chat" / "results.json"
    rag.unlink()
    metrics = (run / "metrics.jsonl").read_text()
    steps, _ = plan(load_suite(str(suite)), out)
    train = next(s for s in steps if s.label.endswith("sft: train"))
    assert train.done() and "--resume" in train.argv()  # a finished run is reused, never retrained
    forecast = invoke("bench", suite, "--out", out, "--results", tmp_path / "plan", "--plan", "--jobs", "2")
    assert forecast.exit_code == 0 and not (tmp_path / "plan").exists(), forecast.output  # ran and wrote nothing
    said = " ".join(forecast.output.split())
    # the lost evaluation; not the two judge steps of finished explanations (every invocation
    # runs them again, from their cache, but they are not pending)
    assert "1 step(s) to run" in said and "with --jobs 2" in said, said
    partial = invoke("bench", suite, "--out", out, "--results", tmp_path / "partial", "--report-only")
    assert partial.exit_code == 0, partial.output
    pending = json.loads((tmp_path / "partial" / "results.json").read_text())
    assert not rag.is_file() and len(pending["invocations"]) == 1  # ran nothing, recorded no invocation
    assert pending["pending"] == ["current-events sft: eval retrieved-context-chat"]
    evals = pending["rows"][1]["evals"]
    assert evals["closed-book-raw"] and not evals.get("retrieved-context-chat")
    assert "**partial**: 1 step(s) not finished yet" in (tmp_path / "partial" / "results.md").read_text()
    again = invoke("bench", suite, "--out", out, "--results", results)
    assert again.exit_code == 0, again.output
    assert (run / "metrics.jsonl").read_text() == metrics and rag.is_file()
    assert again.output.count("done before") == len(steps) - 1 - 2  # the lost eval and the two judges re-ran
    assert len(json.loads((results / "results.json").read_text())["invocations"]) == 2


def test_bench_checks_every_recipe_before_running(data_dir, tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text(json.dumps({"name": "bad", "domains": ["current-events"], "methods": ["sft"],
                                 "overrides": {"sft": ["sft.no_such_field=1"]}}))
    result = invoke("bench", suite, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and "no_such_field" in result.output
    assert not (tmp_path / "runs").exists()
    with pytest.raises(Exception, match="no benchmark suite"):
        load_suite("no-such-suite")


SUITE_ERRORS = [  # (id, suite fields, text of the one-line error)
    ("unknown-domain", {"domains": ["current-events", "nowhere"]}, "unknown domain 'nowhere'"),
    ("unknown-method", {"methods": ["sft", "nope"]}, "unknown method 'nope'"),
    ("missing-recipe", {"recipes": {"sft": "no-such-recipe"}}, "recipe not found"),
    ("bad-override-value", {"overrides": {"all": ["train.batch_size=0"]}}, "train.batch_size: Input should be"),
    ("override-sets-domain", {"overrides": {"sft": ["domain=legal"]}}, "the sft overrides set domain=legal"),
    ("missing-split", {"split": "dev", "domains": ["medical"]}, "domain 'medical' has no split 'dev'"),
    ("bad-seed", {"seeds": [1, -1]}, "seed: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize("case, fields, expected", SUITE_ERRORS, ids=[c[0] for c in SUITE_ERRORS])
def test_a_bad_suite_stops_before_any_step(data_dir, tmp_path, case, fields, expected):
    suite = tmp_path / "bad.yaml"
    suite.write_text(json.dumps({"name": "bad", "domains": ["current-events"], "methods": ["sft"], **fields}))
    runs, results = tmp_path / "runs", tmp_path / "results"
    result = invoke("bench", suite, "--out", runs, "--results", results)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: suite bad: ") and expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "bench 1/" not in result.output
    assert not runs.exists() and not results.exists()  # no step ran, no results folder was written


def test_seeds_train_one_run_each_and_report_the_spread(data_dir, tiny_model_dir, tmp_path):
    steps, models = plan(load_suite(str(mini_suite(tmp_path, tiny_model_dir))), tmp_path / "runs", seeds=2)
    trains = [s.argv() for s in steps if s.label.endswith(": train")]
    assert [a[-1] for a in trains] == ["seed=42", "seed=43"]
    assert len({a[a.index("--output") + 1] for a in trains}) == 2  # one run directory per seed


def test_parallel_jobs_respect_needs(tmp_path):
    from rich.console import Console

    py, ran = sys.executable, tmp_path / "ran"
    ran.mkdir()
    order = ran / "order"

    def append(name, delay=0.0):
        return lambda: [py, "-c", f"import time; time.sleep({delay}); open({str(order)!r}, 'a').write('{name} ')"]

    steps = [Step("train a", append("a", 1.0)), Step("train b", append("b")),
             Step("eval a", append("ea"), needs=["train a"]), Step("bad", lambda: [py, "-c", "raise SystemExit(5)"]),
             Step("after bad", append("x"), needs=["bad"]), Step("orphan", append("o"), needs=["no such step"])]
    failures = execute(steps, Console(file=open(tmp_path / "log", "w")), tmp_path, jobs=2)
    assert execute([Step("orphan", append("o"), needs=["no such step"]), Step("free", append("f"))],
                   Console(file=open(tmp_path / "log", "w")), tmp_path) == [{"step": "orphan", "blocked_by": "no such step"}]
    assert order.read_text().split() == ["b", "a", "ea", "f"]  # b ran beside the slow a; ea waited for a
    assert {"step": "bad", "returncode": 5} in failures and {"step": "after bad", "blocked_by": "bad"} in failures
    assert {"step": "orphan", "blocked_by": "no such step"} in failures
    assert (tmp_path / "logs" / "train-a.log").is_file()
    order.unlink()
    chain = [Step("t", append("t", 0.5)), Step("e", append("e"), needs=["t"]), Step("j", append("j"), needs=["e"])]
    assert execute(chain, Console(file=open(tmp_path / "log", "w")), tmp_path, jobs=2) == []
    assert order.read_text().split() == ["t", "e", "j"]


@pytest.mark.parametrize("name", ["quick", "cpu", "standard", "paper"])
def test_shipped_suites_plan(name, tmp_path):
    suite = load_suite(name)
    steps, models = plan(suite, tmp_path)
    seeds = sum(len(suite.domain_seeds.get(d) or suite.seeds or [0]) for d in suite.domains)
    trains = [s for s in steps if s.label.endswith(": train") and not s.label.startswith("tune ")]
    assert len(trains) == len(suite.methods) * seeds
    grid = len(suite.tune.lr_scales) * len(suite.tune.epoch_scales) if suite.tune else 0
    assert sum(s.label.startswith("tune ") for s in steps) == len(suite.methods) * grid
    assert {m.domain for m in models} == set(suite.domains)


# ---------------------------------------------------------------------------------------------
# the report from rows alone: per-question outcomes in the cells, domains carried over

KNOW = ["taught", "taught", "untaught", "no-answer-snippet"]  # the classes of the 4 toy test questions
RUNS = {"base": [[False, True, False, False]], "sft": [[True, True, False, False], [True, False, True, False]],
        "cpt": [[True, True, True, False]]}  # per method, per seed: the 4 questions' correctness


def fake_models(out, domain, runs=RUNS):
    """ModelEntry's of one domain with their closed-book evaluation folders in ``out`` (as the
    bench lays them out); a method of several seeds is named ``<method> (seed <s>)``."""
    from kembed.results import ModelEntry

    models = []
    for method, seeds in runs.items():
        for seed, correct in enumerate(seeds, 1):
            name = method if len(seeds) == 1 else f"{method} (seed {seed})"
            folder = out / domain / f"{method}-s{seed}" / "eval-test-closed-book-raw"
            if correct is not None:
                write_evaluation(folder, name, correct, knowledge=None if method == "base" else KNOW)
            models.append(ModelEntry(domain, name, None if method == "base" else method,
                                     None if method == "base" else seed, name, None, {"closed-book-raw": folder}))
    return models


def summary_from_folders(rows, label):
    """seed_summary and method_ranking as they were computed before cells carried outcomes: from
    each cell's samples.jsonl (the first trained run's knowledge classes split the questions)."""
    from kembed.stats import seeds_accuracy, seeds_bootstrap_diff

    def read(cell):
        samples = [json.loads(line) for line in open(f"{cell['folder']}/samples.jsonl")]
        return ({s["id"]: s["correct"]["token_mean"] for s in samples},
                {s["id"]: s["knowledge"] for s in samples if "knowledge" in s})

    summary, ranking = [], []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        runs = {}
        for r in rows:
            if r["domain"] == domain and r["evals"].get(label):
                runs.setdefault(r["method"] or "base", []).append(read(r["evals"][label]))
        base = [c for c, _ in runs["base"]]
        classes = next(k for m, cs in runs.items() if m != "base" for _, k in cs)
        trained = {m: [c for c, _ in cs] for m, cs in runs.items() if m != "base"}
        for method, correct in trained.items():
            whole = seeds_accuracy(correct, base)
            entry = {"domain": domain, "method": method, "evaluation": label, "seeds": whole["seeds"],
                     "mean": whole["mean"], "sd": whole["sd"], "min": min(whole["accuracies"]),
                     "max": max(whole["accuracies"]), "diff": whole["diff"], "ci95": whole["ci95"]}
            for kind in ("taught", "untaught"):
                ids = {i for i, k in classes.items() if k == kind}
                part = seeds_accuracy([{i: v for i, v in c.items() if i in ids} for c in correct],
                                      [{i: v for i, v in b.items() if i in ids} for b in base])
                entry[kind] = {k: part[k] for k in ("n", "mean", "diff", "ci95")}
            summary.append(entry)
        methods = list(trained)
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                ids = sorted(set.intersection(*(set(c) for c in [*trained[a], *trained[b]])))
                d = seeds_bootstrap_diff([[c[q] for q in ids] for c in trained[a]],
                                         [[c[q] for q in ids] for c in trained[b]])
                diff, (lo, hi) = d["diff"], d["ci95"]
                if diff < 0:
                    a, b, diff, lo, hi = b, a, -diff, -hi, -lo
                ranking.append({"domain": domain, "a": a, "b": b, "diff": diff, "ci95": [lo, hi],
                                "decided": lo > 0 or hi < 0})
    return summary, ranking


def test_seed_summary_and_ranking_from_outcomes_equal_the_folders(data_dir, tmp_path):
    import shutil

    from kembed.results import collect, method_ranking, seed_summary
    from kembed.errors import KembedError

    rows = collect(fake_models(tmp_path / "out", "current-events"))
    sft = rows[1]["evals"]["closed-book-raw"]["outcomes"]
    ids = sorted(r.id for r in load_records("current-events", "test"))
    order = [r.id for r in load_records("current-events", "test")]  # record i's id: KNOW[i], RUNS[..][i]
    assert sft["ids"] == ids and sft["correct"] == "".join("1" if RUNS["sft"][0][order.index(i)] else "0" for i in ids)
    assert sft["knowledge"] == "".join(KNOW[order.index(i)][0] for i in ids)
    assert "knowledge" not in rows[0]["evals"]["closed-book-raw"]["outcomes"]  # the base model's samples have none
    expected = summary_from_folders(rows, "closed-book-raw")

    shutil.rmtree(tmp_path / "out")  # from here on, only the rows: as a carried results.json holds them
    rows = json.loads(json.dumps(rows))
    summary, ranking = seed_summary(rows, ["closed-book-raw"]), method_ranking(rows, "closed-book-raw")
    assert (summary, ranking) == expected
    by_method = {e["method"]: e for e in summary}
    assert by_method["sft"]["seeds"] == 2 and by_method["sft"]["mean"] == 0.5 and by_method["cpt"]["diff"] == 0.5
    assert by_method["sft"]["taught"]["n"] == 2 and by_method["sft"]["untaught"]["n"] == 1
    assert [(e["a"], e["b"]) for e in ranking] == [("cpt", "sft")] and ranking[0]["diff"] == 0.25

    rows[1]["evals"]["closed-book-raw"]["outcomes"]["correct"] = "01"  # 2 letters for 4 ids
    with pytest.raises(KembedError, match="current-events sft, closed-book-raw: outcomes"):
        seed_summary(rows, ["closed-book-raw"])


def report(suite, models, out, results, started, seconds):
    """Write the report of ``models`` (what ``out`` holds) into ``results`` as one invocation
    started at ``started`` would; returns results.json."""
    import io

    from rich.console import Console

    from kembed.bench import _report

    invocation = {"started": started, "jobs": 1, "domains": [models[0].domain], "seconds": seconds,
                  "steps_run": 1, "finished": True, "commit": f"c-{started[:10]}"}
    _report(suite, models, out, results, [invocation], [], None, Console(file=io.StringIO()))
    return earlier_report(results / "results.json")


def two_domain_suite():
    from kembed.bench import Suite

    return Suite.model_validate({"name": "mini", "domains": ["current-events", "legal"], "methods": ["sft", "cpt"],
                                 "evals": [{"mode": "closed-book", "explain": False}]})


def test_a_report_of_one_domain_carries_over_the_domains_reported_before(data_dir, tmp_path):
    import shutil

    suite, results = two_domain_suite(), tmp_path / "results"
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    models = fake_models(out_a, "current-events")
    (out_a / "bench-steps.jsonl").write_text(
        json.dumps({"step": "tune current-events sft (lr x1): train", "seconds": 7.0, "max_rss_mb": 300}) + "\n"
        + json.dumps({"step": "current-events cpt: train", "seconds": 5.0, "max_rss_mb": 200}) + "\n")
    first = report(suite, models, out_a, results, "2026-01-01T00:00:00+00:00", 60.0)
    assert {r["domain"] for r in first["rows"]} == {"current-events"} and first["carried"] == {}
    shutil.rmtree(out_a)  # the next session runs on a fresh machine: only results/ was committed

    # --domains legal: the plan still lists current-events' models, whose folders are not in out-b
    models = fake_models(out_b, "current-events", {m: [None] * len(s) for m, s in RUNS.items()}) + \
        fake_models(out_b, "legal", {"base": [[True, False, False, False]], "sft": [[True, True, True, True]]})
    (out_b / "bench-steps.jsonl").write_text(json.dumps({"step": "legal sft: train", "seconds": 3.0,
                                                         "max_rss_mb": 100}) + "\n")
    second = report(suite, models, out_b, results, "2026-01-02T00:00:00+00:00", 30.0)
    mark = {"commit": first["commit"], "date": first["date"]}
    assert [(r["domain"], r["name"], r.get("carried_from")) for r in second["rows"]] == [
        ("current-events", "base", mark), ("current-events", "sft (seed 1)", mark),
        ("current-events", "sft (seed 2)", mark), ("current-events", "cpt", mark),
        ("legal", "base", None), ("legal", "sft", None)]
    assert second["carried"] == {"current-events": mark}
    assert [(i["started"][:10], i["commit"]) for i in second["invocations"]] == [
        ("2026-01-01", "c-2026-01-01"), ("2026-01-02", "c-2026-01-02")] and second["bench_seconds"] == 90.0
    assert [e for e in second["over_seeds"] if e["domain"] == "current-events"] == first["over_seeds"]
    assert [e["method"] for e in second["over_seeds"] if e["domain"] == "legal"] == ["sft"]
    assert second["ranking"] == first["ranking"]  # legal has one trained method: no pair
    times = {r["model"]: r for r in second["time_breakdown"]}
    assert times["current-events cpt"]["training"] == 5.0 and times["legal sft"]["training"] == 3.0
    assert times["sft (tuning)"]["tuning"] == 7.0
    md = (results / "results.md").read_text()
    assert f"## current-events (carried over: commit {first['commit']}, {first['date']})" in md
    assert "carried over from earlier invocations" in md and "## legal\n" in md and "| sft (seed 2) |" in md
    assert "2 invocation(s)" in md and (results / "accuracy.png").stat().st_size > 0
    glance = md.split("### Across domains")[1].split("###")[0]  # two domains with a verdict: at a glance
    assert "| current-events: vs base" in glance and "legal: vs base" in glance and "| cpt |" in glance

    # a third session re-runs current-events: its own rows replace the carried ones, legal is carried
    out_c = tmp_path / "out-c"
    models = fake_models(out_c, "current-events", {"base": [[True, True, True, True]], "sft": [[True] * 4]})
    third = report(suite, models, out_c, results, "2026-01-03T00:00:00+00:00", 10.0)
    assert [(r["domain"], r["name"], bool(r.get("carried_from"))) for r in third["rows"]] == [
        ("current-events", "base", False), ("current-events", "sft", False), ("legal", "base", True),
        ("legal", "sft", True)]
    assert third["rows"][2]["carried_from"] == {"commit": second["commit"], "date": second["date"]}
    assert len(third["invocations"]) == 3 and third["bench_seconds"] == 100.0
    assert "sft (tuning)" in {r["model"] for r in third["time_breakdown"]}  # carried again, not lost


def test_a_carried_domain_is_pending_what_its_report_left_pending(tmp_path):
    """A report of current-events alone in a fresh folder plans legal's base evaluations too (the
    base model is evaluated afresh); legal's rows come from the earlier report, so its pending
    steps are that report's, listed once."""
    from kembed.bench import carry_over

    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"suite": "mini", "commit": "c1", "date": "2026-01-01",
                                   "rows": [{"domain": "legal", "name": "base", "evals": {}}],
                                   "pending": ["legal sft: train", "legal sft: train"]}))
    rows = [{"domain": "current-events", "name": "base", "evals": {}}]
    merged = carry_over(two_domain_suite(), earlier, rows, [], [], [],
                        ["current-events sft: train", "legal base: eval closed-book-raw", "legal sft: train"])
    assert merged["pending"] == ["current-events sft: train", "legal sft: train"]
    assert carry_over(two_domain_suite(), earlier, rows, [], [], [], None)["pending"] == ["legal sft: train"]


def test_a_domain_too_long_for_one_session_adds_up_model_by_model(data_dir, tmp_path):
    import shutil

    from kembed.bench import finished_models, skip_finished
    from kembed.schedule import Step

    suite, results = two_domain_suite(), tmp_path / "results"
    # session 1 finished base, cpt and sft's first seed; sft's second seed was still training
    first_runs = {"base": RUNS["base"], "sft": [RUNS["sft"][0], None], "cpt": RUNS["cpt"]}
    out_a = tmp_path / "out-a"
    report(suite, fake_models(out_a, "current-events", first_runs), out_a, results, "2026-01-01T00:00:00+00:00", 60.0)
    shutil.rmtree(out_a)
    finished = finished_models(earlier_report(results / "results.json"), suite)
    assert finished == {("current-events", "sft (seed 1)"), ("current-events", "cpt")}  # never the base model
    step = lambda label, needs=(): Step(label, lambda: [], lambda: False, list(needs))  # noqa: E731
    steps = [step("tune current-events cpt (lr x1): train"), step("tune current-events sft (lr x1): train"),
             step("current-events base: eval closed-book-raw"),
             step("current-events cpt: train", ["tune current-events cpt (lr x1): train"]),
             step("current-events cpt-sft: train"),  # another model whose name starts like cpt's
             step("current-events sft (seed 1): train", ["tune current-events sft (lr x1): train"]),
             step("current-events sft (seed 1): eval closed-book-raw"),
             step("current-events sft (seed 2): train", ["tune current-events sft (lr x1): train"])]
    assert [s.label for s in skip_finished(steps, finished)] == [
        "tune current-events sft (lr x1): train", "current-events base: eval closed-book-raw",
        "current-events cpt-sft: train", "current-events sft (seed 2): train"]
    # session 2 evaluates the base model and trains sft's second seed; the finished models are carried
    out_b = tmp_path / "out-b"
    second_runs = {"base": RUNS["base"], "sft": [None, RUNS["sft"][1]], "cpt": [None]}
    second = report(suite, fake_models(out_b, "current-events", second_runs), out_b, results,
                    "2026-01-02T00:00:00+00:00", 30.0)
    assert [(r["name"], bool(r.get("carried_from"))) for r in second["rows"]] == [
        ("base", False), ("sft (seed 2)", False), ("sft (seed 1)", True), ("cpt", True)]
    assert second["carried"] == {"current-events": second["rows"][2]["carried_from"]}
    sft = next(e for e in second["over_seeds"] if e["method"] == "sft")
    assert sft["seeds"] == 2  # both seeds, one from each session, in the statistics over seeds
    assert len(second["invocations"]) == 2
    md = (results / "results.md").read_text()
    assert "## current-events (models marked carried over: commit" in md and "| cpt (carried over) |" in md
    assert "not variation between training seeds (the section Over training seeds covers both)" in md
    # a run of the whole domain in one session supersedes the report: nothing of it is carried
    out_c = tmp_path / "out-c"
    third = report(suite, fake_models(out_c, "current-events", {"base": RUNS["base"], "sft": RUNS["sft"],
                                                                "cpt": RUNS["cpt"]}),
                   out_c, results, "2026-01-03T00:00:00+00:00", 10.0)
    assert not any(r.get("carried_from") for r in third["rows"]) and len(third["invocations"]) == 1


def test_results_json_writes_each_id_list_once_and_reads_them_back(tmp_path):
    """Cells scored on the same questions share one list in ``question_ids``; reading puts it back
    into each cell; a results.json written before (lists in the cells) reads unchanged."""
    from kembed.bench import _results_json
    from kembed.errors import KembedError
    from kembed.results import cell_outcomes

    cell = {"ids": ["q1", "q2"], "correct": "10"}
    obj = {"rows": [{"evals": {"a": {"outcomes": dict(cell)}, "b": {"outcomes": {**cell, "correct": "01"}}}},
                    {"evals": {"a": {"outcomes": {"ids": ["q3"], "correct": "1"}}}}],
           "tuning": {"sft": {"ids": ["q9"]}}}  # ids outside an outcomes object stay where they are
    path = tmp_path / "results.json"
    path.write_text(_results_json(obj))
    raw = json.loads(path.read_text())
    assert raw["question_ids"] == {"ids-0": ["q1", "q2"], "ids-1": ["q3"]}
    assert [c["outcomes"]["ids"] for c in raw["rows"][0]["evals"].values()] == ["ids-0", "ids-0"]
    assert earlier_report(path) == obj
    path.write_text(json.dumps(obj))
    assert earlier_report(path) == obj
    del raw["question_ids"]["ids-1"]  # a hand-edited file: the name stays, and decoding says so
    path.write_text(json.dumps(raw))
    with pytest.raises(KembedError, match="'ids' names 'ids-1', which the file's question_ids lacks"):
        cell_outcomes(earlier_report(path)["rows"][1]["evals"]["a"], "row 2")


def test_a_results_json_without_outcomes_is_carried_into_tables_only(data_dir, tmp_path):
    suite, results = two_domain_suite(), tmp_path / "results"
    report(suite, fake_models(tmp_path / "out-a", "current-events"), tmp_path / "out-a", results,
           "2026-01-01T00:00:00+00:00", 60.0)
    old = earlier_report(results / "results.json")  # as written before cells kept outcomes
    for r in old["rows"]:
        for c in r["evals"].values():
            del c["outcomes"]
    for key in ("carried", "without_outcomes"):
        del old[key]
    for i in old["invocations"]:
        del i["commit"]
    (results / "results.json").write_text(json.dumps(old))

    legal = fake_models(tmp_path / "out-b", "legal", {"base": [[True, False, False, False]],
                                                      "sft": [[True, True, True, True]], "cpt": [[True] * 4]})
    new = report(suite, legal, tmp_path / "out-b", results, "2026-01-02T00:00:00+00:00", 30.0)
    assert [r["domain"] for r in new["rows"]] == ["current-events"] * 4 + ["legal"] * 3
    assert {e["domain"] for e in new["over_seeds"]} == {"legal"} and {e["domain"] for e in new["ranking"]} == {"legal"}
    assert new["without_outcomes"] == [f"current-events {n} (closed-book-raw)"
                                       for n in ("base", "sft (seed 1)", "sft (seed 2)", "cpt")]
    assert new["invocations"][0]["commit"] == old["commit"]  # an old invocation gets its report's commit
    md = (results / "results.md").read_text()
    assert "| sft (seed 1) |" in md and "Left out of the statistics over seeds" in md


def test_a_long_pending_list_is_counted_per_grid_and_domain():
    from kembed.bench import pending_summary

    few = ["current-events sft: train", "current-events sft: eval closed-book-raw"]
    assert pending_summary(few, ["current-events"]) == "; ".join(few)
    many = ([f"tune current-events sft (lr x{x}): train" for x in (1, 2)]
            + [f"medical {m}: {s}" for m in ("base", "sft") for s in ("eval a", "eval b", "retention legal")]
            + [f"legal sft: eval {i}" for i in range(8)])
    assert pending_summary(many, ["current-events", "medical", "legal"]) == (
        "tuning: 2 step(s) of 2 configuration(s); medical: 6 step(s) of 2 model(s); legal: 8 step(s) of 1 model(s)")


def test_longest_first_starts_the_longest_chain_early_and_keeps_needs_before():
    from kembed.schedule import expected, longest_first, step_kind

    domains = ["current-events"]
    assert step_kind("current-events rlag (seed 43): train", domains) == "rlag: train"
    assert step_kind("tune current-events rlag (lr x2, epochs x1): train", domains) == "rlag: train"
    assert step_kind("current-events base: eval closed-book-raw", domains) == "base: eval closed-book-raw"

    def step(label, needs=()):
        return Step(label, lambda: ["true"], needs=list(needs))

    steps = [step("current-events base: eval a"),
             step("current-events sft: train"), step("current-events sft: eval a", ["current-events sft: train"]),
             step("current-events rlag (seed 43): train"),
             step("current-events rlag (seed 43): eval a", ["current-events rlag (seed 43): train"])]
    # recorded at another seed: the same kind is expected to take as long
    seconds = {"current-events rlag (seed 42): train": 3000, "current-events sft: train": 600,
               "current-events sft: eval a": 100, "current-events rlag (seed 42): eval a": 100,
               "current-events base: eval a": 400}
    order = [s.label for s in longest_first(steps, seconds, domains)]
    assert order[0] == "current-events rlag (seed 43): train"
    assert order.index("current-events sft: train") < order.index("current-events base: eval a")
    assert all(order.index(n) < order.index(s.label) for s in steps for n in s.needs)
    # nothing recorded: the plan's order
    assert [s.label for s in longest_first(steps, {}, domains)] == [s.label for s in steps]
    # a model none of whose steps ran: its evaluation as long as the other models' on average, its
    # training unknown (a training's cost depends on its method)
    raft = [step("current-events raft: train"), step("current-events raft: eval a"),
            step("current-events raft: eval b")]
    assert expected(raft, seconds, domains) == {"current-events raft: train": 0.0,
                                                "current-events raft: eval a": 200.0,
                                                "current-events raft: eval b": 0.0}
    # a retention step on a domain no model has been scored on yet: what retention steps took
    seconds |= {"current-events rlag (seed 42): retention legal": 60, "current-events base: retention medical": 40}
    medical = [step("medical rlag: retention current-events")]
    assert expected(medical, seconds, ["current-events", "medical"]) == {"medical rlag: retention current-events": 50.0}


def test_an_evaluation_of_a_domain_not_yet_scored_is_expected_per_question():
    """Medical's evaluations score 300 questions, current-events' 162: an evaluation not recorded
    itself is expected at the recorded time per question, times its own domain's questions."""
    domains = ["current-events", "medical"]
    seconds = {"current-events rlag: eval a": 200, "current-events base: eval a": 100,
               "current-events rlag: train": 1000, "medical rlag: eval a": 900}
    steps = [Step(label, lambda: ["true"]) for label in
             ("medical base: eval a", "medical rlag: eval a", "medical sft: eval a", "medical rlag: train",
              "current-events sft: eval a")]
    questions = {"current-events": 100, "medical": 300}
    assert expected(steps, seconds, domains, questions=questions) == {
        "medical base: eval a": 300.0,  # base's own kind, 1 s per question
        "medical rlag: eval a": 900,  # recorded itself
        # other models' eval a: (2 + 1 + 3) / 3 s per question
        "medical sft: eval a": 600.0, "current-events sft: eval a": 200.0,
        "medical rlag: train": 1000}  # a training is not scaled
    unscaled = expected(steps, seconds, domains)
    assert unscaled["medical base: eval a"] == 100 and unscaled["medical sft: eval a"] == 400


def test_a_step_waits_while_its_expected_memory_would_not_fit_beside_the_running_one(tmp_path):
    from rich.console import Console

    trace = tmp_path / "trace"
    code = ("import sys, time; f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' start\\n'); f.flush(); "
            "time.sleep(0.5); f.write(sys.argv[2] + ' end\\n')")

    def step(name):
        return Step(name, lambda: [sys.executable, "-c", code, str(trace), name])

    huge = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.6
    failures = execute([step("a"), step("b")], Console(quiet=True), tmp_path, jobs=2,
                       memory_mb={"a": huge, "b": huge})
    assert failures == [] and trace.read_text().split("\n")[:4] == ["a start", "a end", "b start", "b end"]
    trace.unlink()
    execute([step("a"), step("b")], Console(quiet=True), tmp_path, jobs=2, memory_mb={"a": 1.0, "b": 1.0})
    assert sorted(trace.read_text().split("\n")[:2]) == ["a start", "b start"]  # both fit: they run together


def test_a_step_killed_by_sigkill_runs_again_alone_once(tmp_path):
    """The out-of-memory killer's SIGKILL fails nothing at once: the step runs again once, with
    no other step beside it; killed a second time, it fails."""
    from rich.console import Console

    trace = tmp_path / "trace"
    code = ("import os, signal, sys, time; from pathlib import Path; marker = Path(sys.argv[3]); "
            "f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' start\\n'); f.flush(); time.sleep(0.3); "
            "first = not marker.exists(); marker.touch(); "
            "os.kill(os.getpid(), signal.SIGKILL) if (first and sys.argv[4] == 'once') or sys.argv[4] == 'always' "
            "else None; "
            "f.write(sys.argv[2] + ' end\\n')")

    def step(name, kill="once", needs=()):
        return Step(name, lambda: [sys.executable, "-c", code, str(trace), name, str(tmp_path / f"{name}.marker"),
                                   kill], needs=list(needs))

    failures = execute([step("a"), step("b", kill="never"), step("c", kill="never", needs=["a"])],
                       Console(quiet=True), tmp_path, jobs=2)
    lines = trace.read_text().split("\n")
    assert failures == [] and lines.count("a start") == 2 and "a end" in lines and "c end" in lines
    assert lines.count("b start") == 1 and lines.count("c start") == 1
    again = lines.index("a start", lines.index("a start") + 1)
    assert "b end" in lines[:again] and lines[again + 1] == "a end"  # b had ended; nothing ran beside a
    failures = execute([step("d", kill="always"), step("e", kill="never", needs=["d"])], Console(quiet=True),
                       tmp_path, jobs=2)
    assert failures == [{"step": "d", "returncode": -9}, {"step": "e", "blocked_by": "d"}]


def test_a_step_to_run_alone_is_not_starved_by_the_steps_after_it(tmp_path):
    """With two jobs a free slot is filled at once, so both are rarely free together: once a step
    must run alone, nothing else starts until it has run."""
    from rich.console import Console

    trace = tmp_path / "trace"
    code = ("import os, signal, sys, time; from pathlib import Path; marker = Path(sys.argv[3]); "
            "f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' start\\n'); f.flush(); "
            "first = not marker.exists(); marker.touch(); "
            "os.kill(os.getpid(), signal.SIGKILL) if first and sys.argv[2] == 'b' else time.sleep(float(sys.argv[4])); "
            "f.write(sys.argv[2] + ' end\\n')")

    def step(name, seconds):
        return Step(name, lambda: [sys.executable, "-c", code, str(trace), name, str(tmp_path / f"{name}.marker"),
                                   str(seconds)])

    failures = execute([step("a", 1.5), step("b", 0.1), *(step(n, 0.6) for n in "cdef")], Console(quiet=True),
                       tmp_path, jobs=2)
    lines = trace.read_text().split("\n")
    assert failures == [] and lines.count("b start") == 2
    again = lines.index("b start", lines.index("b start") + 1)
    assert lines[again - 1] == "a end" and lines[again + 1] == "b end"  # a ended, b ran alone, then the rest
    assert all(f"{n} start" in lines[again:] for n in "cdef")


def test_a_step_started_last_stops_when_memory_runs_short_and_runs_again_alone(tmp_path):
    """Peaks differ between domains, so the expected peaks may let two steps start that do not
    fit: when available memory falls below the reserve, the step started last is stopped before
    the out-of-memory killer picks one, recorded as interrupted with its peak so far, and runs
    again alone; nothing fails."""
    from rich.console import Console

    from kembed.bench import recorded

    trace = tmp_path / "trace"
    code = ("import sys, time; f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' start\\n'); f.flush(); "
            "time.sleep(1.5); f.write(sys.argv[2] + ' end\\n')")

    def step(name):
        return Step(name, lambda: [sys.executable, "-c", code, str(trace), name])

    short = lambda: 0.0  # noqa: E731  (MiB available: always short)
    failures = execute([step("a"), step("b")], Console(quiet=True), tmp_path, jobs=2, available_mb=short)
    lines = trace.read_text().split("\n")
    assert failures == [] and lines[-3:] == ["b start", "b end", ""] and "a end" in lines[:-3]  # b ran again alone
    steps = read_jsonl(tmp_path / "bench-steps.jsonl")
    assert [(r["step"], r["returncode"], r.get("interrupted", False)) for r in steps] == [
        ("b", -15, True), ("a", 0, False), ("b", 0, False)]
    assert steps[0]["max_rss_mb"] > 0  # the stopped step's peak so far, not 0
    # a recorded peak is the largest of every run of the step, finished or not; seconds only of a finish
    (tmp_path / "bench-steps.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": "x", "returncode": -15, "seconds": 900, "max_rss_mb": 11000, "interrupted": True},
        {"step": "x", "returncode": 0, "seconds": 300, "max_rss_mb": 4000},
        {"step": "y", "returncode": -15, "seconds": 5, "max_rss_mb": 0, "interrupted": True}]) + "\n")
    assert recorded(tmp_path / "results", tmp_path, "max_rss_mb") == {"x": 11000.0}
    assert recorded(tmp_path / "results", tmp_path) == {"x": 300.0}
    # a step with no peak of its own is expected to need the largest of its kind, not the mean
    domains = ["current-events", "medical"]
    memory = {"current-events raft (seed 43): train": 11000.0, "current-events raft (seed 44): train": 13000.0}
    raft = [step("medical raft: train")]
    assert expected_memory(raft, memory, domains) == {"medical raft: train": 13000.0}
    assert expected(raft, memory, domains) == {"medical raft: train": 12000.0}


def test_methods_keeps_the_base_model_those_methods_and_the_tuning_they_need():
    from kembed.bench import only_methods
    from kembed.schedule import Step

    step = lambda label, needs=(): Step(label, lambda: [], lambda: False, list(needs))  # noqa: E731
    grid = {m: [f"tune current-events {m} (lr x1): train", f"tune current-events {m} (lr x1): eval"] for m in
            ("cpt", "cpt-sft")}
    steps = [step(grid["cpt"][0]), step(grid["cpt"][1], [grid["cpt"][0]]),
             step(grid["cpt-sft"][0]), step(grid["cpt-sft"][1], [grid["cpt-sft"][0]]),
             step("current-events base: eval closed-book-raw"), step("legal base: retention medical"),
             step("current-events cpt (seed 43): train", [grid["cpt"][1]]),
             step("current-events cpt (seed 43): eval closed-book-raw", ["current-events cpt (seed 43): train"]),
             step("current-events cpt-sft (seed 43): train", [grid["cpt-sft"][1]]),
             step("legal cpt: train", [grid["cpt"][1]])]
    kept = [s.label for s in only_methods(steps, ["cpt"], ["current-events", "legal"])]
    assert kept == [*grid["cpt"], "current-events base: eval closed-book-raw", "legal base: retention medical",
                    "current-events cpt (seed 43): train", "current-events cpt (seed 43): eval closed-book-raw",
                    "legal cpt: train"]
    assert [s.label for s in only_methods(steps, ["sft"], ["current-events", "legal"])] == [
        "current-events base: eval closed-book-raw", "legal base: retention medical"]


def test_one_domain_keeps_the_base_retention_samples_its_models_are_compared_against():
    """The base model's retention samples run under the first domain's base; --domains legal in a
    fresh output folder still needs its scores on current-events, medical and astronomy."""
    from kembed.bench import only_domains
    from kembed.schedule import Step

    labels = ["tune current-events sft (lr x1): train", "current-events base: eval closed-book-raw",
              "current-events base: retention medical", "current-events base: retention legal",
              "current-events base: retention astronomy", "current-events sft: retention legal",
              "medical base: retention current-events", "legal base: eval closed-book-raw",
              "legal sft: retention medical"]
    steps = [Step(label, lambda: [], lambda: False, []) for label in labels]
    assert [s.label for s in only_domains(steps, ["legal"])] == [
        "tune current-events sft (lr x1): train", "current-events base: retention medical",
        "current-events base: retention astronomy", "medical base: retention current-events",
        "legal base: eval closed-book-raw", "legal sft: retention medical"]
    # two domains: each one's base sample is needed by the other's models
    assert "current-events base: retention legal" in [s.label for s in only_domains(steps, ["legal", "medical"])]


def test_domains_run_in_the_order_listed():
    """--domains legal,astronomy: legal's steps first (so its models finish first), astronomy's after,
    each domain's steps in the order they had; what no listed domain owns comes before both."""
    from kembed.bench import in_domain_order
    from kembed.schedule import Step

    suite_domains = ["current-events", "medical", "legal", "astronomy"]
    labels = ["astronomy rlag: train", "legal raft: train", "astronomy base: eval closed-book-raw",
              "current-events base: retention astronomy", "legal raft: eval closed-book-raw",
              "tune current-events sft (lr x1): train"]
    steps = [Step(label, lambda: [], lambda: False, []) for label in labels]
    assert [s.label for s in in_domain_order(steps, ["legal", "astronomy"], suite_domains)] == [
        "current-events base: retention astronomy", "tune current-events sft (lr x1): train",
        "legal raft: train", "legal raft: eval closed-book-raw",
        "astronomy rlag: train", "astronomy base: eval closed-book-raw"]
    assert [s.label for s in in_domain_order(steps, ["astronomy", "legal"], suite_domains)][2] == "astronomy rlag: train"


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_the_running_steps_and_records_them(tmp_path, jobs):
    """SIGTERM to the bench (how a background bench is stopped) ends its running steps instead of
    leaving them to write into runs that the next invocation resumes, and records them."""
    import signal
    import threading
    import time

    from rich.console import Console

    code = ("import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); "
            "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(60)")
    steps = [Step(name, lambda n=name: [sys.executable, "-c", code, str(tmp_path / f"{n}.pid")])
             for name in ["a", "b", "c"][:jobs + 1]]  # one more than runs at once: it never starts

    def stop_once_running():
        while not all((tmp_path / f"{s.label}.pid").is_file() for s in steps[:jobs]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        execute(steps, Console(quiet=True), tmp_path, jobs=jobs)
    for step in steps[:jobs]:
        pid = int((tmp_path / f"{step.label}.pid").read_text())
        with pytest.raises(ProcessLookupError):  # ended and reaped
            os.kill(pid, 0)
    records = [json.loads(x) for x in (tmp_path / "bench-steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["returncode"], r["interrupted"]) for r in records] == [
        (s.label, -signal.SIGTERM, True) for s in steps[:jobs]]
    assert not (tmp_path / f"{steps[-1].label}.pid").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again


def test_an_interrupted_bench_records_its_time_and_exits_130(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    import kembed.bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kembed.bench, "execute", interrupted)
    out = tmp_path / "runs"
    result = runner.invoke(app, ["bench", str(mini_suite(tmp_path, tiny_model_dir)), "--out", str(out),
                                 "--results", str(tmp_path / "results")])
    assert result.exit_code == 130 and "run the same command to go on" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()
    [record] = [json.loads(x) for x in (out / "bench-invocations.jsonl").read_text().splitlines()]
    assert record["interrupted"] is True and record["finished"] is False and record["seconds"] >= 0


def test_step_times_compares_two_reports_on_the_steps_both_ran(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import step_times

    def report(name, steps):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"commit": name, "machine": "cpu", "steps": [
            {"step": label, "returncode": 0, "seconds": s} for label, s in steps.items()]
            + [{"step": "d base: eval x", "returncode": 1, "seconds": 999.0}]}))  # failed: not counted
        return str(path)

    before = report("a", {"d cpt: train": 100.0, "d base: eval x": 50.0, "d sft: train": 10.0})
    after = report("b", {"d cpt: train": 100.0, "d base: eval x": 25.0, "tune d rlag (lr x2): train": 75.0})
    assert step_times.main([before, after]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "steps both ran: 2 of 3 and 3" in out
    assert "eval 50 s -> 25 s ratio 0.50" in out and "all 150 s -> 125 s ratio 0.83" in out
    assert "after: b, cpu: 200 s of steps; eval 12%, train 88%" in out
    assert step_times.main([before]) == 0 and capsys.readouterr().out.strip() == \
        "a, cpu: 160 s of steps; eval 31%, train 69%"


def test_ranking_lines_name_the_decided_pairs_then_the_undecided():
    from kembed.results import ranking_lines

    pairs = [{"domain": "d", "a": "cpt", "b": "sft", "diff": 0.103, "ci95": [0.043, 0.16], "decided": True},
             {"domain": "d", "a": "cpt", "b": "rlag", "diff": 0.027, "ci95": [-0.019, 0.074], "decided": False}]
    assert ranking_lines(pairs, "closed-book-raw") == [
        "Rankings on closed-book-raw whose two-level 95% CI clears zero: cpt > sft (d, +10.3 pp [+4.3, +16.0])", "",
        "Undecided at this scale (the CI holds zero): cpt vs rlag (d, +2.7 pp [-1.9, +7.4])", ""]
    assert ranking_lines(pairs[1:], "x")[0] == \
        "Rankings on x whose two-level 95% CI clears zero: none: every pair of methods is undecided at this scale"


def test_training_seconds_counts_what_a_resume_kept_of_each_session():
    from kembed.runs import training_seconds

    def train(t, step, label="sft"):
        return {"event": "train", "time": t, "label": label, "step": step}

    # interrupted in epoch 2 (steps 3-4) after the epoch-1 checkpoint at step 2: the resume redoes step 3
    events = [{"event": "start", "time": 0.0}, train(10, 1), train(20, 2), train(30, 3),
              {"event": "start", "time": 100.0}, train(112, 3), train(118, 4), {"event": "end", "time": 120.0, "seconds": 20}]
    assert training_seconds(events) == 20 + 20
    assert training_seconds(events[:4]) is None  # never finished
    # an iterative method interrupted in its second iteration: the first iteration is kept, the
    # second one's steps are redone (their checkpoints went with the iteration)
    events = [{"event": "start", "time": 0.0}, train(5, 1, "iteration 1"), {"event": "iteration_end", "time": 50.0},
              train(60, 1, "iteration 2"), {"event": "start", "time": 200.0}, train(210, 1, "iteration 2"),
              {"event": "iteration_end", "time": 240.0}, {"event": "end", "time": 241.0}]
    assert training_seconds(events) == 50 + 41
