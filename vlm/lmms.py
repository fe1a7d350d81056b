"""Our VLMs as an lmms-eval model, so that lmms-eval's tasks run on them.

    pip install -e '.[lmms]'             # lmms-eval; the entry point below registers the model as "lvm_vlm"
    python -m lmms_eval --model lvm_vlm --model_args model=runs/vlm/sft/export,tokenizer=runs/vlm/tokenizer \\
        --tasks TASK [--include_path DIR_OF_LOCAL_TASKS]

pyproject.toml declares `manifest` under the entry-point group "lmms_eval.models"; lmms-eval imports the class
`vlm.lmms.LmmsVLM` by that path. The class is built on first access (the module's `__getattr__`), so that this
package module imports without the optional lmms-eval. The model side is vlm.chat.Chat: requests become
single-turn prompts with one `<image>` per visual; `generate_until` is batched greedy (or sampled, from the
task's generation kwargs) and cut at the task's stop strings; `loglikelihood` (a mean NLL, as lmms-eval's
models return) is one forward per request.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image

from vlm.chat import Chat

MODEL_ID = "lvm_vlm"


def manifest():
    """The "lmms_eval.models" entry point: where lmms-eval finds the class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="vlm.lmms.LmmsVLM")


def __getattr__(name: str):
    if name == "LmmsVLM":
        return _adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def visuals_of(doc_to_visual, doc) -> list[Image.Image]:
    """The task's visuals of one document, as PIL images (lmms-eval gives a list, possibly nested)."""
    found, stack = [], [doc_to_visual(doc)]
    while stack:
        item = stack.pop(0)
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        elif isinstance(item, Image.Image):
            found.append(item.convert("RGB"))
        else:
            raise ValueError(f"lvm_vlm reads images only; the task gave a {type(item).__name__} (video and audio tasks are not supported)")
    return found


def user_turn(context: str, images: list) -> list[dict]:
    # the task's text may carry its own <image> markers (interleaved tasks); otherwise the images go first
    content = context if context.count("<image>") == len(images) else "<image>\n" * len(images) + context
    return [{"role": "user", "content": content}]


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first of the task's stop strings."""
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def generate_until(chat: Chat, requests: list[tuple], docs) -> list[str]:
    """Answers to (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests; docs[task][split][doc_id] is
    the document. Requests with the same generation kwargs go through Chat.generate as one batched call."""
    answers: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs, *_) in enumerate(requests):
        groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
    for indices in groups.values():
        gen_kwargs = dict(requests[indices[0]][1])
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sampling = {"temperature": temperature} | ({"top_p": float(gen_kwargs.get("top_p") or 1.0)} if temperature > 0 else {})
        prompts = []
        for i in indices:
            context, _, doc_to_visual, doc_id, task, split = requests[i]
            images = visuals_of(doc_to_visual, docs[task][split][doc_id])
            prompts.append(chat.prompt_ids(user_turn(context, images), images))
        texts = chat.generate(prompts, int(gen_kwargs.get("max_new_tokens", 32)), **sampling)
        for i, text in zip(indices, texts, strict=True):
            answers[i] = cut_at_stops(text, until)
    return answers


@torch.no_grad()
def loglikelihood(chat: Chat, requests: list[tuple], docs) -> list[tuple[float, bool]]:
    """(mean negative log-likelihood of the continuation's tokens given image + context, whether greedy decoding
    gives the continuation) per (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
    request. The first value is a loss, as lmms-eval's own models return (their `loss.item()`): its
    multiple_choice tasks pick the option with the smallest one, although the base class's docstring
    speaks of a log-probability."""
    results = []
    for context, target, doc_to_visual, doc_id, task, split in requests:
        doc = docs[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        images = visuals_of(doc_to_visual, doc)
        ids, pixels = chat.prompt_ids(user_turn(context, images), images)
        answer = chat.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ValueError(f"task {task} doc {doc_id}: the continuation {continuation!r} has no tokens to score")
        input_ids = torch.tensor([ids + answer], device=chat.device)
        logits = chat.vlm(input_ids=input_ids, pixel_values=None if pixels is None else pixels.to(chat.device)).logits
        predicted = logits[0, len(ids) - 1 : -1].float().log_softmax(-1)  # [len(answer), vocab]: each answer token
        target_ids = torch.tensor(answer, device=chat.device)
        nll = -predicted.gather(-1, target_ids[:, None]).mean()
        results.append((float(nll), bool((predicted.argmax(-1) == target_ids).all())))
    return results


@functools.cache
def _adapter_class():
    from lmms_eval.api.model import lmms

    class LmmsVLM(lmms):
        """model=DIR (vlm.VLM.from_pretrained), tokenizer=DIR (default: model), device, batch_size."""

        def __init__(self, model: str, tokenizer: str | None = None, device: str = "cpu", batch_size: int | str = 8, **_):
            super().__init__()
            self.chat = Chat.load(model, tokenizer, device, batch_size=int(batch_size))

        def generate_until(self, requests) -> list[str]:
            return generate_until(self.chat, [r.args for r in requests], self.task_dict)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return loglikelihood(self.chat, [r.args for r in requests], self.task_dict)

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("lvm_vlm answers single-round tasks (generate_until, loglikelihood) only")

    return LmmsVLM
