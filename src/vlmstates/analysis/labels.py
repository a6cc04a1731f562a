"""Hallucination labels: was the model's answer to a question hallucinated?

One row per question of an embeddings file, in file order:

    question_id, image_id, answer, ground_truth_answer, hallucinated, decided_by

`hallucinated` is "true", "false" or "" (cannot be judged); `decided_by` names the rule that
decided it, or the reason it was left unjudged ("unjudged: ...").

Methods:
  halp   the rule of the HALP paper's code: hallucinated when difflib's SequenceMatcher ratio of the
         lower-cased answer and ground truth is below 0.5, then a lenient pass that clears it when
         yes/no polarity or negation agree, when the numbers agree, or when at least half of the
         ground truth's keywords appear in the answer.
  yesno  yes/no questions only: the answer's leading yes/no against the ground truth.
  exact  normalised exact match (case, punctuation, articles, whitespace).
  file   labels supplied by the user (CSV with question_id, hallucinated).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlmstates.atomic import write_text_atomic
from vlmstates.errors import VlmstatesError
from vlmstates.store import ANSWERS_ATTR, MODEL_ATTR, STATUS_OK, read_embeddings


class LabelError(VlmstatesError, ValueError):
    """A labels input or option cannot be used; the message names the file, line or option."""


METHODS = ("halp", "yesno", "exact", "file")
LABEL_COLUMNS = ("question_id", "image_id", "answer", "ground_truth_answer", "hallucinated", "decided_by")

TRUE, FALSE, UNJUDGED = "true", "false", ""

UNJUDGED_EMPTY_GT = "unjudged: empty ground truth"
UNJUDGED_FAILED = "unjudged: failed extraction"
UNJUDGED_NOT_YESNO = "unjudged: not a yes/no question"
UNJUDGED_NO_LEADING_YESNO = "unjudged: answer has no leading yes/no"
UNJUDGED_NOT_IN_FILE = "unjudged: not in labels file"
UNJUDGED_EMPTY_IN_FILE = "unjudged: empty label in file"

# The `halp` rule's constants, as in the paper's labelling code.
HALP_SIMILARITY_THRESHOLD = 0.5
HALP_KEYWORD_FRACTION = 0.5
HALP_POLARITY_WINDOW = 100  # characters of the answer searched for yes/no and negation cues
HALP_NUMBER_WINDOW = 100  # characters of the answer searched for numbers
HALP_KEYWORD_WINDOW = 300  # characters of the answer searched for the ground truth's keywords
HALP_STOPWORDS = frozenset("the a an is are was were in on at to of and or i you ve seems appear appears".split())
HALP_MIN_KEYWORD_LENGTH = 3

_ARTICLES = frozenset({"a", "an", "the"})
_YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct", "indeed", "certainly"})
_NO_WORDS = frozenset({"no", "nope", "false", "incorrect", "not"})
_NEGATION = re.compile(
    r"\b(?:no|not|none|nothing|never|neither|nor|zero|without|cannot|can't|cant|isn't|isnt|aren't|arent|"
    r"doesn't|doesnt|don't|dont|didn't|didnt|wasn't|wasnt|weren't|werent|hasn't|hasnt|haven't|havent|"
    r"won't|wont|absent|missing)\b"
)
_AFFIRMATION = re.compile(r"\b(?:yes|yeah|yep|correct|true|indeed|certainly)\b")
_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b")
_WORD = re.compile(r"\b\w+\b")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    hallucinated: str  # TRUE, FALSE or UNJUDGED
    decided_by: str


# ---------------------------------------------------------------------------------------------
# Text helpers


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed.

    A ground truth spelled out letter by letter ("n, o", "Y-E-S") is read as the word.
    """
    text = str(text).lower().replace("’", "'")
    text = re.sub(r"[^\w\s]|_", " ", text)
    words = [w for w in text.split() if w not in _ARTICLES]
    joined = "".join(words)
    if len(words) > 1 and joined in ("yes", "no") and all(len(w) == 1 for w in words):
        return joined
    return " ".join(words)


def yes_no_value(ground_truth: str) -> str | None:
    """'yes' or 'no' when the ground truth is a bare yes/no (also 'y', 'n', 'n, o'), else None."""
    compact = re.sub(r"[^a-z]", "", str(ground_truth).lower())
    if compact in ("yes", "y"):
        return "yes"
    if compact in ("no", "n"):
        return "no"
    return None


#: The answer types of the per-subset probe metrics and the label summary, decided by the ground truth alone.
ANSWER_TYPES = ("yes/no", "number", "other")
_NUMERIC_GROUND_TRUTH = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?")


def answer_type(ground_truth: str) -> str:
    """'yes/no' for a bare yes/no ground truth (`yes_no_value`, so 'y' and 'n, o' too), 'number' for a
    number written in digits (thousands separators, a decimal part and a percent sign allowed) or as a word
    up to twenty, 'other' for everything else (open-ended, multiple choice, empty)."""
    if yes_no_value(ground_truth) is not None:
        return "yes/no"
    text = str(ground_truth).strip().lower()
    if _NUMERIC_GROUND_TRUTH.fullmatch(text) or text in _NUMBER_WORDS:
        return "number"
    return "other"


def leading_yes_no(answer: str) -> str | None:
    """'yes' or 'no' when the normalised answer starts with a yes/no word, else None."""
    words = normalise(answer).split()
    if not words:
        return None
    if words[0] in _YES_WORDS:
        return "yes"
    if words[0] in _NO_WORDS:
        return "no"
    return None


def answer_polarity(answer: str) -> str | None:
    """The answer's yes/no stance: its leading yes/no, else negation or affirmation cues near its start."""
    leading = leading_yes_no(answer)
    if leading is not None:
        return leading
    window = str(answer).lower().replace("’", "'")[:HALP_POLARITY_WINDOW]
    if _NEGATION.search(window):
        return "no"
    if _AFFIRMATION.search(window):
        return "yes"
    return None


def has_negation(text: str) -> bool:
    return bool(_NEGATION.search(str(text).lower().replace("’", "'")))


def numbers(text: str) -> set[str]:
    """Numbers written as digits or as words up to twenty, as canonical strings ('2', '3.5')."""
    found = set()
    for token in _NUMBER.findall(str(text).lower()):
        token = _NUMBER_WORDS.get(token, token)
        found.add(str(float(token)).removesuffix(".0") if "." in token else str(int(token)))
    return found


def keywords(text: str) -> set[str]:
    return {
        w for w in _WORD.findall(str(text).lower()) if w not in HALP_STOPWORDS and len(w) >= HALP_MIN_KEYWORD_LENGTH
    }


def similarity(answer: str, ground_truth: str) -> float:
    """difflib.SequenceMatcher ratio of the lower-cased, stripped strings."""
    return difflib.SequenceMatcher(None, str(ground_truth).lower().strip(), str(answer).lower().strip()).ratio()


# ---------------------------------------------------------------------------------------------
# The rules; each takes (answer, ground_truth) of a row with a non-empty ground truth.


def judge_halp(answer: str, ground_truth: str) -> Judgement:
    if similarity(answer, ground_truth) >= HALP_SIMILARITY_THRESHOLD:
        return Judgement(FALSE, "similarity")

    expected = yes_no_value(ground_truth)
    if expected is not None:
        stance = answer_polarity(answer)
        if stance is not None:
            return Judgement(FALSE if stance == expected else TRUE, "yesno")
    elif has_negation(ground_truth) and has_negation(str(answer)[:HALP_POLARITY_WINDOW]):
        return Judgement(FALSE, "yesno")

    gt_numbers = numbers(ground_truth)
    if gt_numbers and gt_numbers == numbers(str(answer)[:HALP_NUMBER_WINDOW]):
        return Judgement(FALSE, "number")

    gt_keywords = keywords(ground_truth)
    if gt_keywords:
        found = gt_keywords & keywords(str(answer)[:HALP_KEYWORD_WINDOW])
        if len(found) >= HALP_KEYWORD_FRACTION * len(gt_keywords):
            return Judgement(FALSE, "keywords")

    return Judgement(TRUE, "similarity")


def judge_yesno(answer: str, ground_truth: str) -> Judgement:
    expected = yes_no_value(ground_truth)
    if expected is None:
        return Judgement(UNJUDGED, UNJUDGED_NOT_YESNO)
    given = leading_yes_no(answer)
    if given is None:
        return Judgement(UNJUDGED, UNJUDGED_NO_LEADING_YESNO)
    return Judgement(FALSE if given == expected else TRUE, "yesno")


def judge_exact(answer: str, ground_truth: str) -> Judgement:
    """Normalised exact match against the ground truth or any of its ';'-separated alternatives."""
    given = normalise(answer)
    candidates = {normalise(ground_truth)} | {normalise(part) for part in str(ground_truth).split(";")}
    candidates.discard("")
    return Judgement(FALSE if given in candidates else TRUE, "exact")


_RULES = {"halp": judge_halp, "yesno": judge_yesno, "exact": judge_exact}


def judge(method: str, answer: str, ground_truth: str) -> Judgement:
    """One row by a text rule (`halp`, `yesno`, `exact`); an empty ground truth is left unjudged."""
    if method not in _RULES:
        raise LabelError(f"unknown label method {method!r}: choose one of {', '.join(_RULES)}")
    if not str(ground_truth).strip():
        return Judgement(UNJUDGED, UNJUDGED_EMPTY_GT)
    return _RULES[method](str(answer), str(ground_truth))


# ---------------------------------------------------------------------------------------------
# User-supplied labels


_FILE_VALUES = {
    "true": TRUE, "1": TRUE, "yes": TRUE, "t": TRUE, "1.0": TRUE,
    "false": FALSE, "0": FALSE, "no": FALSE, "f": FALSE, "0.0": FALSE,
    "": UNJUDGED,
}  # fmt: skip


def read_labels_file(path: str | Path, known_question_ids, ignore_unknown: bool = False) -> dict[str, str]:
    """question_id -> TRUE/FALSE/UNJUDGED from a CSV with columns question_id, hallucinated.

    Errors name the file and the line (line 1 is the header): a missing column, an empty or
    duplicated question_id, one not in the embeddings file, or a value that is not a boolean.
    With `ignore_unknown`, rows of questions not in the embeddings file (e.g. cut by dataset.limit)
    are skipped with a warning instead.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise LabelError(f"labels file {path}: cannot be read as CSV ({error})") from error
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("question_id", "hallucinated") if c not in table.columns]
    if missing:
        raise LabelError(
            f"labels file {path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.columns)})"
        )
    known = set(known_question_ids)
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    unknown: list[str] = []
    for i, (qid, value) in enumerate(zip(table["question_id"], table["hallucinated"])):
        line = i + 2
        qid = qid.strip()
        if not qid:
            raise LabelError(f"labels file {path}, line {line}: empty question_id")
        if qid in first_line:
            raise LabelError(f"labels file {path}, line {line}: question_id {qid!r} repeats line {first_line[qid]}")
        if qid not in known and not ignore_unknown:
            raise LabelError(f"labels file {path}, line {line}: question_id {qid!r} is not in the embeddings file")
        key = value.strip().lower()
        if key not in _FILE_VALUES:
            raise LabelError(
                f"labels file {path}, line {line} (question_id {qid!r}): hallucinated is {value!r}; "
                "expected true/false (also 1/0, yes/no) or empty"
            )
        first_line[qid] = line
        if qid in known:
            labels[qid] = _FILE_VALUES[key]
        else:
            unknown.append(qid)
    if unknown:
        log.warning(
            "labels file %s: %d rows name questions not in the embeddings file, ignored (first: %s)",
            path,
            len(unknown),
            ", ".join(unknown[:3]),
        )
    return labels


# ---------------------------------------------------------------------------------------------
# Whole files


def summary_path(out_csv: str | Path) -> Path:
    """Where the JSON summary of `out_csv` goes: labels.csv -> labels.summary.json."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + ".summary.json")


def label_table(
    table: pd.DataFrame, method: str, labels_file: str | Path | None = None, ignore_unknown: bool = False
) -> pd.DataFrame:
    """Labels for an embeddings table (as `read_embeddings(...).table`), in its row order."""
    if method not in METHODS:
        raise LabelError(f"unknown label method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "file":
        if not labels_file:
            raise LabelError("label method 'file' needs a labels file (CSV with question_id, hallucinated)")
        supplied = read_labels_file(labels_file, table["question_id"], ignore_unknown)

    rows = []
    for record in table.itertuples(index=False):
        answer, ground_truth = str(record.answer), str(record.ground_truth_answer)
        if record.status != STATUS_OK:
            verdict = Judgement(UNJUDGED, UNJUDGED_FAILED)
        elif method == "file":
            if record.question_id not in supplied:
                verdict = Judgement(UNJUDGED, UNJUDGED_NOT_IN_FILE)
            elif supplied[record.question_id] == UNJUDGED:
                verdict = Judgement(UNJUDGED, UNJUDGED_EMPTY_IN_FILE)
            else:
                verdict = Judgement(supplied[record.question_id], "file")
        else:
            verdict = judge(method, answer, ground_truth)
        rows.append(
            (record.question_id, record.image_id, answer, ground_truth, verdict.hallucinated, verdict.decided_by)
        )
    return pd.DataFrame(rows, columns=list(LABEL_COLUMNS))


def summarise_labels(labels: pd.DataFrame, method: str) -> dict:
    judged = labels["hallucinated"] != UNJUDGED
    positives = int((labels["hallucinated"] == TRUE).sum())
    n_judged = int(judged.sum())
    return {
        "method": method,
        "n_total": int(len(labels)),
        "n_judged": n_judged,
        "n_unjudged": int((~judged).sum()),
        "n_hallucinated": positives,
        "n_not_hallucinated": n_judged - positives,
        "positive_rate": positives / n_judged if n_judged else None,
        "unjudged_by_reason": dict(Counter(labels.loc[~judged, "decided_by"])),
        "decided_by": dict(Counter(labels.loc[judged, "decided_by"])),
    }


def label_embeddings(
    embeddings_path: str | Path,
    out_csv: str | Path,
    method: str = "halp",
    labels_file: str | Path | None = None,
    summary_json: str | Path | None = None,
    ignore_unknown: bool = False,
) -> dict:
    """Label every question of an embeddings file; write `out_csv` and its JSON summary (by default
    beside it, see `summary_path`); return the summary."""
    embeddings = read_embeddings(embeddings_path)
    if method != "file" and not embeddings.attrs.get(ANSWERS_ATTR, True):
        raise LabelError(
            f"{embeddings_path} is prefill-only (attribute {ANSWERS_ATTR} false: its model entry sets answers: false), "
            f"so label method {method!r} has no answers to judge; use method 'file' with a labels file"
        )
    labels = label_table(embeddings.table, method, labels_file, ignore_unknown)
    summary = summarise_labels(labels, method)
    summary["embeddings"] = str(embeddings_path)
    summary["model"] = str(embeddings.attrs.get(MODEL_ATTR, ""))
    summary["labels_file"] = str(labels_file) if labels_file else None
    out_csv = Path(out_csv)
    write_text_atomic(out_csv, labels.to_csv(index=False))
    write_text_atomic(Path(summary_json or summary_path(out_csv)), json.dumps(summary, indent=2) + "\n")
    return summary


def read_labels(path: str | Path) -> pd.DataFrame:
    """A labels CSV as written by `label_embeddings`, every column as text ('' for unjudged)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("question_id", "hallucinated") if c not in table.columns]
    if missing:
        raise LabelError(f"{path}: not a labels file (missing {', '.join(missing)})")
    return table
