import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second thread only adds synchronisation (several times slower on a busy
    machine). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A saved random tiny VLM with its tokenizer (tests/helpers.save_tiny_vlm) and a red image, red.png."""
    from helpers import save_tiny_vlm
    from PIL import Image

    directory = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(0)
    save_tiny_vlm(directory)
    Image.new("RGB", (40, 30), "red").save(directory / "red.png")
    return directory
