"""Label rules and the `label` step on small synthetic embeddings files."""

from __future__ import annotations

import difflib
import json

import numpy as np
import pandas as pd
import pytest

from vlmstates.analysis import labels as L
from vlmstates.cli import main
from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.store import SampleResult, write_embeddings

# ---------------------------------------------------------------------------------------------
# Text helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat!", "cat"),
        ("  A   red, umbrella. ", "red umbrella"),
        ("n, o", "no"),
        ("Y-E-S", "yes"),
        ("an apple", "apple"),
        ("two  dogs", "two dogs"),
    ],
)
def test_normalise(text, expected):
    assert L.normalise(text) == expected


@pytest.mark.parametrize(
    "ground_truth, expected",
    [("yes", "yes"), ("Yes.", "yes"), ("n, o", "no"), ("N", "no"), ("no", "no"), ("dog", None), ("", None)],
)
def test_yes_no_value(ground_truth, expected):
    assert L.yes_no_value(ground_truth) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes.", "yes"),
        ("**No**, there is no dog.", "no"),
        ("Not really.", "no"),
        ("Nope", "no"),
        ("There is a dog.", None),
        ("", None),
    ],
)
def test_leading_yes_no(answer, expected):
    assert L.leading_yes_no(answer) == expected


def test_numbers_digits_and_words():
    assert L.numbers("There are three dogs and 2 cats, 3.50 m") == {"3", "2", "3.5"}
    assert L.numbers("none here") == set()


# ---------------------------------------------------------------------------------------------
# The halp rule


def test_halp_similarity_decides_first():
    # ratio("dog", "a dog") = 2*3/8 = 0.75 >= 0.5: not hallucinated on similarity alone
    assert difflib.SequenceMatcher(None, "dog", "a dog").ratio() == pytest.approx(0.75)
    assert L.judge("halp", "A dog", "dog") == L.Judgement("false", "similarity")
    # ratio("cat", "dog") = 0 and nothing clears it
    assert L.judge("halp", "cat", "dog") == L.Judgement("true", "similarity")


def test_halp_threshold_is_inclusive_at_one_half():
    # "ab" vs "ax": one matching character of four -> 2*1/4 = 0.5, not below the threshold
    assert L.similarity("ax", "ab") == pytest.approx(0.5)
    assert L.judge("halp", "ax", "ab").hallucinated == "false"
    assert L.judge("halp", "xyz", "ab").hallucinated == "true"


def test_halp_yes_no_with_negation():
    # a long "no" answer is far from "no" by similarity but agrees by negation
    answer = "There isn't any chair visible anywhere in this picture."
    assert L.similarity(answer, "no") < 0.5
    assert L.judge("halp", answer, "no") == L.Judgement("false", "yesno")
    # a negative answer to a "yes" question is hallucinated
    answer = "No, there is no sports ball visible in the image."
    assert L.judge("halp", answer, "yes") == L.Judgement("true", "yesno")
    # an affirmative answer to a "no" question (AMBER spells it "n, o")
    assert L.judge("halp", "Yes, there is a beach in the image.", "n, o") == L.Judgement("true", "yesno")
    assert L.judge("halp", "Yes.", "no") == L.Judgement("true", "yesno")


def test_halp_negation_agreement_on_free_text():
    ground_truth = "He does not have a hat; He is without a hat"
    answer = "I can't tell what it says because the man is not wearing anything on his head."
    assert L.similarity(answer, ground_truth) < 0.5
    assert L.judge("halp", answer, ground_truth) == L.Judgement("false", "yesno")
    answer = 'Based on the image, the hat says "Make America Great Again".'
    assert L.judge("halp", answer, ground_truth) == L.Judgement("true", "similarity")


def test_halp_numbers():
    assert L.judge("halp", "There are 3 dogs in the picture.", "3") == L.Judgement("false", "number")
    assert L.judge("halp", "I count three dogs on the grass.", "3") == L.Judgement("false", "number")
    assert L.judge("halp", "There are 4 dogs in the picture.", "3") == L.Judgement("true", "similarity")


def test_halp_keywords():
    answer = "The woman is holding a red umbrella on a rainy street corner."
    assert L.similarity(answer, "red umbrella") < 0.5
    assert L.judge("halp", answer, "red umbrella") == L.Judgement("false", "keywords")
    # one of the two keywords is half of them: still cleared
    answer = "It is a bright red kite flying over the beach on a sunny day."
    assert L.judge("halp", answer, "red umbrella") == L.Judgement("false", "keywords")
    answer = "It is a blue kite flying over the beach on a sunny day."
    assert L.judge("halp", answer, "red umbrella") == L.Judgement("true", "similarity")


def test_empty_ground_truth_is_unjudged_by_every_rule():
    for method in ("halp", "yesno", "exact"):
        assert L.judge(method, "yes", "  ") == L.Judgement("", L.UNJUDGED_EMPTY_GT)


# ---------------------------------------------------------------------------------------------
# yesno and exact


def test_yesno_rule():
    assert L.judge("yesno", "Yes, it is.", "yes") == L.Judgement("false", "yesno")
    assert L.judge("yesno", "No.", "Yes") == L.Judgement("true", "yesno")
    assert L.judge("yesno", "**No**, not at all", "n, o") == L.Judgement("false", "yesno")
    assert L.judge("yesno", "A red umbrella", "red umbrella") == L.Judgement("", L.UNJUDGED_NOT_YESNO)
    assert L.judge("yesno", "I think so", "yes") == L.Judgement("", L.UNJUDGED_NO_LEADING_YESNO)


def test_exact_rule():
    assert L.judge("exact", "The red umbrella.", "red umbrella") == L.Judgement("false", "exact")
    assert L.judge("exact", "RED   Umbrella!", "a red umbrella") == L.Judgement("false", "exact")
    assert L.judge("exact", "blue umbrella", "red umbrella") == L.Judgement("true", "exact")
    assert (
        L.judge("exact", "He is without a hat", "He does not have a hat; He is without a hat").hallucinated == "false"
    )


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown label method"):
        L.judge("fuzzy", "a", "b")


# ---------------------------------------------------------------------------------------------
# Whole files


def _write(path, rows):
    """rows: (question_id, image_id, ground_truth, answer, status)."""
    results = []
    for qid, image, gt, answer, status in rows:
        if status == "ok":
            results.append(
                SampleResult(
                    qid, image, "question?", gt, answer=answer, vectors={"vision_only_representation": np.zeros(2)}
                )
            )
        else:
            results.append(SampleResult.failed(qid, image, "question?", gt, "CUDA out of memory"))
    write_embeddings(path, results, {"vision_only_representation": 2}, {"model": "test/model", "layers": [0]})
    return path


ROWS = [
    ("q1", "i1", "yes", "Yes.", "ok"),
    ("q2", "i1", "no", "Yes, there is.", "ok"),
    ("q3", "i2", "3", "There are 3 cats.", "ok"),
    ("q4", "i2", "", "Something", "ok"),
    ("q5", "i3", "red umbrella", "", "failed"),
    ("q6", "i3", "red umbrella", "A green kite", "ok"),
]


def test_label_embeddings_writes_csv_and_summary(tmp_path):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    out = tmp_path / "labels.csv"
    summary = L.label_embeddings(h5, out, "halp")
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table.columns) == list(L.LABEL_COLUMNS)
    assert table["question_id"].tolist() == [r[0] for r in ROWS]
    assert table["hallucinated"].tolist() == ["false", "true", "false", "", "", "true"]
    assert table.loc[3, "decided_by"] == L.UNJUDGED_EMPTY_GT
    assert table.loc[4, "decided_by"] == L.UNJUDGED_FAILED
    assert summary["n_total"] == 6 and summary["n_judged"] == 4 and summary["n_hallucinated"] == 2
    assert summary["positive_rate"] == pytest.approx(0.5)
    assert summary["unjudged_by_reason"] == {L.UNJUDGED_EMPTY_GT: 1, L.UNJUDGED_FAILED: 1}
    assert json.loads(L.summary_path(out).read_text()) == json.loads(json.dumps(summary))
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_yesno_method_counts_non_yes_no_questions(tmp_path):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "yesno")
    assert summary["n_judged"] == 2
    assert summary["unjudged_by_reason"][L.UNJUDGED_NOT_YESNO] == 2


def test_file_method(tmp_path):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    supplied = tmp_path / "human.csv"
    supplied.write_text("question_id,hallucinated\nq1,1\nq2,False\nq3,\nq5,true\nq6,yes\n")
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "file", supplied)
    table = pd.read_csv(tmp_path / "labels.csv", dtype=str, keep_default_na=False)
    assert table["hallucinated"].tolist() == ["true", "false", "", "", "", "true"]
    assert table["decided_by"].tolist() == [
        "file", "file", L.UNJUDGED_EMPTY_IN_FILE, L.UNJUDGED_NOT_IN_FILE, L.UNJUDGED_FAILED, "file",
    ]  # fmt: skip
    assert summary["n_judged"] == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("question_id,hallucinated\nq1,true\nq2,maybe\n", r"line 3 \(question_id 'q2'\): hallucinated is 'maybe'"),
        ("question_id,hallucinated\nq1,true\n,false\n", "line 3: empty question_id"),
        ("question_id,hallucinated\nq1,true\nq9,false\n", "line 3: question_id 'q9' is not in the embeddings file"),
        ("question_id,hallucinated\nq1,true\nq1,false\n", "line 3: question_id 'q1' repeats line 2"),
        ("question_id,label\nq1,true\n", "missing column"),
    ],
)
def test_file_method_errors_name_the_row(tmp_path, content, message):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    supplied = tmp_path / "human.csv"
    supplied.write_text(content)
    with pytest.raises(ValueError, match=message):
        L.label_embeddings(h5, tmp_path / "labels.csv", "file", supplied)
    assert not (tmp_path / "labels.csv").exists()


def test_file_method_can_skip_questions_not_in_the_embeddings(tmp_path, caplog):
    """The workflow's dataset.limit leaves out questions that a labels file may still name."""
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    supplied = tmp_path / "human.csv"
    supplied.write_text("question_id,hallucinated\nq1,true\nq9,false\nq10,true\n")
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "file", supplied, ignore_unknown=True)
    assert summary["n_judged"] == 1 and summary["n_hallucinated"] == 1
    assert "2 rows name questions not in the embeddings file" in caplog.text and "q9, q10" in caplog.text
    supplied.write_text("question_id,hallucinated\nq9,false\nq9,true\n")
    with pytest.raises(ValueError, match="repeats line 2"):  # still checked
        L.label_embeddings(h5, tmp_path / "labels.csv", "file", supplied, ignore_unknown=True)


def test_demo_stand_in_labels(tmp_path):
    """The demo's labels are those of an always-"yes" answerer: true where the truth is "no"."""
    questions = pd.read_csv(write_demo_dataset(tmp_path, n_images=8), dtype=str, keep_default_na=False)
    labels = pd.read_csv(tmp_path / "labels.csv", dtype=str, keep_default_na=False)
    assert list(labels.columns) == ["question_id", "hallucinated"]
    assert labels["question_id"].tolist() == questions["question_id"].tolist()
    expected = questions["answer"].map({"no": "true", "yes": "false"}).fillna("")
    assert labels["hallucinated"].tolist() == expected.tolist()
    assert (labels["hallucinated"] == "true").sum() == (labels["hallucinated"] == "false").sum() == 4


def test_file_method_needs_a_file(tmp_path):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    with pytest.raises(ValueError, match="needs a labels file"):
        L.label_embeddings(h5, tmp_path / "labels.csv", "file")


def test_cli(tmp_path, capsys):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    assert main(["label", str(h5), "--method", "exact"]) == 0
    assert (tmp_path / "labels.csv").exists() and (tmp_path / "labels.summary.json").exists()
    assert "judged by exact" in capsys.readouterr().out
    # as the workflow calls it: every path given, an empty --labels-file for the text rules
    code = main(
        ["label", str(h5), "--method", "yesno", "--labels-file", "", "-o", str(tmp_path / "l.csv"),
         "--summary", str(tmp_path / "s.json")]
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "s.json").read_text())["labels_file"] is None


def test_a_bad_labels_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    labels = tmp_path / "mine.csv"
    labels.write_text("question_id,hallucinated\nnot-a-question,true\n")
    code = main(["label", str(h5), "--method", "file", "--labels-file", str(labels), "-o", str(tmp_path / "l.csv")])
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert f"labels file {labels}, line 2: question_id 'not-a-question'" in error
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize(
    ("ground_truth", "expected"),
    [
        ("yes", "yes/no"), ("No", "yes/no"), ("n, o", "yes/no"), ("y, e, s", "yes/no"), ("Y", "yes/no"),
        ("3", "number"), ("-2.5", "number"), ("1,024", "number"), ("40%", "number"), ("seven", "number"),
        ("3 apples", "other"), ("B", "other"), ("a red hat", "other"), ("", "other"), ("nothing", "other"),
    ],
)  # fmt: skip
def test_answer_type_is_read_off_the_ground_truth(ground_truth, expected):
    assert L.answer_type(ground_truth) == expected
