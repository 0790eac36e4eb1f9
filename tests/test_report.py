"""The side-by-side report: retention against the dense row, dense rows deduplicated, figures written."""

import json

import pytest

from foldgpt.cli.main import main
from foldgpt.workflows.report import collect_rows, report_table


def fake_run(folder, model="m", compressed_acc=0.6, unique=60):
    folder.mkdir(parents=True)
    dense = {"perplexity": {"wikitext2": {"perplexity": 20.0}}, "tasks": {"piqa": {"acc": 0.8, "acc_norm": 0.7}, "boolq": {"acc": 0.6}}}
    compressed = {"perplexity": {"wikitext2": {"perplexity": 30.0}},
                  "tasks": {"piqa": {"acc": compressed_acc, "acc_norm": 0.5}, "boolq": {"acc": compressed_acc}}}
    (folder / "summary.json").write_text(json.dumps({"model": model, "parameters": {"dense": 100, "unique": unique, "materialised": 90},
                                                     "dense": dense, "compressed": compressed}))
    return folder


def test_retention_and_parameter_share_are_relative_to_the_dense_row(tmp_path):
    rows = collect_rows([fake_run(tmp_path / "a"), fake_run(tmp_path / "b", compressed_acc=0.35, unique=50)])
    assert [row.label for row in rows] == ["m (dense)", "a", "b"]  # the shared dense model appears once
    header, cells = report_table(rows)
    column = {name: i for i, name in enumerate(header)}
    assert cells[0][column["avg acc"]] == "0.7000" and cells[0][column["acc retained"]] == "100.0%"
    assert cells[1][column["avg acc"]] == "0.6000" and cells[1][column["acc retained"]] == "85.7%"
    assert cells[2][column["% of dense"]] == "50.0%"
    assert cells[1][column["piqa acc / acc_norm"]] == "0.6000 / 0.5000"
    assert cells[1][column["wikitext2 ppl"]] == "30.00"


def test_cli_report_writes_markdown_json_and_a_plot(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    (run / "analysis").mkdir()
    (run / "analysis" / "similarity_heatmap.png").write_bytes(b"\x89PNG fake")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| m (dense) |" in markdown and "run-similarity_heatmap.png" in markdown
    assert (tmp_path / "report" / "perplexity_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "report" / "report.json").read_text())["rows"]) == 2
    assert "acc retained" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing", "not-a-run"])
def test_bad_report_inputs_are_one_line_errors(tmp_path, capsys, name):
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / name), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("foldgpt: error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()
