"""In-context prompting and evaluation (lvm.prompting, lvm.evaluation, scripts/prompt.py, scripts/eval.py)
with a tiny random LVM and a tiny VQGAN at 16 px (64 tokens per image, 64 codes)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.procedural import procedural_analogy, procedural_seeds
from lvm import LVM, LVMConfig
from lvm.evaluation import METHODS, most_likely, perplexity, score_analogies, target_nll
from lvm.prompting import InContextPrompter, PromptJob, read_jobs
from tokenizer import VQGAN, to_tensor
from tokenizer.images import psnr

pytestmark = pytest.mark.slow  # generation and tokenization with real checkpoints, script subprocesses

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # vqgan_tiny is f2: 16 px -> 8x8 = 64 tokens per image
TOKENS = 64


def tiny_lvm(max_positions: int = 2048) -> LVM:
    # 64 codes + BOS + EOS; 2048 positions hold 15 context frames + 1 generated (16 x 64 + BOS)
    return LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=66, codebook_size=64, max_position_embeddings=max_positions))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(model dir, tokenizer dir) saved with save_pretrained, plus a sentence's images as PNG files."""
    root = tmp_path_factory.mktemp("prompting")
    torch.manual_seed(0)
    tiny_lvm().save_pretrained(root / "lvm")
    VQGAN.from_name("vqgan_tiny", resolution=SIZE).save_pretrained(root / "vq")
    for i, image in enumerate(procedural_analogy("flip", procedural_seeds("heldout", 1)[0], 3, SIZE).images):
        image.save(root / f"{i}.png")
    (root / "not_an_image.png").write_text("hello")
    return root


@pytest.fixture(scope="module")
def prompter(checkpoints) -> InContextPrompter:
    return InContextPrompter(LVM.from_pretrained(checkpoints / "lvm"), VQGAN.from_pretrained(checkpoints / "vq"))


@pytest.fixture
def spy(prompter, monkeypatch):
    """Records the prompts the prompter hands to model.generate (and the token counts asked for)."""
    calls = []
    generate = prompter.model.generate

    def recording(prompt_ids, max_new_tokens, **kwargs):
        calls.append(([p.clone() for p in prompt_ids], max_new_tokens))
        return generate(prompt_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(prompter.model, "generate", recording)
    return calls


def sentences(tasks_shots, count=2):
    return [procedural_analogy(t, s, n, SIZE) for t, n in tasks_shots for s in procedural_seeds("heldout", count)]


def run_script(script: str, *args) -> None:
    """The script as users run it: a separate process."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def script_main(name: str):
    """A script's main(argv), in this process: for the cases where a new process adds only start-up time."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *args: module.main([str(a) for a in args])


# -- layouts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_bos", [True, False])
def test_analogy_prompt_layout(prompter, spy, use_bos, monkeypatch):
    monkeypatch.setattr(prompter, "use_bos", use_bos)
    images = sentences([("recolor", 2)], 1)[0].prompt
    result = prompter.analogy(images, num_candidates=3, temperature=1.0, seed=0)

    codes = prompter.tokenizer.encode(to_tensor(images, SIZE)).reshape(-1)
    expected = torch.cat([torch.tensor([prompter.model.config.bos_id]), codes]) if use_bos else codes
    (prompts, new_tokens), = spy
    assert new_tokens == TOKENS
    assert len(prompts) == 3  # one row per candidate, each the same prompt
    for prompt in prompts:
        assert torch.equal(prompt, expected)
    assert result.tokens.shape == (3, 1, TOKENS)
    assert len(result.generated) == 3 and result.generated[0][0].size == (SIZE, SIZE)


def test_sequence_slides_a_window_of_15_frames(prompter, spy):
    frames = [Image.new("RGB", (SIZE, SIZE), (10 * i, 255 - 10 * i, 0)) for i in range(17)]
    result = prompter.continue_sequence(frames, n_frames=2, temperature=0)

    codes = prompter.encode(frames)
    bos = torch.tensor([prompter.model.config.bos_id])
    (first, _), (second, _) = spy
    assert torch.equal(first[0], torch.cat([bos, codes[2:].reshape(-1)]))  # the last 15 frames
    window = torch.cat([codes[3:], result.tokens[0, :1]])  # slid by one: 14 given + the generated frame
    assert torch.equal(second[0], torch.cat([bos, window.reshape(-1)]))
    assert result.tokens.shape == (1, 2, TOKENS)


def test_window_shrinks_to_what_the_model_holds(prompter):
    short = InContextPrompter(tiny_lvm(max_positions=512), prompter.tokenizer)
    assert short.window_frames() == (512 - 1 - TOKENS) // TOKENS  # 6 frames + BOS + 1 generated fit
    assert InContextPrompter(tiny_lvm(), prompter.tokenizer, context_frames=4).window_frames() == 4


# -- evaluation ------------------------------------------------------------------------------------------------
def test_perplexity_is_exp_mean_nll_of_the_target_tokens(prompter):
    sentence = sentences([("edges", 2)], 1)[0]
    value = perplexity(prompter, sentence.prompt, [sentence.answer])

    ids = prompter.prompt_ids(prompter.encode(sentence.images))  # [BOS] prompt answer
    with torch.no_grad():
        log_probs = torch.log_softmax(prompter.model(ids[None])[0].double(), dim=-1)
    first = len(ids) - TOKENS
    nll = [-log_probs[t - 1, ids[t]] for t in range(first, len(ids))]
    assert value == pytest.approx(math.exp(sum(nll) / TOKENS), rel=1e-4)


def test_analogy_scores_and_copy_baseline(prompter):
    """Catches scores that are not those of the answers generated (a constant, another method's, answers
    scored against the query), and per-task tallies that mix tasks."""
    # Two prompt lengths in one batch: generate gets prompts of different lengths.
    batch = sentences([("flip", 2), ("recolor", 3)])
    scores, examples = score_analogies(prompter, batch, batch_size=4, keep_examples=2)  # 2 sentences per task

    truth = prompter.encode([s.answer for s in batch])
    query = prompter.encode([s.prompt[-1] for s in batch])
    # The greedy answers, generated here apart from score_analogies from the same prompt tokens.
    prompts = [prompter.fit_images(s.prompt) for s in batch]
    answers = prompter.fit_images([s.answer for s in batch], "answer image")
    *contexts, _ = prompter.encode([im for p in prompts for im in p] + answers).split([*map(len, prompts), len(batch)])
    generated = {
        "model": prompter.complete(contexts, temperature=0)[:, 0, 0],
        "no_context": prompter.complete([c[-1:] for c in contexts], temperature=0)[:, 0, 0],
    }
    for method, pred in generated.items():
        assert scores["token_accuracy"][method] == pytest.approx((pred == truth).double().mean().item())
    flip = [i for i, s in enumerate(batch) if s.task == "flip"]
    assert scores["per_task"]["flip"]["token_accuracy"]["model"] == pytest.approx(
        (generated["model"][flip] == truth[flip]).double().mean().item()
    )
    copied = psnr(prompter.decode(query), to_tensor(answers)).mean().item()
    assert scores["psnr"]["copy_query"] == pytest.approx(copied, rel=1e-4)
    unchanged = (truth == query).double().mean().item()
    assert scores["changed_token_accuracy"]["copy_query"] == 0
    assert scores["token_accuracy"]["copy_query"] == pytest.approx(unchanged)
    assert scores["changed_fraction"] == pytest.approx(1 - unchanged)
    for metric in ("token_accuracy", "changed_token_accuracy", "psnr"):
        assert set(scores[metric]) == set(METHODS)
    assert set(scores["per_task"]) == {"flip", "recolor"} and scores["per_task"]["flip"]["count"] == 2
    assert {task: len(rows) for task, rows in examples.items()} == {"flip": 2, "recolor": 2}
    row = examples["flip"][0]  # what the grid shows: the examples, the query, each method's answer, the truth
    assert len(row.examples) == 2 and set(row.answers) == set(METHODS) and row.truth.size == (SIZE, SIZE)


def test_candidates_are_picked_by_likelihood(prompter):
    batch = sentences([("recolor", 2)])
    contexts = [prompter.encode(s.prompt) for s in batch]
    drawn = prompter.complete(contexts, num_candidates=3, temperature=1.0, seed=0)[:, :, 0]  # [B, 3, TOKENS]
    picked = most_likely(prompter, contexts, drawn)
    for context, options, pick in zip(contexts, drawn, picked, strict=True):
        nll = [target_nll(prompter.model, prompter.prompt_ids(context), o).mean().item() for o in options]
        assert len(set(nll)) == 3 and torch.equal(pick, options[min(range(3), key=nll.__getitem__)])
    scores, _ = score_analogies(prompter, batch, num_candidates=3, temperature=1.0, seed=0)
    greedy, _ = score_analogies(prompter, batch)
    assert scores["count"] == 2 and set(scores["psnr"]) == set(METHODS)
    assert greedy["token_accuracy"]["copy_query"] == scores["token_accuracy"]["copy_query"]


# -- bad input: errors before any generation --------------------------------------------------------------------
def test_bad_inputs_fail_before_generation(prompter, spy, checkpoints):
    images = [checkpoints / f"{i}.png" for i in range(5)]
    with pytest.raises(ValueError, match="not_an_image.png' is not a readable image"):
        prompter.analogy([images[0], checkpoints / "not_an_image.png", images[2]])
    for count in (1, 2, 4):
        with pytest.raises(ValueError, match="odd number of images >= 3"):
            prompter.analogy(images[:count])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        InContextPrompter(tiny_lvm(max_positions=256), prompter.tokenizer).analogy(images[:5])
    with pytest.raises(ValueError, match="odd number"):
        score_analogies(prompter, [procedural_analogy("flip", 0, 2, SIZE), procedural_analogy("flip", 1, 1, SIZE)])
    assert spy == []
    with pytest.raises(ValueError, match="tokenizer has 32 codes but the model was trained on 64"):
        InContextPrompter(prompter.model, VQGAN.from_name("vqgan_tiny", resolution=SIZE, codebook_size=32))


def test_jobs_are_checked_with_their_line(tmp_path, checkpoints):
    lines = [{"images": [f"{checkpoints}/{i}.png" for i in range(3)], "output": "a.png"}, {"images": [], "output": "b.png"}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with pytest.raises(ValueError, match=r"jobs.jsonl:2: .*odd number"):
        read_jobs(tmp_path / "jobs.jsonl")
    with pytest.raises(ValueError, match="unknown prompting mode"):
        PromptJob([str(checkpoints / "0.png")], "x.png", mode="video").check()


# -- command line -----------------------------------------------------------------------------------------------
def test_cli_single_prompt_writes_a_grid(checkpoints, tmp_path):
    out = tmp_path / "grid.png"
    images = [checkpoints / f"{i}.png" for i in range(5)]
    run_script(
        "prompt.py", "--model", checkpoints / "lvm", "--tokenizer", checkpoints / "vq", "--images", *images,
        "--truth", checkpoints / "5.png", "--candidates", 2, "--seed", 0, "--out", out,
    )  # fmt: skip
    with Image.open(out) as grid:
        # 2 candidate rows; 5 prompt + 1 generated + 1 truth tiles, 2 px apart, 10 px between sections
        assert grid.size == (7 * SIZE + 4 * 2 + 2 * 10, 2 * SIZE + 2)

    with pytest.raises(SystemExit, match="is not a readable image"):
        script_main("prompt")(
            "--model", checkpoints / "lvm", "--tokenizer", checkpoints / "vq",
            "--images", images[0], checkpoints / "not_an_image.png", images[2], "--out", tmp_path / "bad.png",
        )  # fmt: skip
    assert not (tmp_path / "bad.png").exists()


def test_cli_batch_writes_every_output(checkpoints, tmp_path, capsys):
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes((checkpoints / f"{i}.png").read_bytes())
    jobs = [
        {"images": ["0.png", "1.png", "2.png"], "output": "out/analogy.png", "truth": ["3.png"]},
        {"images": ["0.png", "1.png", "2.png", "3.png", "4.png"], "output": "out/analogy5.png"},
        {"images": ["0.png", "2.png", "4.png"], "output": "out/sequence.png", "mode": "sequence", "frames": 2},
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(map(json.dumps, jobs)) + "\n")
    args = ["--model", checkpoints / "lvm", "--tokenizer", checkpoints / "vq", "--jobs", tmp_path / "jobs.jsonl"]
    run_script("prompt.py", *args, "--temperature", 0)
    for job in jobs:
        assert Image.open(tmp_path / job["output"]).height == SIZE
    script_main("prompt")(*args)
    assert "skipped 3" in capsys.readouterr().out  # a rerun resumes: nothing left to do


def test_eval_script(checkpoints, prompter, tmp_path):
    main = script_main("eval")
    common = ["--model", checkpoints / "lvm", "--tokenizer", checkpoints / "vq"]
    # Catches a script that scores other images than those named, or a perplexity that ignores the prompt.
    value = main("perplexity", *common, "--prompt", checkpoints / "0.png", "--target", checkpoints / "1.png")
    assert value == pytest.approx(perplexity(prompter, [checkpoints / "0.png"], [checkpoints / "1.png"]), rel=1e-5)
    # another prompt, another value (a random model barely uses context: ~0.1% here, 100x the tolerance)
    assert value != pytest.approx(perplexity(prompter, [checkpoints / "2.png"], [checkpoints / "1.png"]), rel=1e-5)
    scores = main(
        "analogies", *common, "--tasks", "flip,colorize", "--per-task", 1, "--n-shots", 2, "--grid-rows", 1, "--out", tmp_path
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(scores))
    assert set(scores["per_task"]) == {"flip", "colorize"}
    assert sorted(Path(p).name for p in scores["grids"]) == ["colorize.png", "flip.png"]
