"""The web app (scripts/app.py) served on a free localhost port and driven by a real headless Chromium
through Playwright, with a tiny random LVM and VQGAN at 16 px (64 tokens per image).

Screenshots of every tab are saved under runs/test-artifacts/app/ (the README's come from there)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_vlm
from PIL import Image

from data.procedural import moving_shapes, procedural_seeds
from lvm import LVM, LVMConfig
from lvm.evaluation import heldout_analogies
from lvm.prompting import InContextPrompter
from tokenizer import VQGAN
from tokenizer.images import resolve_image
from vlm.chat import Chat

pytestmark = pytest.mark.slow  # a live Gradio server and browser sessions

pytest.importorskip("gradio", reason="the app needs the `app` extra: pip install -e '.[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the `app` extra")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "runs" / "test-artifacts" / "app"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000  # for every wait and check: a busy machine (CI, shared cores) slows the server down
sync_api.expect.set_options(timeout=TIMEOUT_MS)

if not os.path.exists(CHROMIUM):
    pytest.skip(
        "no Chromium on this machine: `apt-get install -y chromium` (make test does it when run as root)",
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved models, a held-out analogy's prompt images as PNG files, a text file posing as a PNG."""
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    config = LVMConfig.from_name("vqlm_tiny", vocab_size=66, codebook_size=64, max_position_embeddings=1024)
    LVM(config).save_pretrained(root / "lvm")  # 1024 positions: a 14-frame video window
    VQGAN.from_name("vqgan_tiny", resolution=16).save_pretrained(root / "vq")
    sentence = heldout_analogies(["recolor"], 1, 3, 16)[0]  # 2 example pairs + the query
    prompt = []
    for i, image in enumerate(sentence.prompt):
        resolve_image(image).save(root / f"{i}.png")
        prompt.append(root / f"{i}.png")
    (root / "bad.png").write_text("not an image")
    Image.new("RGB", (40, 30), "red").save(root / "red.png")
    save_tiny_vlm(root / "vlm")
    return root, prompt


@pytest.fixture(scope="module")
def server(files):
    """`python -m scripts.app` as users start it; yields its URL, checks it still serves at the end."""
    root, _ = files
    port = free_port()
    log = open(root / "server.log", "w")
    command = [sys.executable, "-m", "scripts.app", "--lvm", root / "lvm", "--tokenizer", root / "vq", "--port", port,
               "--vlm", root / "vlm"]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url
    alive = process.poll() is None
    process.terminate()
    process.wait(timeout=30)
    log.close()
    assert alive, f"the server died:\n{(root / 'server.log').read_text()}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    """A new browser session (own cookies, own Gradio session) on the app."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def image_at(page, selector: str) -> np.ndarray:
    """The pixels of the first image under `selector`, fetched from the server as the browser shows it."""
    image = page.locator(f"{selector} img").first
    image.wait_for()
    data = page.request.get(image.get_attribute("src")).body()
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def screenshot(page, name: str, keep_messages: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if not keep_messages:  # messages stay until closed; close the earlier ones
        for button in page.get_by_role("button", name="Close", exact=True).all():
            button.click()
        page.wait_for_timeout(500)  # the messages fade out
    page.screenshot(path=ARTIFACTS / name, full_page=True)


@pytest.fixture(scope="module")
def prompter(files) -> InContextPrompter:
    """The same models in this process: what the page must show, computed without it."""
    root, _ = files
    return InContextPrompter(LVM.from_pretrained(root / "lvm"), VQGAN.from_pretrained(root / "vq"))


def test_analogy_greedy_answer_while_another_session_uploads_bad_files(server, browser, files, prompter):
    root, prompt = files
    greedy = prompter.analogy(prompt, num_candidates=2, temperature=0)  # the page's default: 2 candidates
    expected = np.asarray(greedy.generated[0][0])

    user, other = open_page(browser, server), open_page(browser, server)
    user.locator("#incontext-files input[type=file]").set_input_files(prompt)
    sync_api.expect(user.locator("#incontext-status")).to_contain_text("2 example pair(s) and a query")
    set_number(user, "#incontext-temperature", 0)
    user.click("#incontext-run")

    # Meanwhile, in another session: a file that is not an image, then a wrong count.
    other.locator("#incontext-files input[type=file]").set_input_files(root / "bad.png")
    sync_api.expect(other.locator("#incontext-status")).to_contain_text("'bad.png' is not an image file")
    screenshot(other, "bad_upload.png", keep_messages=True)
    other.locator("#incontext-files").get_by_role("button", name="Clear").click()  # uploads add to the list
    other.locator("#incontext-files input[type=file]").set_input_files(prompt[:4])
    sync_api.expect(other.locator("#incontext-status")).to_contain_text("an odd number of images")
    other.click("#incontext-run")  # generating anyway: the same message, in a message box
    sync_api.expect(other.locator(".toast-wrap")).to_contain_text("an odd number of images")
    other.get_by_role("button", name="Close", exact=True).click()
    other.click("#incontext-load")  # a held-out preset replaces the files
    sync_api.expect(other.locator("#incontext-status")).to_contain_text("3 example pair(s) and a query")

    answer = image_at(user, "#incontext-out")
    assert answer.shape == expected.shape == (16, 16, 3)
    assert np.array_equal(answer, expected), (
        "the page's answer differs from InContextPrompter's greedy answer"
    )
    link = user.locator("#incontext-grid-file a").first
    assert link.get_attribute("href").endswith("analogy_grid.png")
    grid = np.asarray(Image.open(BytesIO(user.request.get(link.get_attribute("href")).body())).convert("RGB"))
    assert np.array_equal(grid, np.asarray(greedy.grid())), "the downloadable grid is not prompt | answers"
    screenshot(user, "incontext.png")
    assert "Traceback" not in user.content() + other.content()


def test_video_and_info_tabs(server, browser, files, prompter):
    root, _ = files
    clip = moving_shapes(procedural_seeds("heldout", 1)[0], 8, 16)[0].images[:4]  # the page's example clip 0
    expected = np.asarray(prompter.continue_sequence(clip, 2, temperature=0).generated[0][0])
    page = open_page(browser, server)
    page.get_by_role("tab", name="Video").click()
    too_many = [
        shutil.copy(root / f"{i % 5}.png", root / f"frame{i:02d}.png") for i in range(15)
    ]  # window: 14
    page.locator("#video-files input[type=file]").set_input_files(too_many)
    sync_api.expect(page.locator("#video-status")).to_contain_text("more than the model's context holds")
    page.click("#video-load")
    sync_api.expect(page.locator("#video-status")).to_contain_text("4 frame(s)")
    set_number(page, "#video-temperature", 0)
    page.click("#video-run")
    assert np.array_equal(image_at(page, "#video-out"), expected), "the next frame is not the greedy one"
    screenshot(page, "video.png")

    page.get_by_role("tab", name="Model info").click()
    info = page.locator("#model-info")
    sync_api.expect(info).to_contain_text("vqlm_tiny")
    sync_api.expect(info).to_contain_text("64 tokens per image")
    sync_api.expect(info).to_contain_text("connector mlp2x_gelu")
    screenshot(page, "info.png")


def printed(text: str) -> str:
    """What two renderings of a random model's text share: its printable characters, blanks left out."""
    return "".join(ch for ch in text if ch.isprintable() and not ch.isspace())


@pytest.fixture(scope="module")
def chat(files) -> Chat:
    root, _ = files
    return Chat.load(str(root / "vlm"), None, "cpu")


def test_chat_answer_streams_token_by_token(chat, files):
    """The handler's stream: one update per new token, the last one the whole greedy answer."""
    root, _ = files
    image = Image.open(root / "red.png")
    turns = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    updates = list(chat.stream(turns, [image], max_new_tokens=8, temperature=0))
    input_ids, pixel_values = chat.prompt_ids(turns, [image])
    ids = chat.vlm.generate(
        input_ids=torch.tensor([input_ids]), pixel_values=pixel_values, max_new_tokens=8, eos_token_id=chat.stop_ids
    )
    assert len(updates) == ids.shape[1]
    assert updates[-1] == chat.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


def read_answer(page, expected: str) -> str:
    """The last assistant message once it reads `expected` (the answer streams in; timeout: its last text)."""
    message = page.locator("#chat-messages .bot").last
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        if message.count() and printed(message.inner_text()) == printed(expected):
            break
        time.sleep(0.2)
    return message.inner_text() if message.count() else ""


def test_vlm_chat_keeps_history(server, browser, files, chat):
    root, _ = files
    image = Image.open(root / "red.png")
    first = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    answer = list(chat.stream(first, [image], 16, 0.0))[-1]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And its shape?"}]
    follow_up = list(chat.stream(second, [image], 16, 0.0))[-1]

    page = open_page(browser, server)
    page.get_by_role("tab", name="VLM chat").click()
    set_number(page, "#chat-max-new", 16)
    page.locator("#chat-box input[type=file]").set_input_files(root / "red.png")
    page.locator("#chat-box textarea").fill("What colour is it?")
    page.locator("#chat-box textarea").press("Enter")
    assert printed(read_answer(page, answer)) == printed(answer)
    page.locator("#chat-box textarea").fill("And its shape?")
    page.locator("#chat-box textarea").press("Enter")
    sync_api.expect(page.locator("#chat-messages .bot")).to_have_count(2)
    assert printed(read_answer(page, follow_up)) == printed(follow_up), (
        "the second answer did not see the first turn"
    )
    screenshot(page, "chat.png")
