"""CUDA-only paths: xformers attention, KV-cache decoding and a bf16 training step on a GPU.

Marked `gpu`; each skips with its reason where no CUDA device (or no xformers) is present:
    pytest -m gpu
"""

import pytest
import torch

from lvm import LVM, LVMConfig, attention
from lvm.module import LVMModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
CODEBOOK, VOCAB = 256, 356


def packed_batch(lengths_per_row: list[list[int]], device=CUDA) -> dict[str, torch.Tensor]:
    """Rows of several documents, as data.packing writes them: positions restart, labels = inputs."""
    document_ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths_per_row])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    document_ids, position_ids = document_ids.to(device), position_ids.to(device)  # [B, L] each
    input_ids = torch.randint(0, CODEBOOK, document_ids.shape, device=device)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "document_ids": document_ids, "position_ids": position_ids}


def test_xformers_equals_sdpa_on_packed_sequences():
    """Catches an xformers bias that lets documents see each other, or a layout/scale mix-up in its call."""
    pytest.importorskip("xformers.ops", reason="xformers not installed (pip install -e '.[gpu]')")
    torch.manual_seed(0)
    batch = packed_batch([[100, 60, 96], [256]])
    length = batch["input_ids"].shape[1]
    q = torch.randn(2, 8, length, 64, device=CUDA, dtype=torch.bfloat16)  # [B, H, L, D]
    k, v = (torch.randn(2, 2, length, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(2))  # GQA: 2 kv heads
    fast = attention.build("xformers", batch["document_ids"], length, CUDA)(q, k, v)
    reference = attention.build("sdpa", batch["document_ids"], length, CUDA)(q.float(), k.float(), v.float())
    assert fast.shape == reference.shape
    assert (fast.float() - reference).abs().max() < 2e-2  # bf16 inputs: ~3 significant digits
    # the second document's first token sees only itself: its output is its own value vector
    assert torch.allclose(fast[0, :, 100].float(), v[0, :, 100].float().repeat_interleave(4, dim=0), atol=1e-2)


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_kv_cache_decoding_on_cuda_equals_recompute(backend):
    """Catches a CUDA cache that drifts from the full forward (wrong slots, positions or masks)."""
    if backend == "xformers":
        pytest.importorskip("xformers.ops", reason="xformers not installed (pip install -e '.[gpu]')")
    torch.manual_seed(0)
    config = LVMConfig.from_name("vqlm_tiny", codebook_size=CODEBOOK, vocab_size=VOCAB, attn_backend=backend)
    model = LVM(config).to(CUDA).eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # exact-ish fp32, so greedy choices are comparable
    prompts = [torch.randint(0, CODEBOOK, (n,), device=CUDA) for n in (7, 19)]
    new = model.generate(prompts, max_new_tokens=12, temperature=0)
    assert new.device == prompts[0].device and new.shape == (2, 12)
    for row, prompt in zip(new, prompts, strict=True):
        ids = prompt[None]
        for _ in range(12):
            with torch.no_grad():
                logits = model(ids)[:, -1]
            logits[:, CODEBOOK:] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(row, ids[0, len(prompt) :])


def test_bf16_training_step_lowers_the_loss():
    """Catches a bf16-mixed step that produces NaNs, no gradients, or does not learn a repeated batch."""
    torch.manual_seed(0)
    module = LVMModule(model="vqlm_tiny", model_overrides={"codebook_size": CODEBOOK, "vocab_size": VOCAB}).to(CUDA)
    batch = packed_batch([[128, 128], [200, 56]])
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.5 * losses[0]
