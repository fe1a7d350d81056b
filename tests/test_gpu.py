"""CUDA paths (skipped without a GPU): compiled decoding with CUDA graphs equals eager decoding, the
fused loss equals the plain one, xformers attention equals sdpa (plain and on packed rows), KV-cache
decoding equals recomputing, a bf16 training step learns, the tokenizer gives the CPU's codes.

    pytest -m gpu
"""

import pytest
import torch
import torch.nn.functional as F

from lvm import LVM, LVMConfig, attention
from lvm.attention import xformers_unavailable
from lvm.fused import linear_cross_entropy
from lvm.module import LVMModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CODEBOOK, VOCAB = 256, 356
CUDA = torch.device("cuda")


@pytest.fixture
def model():
    config = LVMConfig.from_name("vqlm_tiny", codebook_size=CODEBOOK, vocab_size=VOCAB)
    return LVM(config).cuda().eval()


@pytest.mark.slow
def test_compiled_decoding_with_cuda_graphs_equals_eager(model):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 greedy must not round through tf32
    ragged = [torch.randint(0, CODEBOOK, (n,), device="cuda") for n in (7, 19, 1, 12)]
    eager = model.generate(ragged, max_new_tokens=24, temperature=0)
    for _ in range(2):  # the second call replays the recorded graphs
        assert torch.equal(model.generate(ragged, max_new_tokens=24, temperature=0, compile=True), eager)
    sampled = model.generate(ragged, max_new_tokens=24, top_k=20, seed=3)
    assert torch.equal(model.generate(ragged, max_new_tokens=24, top_k=20, seed=3, compile=True), sampled)


def test_fused_loss_on_cuda_equals_reference():
    hidden, weight = torch.randn(300, 64, device="cuda"), torch.randn(500, 64, device="cuda") * 0.2
    targets = torch.randint(0, 500, (300,), device="cuda")
    results = []
    for loss_fn in (
        lambda h, w: F.cross_entropy((h @ w.T).float(), targets),
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=64),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(bool(xformers_unavailable(torch.device("cuda"))) if torch.cuda.is_available() else True,
                    reason="xformers kernels unavailable")
def test_xformers_equals_sdpa_on_cuda(model):
    ids = torch.randint(0, CODEBOOK, (2, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.config.attn_backend = "sdpa"
        sdpa = model(ids).float()
        model.config.attn_backend = "xformers"
        xformers = model(ids).float()
    torch.testing.assert_close(xformers, sdpa, rtol=2e-2, atol=2e-2)


def test_tokenizer_cuda_codes_equal_cpu():
    from tokenizer import VQGAN

    torch.backends.cudnn.allow_tf32 = False
    vq = VQGAN.from_name("vqgan_demo").eval()
    images = torch.rand(2, 3, 32, 32)
    cpu = vq.encode(images)
    gpu = vq.cuda().encode(images.cuda()).cpu()
    assert (gpu == cpu).float().mean() > 0.99  # conv algorithms differ: a rare tie may flip


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
