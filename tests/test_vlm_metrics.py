"""vlm.metrics against values worked out by hand on small examples, and CIDEr-D against coco-caption's scorer."""

import math

import pytest

from vlm.metrics import (
    caption_scores,
    choice_index,
    cider_d,
    exact_match,
    multiple_choice_accuracy,
    token_f1,
    vqa_accuracy,
    vqa_normalize,
)


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("The Two dogs.", "2 dogs"),  # article dropped, number word -> digit, final period gone
        ("  Yes, sir!\n", "yes sir"),  # marks next to a space are dropped
        ("left-right", "left right"),  # a mark between letters becomes a space
        ("1,000 people", "1000 people"),  # a digit comma: every mark dropped, nothing split
        ("3.5", "3.5"),  # a period before a digit stays
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("none", "0"),
        ("an apple", "apple"),
    ],
)
def test_vqa_normalisation(answer, normalized):
    assert vqa_normalize(answer) == normalized


def test_vqa_accuracy_is_the_leave_one_out_mean():
    # 2 of 10 humans say "two": the 2 subsets without one of them hold 1 match (1/3), the other 8 hold 2 (2/3)
    assert vqa_accuracy("2", ["two", "Two"] + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    # 3 agreeing humans give 0.9, not 1: the 3 subsets without one of them hold only 2 matches
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    assert vqa_accuracy("The red.", ["red"]) == 1.0 and vqa_accuracy("reddish", ["red"]) == 0.0  # one answer: exact
    assert exact_match(["two", "a cat", "dog"], ["2", "cat", "cats"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("red", [])


def test_multiple_choice_matches_letters_and_option_text():
    options = ["a dog", "a cat", "a bird"]
    assert choice_index("B", options) == 1
    assert choice_index("(C) a bird", options) == 2
    assert choice_index("A. a dog", options) == 0
    assert choice_index("Cat", options) == 1  # the option text, normalised
    assert choice_index("I think it is a bird", options) == 2  # the one option the answer contains
    assert choice_index("D", options) is None and choice_index("a fish", options) is None
    assert multiple_choice_accuracy(["B", "a dog", "nothing"], [options] * 3, [1, 1, 0]) == pytest.approx(1 / 3)


def test_token_f1_by_hand():
    # prediction "a red circle" vs truth "a blue circle": 2 common words of 3 + 3 -> F1 = 4 / 6
    assert token_f1(["a red circle"], ["A blue circle."]) == pytest.approx(2 / 3)
    assert token_f1(["x"], ["y"]) == 0.0


def test_bleu_and_rouge_by_hand():
    scores = caption_scores(["The cat sat on the mat."], [["the cat is on the mat"]])
    # unigrams: 5 of 6 match (the, cat, on, the, mat); bigrams: 3 of 5 (the cat, on the, the mat); same lengths
    assert scores["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    # longest common subsequence "the cat on the mat": 5 words of 6 both ways
    assert scores["rouge_l"] == pytest.approx(5 / 6, abs=1e-6)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a"], [[]])


# Two images so that idf is not zero: an n-gram in both images' references has idf log(2/2) = 0, one in one
# image's references log(2/1) = log 2.
CANDIDATES = ["a cat cat", "a dog"]
REFERENCES = [["a cat"], ["a dog"]]


def test_cider_d_by_hand():
    mean, (first, second) = cider_d(CANDIDATES, REFERENCES)
    # image 2 repeats its reference: cosine 1 for 1- and 2-grams, nothing for 3- and 4-grams -> 10 * 2 / 4
    assert second == pytest.approx(5.0)
    # image 1, "a cat cat" against "a cat" (l = log 2): 1-grams a -> 0, cat -> 2l clipped at l: l*l / (2l * l) = 1/2;
    # 2-grams "a cat" (l), "cat cat" (l) against "a cat" (l): l*l / (sqrt(2) l * l) = 1/sqrt(2); 3-gram: 0.
    # Length penalty: 2 bigrams against 1, exp(-1 / 72).
    assert first == pytest.approx(10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72))
    assert mean == pytest.approx((first + second) / 2)


def test_cider_d_equals_coco_captions_scorer():
    """pycocoevalcap (coco-caption's Python 3 package) ships `Cider`, whose scorer is CIDEr-D: clipped tf-idf,
    Gaussian length penalty sigma 6, x10, document frequencies over the evaluated references."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap (the dev extra) is not installed")
    candidates = CANDIDATES + ["a large red circle on the left", "two small blue squares", "a tree"]
    references = REFERENCES + [
        ["a large red circle on the left of the image", "a red circle left"],
        ["two blue squares", "a pair of small blue squares", "blue squares two"],
        ["a green tree in a field", "one tree"],
    ]
    theirs, per_image = cider.Cider().compute_score(
        {i: refs for i, refs in enumerate(references)}, {i: [c] for i, c in enumerate(candidates)}
    )
    ours, our_per_image = cider_d(candidates, references)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert our_per_image == pytest.approx(list(per_image), rel=1e-9)
