"""Scores of a VLM's text against the truth: the one home of every answer and caption metric.

    vqa_normalize("The Two dogs.")                    # "2 dogs"  (the VQAv2 evaluation's answer normalisation)
    vqa_accuracy("2", ["two", "two", "3", ...])         # min(#humans agreeing / 3, 1), leave-one-out over 10
    exact_match(predictions, truths)                    # one truth each: VQA-normalised equality
    choice_index("(B) a cat", ["a dog", "a cat"])       # 1: the option a free-form answer picks
    token_f1(predictions, truths)                       # SQuAD's bag-of-words F1
    caption_scores(predictions, references)             # BLEU-1..4, ROUGE-L (torchmetrics), CIDEr-D (below)

Captions are compared as lowercased words without punctuation (`words`), as coco-caption does after its PTB
tokenizer (a Java program we do not run, so words like "cat's" split differently from it).
"""

from __future__ import annotations

import collections
import math
import re

# -- VQAv2 ------------------------------------------------------------------------------------------------
# The official VQA evaluation's tables (vqaEval.py; also lmms-eval's EvalAIAnswerProcessor), kept verbatim,
# "somebody'd" -> "somebodyd" included.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a period not followed by a digit ("3.5" keeps its period)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
    """The VQAv2 evaluation's answer normalisation: a punctuation mark next to a space (or any, when the
    answer holds a digit comma as in "1,000") is dropped, otherwise it becomes a space; periods go unless a
    digit follows; lowercase; number words become digits; articles go; "dont" -> "don't" and the like."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        glued = mark + " " in text or " " + mark in text or _DIGIT_COMMA.search(text) is not None
        out = out.replace(mark, "" if glued else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one answer: with n > 1 human answers, the mean over the n leave-one-out subsets of
    min(#subset answers equal to the prediction / 3, 1) (so 3 agreeing humans of 10 give 0.9); with one answer,
    exact match. Everything compared after `vqa_normalize`. (The official script skips the normalisation
    when all ten humans agree, so there "Red." scores 0 against ten "red"; lmms-eval's VQAv2 task and this
    function always normalise.)"""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    prediction, answers = vqa_normalize(prediction), [vqa_normalize(a) for a in answers]
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = sum(a == prediction for a in answers)
    # leaving out answer i removes one match when answer i is itself a match
    return sum(min((matches - (a == prediction)) / 3, 1.0) for a in answers) / len(answers)


def exact_match(predictions: list[str], truths: list[str]) -> float:
    """Mean VQA-normalised equality of each prediction with its one truth."""
    return sum(vqa_accuracy(p, [t]) for p, t in zip(predictions, truths, strict=True)) / max(len(truths), 1)


# -- multiple choice ---------------------------------------------------------------------------------------
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"^\(?([A-Z])(?:[).:,]|\s|$)")


def choice_index(answer: str, options: list[str]) -> int | None:
    """The option a free-form answer picks, or None: the option text itself (VQA-normalised), a leading
    option letter ("B", "(B)", "B. a cat", "B) ..."), else the one option whose text the answer contains."""
    normalized = [vqa_normalize(o) for o in options]
    said = vqa_normalize(answer)
    if said in normalized:
        return normalized.index(said)
    if (match := _LETTER.match(answer.strip())) and LETTERS.index(match.group(1)) < len(options):
        return LETTERS.index(match.group(1))
    inside = [i for i, o in enumerate(normalized) if o and re.search(rf"\b{re.escape(o)}\b", said)]
    return inside[0] if len(inside) == 1 else None


def multiple_choice_accuracy(predictions: list[str], options: list[list[str]], truths: list[int]) -> float:
    """Fraction of answers whose `choice_index` is the true option's index (an unmatched answer is wrong)."""
    hits = [choice_index(p, o) == t for p, o, t in zip(predictions, options, truths, strict=True)]
    return sum(hits) / max(len(hits), 1)


# -- short answers and captions -----------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lowercased words, punctuation removed: how answers and captions are compared word by word."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def token_f1(predictions: list[str], truths: list[str]) -> float:
    """Mean bag-of-words F1 (SQuAD's): overlap of word counts between prediction and truth."""
    scores = []
    for prediction, truth in zip(predictions, truths, strict=True):
        p, t = words(prediction), words(truth)
        common = sum((collections.Counter(p) & collections.Counter(t)).values())
        scores.append(0.0 if not common else 2 * common / (len(p) + len(t)))
    return sum(scores) / max(len(scores), 1)


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (torchmetrics, clipped n-gram precisions with the brevity penalty), ROUGE-L F1
    (torchmetrics, the best reference per caption) and CIDEr-D, on `words`."""
    from torchmetrics.functional.text import bleu_score
    from torchmetrics.functional.text.rouge import rouge_score

    if len(predictions) != len(references) or not predictions or not all(references):
        raise ValueError("caption_scores needs one prediction and at least one reference per image")
    preds = [" ".join(words(p)) for p in predictions]
    refs = [[" ".join(words(r)) for r in rs] for rs in references]
    scores = {f"bleu_{n}": float(bleu_score(preds, refs, n_gram=n)) for n in range(1, 5)}
    scores["rouge_l"] = float(rouge_score(preds, refs, rouge_keys="rougeL")["rougeL_fmeasure"])
    scores["cider_d"] = cider_d(preds, refs)[0]
    return scores


def _ngram_counts(text: str, n: int) -> collections.Counter:
    tokens = words(text)
    return collections.Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015), as coco-caption's CiderScorer computes it -> (mean, per image).

    Per image and n-gram order k = 1..n: tf-idf vectors, tf = the n-gram's count in the sentence, idf =
    log(#images) - log(max(1, #images whose references hold the n-gram)) (document frequencies over the
    evaluated references); the similarity to each reference is the candidate's tf-idf clipped at the
    reference's, times the reference's, over both norms, times the Gaussian length penalty
    exp(-(len_c - len_r)^2 / (2 sigma^2)); averaged over the references and the n orders, times 10."""
    if len(predictions) != len(references) or not all(references):
        raise ValueError("cider_d needs one prediction and at least one reference per image")
    candidates = [_ngram_counts(p, n) for p in predictions]
    refs = [[_ngram_counts(r, n) for r in rs] for rs in references]
    document_frequency = collections.Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_images = math.log(len(references))

    def vector(counts):
        # coco-caption takes the length from the 2-gram slot: #bigrams, which is the word count minus one
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for candidate, rs in zip(candidates, refs, strict=True):
        vec, norms, length = vector(candidate)
        total = 0.0
        for ref in rs:
            ref_vec, ref_norms, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(v, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, v in vec[k].items())
                if norms[k] and ref_norms[k]:
                    dot /= norms[k] * ref_norms[k]
                total += dot * penalty
        scores.append(10.0 * total / n / len(rs))
    return sum(scores) / max(len(scores), 1), scores
