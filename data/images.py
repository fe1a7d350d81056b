"""Image folders (or the embedded photos) as a LightningDataModule of random crops, for tokenizer training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from data.photos import embedded_photos
from data.procedural import TASKS, procedural_analogy, procedural_seeds
from data.sources import IMAGE_EXTENSIONS, list_images
from tokenizer.images import fit_to_resolution, load_image, to_rgb, to_tensor

log = logging.getLogger(__name__)


class ImageCrops(Dataset):
    """Samples drawn from a list of images (paths or PIL images), cycling through them.

    Training: `length` random resized crops with horizontal flips. Evaluation: each image at `zooms`
    fixed scales (whole, then 2x, 3x... center zooms), resized + center-cropped. A file that fails to load is logged, counted in
    `failed`, and replaced by the next image."""

    def __init__(self, images: list, resolution: int, train: bool, length: int | None = None, zooms: int = 1):
        self.images = images
        self.resolution = resolution
        self.zooms = zooms
        self.length = length if train else len(images) * zooms
        self.failed: set[int] = set()
        self.augment = (
            v2.Compose(
                [v2.RandomResizedCrop(resolution, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
            )
            if train
            else None
        )

    def __len__(self) -> int:
        return self.length

    def _load(self, index: int) -> Image.Image:
        for offset in range(len(self.images)):
            i = (index + offset) % len(self.images)
            item = self.images[i]
            if not isinstance(item, (str, Path)):
                return to_rgb(item)
            try:
                return load_image(item)
            except OSError as error:  # truncated or not an image after all (PIL's errors are OSErrors)
                if i not in self.failed:
                    self.failed.add(i)
                    log.warning("skipping unreadable image %s: %s", item, error)
        raise RuntimeError("none of the images could be loaded")

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> float [3, resolution, resolution] in [0, 1]."""
        image = self._load(index % len(self.images))
        if self.augment is None:
            image = fit_to_resolution(_center_zoom(image, 1 + index // len(self.images)), self.resolution)
        tensor = v2.functional.to_dtype(v2.functional.pil_to_tensor(image), torch.float32, scale=True)
        return tensor if self.augment is None else self.augment(tensor)


class ProceduralImages(Dataset):
    """Whole images of the procedural analogy tasks (both sides of each pair, every task in turn), so
    a tokenizer learns the flat colours, masks and edges the demo's visual sentences are made of.
    `split` picks disjoint seed ranges: "train" or "heldout"."""

    def __init__(self, split: str, length: int, resolution: int):
        self.seeds = procedural_seeds(split, length)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> torch.Tensor:
        task = TASKS[index % len(TASKS)]
        x, y = procedural_analogy(task, self.seeds[index], n_shots=1, size=self.resolution).images
        return to_tensor(y if index // len(TASKS) % 2 else x)[0]


class SceneImages(Dataset):
    """Whole procedural scenes of the VLM demo (vlm.scenes: named colours in slots, plain or textured
    backgrounds), the images the demo's unified model learns to draw with this tokenizer's codes.
    `split` picks disjoint seed ranges: "train" or "heldout"."""

    def __init__(self, split: str, length: int, resolution: int):
        from vlm.scenes import scene_seeds  # vlm builds on data; imported here, where it is used

        self.seeds = scene_seeds(split, length)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> torch.Tensor:
        from vlm.scenes import Scene

        return to_tensor(Scene.random(self.seeds[index]).render(self.resolution))[0]


class _EpochSamples(Dataset):
    """Item `epoch * n + i` is sample i of `dataset`, augmented with the torch RNG seeded by (seed, epoch, i):
    a sample's crop depends on nothing else, so a resumed run sees the crops an unbroken one would."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> torch.Tensor:
        epoch, index = divmod(item, len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)  # ints hash to themselves: stable
            return self.dataset[index]


class _ResumableSampler(torch.utils.data.Sampler):
    """A (seed, epoch) permutation of epoch-tagged items (see _EpochSamples), starting `skip` items in
    once after a restore. Lightning calls set_epoch as each epoch starts."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.resume = n, seed, 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        skip = self.resume["items"] if self.resume and self.resume["epoch"] == self.epoch else 0
        self.resume = None
        return iter((self.epoch * self.n + order[skip:]).tolist())


class ImageDataModule(L.LightningDataModule):
    """Random crops of the images under `root` (recursive, any PIL-readable format), or of the
    embedded photos when `root` is None, plus a `procedural_fraction` of whole procedural task images and
    a `scene_fraction` of whole VLM demo scenes. Validation uses held-out images: the embedded validation
    photos, or every `val_every`-th file of the folder, and `val_procedural` held-out procedural images
    (and as many held-out scenes) for each generated source that is trained on."""

    def __init__(
        self,
        root: str | None = None,
        resolution: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        train_samples_per_epoch: int = 1024,
        val_every: int = 10,
        val_zooms: int = 4,
        procedural_fraction: float = 0.0,
        scene_fraction: float = 0.0,
        val_procedural: int = 12,
        seed: int = 0,
    ):
        """Training order and crops are a function of (seed, epoch, sample), and the position in the epoch is
        saved in checkpoints: a run resumed mid-epoch sees exactly the batches an unbroken run would."""
        super().__init__()
        self.save_hyperparameters()
        self._position = {"epoch": 0, "batches": 0}  # train batches consumed in this epoch
        self._resume: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.root is None:
            train_images, val_images = embedded_photos("train"), embedded_photos("val")
        else:
            files = list_images(hp.root)
            if not files:
                raise ValueError(f"no images under {hp.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            val_images = files[:: hp.val_every]
            train_images = [f for f in files if f not in set(val_images)] or files
        if not 0 <= hp.procedural_fraction + hp.scene_fraction <= 1:
            raise ValueError(
                f"procedural_fraction {hp.procedural_fraction} + scene_fraction {hp.scene_fraction} must lie in "
                "[0, 1]: they are shares of train_samples_per_epoch, the photos take the rest"
            )
        generated = {ProceduralImages: hp.procedural_fraction, SceneImages: hp.scene_fraction}
        counts = {source: round(hp.train_samples_per_epoch * share) for source, share in generated.items()}
        train_sets = [ImageCrops(train_images, hp.resolution, train=True, length=hp.train_samples_per_epoch - sum(counts.values()))]
        val_sets = [ImageCrops(val_images, hp.resolution, train=False, zooms=hp.val_zooms)]
        for source, count in counts.items():
            if count:
                train_sets.append(source("train", count, hp.resolution))
                val_sets.append(source("heldout", hp.val_procedural, hp.resolution))
        # photos alone stay a plain ImageCrops (its `images` and `failed` are read by callers)
        self.train_set, self.val_set = (sets[0] if len(sets) == 1 else ConcatDataset(sets) for sets in (train_sets, val_sets))

    def train_dataloader(self) -> DataLoader:
        sampler = _ResumableSampler(len(self.train_set), self.hparams.seed)
        if self._resume is not None:
            sampler.resume = {"epoch": self._resume["epoch"], "items": self._resume["batches"] * self.hparams.batch_size}
            self._resume = None
        return DataLoader(
            _EpochSamples(self.train_set, self.hparams.seed),
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            drop_last=True,
            persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),  # worker seeds leave the global RNG alone
        )

    def on_before_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        trainer = self.trainer
        if trainer is not None and trainer.training:  # count the train batches the loop takes
            epoch = trainer.current_epoch
            batches = self._position["batches"] + 1 if self._position["epoch"] == epoch else 1
            self._position = {"epoch": epoch, "batches": batches}
        return batch

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._position, self._resume = dict(state), dict(state)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


def _center_zoom(image: Image.Image, factor: int) -> Image.Image:
    if factor == 1:
        return image
    width, height = image.size
    w, h = round(width / factor), round(height / factor)
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))
