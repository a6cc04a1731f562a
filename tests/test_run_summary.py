"""The run's closing lines on their own files (the demo run's are tested in test_workflow.py)."""

from __future__ import annotations

import json

from vlmstates.workflow.run_summary import dataset_line, error_excerpt, the_command

TRACEBACK = """\
2026-01-01 INFO loading /models/broken
Traceback (most recent call last):
  File "/x/engine.py", line 92, in load_model
    raise OSError(
OSError: Can't load image processor for '/models/broken'
"""


def test_the_excerpt_of_a_traceback_is_its_exception(tmp_path):
    log = tmp_path / "shard.log"
    log.write_text(TRACEBACK)
    assert [line.strip() for line in error_excerpt(log)] == ["OSError: Can't load image processor for '/models/broken'"]


def test_the_excerpt_of_a_refused_step_is_its_message(tmp_path):
    log = tmp_path / "merge.log"
    log.write_text("INFO reading\nvlmstates merge: shard a.h5: question q7 repeats\n  first in b.h5\n")
    assert [line.strip() for line in error_excerpt(log)] == [
        "vlmstates merge: shard a.h5: question q7 repeats",
        "first in b.h5",
    ]


def test_the_excerpt_of_an_empty_log_is_empty(tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("")
    assert error_excerpt(log) == []


def test_dataset_line_tells_a_refused_table_from_dropped_rows(tmp_path):
    (tmp_path / "dataset").mkdir()
    report = tmp_path / "dataset" / "validation.json"
    counts = {"rows_read": 7, "rows_kept": 6, "rows_dropped": 1, "errors": 1}
    report.write_text(json.dumps({"ok": False, "counts": counts}))
    assert "validation failed with 1 error(s) in 7 rows read" in dataset_line(tmp_path)
    report.write_text(json.dumps({"ok": True, "counts": counts}))
    assert "7 rows read, 6 kept, 1 dropped by validation" in dataset_line(tmp_path)
    assert dataset_line(tmp_path / "nowhere") is None


def test_the_command_to_run_again_quotes_its_arguments():
    argv = ["/venv/bin/snakemake", "--cores", "2", "--config", "labels={method: halp}"]
    assert the_command(argv) == "snakemake --cores 2 --config 'labels={method: halp}'"


def test_an_unreadable_file_is_reported_not_raised(tmp_path, monkeypatch):
    from vlmstates.workflow.run_summary import run_summary

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "m").mkdir(parents=True)
    (tmp_path / "results" / "m" / "embeddings.h5").write_text("not hdf5")
    config = {"results": "results", "models": {"m": {}}, "extraction": {"shard_size": 4}}
    text = run_summary(config, succeeded=True, argv=["snakemake"])
    assert "  m: could not be summarised (" in text and text.rstrip().endswith("--report report.html")
