"""Benchmark metrics, matching the scripts that produce the published numbers.

Every function states the script it follows. Where the common scripts disagree, the
choice made here is named with the alternative. Scores are fractions in [0, 1]; papers
print them multiplied by 100.

Sources (the code was written here; rules and tables were taken from these):

* VQA accuracy / answer normalisation: the VQA evaluation code
  (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) and the EvalAI
  answer processor that the VQA v2 and TextVQA challenge servers run. That processor is
  also used by MMF/Pythia (``EvalAIAnswerProcessor``), by LLaVA's TextVQA evaluator
  (``m4c_evaluator.py``) and by lmms-eval (``_task_utils/vqa_eval_metric.py``).
* ANLS: the Robust Reading Competition's DocVQA/InfographicVQA scoring script
  (reproduced as lmms-eval's ``anls`` metric); Biten et al., ICCV 2019.
* ChartQA relaxed accuracy: ChartQA paper (Masry et al. 2022, end of section 5.1) and
  the ``relaxed_correctness`` function used by pix2struct, Qwen-VL and lmms-eval.
* POPE: the POPE repository's ``evaluate.py`` (copied unchanged into LLaVA as
  ``llava/eval/eval_pope.py``).
* GQA exact match: lmms-eval ``gqa.yaml`` (``exact_match`` with ``ignore_case`` and
  ``ignore_punctuation``) and LLaVA ``scripts/convert_gqa_for_eval.py``.
* ScienceQA letter extraction: LLaVA-1.5 ``llava/eval/eval_science_qa.py``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Optional, Union

from ..errors import FastVLMError

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "levenshtein",
    "anls",
    "relaxed_accuracy",
    "pope_answer_to_label",
    "pope_scores",
    "normalize_exact",
    "exact_match",
    "extract_choice_letter",
    "choice_index",
    "multiple_choice_accuracy",
    "SHORT_ANSWER_PROMPT",
    "MULTIPLE_CHOICE_PROMPT",
]

# The instruction LLaVA-1.5 appends to short-answer VQA questions (its eval question files
# and lmms-eval's ``post_prompt`` for TextVQA, DocVQA, ChartQA, GQA and POPE). FastVLM is
# trained on LLaVA-1.5-style data and evaluated with these prompts.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
# LLaVA-1.5 ``model_vqa_science.py --single-pred-prompt`` and lmms-eval ``scienceqa_img.yaml``.
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------

# Contractions written without an apostrophe, mapped to the spelled form. The table of
# the EvalAI processor (ASCII apostrophes). GT-Vision-Lab's vqaEval.py has the same keys
# but most of its values use U+2019; since that script turns ASCII "'" into a space
# before this step, its mapped forms never match a typed "don't" either way.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# ``manualMap`` of vqaEval.py: number words up to ten become digits ("none" counts as 0).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# ``periodStrip``: a full stop not followed by a digit is deleted ("yes." -> "yes", but
# "2.5" keeps its point). The original pattern opens with ``(?!<=\d)``, a typo for a
# look-behind that in fact tests for the literal text "<=" + digit, so it almost never
# matters; it is kept so that results agree character for character.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# ``commaStrip``: a comma between digits ("1,000"). Only used as a test (see below).
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# Punctuation of the EvalAI processor. (vqaEval.py's list has ":" and "'" instead of
# "{", "}", "-" and "!".)
_PUNCTUATION = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
    "@", "`", ",", "?", "!",
)  # fmt: skip
# vqaEval.py passes ``re.UNICODE`` (== 32) where ``re.sub`` expects ``count``; the
# processors copied that, so at most 32 full stops are removed. Kept for exactness.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    # Each mark is deleted when it touches a space somewhere in the *input* (or when the
    # input has a comma between digits), otherwise it becomes a space: "yes, it is" ->
    # "yes it is", but "black/white" -> "black white".
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(s: str) -> str:
    """Normalise an answer the way the VQA/TextVQA evaluation server does.

    Steps of the EvalAI answer processor, in order:

    1. lower-case; delete every "," and "?"; write "'s" as " 's" ("it's" -> "it 's");
       strip;
    2. newlines and tabs become spaces; strip;
    3. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: deleted where the
       text has it next to a space, replaced by a space otherwise; then every "." not
       followed by a digit is deleted (``periodStrip``);
    4. split on whitespace; number words "none", "zero" ... "ten" become digits
       (``manualMap``); the articles "a", "an", "the" are dropped; apostrophe-less
       contractions are spelled out ("dont" -> "don't"); words are joined by one space.

    Examples: ``"Yes."`` -> ``"yes"``, ``"Two"`` -> ``"2"``, ``"the red car"`` ->
    ``"red car"``, ``"1,000"`` -> ``"1000"``, ``"dont"`` -> ``"don't"``.

    Source: EvalAI processor (MMF ``EvalAIAnswerProcessor``, lmms-eval
    ``vqa_eval_metric.py``), which implements GT-Vision-Lab ``vqaEval.py``'s
    ``processPunctuation`` + ``processDigitArticle`` with an extra first step.
    """
    s = s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually ten).

    ``acc = mean over annotators i of min(1, #{j != i : answers[j] == prediction} / 3)``
    after normalising the prediction and every answer with :func:`normalize_vqa_answer`.
    Each of the n leave-one-out subsets of n-1 answers scores min(matches / 3, 1) and the
    n scores are averaged; with ten answers, 3 matching answers give
    (3 * 2/3 + 7 * 1) / 10 = 0.9 and 4 or more give 1.0.

    Fewer than ten answers use the same formula over the n answers given (the official
    script averages over ``len(answers)`` subsets). Consequently a single reference
    answer always scores 0 (its only subset is empty); use :func:`exact_match` for
    single-reference data. An empty list raises :class:`FastVLMError`.

    Sources: vqaEval.py ``evaluate`` (leave-one-out average); lmms-eval
    ``textvqa_process_results`` and LLaVA ``m4c_evaluator`` (both answers and prediction
    normalised with the EvalAI processor). Annotators are left out by position, so equal
    answers from different annotators count separately, as in the official script.
    """
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise FastVLMError("vqa_accuracy: no reference answers")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    total_matches = sum(1 for g in gts if g == pred)
    scores = []
    for g in gts:
        others = total_matches - (1 if g == pred else 0)
        scores.append(min(1.0, others / 3.0))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Union[str, Sequence[str]], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA, InfoVQA).

    For each reference a: both strings are stripped, lower-cased and have runs of
    whitespace collapsed; NL = levenshtein(a', p') / max(len(a), len(p)). The score is
    ``1 - min NL`` over the references, or 0 when that is below ``threshold``. A
    similarity of exactly ``threshold`` is kept (0.5 scores 0.5).

    Two details follow the RRC scoring script (and lmms-eval) rather than the paper's
    formula: the denominator uses the lengths of the *un-normalised* strings (upper-cased,
    as the script does), and the threshold test is ``similarity < threshold -> 0``, which
    keeps NL == 0.5 where the paper's ``NL < tau`` would not.
    """
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise FastVLMError("anls: no reference answers")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# ---------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------


def _to_float(text: str) -> Optional[float]:
    # A trailing "%" divides by 100: "50%" == "0.5" but "50%" != "50". Python's float()
    # is the parser, so "1,000" is not a number (compared as text) and "1e3" is.
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 or 0.0.

    If both strings parse as numbers (a trailing "%" meaning /100) and the target is not
    zero, the prediction is right when ``|p - t| / |t| <= tolerance`` (5%: exactly 5% off
    is right). Otherwise the two must be equal ignoring case. A zero target is therefore
    matched as text ("0" vs "0.0" is wrong), as in the reference code.

    Both strings are stripped first (the models' outputs are stripped before scoring in
    lmms-eval and LLaVA). Floating-point comparison is kept as is: "105%" vs "100%" is
    1.05 - 1.0 = 0.0500000000000000444 > 0.05 and so wrong, exactly as in lmms-eval.

    Source: ChartQA paper section 5.1; ``relaxed_correctness`` of pix2struct / Qwen-VL /
    lmms-eval ``chartqa/utils.py``.
    """
    prediction = str(prediction).strip()
    target = str(target).strip()
    p = _to_float(prediction)
    t = _to_float(target)
    if p is not None and t:
        return 1.0 if abs(p - t) / abs(t) <= tolerance else 0.0
    return 1.0 if prediction.lower() == target.lower() else 0.0


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


def pope_answer_to_label(prediction: str) -> str:
    """Map a free-form answer to "yes" or "no" as POPE's ``evaluate.py`` does.

    Keep the text before the first "." (the first sentence), delete commas, split on
    single spaces; if one of the words is exactly "No", "no" or "not" the answer is
    "no", otherwise "yes". So "No, there is not." -> "no", "Yes" -> "yes",
    "There is no dog" -> "no", and anything without such a word (including "NO", "Nope"
    or an empty answer) counts as "yes". This is the rule of the POPE repository and of
    LLaVA's ``eval_pope.py``; lmms-eval's POPE task instead requires the whole answer to
    be "yes"/"no" (case-insensitive).
    """
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def _label(value: Union[str, bool, int]) -> int:
    # POPE's evaluate.py: label "no" -> 0, anything else -> 1. Stricter here: the value
    # must be yes/no (or a bool/0/1) so that a misspelt label is not silently "yes".
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return 1 if value.strip().lower() == "yes" else 0
    raise FastVLMError(f"POPE label must be 'yes' or 'no', got {value!r}")


def pope_scores(predictions: Sequence[str], labels: Sequence[Union[str, bool, int]]) -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class).

    Each prediction goes through :func:`pope_answer_to_label` ("yes"/"no" map to
    themselves). With TP, FP, TN, FN counted against the labels:
    accuracy = (TP + TN) / n, precision = TP / (TP + FP), recall = TP / (TP + FN),
    F1 = 2PR / (P + R), yes_ratio = (TP + FP) / n, the share of *predicted* "yes"
    (lmms-eval's ``pope_yes_ratio`` counts labels instead; POPE's own script and LLaVA
    count predictions, as here). Where a denominator is 0 the official script raises;
    here that value is 0.0. The returned dict also carries the counts tp, fp, tn, fn, n.
    """
    if len(predictions) != len(labels):
        raise FastVLMError(f"pope_scores: {len(predictions)} predictions but {len(labels)} labels")
    n = len(predictions)
    tp = fp = tn = fn = 0
    for pred, lab in zip(predictions, labels):
        p = 1 if pope_answer_to_label(pred) == "yes" else 0
        y = _label(lab)
        if p and y:
            tp += 1
        elif p and not y:
            fp += 1
        elif not p and not y:
            tn += 1
        else:
            fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


# ---------------------------------------------------------------------------
# GQA exact match
# ---------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(s: str) -> str:
    """Lower-case, delete ASCII punctuation (``string.punctuation``), collapse spaces.

    lmms-eval's GQA metric is ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation`` (lower-case; delete ``string.punctuation``). LLaVA's GQA
    conversion does ``rstrip('.').lower()`` before GQA's exact comparison, which this
    subsumes. Stripping and collapsing whitespace is added here, so "yes " and "yes"
    compare equal (lmms-eval's would not); "t - shirt" and "t-shirt" still differ there and here.
    """
    return " ".join(s.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, answer: Union[str, Sequence[str]]) -> float:
    """1.0 when the prediction equals the answer (or one of the answers) after
    :func:`normalize_exact`, else 0.0. Used for GQA and the project's synthetic data."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers:
        raise FastVLMError("exact_match: no reference answers")
    pred = normalize_exact(prediction)
    return 1.0 if any(pred == normalize_exact(a) for a in answers) else 0.0


# ---------------------------------------------------------------------------
# Multiple choice (ScienceQA)
# ---------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
# LLaVA's pattern, unchanged: the final "." matches any one character, so "The answer is
# B" at the very end of the text does not match in strict mode.
_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
# Lenient additions: a letter in brackets or followed by ")", "." or ":" at the start
# ("(C)", "C)", "C.", "C: ..."), or after "answer is"/"answer:" anywhere.
_LEAD_LETTER = re.compile(r"^\(?([A-Z])(?:\)|\.|:)(?:\s|$)|^\(([A-Z])\)")
_ANSWER_LETTER = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_choice_letter(prediction: str, num_choices: int, *, strict: bool = False) -> Optional[str]:
    """The option letter a model chose, or None when none can be read off.

    LLaVA-1.5's ``eval_science_qa.py`` rules, tried first and in this order on the
    stripped text: (1) the text is a letter; (2) it starts with "<letter>. "; (3) the
    pattern ``The answer is ([A-Z]).`` occurs exactly once. The letter must be one of
    the first ``num_choices`` (LLaVA's ``get_pred_idx``; LLaVA then scores a failure as
    wrong).

    Unless ``strict``, further forms are accepted when those fail: "(C)", "C)", "C.",
    "C:" at the start, and "answer: C" / "answer is (C)" anywhere (case-insensitive
    "answer"). A bare leading "A " is *not* read as a choice, since it is usually the
    article. ``strict=True`` gives LLaVA's result exactly.
    """
    if num_choices < 1:
        raise FastVLMError(f"extract_choice_letter: num_choices must be >= 1, got {num_choices}")
    valid = _LETTERS[:num_choices]
    text = prediction.strip()
    letter: Optional[str] = None
    if len(text) == 1 and text in _LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in _LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _LLAVA_ANSWER_IS.findall(text)
        if len(found) == 1:
            letter = found[0]
    if letter is None and not strict:
        m = _LEAD_LETTER.match(text)
        if m:
            letter = m.group(1) or m.group(2)
        else:
            found = _ANSWER_LETTER.findall(text)
            if found:
                letter = found[-1]
    if letter is None or letter not in valid:
        return None
    return letter


def choice_index(answer: Union[int, str]) -> int:
    """An answer given as index (2) or letter ("C") -> index."""
    if isinstance(answer, bool):
        raise FastVLMError(f"choice answer must be an index or a letter, got {answer!r}")
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in _LETTERS:
        return _LETTERS.index(answer.strip().upper())
    raise FastVLMError(f"choice answer must be an index or a letter, got {answer!r}")


def multiple_choice_accuracy(
    predictions: Sequence[str],
    answers: Sequence[Union[int, str]],
    num_choices: Union[int, Sequence[int]],
    *,
    strict: bool = False,
) -> float:
    """Share of predictions whose extracted letter (:func:`extract_choice_letter`) is the
    answer (index or letter). An unreadable answer counts as wrong (LLaVA-1.5 returns -1
    for it; earlier LLaVA versions picked a random choice instead)."""
    if len(predictions) != len(answers):
        raise FastVLMError(f"multiple_choice_accuracy: {len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        return 0.0
    counts = [num_choices] * len(predictions) if isinstance(num_choices, int) else list(num_choices)
    if len(counts) != len(predictions):
        raise FastVLMError("multiple_choice_accuracy: num_choices has the wrong length")
    correct = 0
    for pred, ans, k in zip(predictions, answers, counts):
        letter = extract_choice_letter(pred, k, strict=strict)
        if letter is not None and _LETTERS.index(letter) == choice_index(ans):
            correct += 1
    return correct / len(predictions)
