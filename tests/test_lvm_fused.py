"""lvm.fused.linear_cross_entropy equals F.cross_entropy over the full logits, gradients included, with
ignored targets, several chunks, and under bf16 autocast; LVM.loss equals the loss of LVM.forward."""

import pytest
import torch
import torch.nn.functional as F

from lvm import LVM, LVMConfig
from lvm.fused import linear_cross_entropy


def reference(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


def grads(loss_fn, hidden, weight, targets):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [7, 4096])  # several uneven chunks; one chunk
def test_fused_equals_reference_with_gradients(chunk_rows):
    hidden, weight = torch.randn(50, 32), torch.randn(300, 32) * 0.3
    targets = torch.randint(0, 300, (50,))
    targets[::5] = -100
    expected = grads(reference, hidden, weight, targets)
    fused = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=chunk_rows), hidden, weight, targets)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert expected[1][::5].abs().max() == 0 and fused[1][::5].abs().max() == 0  # ignored rows get nothing


def test_fused_under_bf16_autocast_and_all_ignored():
    hidden, weight = torch.randn(40, 64), torch.randn(200, 64) * 0.2
    targets = torch.randint(0, 200, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = grads(reference, hidden, weight, targets)
        fused = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=16), hidden, weight, targets)
    for got, want in zip(fused, expected, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    nothing = linear_cross_entropy(hidden, weight, torch.full((40,), -100))
    assert nothing.item() == 0  # no target: zero loss (not NaN), as a batch of padding would give


def test_model_loss_equals_forward_loss():
    model = LVM(LVMConfig.from_name("vqlm_tiny"))
    ids = torch.randint(0, 512, (2, 33))
    targets = ids[:, 1:].clone()
    targets[1, 20:] = -100
    want = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = model.loss(ids, targets)
    got.backward()
    torch.testing.assert_close(got, want)
    for p, g in zip(model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"targets must be \[B, L-1\]"):
        model.loss(ids, ids)
