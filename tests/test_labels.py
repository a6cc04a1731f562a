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
# The difflib_lenient rule (the former halp)


def test_difflib_lenient_similarity_decides_first():
    # ratio("dog", "a dog") = 2*3/8 = 0.75 >= 0.5: not hallucinated on similarity alone
    assert difflib.SequenceMatcher(None, "dog", "a dog").ratio() == pytest.approx(0.75)
    assert L.judge("difflib_lenient", "A dog", "dog") == L.Judgement("false", "similarity")
    # ratio("cat", "dog") = 0 and nothing clears it
    assert L.judge("difflib_lenient", "cat", "dog") == L.Judgement("true", "similarity")


def test_difflib_lenient_threshold_is_inclusive_at_one_half():
    # "ab" vs "ax": one matching character of four -> 2*1/4 = 0.5, not below the threshold
    assert L.similarity("ax", "ab") == pytest.approx(0.5)
    assert L.judge("difflib_lenient", "ax", "ab").hallucinated == "false"
    assert L.judge("difflib_lenient", "xyz", "ab").hallucinated == "true"


def test_difflib_lenient_yes_no_with_negation():
    # a long "no" answer is far from "no" by similarity but agrees by negation
    answer = "There isn't any chair visible anywhere in this picture."
    assert L.similarity(answer, "no") < 0.5
    assert L.judge("difflib_lenient", answer, "no") == L.Judgement("false", "yesno")
    # a negative answer to a "yes" question is hallucinated
    answer = "No, there is no sports ball visible in the image."
    assert L.judge("difflib_lenient", answer, "yes") == L.Judgement("true", "yesno")
    # an affirmative answer to a "no" question (AMBER spells it "n, o")
    assert L.judge("difflib_lenient", "Yes, there is a beach in the image.", "n, o") == L.Judgement("true", "yesno")
    assert L.judge("difflib_lenient", "Yes.", "no") == L.Judgement("true", "yesno")


def test_difflib_lenient_negation_agreement_on_free_text():
    ground_truth = "He does not have a hat; He is without a hat"
    answer = "I can't tell what it says because the man is not wearing anything on his head."
    assert L.similarity(answer, ground_truth) < 0.5
    assert L.judge("difflib_lenient", answer, ground_truth) == L.Judgement("false", "yesno")
    answer = 'Based on the image, the hat says "Make America Great Again".'
    assert L.judge("difflib_lenient", answer, ground_truth) == L.Judgement("true", "similarity")


def test_difflib_lenient_numbers():
    assert L.judge("difflib_lenient", "There are 3 dogs in the picture.", "3") == L.Judgement("false", "number")
    assert L.judge("difflib_lenient", "I count three dogs on the grass.", "3") == L.Judgement("false", "number")
    assert L.judge("difflib_lenient", "There are 4 dogs in the picture.", "3") == L.Judgement("true", "similarity")


def test_difflib_lenient_keywords():
    answer = "The woman is holding a red umbrella on a rainy street corner."
    assert L.similarity(answer, "red umbrella") < 0.5
    assert L.judge("difflib_lenient", answer, "red umbrella") == L.Judgement("false", "keywords")
    # one of the two keywords is half of them: still cleared
    answer = "It is a bright red kite flying over the beach on a sunny day."
    assert L.judge("difflib_lenient", answer, "red umbrella") == L.Judgement("false", "keywords")
    answer = "It is a blue kite flying over the beach on a sunny day."
    assert L.judge("difflib_lenient", answer, "red umbrella") == L.Judgement("true", "similarity")


# ---------------------------------------------------------------------------------------------
# halp_paper: the HALP code's semantic_review, worked by hand (question, ground truth, answer -> branch)

ASKED = "Is there a dog in the image?"
HAT_QUESTION = "Is the man wearing a hat?"
HAT_TRUTH = "He does not have a hat"


@pytest.mark.parametrize(
    ("question", "ground_truth", "answer", "branch"),
    [
        # a "no" truth: any negative cue in the first 100 characters agrees, by substring
        (ASKED, "no", "No, there is none.", L.NO_TRUTH_NEGATIVE_CUE),
        (ASKED, "no", "Yes, there is a dog.", L.NO_TRUTH_NO_CUE),
        (ASKED, "no", "I know there is a dog.", L.NO_TRUTH_NEGATIVE_CUE),  # "know" contains "no"
        (ASKED, "no", "Yes, a dog in the snow.", L.NO_TRUTH_NEGATIVE_CUE),  # so does "snow"
        (ASKED, "no", "Yes, and it doesn't bark.", L.NO_TRUTH_NEGATIVE_CUE),
        (ASKED, " NO \n", "Yes", L.NO_TRUTH_NO_CUE),  # the truth is lower-cased and stripped
        (ASKED, "n", "A dog.", L.NO_TRUTH_NO_CUE),
        (ASKED, "N, O", "Yes, there is.", L.NO_TRUTH_NO_CUE),  # "n, o" is read as no ...
        (ASKED, "y, e, s", "No, there is not.", L.NOT_YES_NO),  # ... "y, e, s" not as yes: never positive
        (ASKED, "n,o", "Yes.", L.NOT_YES_NO),  # only that exact spelling
        (ASKED, "Yes.", "No.", L.NOT_YES_NO),  # nor with punctuation
        (ASKED, "no", "z" * 98 + "no", L.NO_TRUTH_NEGATIVE_CUE),  # "no" ends at character 100: inside
        (ASKED, "no", "z" * 99 + "no", L.NO_TRUTH_NO_CUE),  # ends at 101: outside the window
        (ASKED, "no", "   " + "z" * 98 + "no", L.NO_TRUTH_NEGATIVE_CUE),  # the answer is stripped first
        (ASKED, "no", "", L.NO_TRUTH_NO_CUE),  # an empty answer disagrees with "no"
        # a "yes" truth: an affirmative cue in the first 100 agrees; else a negative one in the first 50 denies
        (ASKED, "yes", "Yes, there is.", L.YES_TRUTH_AFFIRMATIVE_CUE),
        (ASKED, "Y", "It appears to be a dog.", L.YES_TRUTH_AFFIRMATIVE_CUE),
        (ASKED, "yes", "No, only its eyes.", L.YES_TRUTH_AFFIRMATIVE_CUE),  # "eyes" contains "yes"
        (ASKED, "yes", "No, that is incorrect.", L.YES_TRUTH_AFFIRMATIVE_CUE),  # "incorrect" contains "correct"
        (ASKED, "yes", "No, there is no dog.", L.YES_TRUTH_DENIAL),
        (ASKED, "yes", "There is nothing.", L.YES_TRUTH_DENIAL),  # "nothing" contains "no"
        (ASKED, "yes", "z" * 48 + "no", L.YES_TRUTH_DENIAL),  # ends at character 50: inside
        (ASKED, "yes", "z" * 49 + "no", L.YES_TRUTH_NO_CUE),  # ends at 51: outside, and no other cue
        (ASKED, "yes", "no" + "z" * 95 + "yes", L.YES_TRUTH_AFFIRMATIVE_CUE),  # "yes" ends at 100: agrees
        (ASKED, "yes", "no" + "z" * 96 + "yes", L.YES_TRUTH_DENIAL),  # ends at 101: the "no" decides
        (ASKED, "yes", "A brown dog.", L.YES_TRUTH_NO_CUE),
        (ASKED, "yes", "", L.YES_TRUTH_NO_CUE),
        # every other truth is negative, whatever the answer
        ("What colour is the car?", "red", "The car is blue.", L.NOT_YES_NO),
        ("How many dogs are there?", "3", "There are 7 dogs.", L.NOT_YES_NO),
        ("Which one?", "B", "A", L.NOT_YES_NO),
        (ASKED, "", "No.", L.NOT_YES_NO),
        # the hat case: a negated hat truth, "hat" in the question, MAGA in the answer
        (HAT_QUESTION, HAT_TRUTH, "He wears a red MAGA cap.", L.HAT_CASE),
        ("What does he wear?", "The man is without a hat", "A Make America Great Again hat.", L.HAT_CASE),  # wHAT
        ("Describe him.", HAT_TRUTH, "He wears a MAGA cap.", L.NOT_YES_NO),  # no "hat" in the question
        (HAT_QUESTION, "He does not have a cap", "A MAGA cap.", L.NOT_YES_NO),  # no "hat" in the truth
        (HAT_QUESTION, "The hat is red", "A MAGA hat.", L.NOT_YES_NO),  # the truth does not negate
        (HAT_QUESTION, HAT_TRUTH, "He is not wearing a hat; the sign says MAGA.", L.HAT_CASE_NEGATION_AGREES),
        ("Is there a shark with a hat?", HAT_TRUTH, "Not a shark. MAGA hat.", L.HAT_CASE_NEGATION_AGREES),
        ("What is in the forest?", HAT_TRUTH, "Trees, not withering. MAGA hat.", L.HAT_CASE_NEGATION_AGREES),
    ],
)
def test_halp_paper_hand_worked(question, ground_truth, answer, branch):
    assert L.halp_paper_branch(question, ground_truth, answer) == branch
    expected = L.TRUE if branch in (L.NO_TRUTH_NO_CUE, L.YES_TRUTH_DENIAL, L.HAT_CASE) else L.FALSE
    assert L.judge_halp_paper(answer, ground_truth, question, "gemma3") == L.Judgement(expected, branch)


@pytest.mark.parametrize(
    ("answer", "positive_in"),
    [
        # "don't see" is a negation and a hat cue in the llava and molmo copies only
        ("I don't see a hat, only a MAGA sign.", {"gemma3", "qwen25vl"}),
        # "does not show" is a hat cue in the qwen25vl copy only
        ("The image does not show a hat, only MAGA.", {"gemma3", "llava", "molmo"}),
        # "appears to" is a hat cue in the llava copy only
        ("It appears to say MAGA; he is not in a cap.", {"gemma3", "qwen25vl", "molmo"}),
    ],
)
def test_halp_paper_copies_differ_only_in_the_hat_case(answer, positive_in):
    for variant in L.HALP_PAPER_VARIANTS:
        branch = L.halp_paper_branch(HAT_QUESTION, HAT_TRUTH, answer, variant)
        assert (branch == L.HAT_CASE) == (variant in positive_in), variant
        assert branch in (L.HAT_CASE, L.HAT_CASE_NEGATION_AGREES)


def test_halp_paper_shark_rule_differs_by_copy():
    """With "shark" in the question, the copies read different agreement cues ("not", "not depicted", "none")."""
    question = "Is there a shark? What hat?"
    assert L.halp_paper_branch(question, HAT_TRUTH, "Not one, zero. MAGA", "gemma3") == L.HAT_CASE_NEGATION_AGREES
    assert L.halp_paper_branch(question, HAT_TRUTH, "Not one, zero. MAGA", "llava") == L.HAT_CASE
    assert L.halp_paper_branch(question, HAT_TRUTH, "none not here. MAGA", "molmo") == L.HAT_CASE_NEGATION_AGREES
    assert L.halp_paper_branch(question, HAT_TRUTH, "not depicted. MAGA", "llava") == L.HAT_CASE_NEGATION_AGREES


def test_halp_paper_copy_of_each_family():
    assert {f: L.halp_paper_variant(f) for f in ("gemma3", "qwen2_5_vl", "llava_next", "molmo")} == {
        "gemma3": "gemma3", "qwen2_5_vl": "qwen25vl", "llava_next": "llava", "molmo": "molmo",
    }  # fmt: skip
    assert L.halp_paper_variant("phi4_multimodal") == L.halp_paper_variant(None) == "gemma3"


def test_empty_ground_truth_is_unjudged_by_every_rule():
    for method in L.TEXT_METHODS:
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
    summary = L.label_embeddings(h5, out, "difflib_lenient")
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


def test_halp_paper_labels_say_branch_and_answer_type_and_the_summary_counts_them(tmp_path, caplog):
    rows = [*ROWS, ("q7", "i4", "no", "I know it is there.", "ok"), ("q8", "i4", "yes", "No, none.", "ok")]
    h5 = _write(tmp_path / "embeddings.h5", rows)
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "halp_paper")
    table = pd.read_csv(tmp_path / "labels.csv", dtype=str, keep_default_na=False)
    assert table["hallucinated"].tolist() == ["false", "true", "false", "", "", "false", "false", "true"]
    assert table["decided_by"].tolist() == [
        L.YES_TRUTH_AFFIRMATIVE_CUE, L.NO_TRUTH_NO_CUE, L.NOT_YES_NO, L.UNJUDGED_EMPTY_GT, L.UNJUDGED_FAILED,
        L.NOT_YES_NO, L.NO_TRUTH_NEGATIVE_CUE, L.YES_TRUTH_DENIAL,
    ]  # fmt: skip
    assert table["answer_type"].tolist() == [
        "yes/no",
        "yes/no",
        "number",
        "other",
        "other",
        "other",
        "yes/no",
        "yes/no",
    ]
    assert table["question"].tolist() == ["question?"] * len(rows)
    assert summary["method"] == "halp_paper" and summary["positive_rate"] == pytest.approx(2 / 6)
    assert summary["decided_by"] == {
        L.YES_TRUTH_AFFIRMATIVE_CUE: 1, L.NO_TRUTH_NO_CUE: 1, L.NOT_YES_NO: 2, L.NO_TRUTH_NEGATIVE_CUE: 1,
        L.YES_TRUTH_DENIAL: 1,
    }  # fmt: skip
    by_type = summary["by_answer_type"]
    assert list(by_type) == list(L.ANSWER_TYPES)
    assert by_type["yes/no"]["n_judged"] == 4 and by_type["yes/no"]["n_hallucinated"] == 2
    assert by_type["number"] == {
        "n_total": 1, "n_judged": 1, "n_unjudged": 0, "n_hallucinated": 0, "n_not_hallucinated": 1,
        "positive_rate": 0.0, "decided_by": {L.NOT_YES_NO: 1},
    }  # fmt: skip
    assert by_type["other"]["n_total"] == 3 and by_type["other"]["n_judged"] == 1
    assert by_type["other"]["decided_by"] == {L.UNJUDGED_EMPTY_GT: 1, L.UNJUDGED_FAILED: 1, L.NOT_YES_NO: 1}
    assert summary["halp_paper_variant"] == "gemma3" and summary["family"] is None  # the test file has none
    assert summary["warnings"] == [] and "WARNING" not in caplog.text


def test_halp_paper_follows_the_copy_of_the_files_family(tmp_path):
    """The embeddings file's `family` attribute picks the copy: llava's reads "don't see" as agreement."""
    rows = [("q1", "i1", "He does not have a hat", "I don't see a hat, only a MAGA sign.", "ok")]
    for family, expected in (("gemma3", "true"), ("llava_next", "false")):
        h5 = tmp_path / f"{family}.h5"
        results = [
            SampleResult(
                qid,
                image,
                "Is the man wearing a hat?",
                gt,
                answer=answer,
                vectors={"vision_only_representation": np.zeros(2)},
            )
            for qid, image, gt, answer, _ in rows
        ]
        write_embeddings(
            h5, results, {"vision_only_representation": 2}, {"model": "m", "layers": [0], "family": family}
        )
        summary = L.label_embeddings(h5, tmp_path / f"{family}.csv", "halp_paper")
        table = pd.read_csv(tmp_path / f"{family}.csv", dtype=str, keep_default_na=False)
        assert table["hallucinated"].tolist() == [expected], family
        assert summary["family"] == family and summary["halp_paper_variant"] == L.halp_paper_variant(family)


def test_summary_warns_of_spelled_out_truths_and_an_empty_class(tmp_path, caplog):
    rows = [
        ("q1", "i1", "y, e, s", "Yes.", "ok"), ("q2", "i1", "Y, E, S", "No.", "ok"), ("q3", "i2", "n, o", "No.", "ok"),
        ("q4", "i2", "yes", "Yes.", "ok"),
    ]  # fmt: skip
    h5 = _write(tmp_path / "embeddings.h5", rows)
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "halp_paper")
    assert summary["n_hallucinated"] == 0  # "Y, E, S" / "No." is a disagreement the paper's rule cannot see
    spelled, empty = summary["warnings"]
    assert spelled.startswith("3 ground truths look spelled out letter by letter ('y, e, s' x2, 'n, o' x1)")
    assert "'y, e, s') as not yes/no, never positive" in spelled
    assert empty == "no question is labelled hallucinated (4 judged): a probe needs both classes"
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert logged == [f"labels {tmp_path / 'labels.csv'}: {w}" for w in summary["warnings"]]
    assert json.loads((tmp_path / "labels.summary.json").read_text())["warnings"] == summary["warnings"]
    # yesno reads them as the words and finds both classes; the spelling is still pointed out
    summary = L.label_embeddings(h5, tmp_path / "labels.csv", "yesno")
    assert summary["n_hallucinated"] == 1 and len(summary["warnings"]) == 1
    assert summary["warnings"][0].endswith("check that the method reads them as meant")
    # nothing judged: both classes are empty
    failed = _write(tmp_path / "failed.h5", [("q1", "i1", "yes", "", "failed")])
    assert L.label_embeddings(failed, tmp_path / "f.csv", "yesno")["warnings"] == [
        "no question was judged: both classes are empty, no probe can be trained"
    ]


def test_the_old_method_name_halp_is_refused_with_the_new_names(tmp_path, capsys):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    with pytest.raises(
        L.LabelError, match="'halp': renamed: `halp_paper` is the HALP paper's label.*`difflib_lenient`"
    ):
        L.label_embeddings(h5, tmp_path / "labels.csv", "halp")
    with pytest.raises(SystemExit):
        main(["label", str(h5), "--method", "halp"])
    error = capsys.readouterr().err
    assert "renamed: `halp_paper`" in error and "`difflib_lenient` is what `halp` was" in error
    assert not (tmp_path / "labels.csv").exists()


def test_cli_default_method_is_halp_paper(tmp_path):
    h5 = _write(tmp_path / "embeddings.h5", ROWS)
    assert main(["label", str(h5)]) == 0
    assert json.loads((tmp_path / "labels.summary.json").read_text())["method"] == L.DEFAULT_METHOD == "halp_paper"


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
