"""vlm.soup: a soup of identical models (or of one) is that model, the uniform soup is the hand-computed mean,
ingredients that differ are refused naming the tensor or config field, the greedy soup of tiny VLMs fine-tuned
from one start is never worse than its best ingredient, and LVMs and VQGANs soup through the same command."""

import copy
import json

import lightning as L
import pytest
import torch
from helpers import TINY_VLM_SPEC as SPEC
from safetensors.torch import load_file

from data.sources import sentences_from_spec
from data.tokenize import tokenize_to_shards
from lvm import LVM, LVMConfig
from lvm.aim import AIM, AIMConfig
from tokenizer import VQGAN
from vlm.filter import mean_answer_nll
from vlm.model import VLM
from vlm.module import VLMModule, new_config
from vlm.prepare import prepare
from vlm.soup import average, check_ingredients, greedy_soup, load_saved, main
from vlm.text import load_text_tokenizer, train_default_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    train_default_tokenizer(root / "tok")
    prepare(["scenes:40:train:32:multi"], root / "train", shard_size=64, progress=False)
    prepare(["scenes:6:heldout:32"], root / "val", shard_size=64, progress=False)
    return root


def tiny_vlm(corpus, seed: int = 0, **llm) -> VLM:
    torch.manual_seed(seed)
    spec = copy.deepcopy(SPEC)
    spec["llm"]["config"].update(llm)
    return VLM(new_config(spec, str(corpus / "tok")))


def logits(model: VLM) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.tensor([[5, 0, 0, 0, 0, 9, 12, 30]])  # four <image> tokens: one 32 px image
    with torch.no_grad():
        return model.eval()(ids, torch.randn(1, 3, 32, 32)).logits


def soup_cli(*args) -> dict:
    return main([str(a) for a in args])


def test_soup_of_identical_models_is_the_model(corpus, tmp_path):
    model = tiny_vlm(corpus)
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
    soup_cli("--method", "uniform", "--ingredients", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab")
    assert torch.equal(logits(VLM.from_pretrained(tmp_path / "ab")), logits(model))
    table = soup_cli("--method", "uniform", "--ingredients", tmp_path / "a", "--out", tmp_path / "one")
    assert table["candidates"][0]["metric"] is None  # no --val: nothing scored
    one, original = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert one.keys() == original.keys() and all(torch.equal(one[k], original[k]) for k in one)  # bit for bit


def test_uniform_soup_is_the_mean_of_the_tensors(corpus, tmp_path):
    a, b = tiny_vlm(corpus, seed=0), tiny_vlm(corpus, seed=1)
    a.save_pretrained(tmp_path / "a"), b.save_pretrained(tmp_path / "b")
    soup_cli("--method", "uniform", "--ingredients", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "soup")
    soup = VLM.from_pretrained(tmp_path / "soup").state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sum(not torch.equal(sa[k], sb[k]) for k in sa) > len(sa) // 2  # two different models
    for key in sa:
        expected = (sa[key] + sb[key]) / 2 if sa[key].is_floating_point() else sa[key]
        assert torch.allclose(soup[key], expected, atol=1e-7, rtol=0), key
    with pytest.raises(ValueError, match="integer tensor ids differs"):
        average([{"ids": torch.arange(3)}, {"ids": torch.arange(3) + 1}])


def test_ingredients_that_differ_are_refused_naming_what_differs(corpus, tmp_path, capsys):
    base = tiny_vlm(corpus)
    with pytest.raises(ValueError, match=r"tensor llm\.model\.model\.embed_tokens\.weight: .* \(\d+, 48\) .* \(\d+, 64\)"):
        check_ingredients([base, tiny_vlm(corpus, hidden_size=64)], ["a", "b"])
    base = tiny_vlm(corpus, rope_theta=10000.0)
    with pytest.raises(ValueError, match=r"config field llm\.config\.rope_theta: a has 10000.0, b has 500.0"):
        check_ingredients([base, tiny_vlm(corpus, rope_theta=500.0)], ["a", "b"])
    base.save_pretrained(tmp_path / "vlm")
    LVM(LVMConfig.from_name("vqlm_tiny")).save_pretrained(tmp_path / "lvm")
    with pytest.raises(SystemExit):
        soup_cli("--ingredients", tmp_path / "vlm", tmp_path / "lvm", "--out", tmp_path / "o", "--method", "uniform")
    assert "different kinds (lvm, vlm)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        soup_cli("--ingredients", tmp_path / "vlm", "--out", tmp_path / "o", "--val", corpus / "val")
    assert "needs --tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        soup_cli("--ingredients", tmp_path, "--out", tmp_path / "o", "--method", "uniform")
    assert "holds no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        soup_cli("--ingredients", tmp_path / "vlm", "--out", tmp_path / "vlm", "--method", "uniform")
    assert "is an ingredient" in capsys.readouterr().err


def test_greedy_keeps_only_what_improves():
    values = {(0,): 3.0, (1,): 2.0, (2,): 2.5, (1, 2): 1.5, (0, 1, 2): 1.7}
    kept, value = greedy_soup([3.0, 2.0, 2.5], lambda ids: values[tuple(sorted(ids))], higher_is_better=False)
    assert (sorted(kept), value) == ([1, 2], 1.5)  # 2 joined (1.5 < 2.0), 0 did not (1.7 > 1.5)


def finetune(corpus, start, root, seed: int, lr: float, steps: int) -> str:
    from vlm.data import VLMDataModule

    torch.manual_seed(seed)
    module = VLMModule(init_from=str(start), train_parts=["encoder", "connector", "llm"], learning_rate=lr, warmup_steps=2,
                       export_dir=str(root / "export"))  # fmt: skip
    data = VLMDataModule(str(corpus / "train"), tokenizer=str(corpus / "tok"), seq_len=192, batch_size=4, num_workers=0,
                         seed=seed)  # fmt: skip
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=root).fit(module, datamodule=data)  # fmt: skip
    return str(root / "export")


def test_greedy_soup_of_finetuned_vlms_is_never_worse_than_its_best_ingredient(corpus, tmp_path):
    tiny_vlm(corpus).save_pretrained(tmp_path / "init")
    start = finetune(corpus, tmp_path / "init", tmp_path / "start", seed=0, lr=3e-3, steps=12)
    ingredients = [finetune(corpus, start, tmp_path / f"ft{i}", seed=i, lr=lr, steps=6)
                   for i, lr in enumerate((1e-3, 2e-3, 4e-3), 1)]  # fmt: skip
    table = soup_cli("--method", "greedy", "--ingredients", *ingredients, "--val", corpus / "val", "--tokenizer",
                     corpus / "tok", "--out", tmp_path / "soup")  # fmt: skip
    scores = [row["metric"] for row in table["candidates"][:3]]
    greedy = table["candidates"][-1]
    assert greedy["candidate"] == "greedy soup" and greedy["metric"] <= min(scores)
    assert table["candidates"][3]["candidate"] == "uniform soup" and table["candidates"][3]["metric"] is not None
    soup = VLM.from_pretrained(tmp_path / "soup")  # what was written is what was scored
    measured = mean_answer_nll(soup, load_text_tokenizer(corpus / "tok"), corpus / "val")
    assert measured == pytest.approx(greedy["metric"], abs=1e-5)
    written = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert written["written"]["ingredients"] == greedy["ingredients"]
    assert (tmp_path / "soup" / "soup.csv").read_text().count("\n") == 6  # header, 3 ingredients, 2 soups
    best = soup_cli("--method", "best", "--ingredients", *ingredients, "--val", corpus / "val", "--tokenizer",
                    corpus / "tok", "--out", tmp_path / "best")  # fmt: skip
    index = min(range(3), key=lambda i: scores[i])
    assert best["written"]["ingredients"] == [index]
    a, b = load_file(tmp_path / "best" / "model.safetensors"), load_file(f"{ingredients[index]}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lvm_and_vqgan_soups_score_with_their_own_metrics(tmp_path):
    torch.manual_seed(0)
    vq = VQGAN.from_name("vqgan_tiny").eval()
    sentences = sentences_from_spec("procedural", split="heldout", image_size=32, count=4, images_per_sentence=2)
    tokenize_to_shards(sentences, vq, tmp_path / "tokens", samples_per_shard=4, progress=False)
    shape = {"codebook_size": vq.config.codebook_size, "vocab_size": vq.config.codebook_size + 100}
    for name in ("a", "b"):
        LVM(LVMConfig.from_name("vqlm_tiny", **shape)).save_pretrained(tmp_path / f"lvm_{name}")
        VQGAN.from_name("vqgan_tiny").save_pretrained(tmp_path / f"vq_{name}")
    lvm = soup_cli("--ingredients", tmp_path / "lvm_a", tmp_path / "lvm_b", "--val", tmp_path / "tokens",
                   "--out", tmp_path / "lvm_soup", "--batch-size", 2)  # fmt: skip
    assert lvm["kind"] == "lvm" and lvm["metric"] == "loss" and lvm["candidates"][-1]["metric"] <= lvm["candidates"][0]["metric"]
    assert load_saved(tmp_path / "lvm_soup")[0] == "lvm"
    tok = soup_cli("--ingredients", tmp_path / "vq_a", tmp_path / "vq_b", "--val", "embedded", "--out",
                   tmp_path / "vq_soup", "--batches", 1, "--batch-size", 2)  # fmt: skip
    assert tok["metric"] == "psnr" and tok["higher_is_better"]
    assert tok["candidates"][-1]["metric"] >= max(r["metric"] for r in tok["candidates"][:2])
    assert load_saved(tmp_path / "vq_soup")[0] == "tokenizer"


def test_aim_soups_uniformly_and_says_it_has_no_metric(tmp_path, capsys):
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        AIM(AIMConfig.from_name("aim_tiny")).save_pretrained(tmp_path / name)
    soup_cli("--method", "uniform", "--ingredients", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "soup")
    kind, soup = load_saved(tmp_path / "soup")
    a, b = AIM.from_pretrained(tmp_path / "a").state_dict(), AIM.from_pretrained(tmp_path / "b").state_dict()
    assert kind == "aim" and all(torch.allclose(v, (a[k] + b[k]) / 2, atol=1e-7) for k, v in soup.state_dict().items())
    with pytest.raises(SystemExit):
        soup_cli("--ingredients", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "greedy", "--val", tmp_path)
    assert "no held-out metric for an aim" in capsys.readouterr().err
