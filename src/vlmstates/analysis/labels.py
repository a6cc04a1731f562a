"""Hallucination labels: was the model's answer to a question hallucinated?

One row per question of an embeddings file, in file order:

    question_id, image_id, question, answer, ground_truth_answer, answer_type, hallucinated, decided_by

`hallucinated` is "true", "false" or "" (cannot be judged); `decided_by` names the branch of the rule
that decided it, or the reason it was left unjudged ("unjudged: ..."); `answer_type` is the ground
truth's (`answer_type`: yes/no, number, other).

Methods:
  halp_paper       the HALP paper's label (`semantic_review` of its manual_review_<model>.py scripts,
                   the column its probes learn), with its quirks. Positive only where the ground truth is
                   exactly yes, y, no, n or "n, o" (lower-cased, stripped; "y, e, s" is not) and the answer
                   disagrees by substring cues: a "no" truth with none of no / doesn't / isn't / don't
                   (substrings: "not", "nothing", "know", "snow" all contain "no") in the answer's first
                   100 characters; a "yes" truth with none of yes / correct / true / indeed / appears to be
                   in the first 100 and one of no / doesn't / isn't in the first 50. Plus one hard-coded
                   case: a truth containing "hat" and "does not have", "without" or "is not", a question
                   containing "hat" (also "what", "that") and an answer naming MAGA. Every other question
                   (open-ended, number, multiple choice) is negative, whatever the answer. The paper has a
                   copy per model; they differ only in when the hat case applies, and the embeddings
                   file's family picks the copy (gemma3's for families without their own).
  difflib_lenient  the paper's difflib flag (SequenceMatcher ratio of the lower-cased answer and ground
                   truth below 0.5 is hallucinated; not what its probes learn), then a lenient pass of
                   this project's own that clears it when yes/no polarity or negation agree, when the
                   numbers agree, or when at least half of the ground truth's keywords are in the answer.
  yesno            yes/no questions only (also spelled out, "y, e, s"): the answer's leading yes/no
                   word against the ground truth; other questions, and answers that do not start with
                   yes or no, are left unjudged.
  exact            normalised exact match (case, punctuation, articles, whitespace).
  file             labels supplied by the user (CSV with question_id, hallucinated).

Every method leaves failed extractions unjudged, and every rule that reads answers empty ground truths.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from vlmstates.atomic import write_text_atomic
from vlmstates.errors import VlmstatesError
from vlmstates.store import ANSWERS_ATTR, FAMILY_ATTR, MODEL_ATTR, STATUS_OK, read_embeddings


class LabelError(VlmstatesError, ValueError):
    """A labels input or option cannot be used; the message names the file, line or option."""


HALP_PAPER, DIFFLIB_LENIENT, YESNO, EXACT, FILE = "halp_paper", "difflib_lenient", "yesno", "exact", "file"
METHODS = (HALP_PAPER, DIFFLIB_LENIENT, YESNO, EXACT, FILE)
#: The default of `labels.method` and `vlmstates label --method` (config/README.md says why).
DEFAULT_METHOD = HALP_PAPER
#: Method names no longer accepted, with what to write instead.
RENAMED_METHODS = {
    "halp": "renamed: `halp_paper` is the HALP paper's label (the rule its probes learn), `difflib_lenient` "
    "is what `halp` was (the paper's difflib flag plus this project's lenient pass)",
}
LABEL_COLUMNS = (
    "question_id", "image_id", "question", "answer", "ground_truth_answer", "answer_type", "hallucinated",
    "decided_by",
)  # fmt: skip

TRUE, FALSE, UNJUDGED = "true", "false", ""

UNJUDGED_EMPTY_GT = "unjudged: empty ground truth"
UNJUDGED_FAILED = "unjudged: failed extraction"
UNJUDGED_NOT_YESNO = "unjudged: not a yes/no question"
UNJUDGED_NO_LEADING_YESNO = "unjudged: answer has no leading yes/no"
UNJUDGED_NOT_IN_FILE = "unjudged: not in labels file"
UNJUDGED_EMPTY_IN_FILE = "unjudged: empty label in file"

# The `difflib_lenient` rule's constants: the threshold is the paper's difflib flag, the rest this project's.
DIFFLIB_THRESHOLD = 0.5
LENIENT_KEYWORD_FRACTION = 0.5
LENIENT_POLARITY_WINDOW = 100  # characters of the answer searched for yes/no and negation cues
LENIENT_NUMBER_WINDOW = 100  # characters of the answer searched for numbers
LENIENT_KEYWORD_WINDOW = 300  # characters of the answer searched for the ground truth's keywords
LENIENT_STOPWORDS = frozenset("the a an is are was were in on at to of and or i you ve seems appear appears".split())
LENIENT_MIN_KEYWORD_LENGTH = 3

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
    window = str(answer).lower().replace("’", "'")[:LENIENT_POLARITY_WINDOW]
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
        w
        for w in _WORD.findall(str(text).lower())
        if w not in LENIENT_STOPWORDS and len(w) >= LENIENT_MIN_KEYWORD_LENGTH
    }


def similarity(answer: str, ground_truth: str) -> float:
    """difflib.SequenceMatcher ratio of the lower-cased, stripped strings."""
    return difflib.SequenceMatcher(None, str(ground_truth).lower().strip(), str(answer).lower().strip()).ratio()


# ---------------------------------------------------------------------------------------------
# halp_paper: the facts of `semantic_review` in Secondary_Scripts/manual_review_scripts/manual_review_<model>.py
# of github.com/alliedbrother/HALP_EACL (commit 342e35c), the function behind the probes' target column
# `is_hallucinating_manual`. Its rules run in order and the first that returns decides; only the branches
# that can change the result are kept apart here (every other return is False, see HALP_PAPER_BRANCHES).
# Every test is a substring test on the lower-cased, stripped text; windows are slices of that text.

HALP_PAPER_NO_TRUTHS = frozenset({"no", "n", "n, o"})  # exact, after lower() and strip(): "y, e, s" is not a yes
HALP_PAPER_YES_TRUTHS = frozenset({"yes", "y"})
HALP_PAPER_WINDOW = 100  # characters of the answer searched for agreement with a yes/no truth
HALP_PAPER_YES_DENIAL_WINDOW = 50  # characters searched for a denial of a "yes" truth
# a "no" truth agrees with any of these; the qwen25vl, llava and molmo copies add "does not", which already
# contains "no", so all four agree ("not", "nothing", "know" and "snow" contain "no" too)
HALP_PAPER_NO_CUES = ("no", "not", "doesn't", "isn't", "don't")
HALP_PAPER_YES_CUES = ("yes", "correct", "true", "indeed", "appears to be")  # also "eyes", "incorrect", "untrue"
HALP_PAPER_YES_DENIAL_CUES = ("no", "not", "doesn't", "isn't")
# The hard-coded case: a truth that says there is no hat, "hat" in the question (so also "what", "that") and
# an answer naming the MAGA cap is positive, unless the negation-agreement rule before it returned first.
HALP_PAPER_HAT_TRUTH_CUES = ("does not have", "without", "is not")
HALP_PAPER_HAT_ANSWER_CUES = ("make america great again", "maga")
HALP_PAPER_FOREST_WINDOW = 200
HALP_PAPER_SHARK_WINDOW = 100
_HALP_PAPER_NEGATIONS = ("no ", "zero ", "without ", "none", "not ", "isn't", "aren't", "doesn't")


@dataclass(frozen=True)
class HalpPaperVariant:
    """The cues in which the four copies of the rule differ where it matters: the negation-agreement rule,
    which returns False before the hat case can return True. (The copies also differ in later rules that
    only ever return False; none of those can change a result.)"""

    negations: tuple[str, ...]  # the truth and the answer must each contain one
    shark_cues: tuple[str, ...]  # with "shark" in the question, anywhere in the answer
    shark_cues_near_start: tuple[str, ...]  # ... or in its first HALP_PAPER_SHARK_WINDOW characters
    hat_cues: tuple[str, ...]  # with "hat" in the question, anywhere in the answer


_GEMMA3 = HalpPaperVariant(
    negations=_HALP_PAPER_NEGATIONS,
    shark_cues=("no shark", "zero shark"),
    shark_cues_near_start=("not",),
    hat_cues=("no hat", "not wearing", "doesn't have"),
)
HALP_PAPER_VARIANTS = {
    "gemma3": _GEMMA3,
    "qwen25vl": replace(_GEMMA3, hat_cues=(*_GEMMA3.hat_cues, "does not show")),
    "llava": HalpPaperVariant(
        negations=(*_HALP_PAPER_NEGATIONS, "don't see", "not depicted"),
        shark_cues=("no shark", "zero shark", "not depicted"),
        shark_cues_near_start=(),
        hat_cues=(*_GEMMA3.hat_cues, "don't see", "appears to"),
    ),
    "molmo": HalpPaperVariant(
        negations=(*_HALP_PAPER_NEGATIONS, "don't see"),
        shark_cues=("no shark", "zero shark"),
        shark_cues_near_start=("none",),
        hat_cues=(*_GEMMA3.hat_cues, "don't see"),
    ),
}
#: The adapter family (embeddings attribute `family`) of each of the paper's models that has its own copy;
#: every other family gets the gemma3 copy, the one the other three extend.
HALP_PAPER_VARIANT_OF_FAMILY = {"gemma3": "gemma3", "qwen2_5_vl": "qwen25vl", "llava_next": "llava", "molmo": "molmo"}
HALP_PAPER_DEFAULT_VARIANT = "gemma3"

# The branches, as `decided_by` names them; the three of HALP_PAPER_POSITIVE return True.
NO_TRUTH_NO_CUE = "no truth: no negative cue in first 100"
NO_TRUTH_NEGATIVE_CUE = "no truth: negative cue in first 100"
YES_TRUTH_AFFIRMATIVE_CUE = "yes truth: affirmative cue in first 100"
YES_TRUTH_DENIAL = "yes truth: negative cue in first 50 and no affirmative"
YES_TRUTH_NO_CUE = "yes truth: no cue"
HAT_CASE = "hat case"
HAT_CASE_NEGATION_AGREES = "hat case: negation agreement first"
NOT_YES_NO = "truth not yes/no: never positive"
HALP_PAPER_BRANCHES = (
    NO_TRUTH_NO_CUE, NO_TRUTH_NEGATIVE_CUE, YES_TRUTH_AFFIRMATIVE_CUE, YES_TRUTH_DENIAL, YES_TRUTH_NO_CUE, HAT_CASE,
    HAT_CASE_NEGATION_AGREES, NOT_YES_NO,
)  # fmt: skip
HALP_PAPER_POSITIVE = frozenset({NO_TRUTH_NO_CUE, YES_TRUTH_DENIAL, HAT_CASE})


def halp_paper_variant(family: str | None) -> str:
    """The copy of the paper's rule that labels a family's answers."""
    return HALP_PAPER_VARIANT_OF_FAMILY.get(family or "", HALP_PAPER_DEFAULT_VARIANT)


def _contains_any(text: str, cues) -> bool:
    return any(cue in text for cue in cues)


def _negation_agrees(truth: str, question: str, answer: str, variant: HalpPaperVariant) -> bool:
    """The rule that runs first: truth and answer both negate and the answer agrees about one of three
    hard-coded subjects. It cannot fire on a yes/no truth (none of those contains a negation cue)."""
    if not (_contains_any(truth, variant.negations) and _contains_any(answer, variant.negations)):
        return False
    shark = _contains_any(answer, variant.shark_cues) or _contains_any(
        answer[:HALP_PAPER_SHARK_WINDOW], variant.shark_cues_near_start
    )
    forest = "not" in answer[:HALP_PAPER_FOREST_WINDOW] and _contains_any(answer, ("wither", "healthy"))
    return (
        ("shark" in question and shark)
        or ("hat" in question and _contains_any(answer, variant.hat_cues))
        or (_contains_any(question, ("withering", "forest")) and forest)
    )


def halp_paper_branch(question: str, ground_truth: str, answer: str, variant: str = HALP_PAPER_DEFAULT_VARIANT) -> str:
    """The branch of the paper's rule that decides the row (one of HALP_PAPER_BRANCHES); positive when it
    is in HALP_PAPER_POSITIVE. Arguments in the order of the paper's function."""
    truth, answer, question = (str(text).lower().strip() for text in (ground_truth, answer, question))
    if truth in HALP_PAPER_NO_TRUTHS:
        agrees = _contains_any(answer[:HALP_PAPER_WINDOW], HALP_PAPER_NO_CUES)
        return NO_TRUTH_NEGATIVE_CUE if agrees else NO_TRUTH_NO_CUE
    if truth in HALP_PAPER_YES_TRUTHS:
        if _contains_any(answer[:HALP_PAPER_WINDOW], HALP_PAPER_YES_CUES):
            return YES_TRUTH_AFFIRMATIVE_CUE
        if _contains_any(answer[:HALP_PAPER_YES_DENIAL_WINDOW], HALP_PAPER_YES_DENIAL_CUES):
            return YES_TRUTH_DENIAL
        return YES_TRUTH_NO_CUE
    hat_case = (
        _contains_any(truth, HALP_PAPER_HAT_TRUTH_CUES)
        and "hat" in truth
        and "hat" in question
        and _contains_any(answer, HALP_PAPER_HAT_ANSWER_CUES)
    )
    if not hat_case:
        return NOT_YES_NO
    return (
        HAT_CASE_NEGATION_AGREES
        if _negation_agrees(truth, question, answer, HALP_PAPER_VARIANTS[variant])
        else HAT_CASE
    )


def judge_halp_paper(answer: str, ground_truth: str, question: str, variant: str) -> Judgement:
    branch = halp_paper_branch(question, ground_truth, answer, variant)
    return Judgement(TRUE if branch in HALP_PAPER_POSITIVE else FALSE, branch)


# ---------------------------------------------------------------------------------------------
# The other rules; each takes (answer, ground_truth) of a row with a non-empty ground truth.


def judge_difflib_lenient(answer: str, ground_truth: str) -> Judgement:
    if similarity(answer, ground_truth) >= DIFFLIB_THRESHOLD:
        return Judgement(FALSE, "similarity")

    expected = yes_no_value(ground_truth)
    if expected is not None:
        stance = answer_polarity(answer)
        if stance is not None:
            return Judgement(FALSE if stance == expected else TRUE, "yesno")
    elif has_negation(ground_truth) and has_negation(str(answer)[:LENIENT_POLARITY_WINDOW]):
        return Judgement(FALSE, "yesno")

    gt_numbers = numbers(ground_truth)
    if gt_numbers and gt_numbers == numbers(str(answer)[:LENIENT_NUMBER_WINDOW]):
        return Judgement(FALSE, "number")

    gt_keywords = keywords(ground_truth)
    if gt_keywords:
        found = gt_keywords & keywords(str(answer)[:LENIENT_KEYWORD_WINDOW])
        if len(found) >= LENIENT_KEYWORD_FRACTION * len(gt_keywords):
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


_RULES = {DIFFLIB_LENIENT: judge_difflib_lenient, YESNO: judge_yesno, EXACT: judge_exact}
TEXT_METHODS = (HALP_PAPER, *_RULES)


def check_method(method: str) -> str:
    """`method` when it is one of METHODS, else a LabelError that says what to write instead."""
    if method in METHODS:
        return method
    hint = RENAMED_METHODS.get(method, f"choose one of {', '.join(METHODS)}")
    raise LabelError(f"unknown label method {method!r}: {hint}")


def judge(
    method: str, answer: str, ground_truth: str, question: str = "", variant: str = HALP_PAPER_DEFAULT_VARIANT
) -> Judgement:
    """One row by a text rule (TEXT_METHODS); an empty ground truth is left unjudged by every rule.
    `question` and `variant` (the copy of the paper's rule, `halp_paper_variant`) are read by halp_paper."""
    if check_method(method) not in TEXT_METHODS:
        raise LabelError(f"label method {method!r} reads no answers: choose one of {', '.join(TEXT_METHODS)}")
    if not str(ground_truth).strip():
        return Judgement(UNJUDGED, UNJUDGED_EMPTY_GT)
    if method == HALP_PAPER:
        return judge_halp_paper(str(answer), str(ground_truth), str(question), variant)
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
    table: pd.DataFrame,
    method: str,
    labels_file: str | Path | None = None,
    ignore_unknown: bool = False,
    variant: str = HALP_PAPER_DEFAULT_VARIANT,
) -> pd.DataFrame:
    """Labels for an embeddings table (as `read_embeddings(...).table`), in its row order; `variant` is the
    copy of the paper's rule that halp_paper follows (`halp_paper_variant`)."""
    check_method(method)
    if method == FILE:
        if not labels_file:
            raise LabelError("label method 'file' needs a labels file (CSV with question_id, hallucinated)")
        supplied = read_labels_file(labels_file, table["question_id"], ignore_unknown)

    rows = []
    for record in table.itertuples(index=False):
        question, answer, ground_truth = str(record.question), str(record.answer), str(record.ground_truth_answer)
        if record.status != STATUS_OK:
            verdict = Judgement(UNJUDGED, UNJUDGED_FAILED)
        elif method == FILE:
            if record.question_id not in supplied:
                verdict = Judgement(UNJUDGED, UNJUDGED_NOT_IN_FILE)
            elif supplied[record.question_id] == UNJUDGED:
                verdict = Judgement(UNJUDGED, UNJUDGED_EMPTY_IN_FILE)
            else:
                verdict = Judgement(supplied[record.question_id], "file")
        else:
            verdict = judge(method, answer, ground_truth, question, variant)
        rows.append(
            (record.question_id, record.image_id, question, answer, ground_truth, answer_type(ground_truth),
             verdict.hallucinated, verdict.decided_by)
        )  # fmt: skip
    return pd.DataFrame(rows, columns=list(LABEL_COLUMNS))


# A ground truth of single letters: "y, e, s", "n, o", "Y-E-S" (AMBER's, in the paper's data).
_SPELLED_OUT = re.compile(r"[a-z](?:\s*[,.\-/]\s*[a-z]|\s+[a-z])+")
SHOWN_EXAMPLES = 3


def counts(labels: pd.DataFrame) -> dict:
    """How many rows, judged, hallucinated, and the share of hallucinated among the judged."""
    judged = labels["hallucinated"] != UNJUDGED
    positives = int((labels["hallucinated"] == TRUE).sum())
    n_judged = int(judged.sum())
    return {
        "n_total": int(len(labels)),
        "n_judged": n_judged,
        "n_unjudged": int((~judged).sum()),
        "n_hallucinated": positives,
        "n_not_hallucinated": n_judged - positives,
        "positive_rate": positives / n_judged if n_judged else None,
    }


def label_warnings(labels: pd.DataFrame, method: str) -> list[str]:
    """What makes labels suspect: ground truths spelled out letter by letter, a class with no question."""
    warnings = []
    truths = labels["ground_truth_answer"].str.strip().str.lower()
    spelled = truths[truths.map(lambda text: bool(_SPELLED_OUT.fullmatch(text)))]
    if len(spelled):
        shown = ", ".join(f"{text!r} x{n}" for text, n in spelled.value_counts().head(SHOWN_EXAMPLES).items())
        how = (
            "halp_paper, as the paper's code, reads 'n, o' as no and any other spelling (such as 'y, e, s') "
            "as not yes/no, never positive"
            if method == HALP_PAPER
            else "check that the method reads them as meant"
        )
        warnings.append(f"{len(spelled)} ground truths look spelled out letter by letter ({shown}): {how}")
    tally = counts(labels)
    if tally["n_judged"] == 0:
        warnings.append("no question was judged: both classes are empty, no probe can be trained")
    else:
        for key, label in (("n_hallucinated", "hallucinated"), ("n_not_hallucinated", "not hallucinated")):
            if tally[key] == 0:
                warnings.append(
                    f"no question is labelled {label} ({tally['n_judged']} judged): a probe needs both classes"
                )
    return warnings


def summarise_labels(labels: pd.DataFrame, method: str) -> dict:
    """Counts overall, per branch of the rule (`decided_by`, judged rows) and per answer type, and warnings."""
    judged = labels["hallucinated"] != UNJUDGED
    by_type = {}
    for kind in ANSWER_TYPES:
        rows = labels[labels["answer_type"] == kind]
        by_type[kind] = counts(rows) | {"decided_by": dict(Counter(rows["decided_by"]))}
    return {
        "method": method,
        **counts(labels),
        "unjudged_by_reason": dict(Counter(labels.loc[~judged, "decided_by"])),
        "decided_by": dict(Counter(labels.loc[judged, "decided_by"])),
        "by_answer_type": by_type,
        "warnings": label_warnings(labels, method),
    }


def label_embeddings(
    embeddings_path: str | Path,
    out_csv: str | Path,
    method: str = DEFAULT_METHOD,
    labels_file: str | Path | None = None,
    summary_json: str | Path | None = None,
    ignore_unknown: bool = False,
) -> dict:
    """Label every question of an embeddings file; write `out_csv` and its JSON summary (by default
    beside it, see `summary_path`); return the summary. Each warning of the summary is also logged."""
    check_method(method)
    embeddings = read_embeddings(embeddings_path)
    if method != FILE and not embeddings.attrs.get(ANSWERS_ATTR, True):
        raise LabelError(
            f"{embeddings_path} is prefill-only (attribute {ANSWERS_ATTR} false: its model entry sets answers: false), "
            f"so label method {method!r} has no answers to judge; use method 'file' with a labels file"
        )
    family = str(embeddings.attrs.get(FAMILY_ATTR, "")) or None
    variant = halp_paper_variant(family)
    labels = label_table(embeddings.table, method, labels_file, ignore_unknown, variant)
    summary = summarise_labels(labels, method)
    summary["embeddings"] = str(embeddings_path)
    summary["model"] = str(embeddings.attrs.get(MODEL_ATTR, ""))
    summary["family"] = family
    if method == HALP_PAPER:
        summary["halp_paper_variant"] = variant  # the copy of the paper's rule followed: the family's own, or gemma3
    summary["labels_file"] = str(labels_file) if labels_file else None
    out_csv = Path(out_csv)
    write_text_atomic(out_csv, labels.to_csv(index=False))
    write_text_atomic(Path(summary_json or summary_path(out_csv)), json.dumps(summary, indent=2) + "\n")
    for warning in summary["warnings"]:
        log.warning("labels %s: %s", out_csv, warning)
    return summary


def read_labels(path: str | Path) -> pd.DataFrame:
    """A labels CSV as written by `label_embeddings`, every column as text ('' for unjudged)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("question_id", "hallucinated") if c not in table.columns]
    if missing:
        raise LabelError(f"{path}: not a labels file (missing {', '.join(missing)})")
    return table
