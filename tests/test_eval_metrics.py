"""Metrics against worked examples computed by hand (the arithmetic is in the comments)."""

import pytest

from fastvlm.errors import FastVLMError
from fastvlm.eval.metrics import (
    anls,
    choice_index,
    exact_match,
    extract_choice_letter,
    levenshtein,
    multiple_choice_accuracy,
    normalize_exact,
    normalize_vqa_answer,
    pope_answer_to_label,
    pope_scores,
    relaxed_accuracy,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # articles are dropped as whole words only
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("the red car", "red car"),
        ("theater", "theater"),
        # a final "." is removed (periodStrip: a "." not followed by a digit) ...
        ("yes.", "yes"),
        ("Yes.", "yes"),
        # ... but a decimal point stays, and "5." loses its trailing point
        ("3.5", "3.5"),
        ("5.", "5"),
        # step 1 deletes every comma, so digit groups join up
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        # step 1 writes "'s" as " 's"; the apostrophe itself is not punctuation here
        ("it's", "it 's"),
        ("man's hat", "man 's hat"),
        # number words up to ten become digits (manualMap), "none" too
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("eleven", "eleven"),
        # contractions written without apostrophe are spelled out
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("wont", "won't"),
        # punctuation not touching a space becomes a space; touching one, it is deleted
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("t-shirt", "t shirt"),
        ("(left)", "left"),
        # "?" deleted in step 1; case, tabs and newlines, repeated spaces
        ("What?", "what"),
        ("  Two\tDogs \n", "2 dogs"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# ---------------------------------------------------------------------------
# VQA accuracy: mean over annotators i of min(1, matches among the other 9 / 3)
# ---------------------------------------------------------------------------


def test_vqa_accuracy_ten_annotators():
    # 0 matching answers: every subset has 0 matches -> 0.
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # 1 match: the matching annotator's subset has 0 others -> 0; the 9 others see 1
    # match -> 1/3 each. (0 + 9 * 1/3) / 10 = 3 / 10 = 0.3.
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 2 matches: 2 subsets see 1 -> 1/3; 8 subsets see 2 -> 2/3.
    # (2/3 + 16/3) / 10 = 6 / 10 = 0.6.
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    # 3 matches: 3 subsets see 2 -> 2/3; 7 subsets see 3 -> 1.
    # (3 * 2/3 + 7) / 10 = (2 + 7) / 10 = 0.9  (not 1.0).
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 4 matches: 4 subsets see 3 -> 1; 6 subsets see 4 -> 1. -> 1.0.
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0


def test_vqa_accuracy_normalises_both_sides():
    # prediction "Two." -> "2"; answers "2", "two", "2 " all -> "2": 3 matches -> 0.9.
    answers = ["2", "two", "2 ", "3", "3", "3", "4", "4", "4", "4"]
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    # "the dog" and "a dog" both -> "dog": 4 matches -> 1.0
    assert vqa_accuracy("The dog", ["a dog", "dog", "the dog", "dog.", "cat"] + ["cat"] * 5) == 1.0
    # "1,000" -> "1000"
    assert vqa_accuracy("1000", ["1,000"] * 10) == 1.0


def test_vqa_accuracy_fewer_than_ten_answers():
    # The official script averages over len(answers) leave-one-out subsets.
    # 3 answers, 2 match: the two matching subsets see 1 match -> 1/3 each; the other
    # sees 2 -> 2/3. (1/3 + 1/3 + 2/3) / 3 = (4/3) / 3 = 4/9.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    # A single reference leaves an empty subset: always 0 (use exact_match instead).
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    # A bare string is one answer.
    assert vqa_accuracy("cat", "cat") == 0.0
    with pytest.raises(FastVLMError):
        vqa_accuracy("cat", [])


# ---------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_worked_examples():
    # exact (case and spaces ignored)
    assert anls("  Denver   BRONCOS ", ["Denver Broncos"]) == pytest.approx(1.0)
    # "12/15/89" vs "12/15/88": 1 edit / 8 chars -> 1 - 0.125 = 0.875
    assert anls("12/15/89", ["12/15/88"]) == pytest.approx(0.875)
    # best reference wins: vs "Dr. Lobo" distance 5 / 13 chars; vs "Dear Dr. Lobo" 0 -> 1.0
    assert anls("dear dr. lobo", ["Dr. Lobo", "Dear Dr. Lobo"]) == pytest.approx(1.0)


def test_anls_threshold():
    # "abxy" vs "abcd": 2 substitutions / 4 -> NL 0.5, similarity exactly 0.5: kept.
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)
    # "abxyz" vs "abcde": 3 / 5 = 0.6 -> similarity 0.4 < 0.5 -> 0.
    assert anls("abxyz", ["abcde"]) == 0.0
    # "abcdefghij" vs "abcdefxyzw": 4 / 10 -> 0.6, above the threshold.
    assert anls("abcdefxyzw", ["abcdefghij"]) == pytest.approx(0.6)
    # a stricter threshold zeroes it
    assert anls("abcdefxyzw", ["abcdefghij"], threshold=0.7) == 0.0
    # empty prediction vs non-empty answer: NL 1 -> 0
    assert anls("", ["abc"]) == 0.0
    # both empty: length 0 -> NL 0 -> 1
    assert anls("", [""]) == 1.0


def test_anls_length_uses_unnormalised_strings():
    # RRC script quirk: distance on normalised strings ("ab" vs "ac" = 1) but the
    # denominator is max(len("ab"), len("ac    ")) = 6 -> 1 - 1/6.
    assert anls("ac    ", ["ab"]) == pytest.approx(1 - 1 / 6)


# ---------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------


def test_relaxed_accuracy_numeric_tolerance():
    # |105 - 100| / 100 = 0.05 <= 0.05 -> right (exactly 5% is inside)
    assert relaxed_accuracy("105", "100") == 1.0
    assert relaxed_accuracy("95", "100") == 1.0
    # 5.01% -> wrong
    assert relaxed_accuracy("105.01", "100") == 0.0
    assert relaxed_accuracy("94.9", "100") == 0.0
    # |21 - 20| / 20 = 0.05 -> right
    assert relaxed_accuracy("21", "20") == 1.0
    # relative to the *target*: |100 - 105| / 105 = 0.0476 -> right
    assert relaxed_accuracy("100", "105") == 1.0
    # negative targets use |t|
    assert relaxed_accuracy("-10.4", "-10") == 1.0
    # other tolerance
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0


def test_relaxed_accuracy_percentages_and_text():
    # "%" divides by 100: 0.5 == 50% exactly
    assert relaxed_accuracy("0.5", "50%") == 1.0
    assert relaxed_accuracy("51%", "50%") == 1.0  # |0.51 - 0.5| / 0.5 = 0.02
    # ... so a bare "50" against "50%" is 50 vs 0.5: wrong (as in lmms-eval)
    assert relaxed_accuracy("50", "50%") == 0.0
    # floating point is not rounded away: 1.05 - 1.0 = 0.05000000000000004 > 0.05
    assert relaxed_accuracy("105%", "100%") == 0.0
    # non-numeric: case-insensitive exact match
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy("  Brazil ", "brazil") == 1.0
    assert relaxed_accuracy("Brazil", "Brazilia") == 0.0
    # "1,000" is not a float: compared as text
    assert relaxed_accuracy("1,000", "1000") == 0.0
    assert relaxed_accuracy("1,000", "1,000") == 1.0
    # a zero target falls back to text equality
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 0.0


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("It is not a dog", "no"),
        ("Yes, there is a dog. No cat.", "yes"),  # only the first sentence counts
        ("no.", "no"),
        ("NO", "yes"),  # only "No", "no" and "not" are negative words
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_answer_to_label(answer, label):
    assert pope_answer_to_label(answer) == label


def test_pope_scores_hand_counted():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["Yes", "yes", "Yes.", "No", "No", "no", "No, there is not.", "no", "Yes", "Yes"]
    # pred yes on labels: y y y n | n n n n y y
    # TP = 3 (first three), FN = 1 (4th), TN = 4 (5th-8th), FP = 2 (last two)
    s = pope_scores(preds, labels)
    assert (s["tp"], s["fn"], s["tn"], s["fp"], s["n"]) == (3, 1, 4, 2, 10)
    assert s["accuracy"] == pytest.approx((3 + 4) / 10)  # 0.7
    assert s["precision"] == pytest.approx(3 / 5)  # TP / (TP + FP) = 0.6
    assert s["recall"] == pytest.approx(3 / 4)  # TP / (TP + FN) = 0.75
    # F1 = 2 * 0.6 * 0.75 / (0.6 + 0.75) = 0.9 / 1.35 = 2/3
    assert s["f1"] == pytest.approx(2 / 3)
    # predicted yes = TP + FP = 5 of 10
    assert s["yes_ratio"] == pytest.approx(0.5)


def test_pope_scores_edge_cases():
    # no "yes" predictions: precision/recall/F1 are 0 instead of dividing by zero
    s = pope_scores(["no", "no"], ["yes", "no"])
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0
    assert s["accuracy"] == 0.5 and s["yes_ratio"] == 0.0
    with pytest.raises(FastVLMError):
        pope_scores(["yes"], ["maybe"])
    with pytest.raises(FastVLMError):
        pope_scores(["yes"], ["yes", "no"])


# ---------------------------------------------------------------------------
# GQA exact match
# ---------------------------------------------------------------------------


def test_exact_match_gqa_normalisation():
    assert normalize_exact(" Yes. ") == "yes"
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("Left", "left") == 1.0
    assert exact_match("t-shirt", "T-Shirt") == 1.0
    assert exact_match("the table", "table") == 0.0  # no article removal in GQA
    assert exact_match("2", "two") == 0.0  # no number words either
    assert exact_match("red", ["blue", "Red"]) == 1.0
    with pytest.raises(FastVLMError):
        exact_match("x", [])


# ---------------------------------------------------------------------------
# ScienceQA letters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, lenient, strict",
    [
        ("B", "B", "B"),  # LLaVA rule 1: the text is a letter
        (" B\n", "B", "B"),
        ("C. spring", "C", "C"),  # rule 2: "<letter>. "
        ("The answer is B.", "B", "B"),  # rule 3: "The answer is ([A-Z])."
        ("I think the answer is D. Because ...", "D", None),  # regex is case-sensitive
        ("The answer is A. The answer is B.", "B", None),  # two matches: LLaVA fails
        ("The answer is B", "B", None),  # LLaVA's "." needs one more character
        ("(C)", "C", None),
        ("(C) spring", "C", None),
        ("C)", "C", None),
        ("C.", "C", None),
        ("Answer: D", "D", None),
        ("A bird", None, None),  # leading article is not a choice
        ("The answer is a bird.", None, None),
        ("E", None, None),  # only 4 choices
        ("", None, None),
    ],
)
def test_extract_choice_letter(pred, lenient, strict):
    assert extract_choice_letter(pred, 4) == lenient
    assert extract_choice_letter(pred, 4, strict=True) == strict


def test_multiple_choice_accuracy():
    preds = ["The answer is B.", "B", "(C)", "A", "garbage"]
    answers = [1, "B", "C", 3, 0]
    # right: 1st (B=1), 2nd (B), 3rd (C); wrong: 4th (A vs D), 5th (unreadable) -> 3/5
    assert multiple_choice_accuracy(preds, answers, 4) == pytest.approx(0.6)
    # strict LLaVA rules cannot read "(C)" -> 2/5
    assert multiple_choice_accuracy(preds, answers, 4, strict=True) == pytest.approx(0.4)
    assert choice_index("c") == 2 and choice_index(0) == 0
    with pytest.raises(FastVLMError):
        choice_index("CC")
