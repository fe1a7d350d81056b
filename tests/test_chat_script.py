"""scripts/chat.py: a scripted session through stdin, answers streamed and history kept."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm.chat import Chat

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts the command in a subprocess (~8 s of CPU)


def run_chat(vlm_dir, session: str, *options) -> subprocess.CompletedProcess:
    script = vlm_dir / "session.txt"
    script.write_text(session)
    with script.open() as stdin:
        return subprocess.run([sys.executable, "-m", "scripts.chat", "--model", str(vlm_dir), "--max-new-tokens", "6",
                               *options], cwd=ROOT, stdin=stdin, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_scripted_two_turn_session_prints_both_answers(vlm_dir):
    image = vlm_dir / "red.png"
    run = run_chat(vlm_dir, f"/image {vlm_dir / 'missing.png'}\n/image {image}\nWhat colour is it?\nAnd its shape?\n/quit\nnot read\n")
    assert run.returncode == 0, run.stderr
    assert f"no image at {vlm_dir / 'missing.png'}" in run.stdout  # said, and the session goes on
    assert run.stdout.count("assistant: ") == 2
    # the same answers, greedy, from the shared model-side class: the second turn sees the first
    chat = Chat.load(str(vlm_dir))
    first = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    expected_first = list(chat.stream(first, [Image.open(image)], 6))[-1]
    second = [*first, {"role": "assistant", "content": expected_first}, {"role": "user", "content": "And its shape?"}]
    expected_second = list(chat.stream(second, [Image.open(image)], 6))[-1]
    assert f"assistant: {expected_first}\nassistant: {expected_second}\n" in run.stdout


def test_reset_and_sampling(vlm_dir):
    run = run_chat(vlm_dir, "Hello\n/reset\n/bogus\nHello\n", "--temperature", "1.0", "--top-k", "5", "--seed", "3")
    assert run.returncode == 0, run.stderr
    assert "(conversation cleared)" in run.stdout and "unknown command /bogus" in run.stdout
    assert run.stdout.count("assistant: ") == 2
