"""Text tokenizers and answer-only labels (vlm/text.py): the default BPE and any HF chat template."""

import pytest
from transformers import AutoTokenizer

from vlm.text import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    check_tokenizer,
    encode_turns,
    load_text_tokenizer,
    train_default_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And how many shapes are there?"},
    {"role": "assistant", "content": "two shapes"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok") / "default"
    train_default_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_text_tokenizer(tok_dir)


def trained(ids, labels):
    assert len(ids) == len(labels)
    for i, label in zip(ids, labels, strict=True):
        assert label in (i, IGNORE_INDEX)  # labels are the ids themselves (the model shifts) or ignored
    return [label for label in labels if label != IGNORE_INDEX]


def test_default_tokenizer_loads_with_autotokenizer(tok_dir, tok):
    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    for token in SPECIAL_TOKENS:  # each special token is one id, in any context
        assert len(auto(f"x{token}y", add_special_tokens=False)["input_ids"]) == 3
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<s>", "</s>", "<pad>")
    rendered = auto.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert rendered == "<|user|>\n<image>\nWhat colour is the circle?<|end|>\n<|assistant|>\nred<|end|>\n"
    text = "a small magenta triangle above a big purple hexagon, zebra!"  # words outside the corpus still encode
    assert auto.decode(auto(text, add_special_tokens=False)["input_ids"]) == text
    assert check_tokenizer(auto) == auto.convert_tokens_to_ids("<image>")


def test_two_turn_conversation_trains_exactly_on_answers(tok):
    ids, labels = encode_turns(tok, CONVERSATION)
    end = tok.convert_tokens_to_ids("<|end|>")
    answer = [*tok("red", add_special_tokens=False)["input_ids"], end]
    answer2 = [*tok("two shapes", add_special_tokens=False)["input_ids"], end]
    assert trained(ids, labels) == answer + answer2
    # the trained tokens sit right after each assistant header, contiguous
    header = tok.convert_tokens_to_ids("<|assistant|>")
    starts = [i + 2 for i, t in enumerate(ids) if t == header]  # header, "\n", answer
    assert [labels[s : s + len(a)] for s, a in zip(starts, (answer, answer2), strict=True)] == [answer, answer2]
    image = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image) == 1 and labels[ids.index(image)] == IGNORE_INDEX
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels[-1] == IGNORE_INDEX


def test_text_segments_train_in_full_and_generation_prompt(tok):
    ids, labels = encode_turns(tok, [{"role": "text", "content": "<image>\na red circle<image>"}])
    image = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image) == 2
    assert trained(ids, labels) == [i for i in ids[1:] if i != image]  # all but bos and the images, eos included
    ids, labels = encode_turns(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|assistant|>\n") and trained(ids, labels) == []
    ids, _ = encode_turns(tok, CONVERSATION, bos=False, eos=False)
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_any_chat_template_chatml(tok_dir):
    """A ChatML template (Qwen style, newline after the end-of-turn token) on the same vocabulary."""
    chatml = load_text_tokenizer(tok_dir)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    ids, labels = encode_turns(chatml, CONVERSATION)
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    expected = [*chatml("red", add_special_tokens=False)["input_ids"], end]
    expected += [*chatml("two shapes", add_special_tokens=False)["input_ids"], end]
    assert trained(ids, labels) == expected


def test_tokenizer_without_image_token_fails_naming_the_fix(tok_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"no <image> token: add it with tokenizer.add_special_tokens"):
        load_text_tokenizer(tmp_path / "plain")
    no_template = load_text_tokenizer(tok_dir)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_tokenizer(no_template)
    with pytest.raises(FileNotFoundError, match="train_default_tokenizer"):
        load_text_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="role must be one of"):
        encode_turns(no_template, [{"role": "bot", "content": "x"}])


def test_a_tokenizer_is_checked_against_the_vlm_it_serves(vlm_dir, tmp_path):
    from vlm import VLM
    from vlm.text import check_tokenizer_for

    model, tokenizer = VLM.from_pretrained(vlm_dir), load_text_tokenizer(vlm_dir)
    assert check_tokenizer_for(model, tokenizer) == model.config.image_token_id
    larger = load_text_tokenizer(vlm_dir)
    larger.add_tokens([f"word{i}" for i in range(model.llm.vocab_size - len(larger) + 1)])  # one id past the LLM's
    with pytest.raises(ValueError, match=rf"has {len(larger)} ids, more than the VLM's vocabulary of {model.llm.vocab_size}"):
        check_tokenizer_for(model, larger)
    model.config.image_token_id += 1
    with pytest.raises(ValueError, match=rf"trained with image_token_id {model.config.image_token_id}: use the tokenizer"):
        check_tokenizer_for(model, tokenizer)
