"""UnifiedModule on UnifiedDataModule batches: which loss each document kind carries (checked through the
gradients), the VLM-stage export given a generation side, and loss that falls on a tiny model. Real parts:
vlm.prepare shards, the embedded BPE tokenizer, a tiny CLIP + LVM VLM, an untrained tiny VQGAN."""

import copy

import lightning as L
import pytest
import torch
from helpers import TINY_VLM_SPEC as SPEC

from tokenizer.config import VQGANConfig
from vlm.prepare import prepare
from vlm.text import load_text_tokenizer, train_default_tokenizer
from vlm.unified import UnifiedModule
from vlm.unified_data import UnifiedDataModule

VQ = VQGANConfig.from_name("vqgan_tiny", resolution=16, channel_mult=(1, 2, 2), attn_resolutions=()).to_dict()
GENERATION = {"tokenizer": {"kind": "vqgan", "config": VQ}, "embed_dim": 8}  # 16 px -> 4x4 = 16 codes of 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    train_default_tokenizer(root / "tok")
    prepare(["scenes:24:train:32:multi"], root / "scenes", shard_size=8, progress=False)
    prepare(["photos:train"], root / "photos", shard_size=8, progress=False)  # caption samples only
    return root


def module_and_data(corpus, shards="scenes", **options):
    torch.manual_seed(0)
    module = UnifiedModule(vlm=copy.deepcopy(SPEC), tokenizer=str(corpus / "tok"), generation=GENERATION, warmup_steps=1,
                           learning_rate=3e-3)
    data = UnifiedDataModule(str(corpus / shards), tokenizer=str(corpus / "tok"), seq_len=192, batch_size=4,
                             num_workers=0, shuffle_buffer=8, **options)
    return module, data


def first_batch(module, data):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.trainer, data.trainer = trainer, trainer
    trainer.datamodule = data
    module.setup("fit")
    return data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)


def grads(module, loss):
    module.zero_grad()
    loss.backward()
    head = module.model.llm.lm_head.weight.grad if hasattr(module.model.llm, "lm_head") else None
    return {"text_head": head, "gen_head": module.model.gen_head.vision_head.weight.grad}


def test_generation_batches_train_codes_only_and_understanding_batches_text_only(corpus):
    module, data = module_and_data(corpus, "photos", mixture={"generation": 1}, p_uncond=0.0)
    batch = first_batch(module, data)
    losses = module.unified_losses(batch)
    assert batch["gen_pixels"].shape[0] >= 4 and losses["image"].numel() == batch["gen_pixels"].shape[0] * 16
    assert losses["text_loss"] == 0 and losses["loss"] == losses["image_loss"] > 0
    found = grads(module, losses["loss"])
    assert found["gen_head"].abs().sum() > 0
    assert found["text_head"] is None or found["text_head"].abs().sum() == 0  # nothing reaches the text head

    module, data = module_and_data(corpus, "photos", mixture={"understanding": 1})
    batch = first_batch(module, data)
    losses = module.unified_losses(batch)
    assert batch["gen_pixels"].shape[0] == 0 and losses["image"].numel() == 0
    assert losses["image_loss"] == 0 and losses["loss"] == losses["text_loss"] > 0
    found = grads(module, losses["loss"])
    assert found["gen_head"] is None or found["gen_head"].abs().sum() == 0
    assert module.model.gen_tokenizer.encoder.conv_in.weight.grad is None  # the VQ never trains


def test_mixed_batches_keep_each_kind_on_its_side(corpus):
    module, data = module_and_data(corpus, mixture={"understanding": 1, "generation": 1, "interleaved": 1})
    losses = module.unified_losses(first_batch(module, data))
    text_kinds = first_batch(module, data)["kind_ids"][:, 1:][losses["targets"] != -100]
    assert 1 not in text_kinds.tolist()  # no text target in a generation document
    assert 0 not in losses["code_kinds"].tolist()  # no code in an understanding document


class Losses(L.Callback):
    def __init__(self):
        self.text, self.image = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.text.append(float(trainer.callback_metrics["train/text_loss"]))
        self.image.append(float(trainer.callback_metrics["train/image_loss"]))


@pytest.mark.slow
def test_loss_falls_and_the_export_writes_images(corpus, tmp_path):
    module, data = module_and_data(corpus)
    module.hparams.export_dir = str(tmp_path / "export")
    losses = Losses()
    L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
              callbacks=[losses]).fit(module, datamodule=data)  # fmt: skip
    assert sum(losses.text[-5:]) < 0.7 * sum(losses.text[:5])
    assert sum(losses.image[-5:]) < 0.8 * sum(losses.image[:5])

    from vlm import VLM

    model = VLM.from_pretrained(tmp_path / "export")  # the generation side and the VQ travel with it
    ids = torch.tensor([[model.config.generation["bos_token_id"], 30, 31, model.config.generation["boi_token_id"]]])
    codes = model.generate_images(ids, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, 16) and model.decode_images(codes).shape == (1, 3, 16, 16)


def test_a_reading_vlm_export_gets_a_generation_side(corpus, tmp_path):
    from vlm import VLM
    from vlm.module import new_config

    VLM(new_config(copy.deepcopy(SPEC), str(corpus / "tok"))).save_pretrained(tmp_path / "reader")
    module = UnifiedModule(init_from=str(tmp_path / "reader"), tokenizer=str(corpus / "tok"), generation=GENERATION)
    assert module.model.codes_per_image == 16 and module.model.config.generation["code_token_id"] == 10
    with pytest.raises(ValueError, match="no generation side: give model.generation"):
        UnifiedModule(init_from=str(tmp_path / "reader"), tokenizer=str(corpus / "tok"))
    with pytest.raises(ValueError, match="unknown train_parts.*generation"):
        UnifiedModule(vlm=copy.deepcopy(SPEC), tokenizer=str(corpus / "tok"), generation=GENERATION,
                      train_parts=["vq"])


def test_draw_in_context_reads_the_examples(corpus):
    from vlm.chat import Chat
    from vlm.draw import draw
    from vlm.model import VLM
    from vlm.module import new_config
    from vlm.scenes import Scene
    from vlm.text import load_text_tokenizer
    from vlm.unified_data import image_prompt

    module, _ = module_and_data(corpus)
    chat = Chat(module.model, load_text_tokenizer(corpus / "tok"))
    caption = Scene.random(0).caption()
    plain = draw(chat, [caption, "a red circle"], seed=1)
    assert [image.size for image in plain] == [(16, 16)] * 2
    assert draw(chat, [caption, "a red circle"], seed=1)[0].tobytes() == plain[0].tobytes()  # seeded
    examples = [(Scene.random(s).caption(), Scene.random(s).render(32)) for s in (1, 2)]
    assert len(draw(chat, [caption, "a red circle"], examples=examples)) == 2
    # what the first code is read from: the <begin_of_image> position, after the example images when given
    last = []
    for shown in ([], examples):
        ids, pixels = chat.prompt_ids([{"role": "text", "content": image_prompt(caption, [c for c, _ in shown])}],
                                      [image for _, image in shown], False)
        assert (torch.tensor(ids) == chat.image_id).sum() == chat.processor.tokens_per_tile * len(shown)  # each example read through the connector
        hidden = module.model.llm.hidden(module.model.embed_inputs(torch.tensor([ids]), pixels))
        last.append(module.model.gen_head(hidden[0, -1]))
    assert not torch.allclose(last[0], last[1], atol=1e-3)
    reader = Chat(VLM(new_config(copy.deepcopy(SPEC), str(corpus / "tok"))), load_text_tokenizer(corpus / "tok"))
    with pytest.raises(ValueError, match="no generation side"):
        draw(reader, [caption])


def test_prompts_of_different_lengths_batch_like_each_alone(corpus):
    from vlm.chat import Chat
    from vlm.draw import draw
    from vlm.scenes import Scene

    module, _ = module_and_data(corpus)
    batched, alone = (Chat(module.model, load_text_tokenizer(corpus / "tok"), batch_size=n) for n in (2, 1))
    captions = [Scene.random(0).caption(), "a red circle"]  # left-padded to the longer one's length
    drawn = {chat.batch_size: [p.tobytes() for p in draw(chat, captions, temperature=0.0)] for chat in (batched, alone)}
    assert drawn[2] == drawn[1]
    prompts = [batched.prompt_ids([{"role": "user", "content": text}], []) for text in ("hi", "what colour is the circle")]
    assert len(prompts[0][0]) != len(prompts[1][0])
    assert batched.generate(prompts, 6) == alone.generate(prompts, 6)


def test_best_of_candidates_is_the_one_the_model_reads_back_best(corpus):
    from vlm.chat import Chat
    from vlm.draw import best_read, caption_nll, draw, draw_candidates
    from vlm.scenes import Scene

    module, _ = module_and_data(corpus)
    chat = Chat(module.model, load_text_tokenizer(corpus / "tok"), batch_size=2)
    captions = [Scene.random(s).caption() for s in range(3)]
    images = [Scene.random(s).render(32) for s in range(3)]
    # batched and right-padded = one unpadded forward per caption
    with torch.no_grad():
        for image, caption, batched in zip(images, captions, caption_nll(chat, images, captions), strict=True):
            ids, pixels = chat.caption_prompt(image)
            answer = chat.tokenizer(caption, add_special_tokens=False)["input_ids"]
            logits = module.model(input_ids=torch.tensor([ids + answer]), pixel_values=pixels).logits[0, len(ids) - 1 : -1]
            alone = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")
            assert batched == pytest.approx(alone.item(), rel=1e-4)
    assert caption_nll(chat, images[:1], [""]) == [0.0]  # nothing to read: every candidate ties, the first is kept
    rounds = draw_candidates(chat, captions, 3, seed=5)
    assert [p.tobytes() for p in rounds[1]] == [p.tobytes() for p in draw(chat, captions, seed=6)]
    scores = [caption_nll(chat, drawn, captions) for drawn in rounds]
    picked = best_read(chat, rounds, captions)
    for i, image in enumerate(picked):
        k = min(range(3), key=lambda k: scores[k][i])
        assert image.tobytes() == rounds[k][i].tobytes()
    assert [p.tobytes() for p in draw(chat, captions, seed=5, candidates=3)] == [p.tobytes() for p in picked]
    with pytest.raises(ValueError, match="candidates is the number of images drawn per caption"):
        draw(chat, captions, candidates=0)


def test_prompt_script_and_chat_draw(corpus, tmp_path):
    import io

    from PIL import Image

    from scripts import prompt
    from scripts.chat import Session
    from vlm.chat import Chat
    from vlm.scenes import Scene

    module, _ = module_and_data(corpus)
    module.model.save_pretrained(tmp_path / "model")
    Scene.random(3).render(32).save(tmp_path / "example.png")
    prompt.main(["--model", str(tmp_path / "model"), "--tokenizer", str(corpus / "tok"), "--draw", "a red circle",
                 "--example", str(tmp_path / "example.png"), Scene.random(3).caption(), "--candidates", "2",
                 "--out", str(tmp_path / "drawn.png")])  # fmt: skip
    assert Image.open(tmp_path / "drawn.png").width > 3 * 96  # caption, one example, two drawings

    out = io.StringIO()
    session = Session(Chat.load(str(tmp_path / "model"), str(corpus / "tok")), {"temperature": 0.0, "top_k": None,
                      "top_p": 1.0, "seed": None}, 6, out=out, draw_dir=str(tmp_path / "chat"))  # fmt: skip
    for line in (f"/example {tmp_path / 'example.png'} {Scene.random(3).caption()}", "/example nowhere.png a caption",
                 "/draw", "/draw a red circle on the left"):  # fmt: skip
        session.handle(line)
    said = out.getvalue()
    assert "(example 1 goes before the next /draw)" in said and "no image at nowhere.png" in said
    assert "/draw needs a caption" in said and Image.open(tmp_path / "chat" / "draw-1.png").size == (16, 16)


def test_app_draw_tab_handler(corpus, tmp_path):
    import gradio as gr

    from scripts.app_draw import draw_images, draw_tab
    from vlm.chat import Chat
    from vlm.scenes import Scene

    module, _ = module_and_data(corpus)
    chat = Chat(module.model, load_text_tokenizer(corpus / "tok"))
    Scene.random(3).render(32).save(tmp_path / "example.png")
    drawn = draw_images(chat, "a red circle", [str(tmp_path / "example.png")], Scene.random(3).caption(), 2, 3.0, 1.0, 0)
    assert [image.size for image in drawn] == [(16, 16)] * 2
    with pytest.raises(gr.Error, match="1 example images but 0 example captions"):
        draw_images(chat, "a red circle", [str(tmp_path / "example.png")], "", 1, 3.0, 1.0, 0)
    with pytest.raises(gr.Error, match="type a caption"):
        draw_images(chat, " ", [], "", 1, 3.0, 1.0, 0)
    with gr.Blocks() as page:  # the tab builds
        draw_tab(chat, "model")
    assert any(getattr(block, "elem_id", None) == "draw-run" for block in page.blocks.values())
