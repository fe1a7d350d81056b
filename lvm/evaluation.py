"""Scoring an LVM on prompts with known answers.

perplexity      exp of the mean NLL of the target images' tokens given the prompt (LVM's definition;
                full-vocabulary softmax, teacher-forced).
score_analogies free-running generation of each analogy's answer (greedy by default), scored against
                the tokenized true answer beside two baselines:
                    copy_query  answer = the query image's own tokens
                    no_context  the same model prompted with the query alone, no example pairs
                Metrics: token accuracy; changed_token_accuracy, over only the positions whose true
                token differs from the query's (where copying scores 0 by construction, so a model
                that merely copies its input gets no credit); PSNR of the decoded answer against the
                true answer image; and the teacher-forced perplexity of the true answer.
Every method's answer is a token sequence decoded by the same tokenizer, so PSNR compares methods on
equal terms (the copy baseline also pays the tokenizer's reconstruction error).
metrics_table   the per-task changed-token accuracy and PSNR as text lines (console, summary picture).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from data.procedural import procedural_analogy, procedural_seeds
from data.sentences import Sentence
from lvm.figures import AnalogyExample
from lvm.prompting import InContextPrompter, check_analogy_count
from tokenizer import to_pil, to_tensor
from tokenizer.images import ImageLike, psnr

METHODS = ("model", "copy_query", "no_context")
GENERATED = ("model", "no_context")  # the methods that run the model (and so have a perplexity)


@torch.no_grad()
def target_nll(model, prompt_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (float [n_target]) of 1-D `target_ids` following 1-D `prompt_ids`, from one forward."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: the first target token has nothing to be predicted from")
    ids = torch.cat([prompt_ids, target_ids])[None]
    # logits at position t predict token t + 1: the targets are predicted from len(prompt) - 1 on
    logits = model(ids)[0, len(prompt_ids) - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, target_ids, reduction="none")


def perplexity(prompter: InContextPrompter, prompt: Sequence[ImageLike], targets: Sequence[ImageLike]) -> float:
    """exp(mean NLL) of the `targets` images' tokens given the `prompt` images, laid out as prompting does."""
    if not targets:
        raise ValueError("perplexity needs at least one target image")
    prompt_ids = prompter.prompt_ids(prompter.encode(prompter.fit_images(prompt)))
    target_ids = prompter.encode(prompter.fit_images(targets, "target image")).reshape(-1)
    return math.exp(target_nll(prompter.model, prompt_ids, target_ids).mean().item())


def heldout_analogies(tasks: Iterable[str], per_task: int, n_shots: int, size: int) -> list[Sentence]:
    """`per_task` held-out procedural analogies of each task (never in training shards), answers known."""
    return [
        procedural_analogy(task, seed, n_shots, size) for task in tasks for seed in procedural_seeds("heldout", per_task)
    ]


def most_likely(prompter: InContextPrompter, contexts: Sequence[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """candidates long [B, N, tokens_per_image], N drawn answers per context -> long [B, tokens_per_image]:
    for each context the candidate with the lowest mean NLL given it (sample several, keep the likeliest)."""
    picks = []
    for context, drawn in zip(contexts, candidates, strict=True):
        prompt = prompter.prompt_ids(context)
        nll = torch.stack([target_nll(prompter.model, prompt, answer).mean() for answer in drawn])
        picks.append(drawn[nll.argmin()])
    return torch.stack(picks)


def _answers(prompter: InContextPrompter, contexts, num_candidates: int, **sampling) -> torch.Tensor:
    """One generated answer per context, long [B, tokens_per_image]: the likeliest of `num_candidates`."""
    drawn = prompter.complete(contexts, num_candidates=num_candidates, **sampling)[:, :, 0]
    return drawn[:, 0] if num_candidates == 1 else most_likely(prompter, contexts, drawn)


class _Tally:
    """Running sums for one group of sentences (all of them, or one task)."""

    def __init__(self):
        self.count = 0
        self.tokens = 0
        self.changed = 0
        self.correct = defaultdict(int)
        self.changed_correct = defaultdict(int)
        self.psnr = defaultdict(float)
        self.nll = defaultdict(float)

    def add_sentence(self, truth: torch.Tensor, query: torch.Tensor) -> None:
        self.count += 1
        self.tokens += len(truth)
        self.changed += int((truth != query).sum())

    def add(self, method: str, pred, truth, query, psnr_value: float, nll: torch.Tensor | None) -> None:
        changed = truth != query
        self.correct[method] += int((pred == truth).sum())
        self.changed_correct[method] += int(((pred == truth) & changed).sum())
        self.psnr[method] += psnr_value
        if nll is not None:
            self.nll[method] += float(nll.sum())

    def summary(self) -> dict:
        # Token counts pool over sentences: a sentence with few changed positions weighs little in
        # changed_token_accuracy instead of swinging it between 0 and 1.
        return {
            "count": self.count,
            "token_accuracy": {m: self.correct[m] / self.tokens for m in METHODS},
            "changed_token_accuracy": {
                m: self.changed_correct[m] / self.changed if self.changed else float("nan") for m in METHODS
            },
            "changed_fraction": self.changed / self.tokens,
            "psnr": {m: self.psnr[m] / self.count for m in METHODS},
            "perplexity": {m: math.exp(self.nll[m] / self.tokens) for m in GENERATED},
        }


def score_analogies(
    prompter: InContextPrompter,
    sentences: Sequence[Sentence],
    batch_size: int = 8,
    temperature: float = 0.0,
    keep_examples: int = 4,
    progress: bool = False,
    num_candidates: int = 1,
    **sampling,
) -> tuple[dict, dict[str, list[AnalogyExample]]]:
    """Score free-running answers to analogy sentences `[x1, y1, ..., xq, yq]` (yq: the known answer).
    With `num_candidates` > 1 (and temperature > 0) each generating method draws that many answers and
    keeps the one the model finds most likely (`most_likely`).

    Returns (scores, examples). scores: {"count", "token_accuracy", "changed_token_accuracy", "psnr",
    "perplexity", "changed_fraction", "per_task": {task: the same}}; each metric is a dict over METHODS
    (perplexity over the methods that run the model). examples: {task: the first `keep_examples` scored
    prompts with every method's decoded answer}, for lvm.figures' grids.
    """
    if not sentences:
        raise ValueError("score_analogies needs at least one sentence")
    for sentence in sentences:  # every sentence is checked before the first generation
        check_analogy_count(len(sentence.prompt))
        prompter.check_fits(len(sentence.prompt))
    overall, per_task = _Tally(), defaultdict(_Tally)
    examples = defaultdict(list)
    for start in tqdm(range(0, len(sentences), batch_size), desc="analogies", disable=not progress):
        batch = sentences[start : start + batch_size]
        prompts = [prompter.fit_images(s.prompt) for s in batch]
        answer_images = prompter.fit_images([s.answer for s in batch], "answer image")
        answers = to_tensor(answer_images)  # [B, 3, H, W], already at the tokenizer resolution
        # One tokenizer call for the whole batch: prompts then answers, split back afterwards.
        *contexts, truth = prompter.encode([im for images in prompts for im in images] + answer_images).split(
            [*map(len, prompts), len(batch)]
        )  # contexts: [n_i, tokens_per_image] each; truth: [B, tokens_per_image]
        queries = torch.stack([context[-1] for context in contexts])
        # Sampling continues across batches from a moved seed, so batches do not repeat one another's draws.
        options = dict(sampling, temperature=temperature)
        if options.get("seed") is not None:
            options["seed"] += start
        no_context = [c[-1:] for c in contexts]
        preds = {
            "model": _answers(prompter, contexts, num_candidates, **options),
            "copy_query": queries,
            "no_context": _answers(prompter, no_context, num_candidates, **options),
        }
        decoded = dict(zip(preds, prompter.decode(torch.stack(list(preds.values()))), strict=True))
        scores = {m: psnr(images, answers.to(images.device)).tolist() for m, images in decoded.items()}
        context_of = {"model": contexts, "no_context": no_context}
        for i, sentence in enumerate(batch):
            tallies = (overall, per_task[sentence.task])
            for tally in tallies:
                tally.add_sentence(truth[i], queries[i])
            for method, pred in preds.items():
                nll = None
                if method in context_of:
                    nll = target_nll(prompter.model, prompter.prompt_ids(context_of[method][i]), truth[i])
                for tally in tallies:
                    tally.add(method, pred[i], truth[i], queries[i], scores[method][i], nll)
            if len(examples[sentence.task]) < keep_examples:
                answers_i = {m: to_pil(decoded[m][i : i + 1])[0] for m in METHODS}
                examples[sentence.task].append(
                    AnalogyExample(sentence.task, prompts[i][:-1], prompts[i][-1], answers_i, answer_images[i])
                )
    result = overall.summary()
    result["per_task"] = {task: tally.summary() for task, tally in sorted(per_task.items())}
    return result, dict(sorted(examples.items()))


TABLE_COLUMNS = {"changed_token_accuracy": "changed acc", "psnr": "PSNR dB"}
SHORT = {"model": "model", "copy_query": "copy", "no_context": "no ctx"}


def metrics_table(scores: dict) -> list[str]:
    """Changed-token accuracy and PSNR per task (and over all), one line each, columns set apart by
    two or more spaces (lvm.figures.text_block aligns them for pictures)."""
    header = [f"{name} {SHORT[m]}" for name in TABLE_COLUMNS.values() for m in METHODS]
    lines = [f"{'task':<14}" + "".join(f"{h:>20}" for h in header)]
    for task, group in {**scores["per_task"], "all": scores}.items():
        values = [group[key][m] for key in TABLE_COLUMNS for m in METHODS]
        lines.append(f"{task:<14}" + "".join(f"{v:>20.3f}" for v in values))
    return lines
