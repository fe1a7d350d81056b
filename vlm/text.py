"""Text side of the VLM: tokenizers, chat rendering and answer-only labels.

    tok = train_default_tokenizer("runs/vlm/tokenizer")     # byte-level BPE on the embedded corpus, HF format
    tok = load_text_tokenizer("any/hf/tokenizer/dir")       # AutoTokenizer, checked: <image> and a chat template
    ids, labels = encode_turns(tok, [{"role": "user", "content": "<image>\nWhat colour?"},
                                     {"role": "assistant", "content": "red"}])
    # labels == -100 except on "red<|end|>"; the <image> marker stays one id
    # (the datamodule expands it with vlm.splice.expand_placeholders)

Turn roles: "system", "user", "assistant" (rendered by the tokenizer's chat template; only assistant content
and its end-of-turn token are trained on) and "text" (a document segment: a caption, an interleaved
document; rendered as is, without a role header, and trained on in full).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

IMAGE_TOKEN = "<image>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A written image (the unified model, vlm/unified.py): <begin_of_image>, one <image_code> per VQ code (the
# model embeds the codes there), <end_of_image>. Janus names its markers the same.
BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_CODE = "<begin_of_image>", "<end_of_image>", "<image_code>"
GENERATION_TOKENS = (BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_CODE)
SPECIAL_TOKENS = (IMAGE_TOKEN, SYSTEM, USER, ASSISTANT, END_OF_TURN, BOS, EOS, PAD, *GENERATION_TOKENS)
CHAT_ROLES = ("system", "user", "assistant")
ROLES = (*CHAT_ROLES, "text")
IGNORE_INDEX = -100  # as vlm.splice: positions that carry no loss

# `<|role|>\n{content}<|end|>\n` per turn; the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def default_corpus() -> list[str]:
    """The embedded text the default tokenizer learns from: scene captions, questions and answers of the
    training seeds, and the photo captions. Deterministic."""
    from vlm.scenes import PHOTO_CAPTIONS, Scene, scene_seeds

    texts = list(PHOTO_CAPTIONS.values())
    for seed in scene_seeds("train", 2000):
        scene = Scene.random(seed)
        texts.append(scene.caption())
        texts.extend(f"{q} {a}" for _, q, a in scene.qa_pairs())
    return texts


def train_default_tokenizer(directory: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts` (default: `default_corpus()`) and save it in HF format in
    `directory` (AutoTokenizer.from_pretrained(directory) loads it); returns the PreTrainedTokenizerFast.

    Special tokens (SPECIAL_TOKENS) take the first ids, `<image>` = 0; bos `<s>`, eos `</s>`, pad `<pad>`; the
    generation markers `<begin_of_image>`, `<end_of_image>`, `<image_code>` follow;
    the chat template renders each turn as `<|role|>\\n{content}<|end|>\\n`. Byte-level: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges: it must exceed {len(SPECIAL_TOKENS) + 256}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(default_corpus() if texts is None else texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN, SYSTEM, USER, ASSISTANT, END_OF_TURN, *GENERATION_TOKENS]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _save_atomically(tokenizer, Path(directory))
    return tokenizer


def _save_atomically(tokenizer, directory: Path) -> None:
    """Write into a temp directory beside `directory`, then swap it in: readers never see half a tokenizer."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_text_tokenizer(path: str | os.PathLike, check: bool = True):
    """A local HF tokenizer directory through AutoTokenizer (nothing downloaded, nothing added); checked
    with `check_tokenizer` unless check=False."""
    from transformers import AutoTokenizer

    if not Path(path, "tokenizer_config.json").exists() and not Path(path, "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{path} is not a tokenizer directory (no tokenizer.json / tokenizer_config.json); "
            "make one with vlm.text.train_default_tokenizer(path) or tokenizer.save_pretrained(path)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if check:
        check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer) -> int:
    """Raise unless `tokenizer` can serve a VLM: a fast tokenizer (offsets), `<image>` as a single special
    token, and a chat template. Returns the `<image>` id."""
    fix = (
        "add it with tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']}) (and resize the "
        "LLM's embeddings), or use vlm.text.train_default_tokenizer"
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer; load it with AutoTokenizer (use_fast=True)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id or IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: {fix}")
    if tokenizer(f"a{IMAGE_TOKEN}b", add_special_tokens=False)["input_ids"].count(image_id) != 1:
        raise ValueError(f"{IMAGE_TOKEN} is in the vocabulary but not split off as one special token: {fix}")
    if not tokenizer.chat_template:
        raise ValueError(
            "the tokenizer has no chat template: set tokenizer.chat_template (vlm.text.CHAT_TEMPLATE is the default "
            "one) and save it, or use vlm.text.train_default_tokenizer"
        )
    return image_id


def check_tokenizer_for(vlm, tokenizer) -> int:
    """check_tokenizer, and that `tokenizer` is the one `vlm` was trained with (its <image> id, and no id
    beyond the LLM's vocabulary). Returns the `<image>` id."""
    image_id = check_tokenizer(tokenizer)
    if vlm.config.image_token_id != image_id:
        raise ValueError(f"the tokenizer's <image> id is {image_id} but the VLM was trained with image_token_id "
                         f"{vlm.config.image_token_id}: use the tokenizer the VLM was trained with")
    if len(tokenizer) > vlm.llm.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than the VLM's vocabulary of "
                         f"{vlm.llm.vocab_size}: use the tokenizer the VLM was trained with")
    return image_id


def generation_token_ids(tokenizer) -> dict[str, int]:
    """{"boi_token_id", "eoi_token_id", "code_token_id"}: the ids a model that writes images needs
    (VLMConfig.generation), each a single special token of `tokenizer`; raises naming the fix otherwise."""
    ids = {}
    for key, token in zip(("boi_token_id", "eoi_token_id", "code_token_id"), GENERATION_TOKENS, strict=True):
        if token not in tokenizer.get_vocab() or tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"].count(
            tokenizer.convert_tokens_to_ids(token)
        ) != 1:
            raise ValueError(
                f"the tokenizer has no {token} special token, needed to write images: train it with "
                f"vlm.text.train_default_tokenizer, or add {list(GENERATION_TOKENS)} with "
                "tokenizer.add_special_tokens({'additional_special_tokens': [...]}) and resize the LLM's embeddings"
            )
        ids[key] = tokenizer.convert_tokens_to_ids(token)
    return ids


def encode_turns(
    tokenizer, turns: Sequence[dict], add_generation_prompt: bool = False, bos: bool = True, eos: bool = True
) -> tuple[list[int], list[int]]:
    """turns -> (ids, labels), one document: [bos] rendering [eos].

    Consecutive chat turns are rendered together by the tokenizer's chat template; labels are -100 except on
    assistant content and the template's end-of-turn token after it (the first special token that follows
    the content; whatever comes after it, such as a newline, is not trained on). "text" turns are rendered
    as is and trained on in full. `<image>` positions are always -100 and each marker is one id.
    add_generation_prompt=True ends the ids with the assistant header (an inference prompt; no eos).
    eos is trained after a text segment only: after a chat turn its end-of-turn token is the stop.
    """
    text, trained = _render(tokenizer, turns, add_generation_prompt)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    labels = [
        i if i != image_id and any(start < stop and end > begin for begin, stop in trained) else IGNORE_INDEX
        for i, (start, end) in zip(ids, encoding["offset_mapping"], strict=True)  # token overlaps a trained range
    ]
    if bos and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    if eos and not add_generation_prompt and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        train_eos = bool(turns) and turns[-1]["role"] == "text"
        ids, labels = [*ids, tokenizer.eos_token_id], [*labels, tokenizer.eos_token_id if train_eos else IGNORE_INDEX]
    return ids, labels


def _render(tokenizer, turns: Sequence[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The document's text and the character ranges trained on."""
    text, trained, block = "", [], []
    for turn in turns:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"bad turn {turn!r}: role must be one of {', '.join(ROLES)} and content a string")
        if role == "text":
            text = _flush(tokenizer, block, text, trained, False)
            block = []
            trained.append((len(text), len(text) + len(content)))
            text += content
        else:
            block.append({"role": role, "content": content})
    text = _flush(tokenizer, block, text, trained, add_generation_prompt)
    return text, trained


def _flush(tokenizer, messages: list[dict], text: str, trained: list, add_generation_prompt: bool) -> str:
    """Render a block of chat turns after `text`; append its trained ranges (answers + end of turn)."""
    if not messages:
        return text + (_chat(tokenizer, [], True) if add_generation_prompt else "")
    whole = _chat(tokenizer, messages, add_generation_prompt)
    specials = [t for t in tokenizer.all_special_tokens if t]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = _chat(tokenizer, messages[:i], True), _chat(tokenizer, messages[: i + 1], False)
        if not (after.startswith(before) and whole.startswith(after)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so answer positions cannot be found; use a template that appends each turn"
            )
        delta = after[len(before) :]
        content = message["content"].strip()
        at = delta.find(content) if content else 0
        if at < 0:
            raise ValueError(f"the chat template altered the assistant content {content!r}; it must render it verbatim")
        tail = delta[at + len(content) :]
        ends = [tail.find(s) + len(s) for s in specials if s in tail]
        stop = at + len(content) + (min(ends) if ends else len(tail))
        trained.append((len(text) + len(before), len(text) + len(before) + stop))
    return text + whole


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
