"""Language-model judges (rubric, pairwise) and their client, against a scripted local server."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest
from judge_server import JudgeServer, Reply

from kembed.errors import KembedError
from kembed.judges import JUDGE_FAILED, ExplanationItem
from kembed.judges.client import JudgeClient, LocalBackend
from kembed.judges.pairwise import PairwiseJudge, check_self_judge, model_family
from kembed.judges.rubric import TEMPLATE_VERSION, RubricJudge

GOOD = '{"logical_clarity": 5, "factual_accuracy": 3, "unable_to_explain": false}'


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def item(i: int, explanation: str = "Paris holds the Eiffel Tower, so A.") -> ExplanationItem:
    return ExplanationItem(f"q{i}", f"Where is the Eiffel Tower? ({i})", ("Paris", "Rome"), 0, 0,
                           ("The Eiffel Tower is in Paris.",), explanation)


def client_for(server, tmp_path, **options) -> JudgeClient:
    options = {"backoff": 0.01, "timeout": 5.0, **options}
    return JudgeClient.endpoint(server.url, "judge-model", cache_path=tmp_path / "cache.sqlite", **options)


def test_rubric_parses_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    with JudgeServer(default=lambda p: f"Here you go:\n```json\n{GOOD}\n```") as server:
        client = client_for(server, tmp_path, api_key_env="TEST_JUDGE_KEY", max_tokens=64)
        [j] = RubricJudge(client).judge([item(1)])
    assert (j.verdict, j.score, j.unable) == ("scored", 0.75, False)
    assert j.details["logical_clarity"] == 5 and j.details["factual_accuracy"] == 3 and GOOD in j.details["raw"]
    assert j.settings["template_version"] == TEMPLATE_VERSION
    assert j.settings["client"] == {"backend": "endpoint", "model": "judge-model", "url": server.url,
                                    "decoding": {"temperature": 0, "max_tokens": 64}}
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert req["body"]["max_tokens"] == 64
    prompt = req["body"]["messages"][0]["content"]
    assert "The Eiffel Tower is in Paris." in prompt and "Reference answer: A. Paris" in prompt
    assert "sk-test" not in json.dumps(j.settings)


def test_missing_api_key_is_an_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(KembedError, match="judge endpoint .*NO_SUCH_KEY_VAR"):
        JudgeClient.endpoint("http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_KEY_VAR", cache_path=False)


def test_malformed_retried_then_failed_and_raw_cached(tmp_path):
    bad = ["I think it is fine.", '{"logical_clarity": 9, "factual_accuracy": 3, "unable_to_explain": false}']
    with JudgeServer(script=[Reply(b) for b in bad] + [Reply("nope"), Reply(GOOD)]) as server:
        client = client_for(server, tmp_path, max_concurrency=1)
        j1, j2 = RubricJudge(client, max_attempts=2).judge([item(1), item(2)])
        assert len(server.requests) == 4  # both first attempts, then both retries
        assert (j1.verdict, j1.score, j1.unable) == (JUDGE_FAILED, None, None)
        assert j1.details["attempts"] == 2 and j1.details["raw_attempts"] == [bad[0], "nope"]
        assert (j2.verdict, j2.score, j2.details["attempts"]) == ("scored", 0.75, 2)
        # the cache holds the raw texts only, each attempt under its own key
        rows = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT text FROM completions").fetchall()
        assert sorted(r[0] for r in rows) == sorted(bad + ["nope", GOOD])
        # a second run answers from the cache: same verdicts, no request
        again = client_for(server, tmp_path)
        k1, k2 = RubricJudge(again, max_attempts=2).judge([item(1), item(2)])
        assert len(server.requests) == 4 and again.usage["requests"] == 0 and again.usage["cache_hits"] == 4
        assert (k1.verdict, k2.verdict) == (j1.verdict, j2.verdict)


def test_cache_hit_and_usage(tmp_path):
    with JudgeServer(default=lambda p: GOOD) as server:
        client = client_for(server, tmp_path)
        judge = RubricJudge(client)
        seen = []
        first = judge.judge([item(1), item(2), item(3)], progress=seen.append)
        assert sum(seen) == 3 and len(server.requests) == 3
        assert client.usage == {"requests": 3, "cache_hits": 0, "prompt_tokens": 30, "completion_tokens": 15}
        second = judge.judge([item(1), item(2), item(3)])
        assert len(server.requests) == 3
        assert client.usage == {"requests": 3, "cache_hits": 3, "prompt_tokens": 30, "completion_tokens": 15}
        assert [j.to_dict() for j in first] == [j.to_dict() for j in second]
        # a different explanation is a different prompt: one new request
        judge.judge([item(1, "Because Rome.")])
        assert len(server.requests) == 4


def test_reparse_makes_no_calls(tmp_path):
    with JudgeServer() as server:
        client = client_for(server, tmp_path)
        judge = RubricJudge(client)
        j = judge.reparse('{"logical_clarity": 1, "factual_accuracy": 1, "unable_to_explain": true}', "q9")
        assert (j.id, j.verdict, j.score, j.unable) == ("q9", "unable", 0.0, True)
        assert judge.reparse("no json here").verdict == JUDGE_FAILED
        assert server.requests == [] and client.usage["requests"] == 0


def test_timeout_retried(tmp_path):
    with JudgeServer(script=[Reply(GOOD, delay=1.5), Reply(GOOD)]) as server:
        client = client_for(server, tmp_path, timeout=0.3)
        [j] = RubricJudge(client).judge([item(1)])
    assert j.verdict == "scored" and len(server.requests) == 2 and client.usage["requests"] == 1


def test_retry_after_and_500(tmp_path):
    script = [Reply(status=429, body='{"error": "slow down"}', headers={"Retry-After": "1"}),
              Reply(status=500, body="oops"), Reply(GOOD)]
    with JudgeServer(script=script) as server:
        client = client_for(server, tmp_path)
        start = time.monotonic()
        [j] = RubricJudge(client).judge([item(1)])
        elapsed = time.monotonic() - start
    t = [r["time"] for r in server.requests]
    assert j.verdict == "scored" and len(t) == 3
    assert t[1] - t[0] >= 0.95  # Retry-After: 1 honoured
    assert t[2] - t[1] < 0.5  # 500: the short back-off
    assert elapsed < 3


def test_retries_exhausted_and_4xx(tmp_path):
    with JudgeServer(script=[Reply(status=503, body="down")] * 3) as server:
        client = client_for(server, tmp_path, max_retries=2)
        with pytest.raises(KembedError, match="judge endpoint " + re.escape(server.url) + r".*HTTP 503"):
            RubricJudge(client).judge([item(1)])
        assert len(server.requests) == 3
    with JudgeServer(script=[Reply(status=401, body="bad key")]) as server:
        client = client_for(server, tmp_path, max_retries=3)
        with pytest.raises(KembedError, match="HTTP 401"):
            RubricJudge(client).judge([item(1)])
        assert len(server.requests) == 1


def test_endpoint_backend_is_shared_with_the_teacher():
    import kembed.endpoint
    import kembed.judges.client as client

    assert client.EndpointBackend is kembed.endpoint.EndpointBackend
    assert client.Completion is kembed.endpoint.Completion


def test_connection_error_gives_up(tmp_path):
    with JudgeServer() as server:
        url = server.url
    client = JudgeClient.endpoint(url, "m", cache_path=False, backoff=0.01, max_retries=1, timeout=1)
    with pytest.raises(KembedError, match="connection error"):
        client.complete(["hello"])


def explanations(prompt: str) -> tuple[str, str]:
    a = prompt.split('Explanation A:\n"""\n', 1)[1].split('\n"""', 1)[0]
    b = prompt.split('Explanation B:\n"""\n', 1)[1].split('\n"""', 1)[0]
    return a, b


def prefer_marker(prompt: str) -> str:
    a, b = explanations(prompt)
    if "BROKEN" in a or "BROKEN" in b:
        return "I cannot decide."
    return '{"better": "%s"}' % ("A" if "MARKER" in a else "B" if "MARKER" in b else "tie")


def runs():
    a = [item(1, "MARKER a1"), item(2, "MARKER a2"), item(3, "plain a3"), item(4, "only in a")]
    b = [item(1, "plain b1"), item(2, "plain b2"), item(3, "MARKER b3"), item(5, "only in b")]
    return a, b


def test_pairwise_maps_the_swap_back(tmp_path):
    with JudgeServer(default=prefer_marker) as server:
        client = client_for(server, tmp_path)
        a, b = runs()
        out = PairwiseJudge(client).compare(a, b)
        assert len(server.requests) == 6  # 3 shared questions x 2 orders
        firsts = [explanations(r["body"]["messages"][0]["content"]) for r in server.requests]
        assert ("MARKER a1", "plain b1") in firsts and ("plain b1", "MARKER a1") in firsts
    assert [q["id"] for q in out["per_question"]] == ["q1", "q2", "q3"]
    assert out["outcomes"] == ["win", "win", "loss"]
    assert [(q["first"], q["second"]) for q in out["per_question"]] == [("a", "a"), ("a", "a"), ("b", "b")]
    assert out["order_flip_rate"] == 0.0 and out["judge_failed"] == 0
    assert (out["stats"]["n"], out["stats"]["wins"], out["stats"]["losses"]) == (3, 2, 1)
    assert out["usage"]["requests"] == 6 and out["usage"]["prompt_tokens"] == 60
    assert out["judge"] == "pairwise" and out["settings"]["client"]["backend"] == "endpoint"
    # b against a mirrors the outcomes
    assert PairwiseJudge(client).compare(b, a)["outcomes"] == ["loss", "loss", "win"]


def test_pairwise_position_bias_is_a_tie(tmp_path):
    with JudgeServer(default=lambda p: '{"better": "A"}') as server:
        out = PairwiseJudge(client_for(server, tmp_path)).compare(*runs())
    assert out["outcomes"] == ["tie"] * 3 and out["order_flip_rate"] == 1.0
    assert out["stats"]["ties"] == 3 and out["stats"]["win_rate"] == 0.5


def test_pairwise_judge_failed_left_out(tmp_path):
    a, b = runs()
    b[1] = item(2, "BROKEN b2")
    with JudgeServer(default=prefer_marker) as server:
        out = PairwiseJudge(client_for(server, tmp_path), max_attempts=2).compare(a, b)
        assert len(server.requests) == 6 + 2  # the two orders of q2 asked again once each
    assert out["judge_failed"] == 1 and out["outcomes"] == ["win", "loss"]
    assert out["per_question"][1] == {"id": "q2", "first": None, "second": None, "outcome": JUDGE_FAILED,
                                      "raw": ["I cannot decide.", "I cannot decide."]}
    assert out["stats"]["n"] == 2 and out["order_flip_rate"] == 0.0


def test_model_family_and_self_judge(tmp_path):
    assert model_family("smollm2-135m-instruct") == "smollm2"
    assert model_family("HuggingFaceTB/SmolLM2-360M-Instruct") == "smollm2"
    assert model_family("meta-llama/Llama-3.1-8B-Instruct") == "llama"
    assert model_family("Qwen/Qwen2.5-7B-Instruct") == "qwen"
    assert model_family("gpt-4o") == "gpt" and model_family("gpt-4o-mini") == "gpt"
    assert model_family("mistralai/Mistral-7B-Instruct-v0.3") == "mistral"
    run = tmp_path / "rlag-run"
    (run / "model").mkdir(parents=True)
    (run / "kembed-run.json").write_text("{}")
    (run / "config.yaml").write_text("method: rlag\nmodel: smollm2-135m-instruct\n")
    assert model_family(str(run)) == "smollm2" and model_family(str(run / "model")) == "smollm2"
    assert model_family("/somewhere/smollm2-rlag/model") == "smollm2"

    with pytest.raises(KembedError, match="allow-self-judge"):
        check_self_judge([str(run / "model"), "Qwen/Qwen2.5-0.5B-Instruct"], "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                         allow=False)
    check_self_judge([str(run / "model")], "HuggingFaceTB/SmolLM2-1.7B-Instruct", allow=True)
    check_self_judge([str(run / "model"), "Qwen/Qwen2.5-0.5B-Instruct"], "gpt-4o", allow=False)


def test_local_backend_runs_and_caches(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_model

    from kembed.models import choose_placement

    placement = choose_placement("cpu", "fp32")
    model = build_tiny_model(tiny_tokenizer)

    def client():
        backend = LocalBackend(model, tiny_tokenizer, placement, model_id="tiny-test", max_new_tokens=6, batch_size=2)
        return JudgeClient(backend, cache_path=tmp_path / "local.sqlite")

    first = client()
    assert first.describe() == {"backend": "local", "model": "tiny-test",
                                "decoding": {"greedy": True, "max_new_tokens": 6}}
    judgments = RubricJudge(first, max_attempts=2).judge([item(1), item(2)])
    assert len(judgments) == 2 and all(j.score is None or 0 <= j.score <= 1 for j in judgments)
    n = first.usage["requests"]
    assert 2 <= n <= 4 and first.usage["cache_hits"] == 0
    assert first.usage["prompt_tokens"] > 100 * n and 0 < first.usage["completion_tokens"] <= 6 * n
    second = client()
    again = RubricJudge(second, max_attempts=2).judge([item(1), item(2)])
    assert second.usage == {"requests": 0, "cache_hits": n, "prompt_tokens": 0, "completion_tokens": 0}
    assert [j.to_dict() for j in again] == [j.to_dict() for j in judgments]
