"""Image tokens into text: one `<image>` placeholder per image, expanded to the connector's token count
for that image (all its tiles), and the connector's outputs written exactly at those positions.

    ids = expand_placeholders(ids, image_token_id, tokens_per_image=[n1, n2])   # before batching
    embeds = splice(embeds, input_ids, image_embeds, image_token_id)            # in the model
    labels = mask_image_labels(labels, input_ids, image_token_id)               # no loss on images
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of positions that carry no loss (PyTorch's cross-entropy default)


def expand_placeholders(ids: list[int], image_token_id: int, tokens_per_image: list[int]) -> list[int]:
    """Each single `<image>` id in `ids` becomes tokens_per_image[i] copies, for the i-th image."""
    found = sum(1 for i in ids if i == image_token_id)
    if found != len(tokens_per_image):
        raise ValueError(f"the text has {found} <image> placeholders but {len(tokens_per_image)} images were given")
    counts = iter(tokens_per_image)
    out: list[int] = []
    for i in ids:
        out.extend([i] * next(counts) if i == image_token_id else [i])
    return out


def splice(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor | list[torch.Tensor], image_token_id: int
) -> torch.Tensor:
    """embeds [B, L, C] with the image tokens written at the placeholder positions, in reading order
    (sample by sample, left to right) -> [B, L, C] (a new tensor; gradients reach both inputs).

    image_embeds: one entry per image, in the order the images appear in the batch: [n_images, n_tokens, C],
    or a list of [n_tokens_i, C] for images of different token counts (tile counts) in one batch. Each
    sample's placeholders must take a whole number of its images: a mismatch names the sample and both counts.
    """
    images = list(image_embeds)
    per_sample = (input_ids == image_token_id).sum(dim=1).tolist()  # placeholders per sample
    taken = 0
    for sample, needed in enumerate(per_sample):
        have = 0
        while have < needed and taken < len(images):
            have += images[taken].reshape(-1, embeds.shape[-1]).shape[0]
            taken += 1
        if have != needed:
            raise ValueError(
                f"image token count mismatch in sample {sample}: its text has {needed} <image> positions but its "
                f"images give {have} image tokens; expand each placeholder to its image's token count "
                "(vlm.splice.expand_placeholders)"
            )
    if taken != len(images):
        raise ValueError(f"{len(images)} images were given but the text's placeholders take only {taken}")
    flat = torch.cat([e.reshape(-1, embeds.shape[-1]) for e in images]) if images else embeds.new_zeros(0, embeds.shape[-1])
    return embeds.masked_scatter((input_ids == image_token_id)[..., None], flat.to(embeds.dtype))


def mask_image_labels(labels: torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """labels with IGNORE_INDEX at every image position."""
    return labels.masked_fill(input_ids == image_token_id, IGNORE_INDEX)
