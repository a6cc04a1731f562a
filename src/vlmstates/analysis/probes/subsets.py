"""The subsets a probe run breaks its test AUROC down by: the answer type of each question's ground truth
(vlmstates.analysis.labels.answer_type) and the values of the dataset columns that `probes.breakdown` names,
which come from the validated dataset table (the embeddings file keeps only the four required columns)."""

from __future__ import annotations

import pandas as pd

from vlmstates.analysis.labels import answer_type
from vlmstates.analysis.probes.settings import ANSWER_TYPE, ProbeError
from vlmstates.dataset import read_validated_table

#: a breakdown value that the dataset leaves empty
EMPTY_VALUE = "(empty)"


def question_subsets(questions: pd.DataFrame, breakdown, dataset_csv=None) -> pd.DataFrame:
    """One row per row of `questions` (an embeddings table: question_id, ground_truth_answer): its answer
    type, then its value of each `breakdown` column of the dataset table, joined by question_id."""
    subsets = pd.DataFrame({ANSWER_TYPE: questions["ground_truth_answer"].map(answer_type).to_numpy()})
    breakdown = list(breakdown)
    if not breakdown:
        return subsets
    if dataset_csv is None:
        raise ProbeError(
            f"probes.breakdown names {', '.join(breakdown)}, dataset columns, but no dataset table was given: "
            "pass the validated table (`vlmstates probe --dataset results/dataset/questions.csv`)"
        )
    dataset = read_validated_table(dataset_csv)
    missing = [column for column in breakdown if column not in dataset.columns]
    if missing:
        raise ProbeError(
            f"probes.breakdown names {', '.join(missing)}, which the dataset table {dataset_csv} lacks "
            f"(its columns: {', '.join(dataset.columns)}); remove it from probes.breakdown or add it to the dataset CSV"
        )
    repeated = dataset["question_id"][dataset["question_id"].duplicated()]
    if len(repeated):
        raise ProbeError(f"dataset table {dataset_csv}: question_id {repeated.iloc[0]!r} repeats")
    values = dataset.set_index("question_id")[breakdown]
    absent = questions.loc[~questions["question_id"].isin(values.index), "question_id"]
    if len(absent):
        raise ProbeError(
            f"dataset table {dataset_csv} lacks {len(absent)} question(s) of the embeddings file (first: "
            f"{', '.join(absent.iloc[:3])}); was it extracted from another dataset?"
        )
    joined = values.loc[questions["question_id"]].reset_index(drop=True).replace("", EMPTY_VALUE)
    return pd.concat([subsets, joined], axis=1)
