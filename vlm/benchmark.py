"""Evaluation sets for scripts/vlm_eval.py: read them, ask a VLM (vlm.chat.Chat), score per task and type.

Two layouts:

    folder/questions.jsonl (or questions.json, a list), one record per question, image paths relative to the folder:
        {"id": "q1", "image": "images/0.png", "question": "What colour is the circle?", "answer": "red",
         "type": "color"}                                       # VQA; "answers": [...] for several humans
        {..., "question": "What shape?", "options": ["circle", "square"], "answer": "B"}
                                                                # multiple choice: answer = letter, text or index
        {"id": "c1", "image": "images/0.png", "captions": ["a red circle", ...]}
                                                                # captioning (a "question" makes it a prompt)
    file.json: LLaVA conversations [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
        {"from": "gpt", "value": "..."}, ...]}]: every human/gpt pair is an open question about the image (its
        "type", if the record has one, names the question type); image paths relative to --images or the file.

`type` (default: the task) groups the per-type tables. Images that are missing or cannot be decoded are
reported per sample and left out of every score, with their count in the result.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlm import metrics
from vlm.formats import LLAVA_ROLES, read_records

TASKS = ("vqa", "choice", "caption")
QUESTION_FILES = ("questions.jsonl", "questions.json")


@dataclass
class Item:
    id: str
    task: str  # one of TASKS
    image: Path
    question: str  # "" for a plain caption
    answers: list[str]  # vqa: the human answers; caption: the reference captions; choice: the true option
    type: str
    options: list[str] = field(default_factory=list)
    truth: int | None = None  # choice: the true option's index


def read_eval_set(path: str | Path, image_root: str | Path | None = None) -> list[Item]:
    """The questions of a folder (questions.jsonl / .json) or of a LLaVA JSON file; raises naming the bad record."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in QUESTION_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"{path} has no {' or '.join(QUESTION_FILES)}: see `python -m scripts.vlm_eval --help` for the layout")
        return [_folder_item(record, Path(image_root or path), f"{found[0]} record {n}") for n, record in _records(found[0])]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give an evaluation folder or a LLaVA-format JSON file")
    root = Path(image_root or path.parent)
    return [item for n, record in _records(path) for item in _llava_items(record, root, f"{path} record {n}")]


def _records(path: Path) -> list[tuple[int, dict]]:
    """vlm.formats' JSON / JSONL reader, strict: an evaluation set with a bad record is refused, not thinned."""
    records = list(read_records(path))
    if bad := [n for n, record in records if not isinstance(record, dict)]:
        raise ValueError(f"{path}: record {bad[0]} is not a JSON object{' line' if path.suffix == '.jsonl' else ''} "
                         f"({len(bad)} such records); fix or remove them")
    return records


def _folder_item(record: dict, root: Path, where: str) -> Item:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise ValueError(f"{where}: each record needs an \"image\" path (and a question with answer(s), options or captions)")
    id, image, question = str(record.get("id", where.rsplit(" ", 1)[-1])), root / record["image"], str(record.get("question", ""))
    if "captions" in record:
        captions = [str(c) for c in record["captions"]]
        if not captions:
            raise ValueError(f"{where}: \"captions\" is empty; give at least one reference caption")
        return Item(id, "caption", image, question, captions, str(record.get("type", "caption")))
    answers = record.get("answers", [record["answer"]] if "answer" in record else [])
    if not question or not answers:
        raise ValueError(f"{where}: a question record needs \"question\" and \"answer\" (or \"answers\"); a caption record \"captions\"")
    if "options" in record:
        options = [str(o) for o in record["options"]]
        truth = _option_index(answers[0], options, where)
        return Item(id, "choice", image, question, [options[truth]], str(record.get("type", "choice")), options, truth)
    return Item(id, "vqa", image, question, [str(a) for a in answers], str(record.get("type", "vqa")))


def _option_index(answer, options: list[str], where: str) -> int:
    """The true option of a record: an index, a letter or the option's text."""
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and metrics.LETTERS.find(answer.strip().upper()) in range(len(options)):
        return metrics.LETTERS.index(answer.strip().upper())
    if isinstance(answer, str) and answer in options:
        return options.index(answer)
    raise ValueError(f"{where}: answer {answer!r} is none of the {len(options)} options (give a letter, an index or an option's text)")


def _llava_items(record: dict, root: Path, where: str) -> list[Item]:
    try:
        image, turns = record["image"], record["conversations"]
        image = image[0] if isinstance(image, list) and len(image) == 1 else image
        pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)
                 if LLAVA_ROLES.get(turns[i]["from"]) == "user" and LLAVA_ROLES.get(turns[i + 1]["from"]) == "assistant"]  # fmt: skip
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{where}: not a LLaVA conversation with one image ({error!r})") from error
    if not isinstance(image, str) or not pairs:
        raise ValueError(f"{where}: needs one \"image\" path and at least one human/gpt pair")
    id = str(record.get("id", where.rsplit(" ", 1)[-1]))
    return [Item(f"{id}-{k}" if len(pairs) > 1 else id, "vqa", root / image, q.replace("<image>", "").strip(), [a.strip()],
                 str(record.get("type", "vqa"))) for k, (q, a) in enumerate(pairs)]  # fmt: skip


def load_images(items: list[Item]) -> tuple[list[Item], list[Image.Image], list[dict]]:
    """-> (items whose image loads, their RGB images, one {"id", "image", "reason", "message"} per item left out)."""
    kept, images, skipped, cache = [], [], [], {}
    for item in items:
        if item.image not in cache:
            try:
                with Image.open(item.image) as image:
                    cache[item.image] = image.convert("RGB")
            except FileNotFoundError:
                cache[item.image] = ("missing_image", f"{item.image} does not exist")
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                cache[item.image] = ("corrupt_image", f"{item.image} cannot be decoded ({error})")
        if isinstance(cache[item.image], tuple):
            reason, message = cache[item.image]
            skipped.append({"id": item.id, "image": str(item.image), "reason": reason, "message": message})
        else:
            kept.append(item), images.append(cache[item.image])
    return kept, images, skipped


def choice_prompt(item: Item) -> str:
    lines = [f"{metrics.LETTERS[i]}. {option}" for i, option in enumerate(item.options)]
    return "\n".join([item.question, *lines, "Answer with the option's letter."])


def predict(chat, items: list[Item], images: list[Image.Image], max_new_tokens: dict[str, int], suffix: str = "") -> list[str]:
    """The model's answer to every item, batched per task (greedy)."""
    predictions: list[str] = [""] * len(items)
    for task in TASKS:
        chosen = [i for i, item in enumerate(items) if item.task == task]
        captions = [i for i in chosen if task == "caption" and not items[i].question]  # no prompt: plain captioning
        asked = [i for i in chosen if i not in set(captions)]
        if captions:
            texts = chat.caption([images[i] for i in captions], max_new_tokens[task])
            for i, text in zip(captions, texts, strict=True):
                predictions[i] = text
        if asked:
            questions = [choice_prompt(items[i]) if task == "choice" else items[i].question + suffix for i in asked]
            texts = chat.answer([images[i] for i in asked], questions, max_new_tokens[task])
            for i, text in zip(asked, texts, strict=True):
                predictions[i] = text
    return predictions


def score(items: list[Item], predictions: list[str]) -> dict:
    """Per task: the overall score(s) and a table per question type."""
    result = {}
    for task in TASKS:
        pairs = [(item, p) for item, p in zip(items, predictions, strict=True) if item.task == task]
        if not pairs:
            continue
        by_type = collections.defaultdict(list)
        for item, p in pairs:
            by_type[item.type].append((item, p))
        result[task] = {"count": len(pairs), **_scores(task, pairs),
                        "per_type": {t: {"count": len(group), **_scores(task, group)} for t, group in sorted(by_type.items())}}  # fmt: skip
    return result


def _scores(task: str, pairs: list) -> dict[str, float]:
    items, predictions = [i for i, _ in pairs], [p for _, p in pairs]
    if task == "vqa":
        return {"accuracy": sum(metrics.vqa_accuracy(p, i.answers) for i, p in pairs) / len(pairs)}
    if task == "choice":
        return {"accuracy": metrics.multiple_choice_accuracy(predictions, [i.options for i in items], [i.truth for i in items])}
    return metrics.caption_scores(predictions, [i.answers for i in items])


def tables(result: dict) -> list[str]:
    """Text tables: one per task, a row per question type and one for all."""
    lines = []
    for task, scores in result.items():
        names = [k for k in scores if k not in ("count", "per_type")]
        lines += [f"{task}", f"  {'type':<16}{'count':>7}" + "".join(f"{n:>10}" for n in names)]
        for name, row in [*scores["per_type"].items(), ("all", scores)]:
            lines.append(f"  {name:<16}{row['count']:>7}" + "".join(f"{row[n]:>10.3f}" for n in names))
    return lines
