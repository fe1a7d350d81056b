"""The attentive probe: ml-aim's pooling classifier, above chance on separable labels and at chance on
shuffled ones, on AIM features, LVM hidden states and any callable encoder; the labelled data; the CLI."""

import pytest
import torch

from data.labelled import labelled
from lvm import LVM, LVMConfig
from lvm.aim import AIM, AIMConfig
from lvm.probe import AttentiveProbe, accuracy, aim_encoder, extract, fit_probe, lvm_encoder

pytestmark = pytest.mark.slow  # trains attentive probes


@pytest.fixture(scope="module")
def colors():
    """Colour classes (6) at 16x16: separable from almost any features."""
    train_images, train_labels, classes = labelled("colors", "train", 16, count=240)
    test_images, test_labels, _ = labelled("colors", "test", 16, count=240)
    return (train_images, train_labels), (test_images, test_labels), classes


@pytest.fixture(scope="module")
def aim_features(colors):
    torch.manual_seed(0)
    encoder = aim_encoder(AIM(AIMConfig.from_name("aim_tiny", attn_backend="sdpa")).eval())
    (train_images, train_labels), (test_images, test_labels), classes = colors
    return (extract(encoder, train_images), train_labels), (extract(encoder, test_images), test_labels), classes


def test_labelled_data():
    images, labels, classes = labelled("shapes", "train", 16, count=30)
    assert images.shape == (30, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert classes == 3 and set(labels.tolist()) == {0, 1, 2}
    test_images, _, _ = labelled("shapes", "test", 16, count=30)
    assert not any(torch.equal(a, b) for a in images for b in test_images[:5])  # disjoint seeds
    digits, digit_labels, ten = labelled("digits", "test", 24)
    assert digits.shape == (360, 3, 24, 24) and ten == 10 and set(digit_labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="valid: shapes, colors, same_color, digits"):
        labelled("cifar", "train", 16)


def test_same_color_pairs():
    """Label 1 iff the two shapes share a colour: the image then holds 2 colours (background + one), else 3."""
    images, labels, classes = labelled("same_color", "train", 32, count=40)
    assert classes == 2 and 10 < int(labels.sum()) < 30
    for image, label in zip(images, labels, strict=True):
        assert len(torch.unique(image.reshape(3, -1), dim=1).T) == (2 if label else 3)
    test_images, _, _ = labelled("same_color", "test", 32, count=40)
    assert not any(torch.equal(a, b) for a in images for b in test_images[:5])


def test_probe_is_ml_aims_pooling_classifier():
    probe = AttentiveProbe(dim=16, num_classes=5, num_heads=4).eval()
    x = torch.randn(3, 7, 16)
    assert probe(x).shape == (3, 5)
    # attention pooling: the order of the feature tokens does not matter
    assert torch.allclose(probe(x), probe(x[:, torch.randperm(7)]), atol=1e-5)
    assert not any(m.bias is not None for m in (probe.k, probe.v, probe.linear))


def test_probe_beats_chance_on_separable_data(aim_features):
    (train_x, train_y), (test_x, test_y), classes = aim_features
    top1 = accuracy(fit_probe(train_x, train_y, classes, epochs=30), test_x, test_y)
    assert top1 > 0.8, top1  # chance is 1/6


def test_probe_stays_at_chance_on_shuffled_labels(aim_features):
    (train_x, train_y), (test_x, test_y), classes = aim_features
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    top1 = accuracy(fit_probe(train_x, shuffled, classes, epochs=30), test_x, test_y)
    assert top1 < 0.3, top1  # chance 0.167; 240 test images put 0.3 about 5 standard deviations above it


def test_lvm_hidden_states_over_an_image():
    from tokenizer import VQGAN

    torch.manual_seed(0)
    vq = VQGAN.from_name("vqgan_tiny").eval()
    lvm = LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=vq.config.codebook_size + 2, codebook_size=vq.config.codebook_size)).eval()
    images = labelled("colors", "train", vq.config.resolution, count=4)[0]
    features = extract(lvm_encoder(lvm, vq), images)
    tokens = vq.encode(images).shape[1]
    assert features.shape == (4, tokens, lvm.config.hidden_size)  # BOS dropped: one row per image token
    with pytest.raises(ValueError, match="tokenizer takes"):
        lvm_encoder(lvm, vq)(torch.rand(1, 3, vq.config.resolution // 2, vq.config.resolution // 2))


def test_any_encoder_returning_vision_features(colors):
    from vlm.encoders import VisionFeatures

    torch.manual_seed(0)
    aim = AIM(AIMConfig.from_name("aim_tiny", attn_backend="sdpa")).eval()
    (train_images, _), _, _ = colors

    def tower(pixels):  # a vlm.encoders-style tower: VisionFeatures(features [B, N, C], grid)
        return VisionFeatures(aim.features(pixels), (4, 4))

    assert torch.equal(extract(tower, train_images[:10], batch_size=4), extract(aim_encoder(aim), train_images[:10]))


def test_probe_command(capsys):
    from scripts.probe import main

    result = main(["--model", "aim_tiny", "--data", "colors", "--count", "60", "--epochs", "3"])
    assert result["data"] == "colors" and result["classes"] == 6 and 0 <= result["top1"] <= 1
    assert "attentive probe top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--model", "no/such/dir", "--data", "colors"])
