"""Results tables: one Markdown helper, and console tables that fit an 80-column terminal with no
header word split across lines and no number wrapped."""

import io
import re

from rich.console import Console

from kembed.results import console_tables
from kembed.evaluate import results_markdown, results_table
from kembed.judges.pairwise import pairwise_table
from kembed.tables import ConsoleTables, markdown_table


def render(renderable, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def header_cells(table: ConsoleTables) -> tuple[list[str], list[str]]:
    """The headers of the numeric columns and their cells, and the words of the other headers."""
    numbers = [table.header[c] for c in table.numbers] + [row[c] for row in table.body for c in table.numbers]
    words = [w for c, h in enumerate(table.header) if c not in table.numbers for w in h.split()]
    return numbers, words


def assert_fits(table: ConsoleTables, width: int) -> str:
    text = render(table, width)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    numbers, words = header_cells(table)
    lines = text.splitlines()
    for cell in numbers:  # each numeric header and number on one line, whole
        assert any(cell in line for line in lines), f"{cell!r} wrapped in:\n{text}"
    for word in words:  # each word of the other headers whole
        assert any(word in line for line in lines), f"{word!r} split in:\n{text}"
    return text


def evaluation(acc, lo, hi, diff=None, grounded=None):
    cell = {"accuracy": acc, "ci95": [lo, hi]}
    if diff:
        cell["vs_reference"] = {"diff": diff[0], "ci95": [diff[1], diff[2]], "p_value": diff[3]}
    if grounded:
        cell["grounded"] = dict(zip(("mean_score", "scored", "unable_share", "unable_ci95"), grounded))
    return cell


# the main job's comparison: base and RLAG, closed-book raw and retrieved-context chat
LABELS = ["closed-book-raw", "retrieved-context-chat"]
ROWS = [
    {"name": "base", "training_seconds": None, "coverage": None,
     "evals": {"closed-book-raw": evaluation(0.167, 0.117, 0.228, grounded=(0.08, 27, 0.519, [0.34, 0.693])),
               "retrieved-context-chat": evaluation(0.698, 0.63, 0.765)}},
    {"name": "rlag", "training_seconds": 522.0, "coverage": {"answer_covered": 59, "answer_in_snippets": 123},
     "evals": {"closed-book-raw": evaluation(0.216, 0.16, 0.278, (0.049, 0.006, 0.093, 0.039),
                                             (0.46, 35, 0.086, [0.03, 0.224])),
               "retrieved-context-chat": evaluation(0.809, 0.747, 0.864, (0.111, 0.043, 0.179, 0.0004))}},
]


def test_markdown_table():
    assert markdown_table(["a", "b c"], [["1", "2"], ["3", "4"]]) == "| a | b c |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"


def test_compare_table_fits_80_columns():
    table = console_tables(ROWS, LABELS, "kembed compare")
    text = assert_fits(table, 80)
    assert "+11.1 [+4.3, +17.9], <0.001" in text and "59/123" in text and "0.46 (35)" in text
    assert text.count("kembed compare") == 4  # one table per evaluation, one for rationality, one for time and coverage
    assert "answer known:" in text  # the legend explains the short headers
    assert render(table, 250).count("kembed compare") == 1  # a wide terminal gets one table


def test_compare_through_the_cli_at_80_columns(data_dir, tmp_path, monkeypatch):
    import kembed.cli
    from conftest import write_evaluation
    from test_bench import GOOD, invoke

    for name, correct, explained in (("base", [False, True, False, False], {1: GOOD[1]}), ("rlag", [True] * 4, GOOD)):
        write_evaluation(tmp_path / name / "eval-test-closed-book-raw", name, correct, explained)
        write_evaluation(tmp_path / name / "eval-test-retrieved-context-raw", name, correct, mode="retrieved-context")
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(kembed.cli, "console", console)
    result = invoke("compare", tmp_path / "base", tmp_path / "rlag")
    assert result.exit_code == 0, result.output
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for cell in ("closed-book-raw %", "retrieved-context-raw vs base", "grounded (n)", "answer known"):
        assert cell in text, text
    assert re.search(r"\+75\.0 \[\+[\d.]+, \+[\d.]+\], 0\.250", text), text  # 3/4 vs 0/4 paired, on one line
    markdown = invoke("compare", tmp_path / "base", tmp_path / "rlag", "--markdown").output
    assert "| model | closed-book-raw % [95% CI] | closed-book-raw vs base (pp) [paired CI], p |" in markdown


def test_long_model_names_wrap_between_words_only():
    rows = [{**r, "name": f"{r['name']} run from the long folder name 2026-11-21"} for r in ROWS]
    text = assert_fits(console_tables(rows, LABELS, "kembed compare"), 80)
    assert "2026-11-21" in text


def test_results_and_pairwise_tables_fit_80_columns():
    scorers = ("token_mean", "sum", "char_norm")
    summary = {"model": "smollm2-135m-instruct", "domain": "current-events", "split": "test", "n": 162,
               "accuracy": dict.fromkeys(scorers, 0.167), "ci95": dict.fromkeys(scorers, [0.117, 0.228]),
               "trained_on": "rlag: 120 records (seed 42)",
               "coverage": {"answer_covered": 59, "answer_in_snippets": 123}}
    rows = [{**summary, "mode": "closed-book", "format": "raw"},
            {**summary, "mode": "retrieved-context", "format": "chat", "index": "bm25", "top_k": 3}]
    text = assert_fits(results_table(rows), 80)
    assert "retrieved-context" in text and "rlag: 120 records" in text
    assert "token_mean % [95% CI]" in results_markdown(rows)  # Markdown keeps the full headers

    stats = {"n": 40, "wins": 20, "losses": 10, "ties": 10, "win_rate": 0.625, "ci95": [0.5, 0.75],
             "sign_test_p": 0.0987}
    result = {"run": "rlag-current-events", "reference": "base", "stats": stats, "order_flip_rate": 0.25,
              "judge_failed": 1, "usage": {"prompt_tokens": 12000, "completion_tokens": 800}}
    assert "62.5 [50.0, 75.0]" in assert_fits(pairwise_table([result]), 80)


def test_pack_keeps_groups_together():
    table = ConsoleTables("t", ["k", "a", "b", "c"], [["x", "1" * 30, "2" * 30, "3" * 30]], numbers=[1, 2, 3],
                          groups=[[1, 2], [3]])
    assert table.pack(80) == [[0, 1, 2], [0, 3]]
    assert table.pack(40) == [[0, 1, 2], [0, 3]]  # a group too wide for the width still gets one table
    assert table.pack(200) == [[0, 1, 2, 3]]
