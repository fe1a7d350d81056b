"""Perplexity filtering (POINTS): score every sample of a VLM shard set with a trained VLM and keep the
samples it finds most plausible.

    python -m vlm.filter --model runs/vlm/sft/export --tokenizer runs/vlm/tokenizer \\
        --shards runs/vlm/shards/train --out runs/vlm/shards/filtered --keep 0.5

A sample's score is the mean NLL of its trained tokens (the answers of a conversation, a caption, the text
of an interleaved document) given its images, with the labels training uses (vlm.data.sample_document);
its perplexity is exp of that. The `--keep` fraction with the lowest perplexity is written to --out as a
new shard set (vlm.prepare's writer and manifest: `python -m vlm.prepare`'s readers and VLMDataModule read
it), with scores.csv (key, id, source, n_tokens, mean_nll, perplexity: every scored sample) and filter.json
(counts, the threshold, skipped samples by reason).
Resumable: scores.csv is appended batch by batch and a rerun skips the keys it already holds, so a killed
run continues where it stopped; a rerun with another --keep only rewrites the shards. Unreadable samples
(corrupt shard, missing or corrupt image) and samples longer than the model's positions are skipped,
counted by reason and logged, never scored.
`mean_answer_nll` is the same scorer over a whole set: vlm.soup's held-out metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.shards import list_shards, shard_path
from lvm.checkpoints import atomic_path
from vlm import formats
from vlm.processing import TILINGS, ImageProcessor
from vlm.splice import IGNORE_INDEX

log = logging.getLogger(__name__)

SCORES_FILE, SUMMARY_FILE = "scores.csv", "filter.json"
COLUMNS = ("key", "id", "source", "n_tokens", "mean_nll", "perplexity")


@torch.no_grad()
def answer_nll(model, documents: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """documents: (ids [L_i], labels [L_i], pixel tiles) per sample -> (summed NLL of each sample's trained
    tokens float [B], their count long [B]), from one forward over the batch right-padded to its longest.
    Causal attention never lets a token see the padding after it, so no mask is needed and a sample's
    score does not depend on its batch."""
    width = max(len(ids) for ids, _, _ in documents)
    input_ids = torch.full((len(documents), width), pad_id, dtype=torch.long)
    labels = torch.full((len(documents), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels, _) in enumerate(documents):
        input_ids[row, : len(ids)], labels[row, : len(ids)] = torch.as_tensor(ids), torch.as_tensor(row_labels)
    pixels = torch.cat([pixels for _, _, pixels in documents])
    device = next(model.parameters()).device
    input_ids, labels, pixels = input_ids.to(device), labels.to(device), pixels.to(device)
    logits = model(input_ids=input_ids, pixel_values=pixels if len(pixels) else None).logits  # [B, L, vocab]
    targets = labels[:, 1:]  # position t predicts token t + 1
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                reduction="none")  # [B, L-1]  # fmt: skip
    return per_token.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def iter_scores(
    model, tokenizer, shards: str | os.PathLike, batch_size: int = 16, skip: frozenset[str] = frozenset(),
    stats: formats.SkipStats | None = None, limit: int | None = None, progress: bool = False, **processor_options,
) -> Iterator[tuple[dict, int, float]]:  # fmt: skip
    """(sample json, n_tokens, mean NLL) per sample of the shard set `shards`, in shard order, batched;
    keys in `skip` are passed over, at most `limit` samples are scored. Samples that cannot be read, that
    exceed the model's positions or that have nothing to score are counted in `stats` and logged."""
    from vlm.prepare import read_manifest
    from vlm.text import check_tokenizer_for

    total = read_manifest(shards)["samples"]  # raises, naming the fix, for a folder that is not a shard set
    check_tokenizer_for(model, tokenizer)
    stats = formats.SkipStats() if stats is None else stats
    processor = ImageProcessor.for_model(model, **processor_options)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    batch: list[tuple[dict, tuple]] = []
    with tqdm(total=min(total, limit or total), desc="scoring", unit="sample", disable=not progress) as bar:
        for sample, document in _documents(model, tokenizer, processor, shards, skip, stats, limit):
            batch.append((sample, document))
            bar.update()
            if len(batch) == batch_size:
                yield from _scored(model, batch, pad_id)
                batch = []
    if batch:
        yield from _scored(model, batch, pad_id)


def _scored(model, batch: list[tuple[dict, tuple]], pad_id: int) -> Iterator[tuple[dict, int, float]]:
    sums, counts = answer_nll(model, [document for _, document in batch], pad_id)
    for (sample, _), nll, count in zip(batch, sums.tolist(), counts.tolist(), strict=True):
        yield sample, count, nll / count


def _documents(model, tokenizer, processor, shards, skip, stats, limit) -> Iterator[tuple[dict, tuple]]:
    """(sample, (ids, labels, pixels)) of each scorable sample not in `skip`, at most `limit` of them."""
    from vlm.data import sample_document
    from vlm.prepare import iter_shard_samples

    max_len = getattr(model.llm.model.config, "max_position_embeddings", None)
    count = 0
    for shard in list_shards(shards):
        for sample, images in iter_shard_samples(shard, stats):
            if limit is not None and count >= limit:
                return
            if sample["key"] in skip:
                continue
            document = sample_document(tokenizer, processor, sample, images)
            where = f"shard {shard.name} sample {sample['key']} ({sample.get('id')})"
            if max_len is not None and len(document[0]) > max_len:
                stats.skip(formats.BadSample("too_long", f"{where}: {len(document[0])} tokens with its images, more than "
                                             f"the model's {max_len} positions"), strict=False)  # fmt: skip
            elif not (document[1][1:] != IGNORE_INDEX).any():
                stats.skip(formats.BadSample("nothing_to_score", f"{where}: no trained tokens"), strict=False)
            else:
                count += 1
                yield sample, document


def mean_answer_nll(model, tokenizer, shards: str | os.PathLike, batch_size: int = 16, limit: int | None = None,
                    **processor_options) -> float:  # fmt: skip
    """The token-weighted mean NLL of the trained tokens over (the first `limit` samples of) a shard set."""
    nll, tokens = 0.0, 0
    for _, count, mean in iter_scores(model, tokenizer, shards, batch_size, limit=limit, **processor_options):
        nll, tokens = nll + mean * count, tokens + count
    if not tokens:
        raise ValueError(f"{shards}: no sample could be scored (see the warnings above)")
    return nll / tokens


# -- the filter -------------------------------------------------------------------------------------------
def read_scores(path: Path) -> list[dict]:
    """The rows of a scores CSV, dropping a last row cut short by a killed run (and rewriting the file
    without it, so that appending continues on a clean line)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        lines = file.read().splitlines(keepends=True)
    rows, good = [], lines[:1]
    for line in lines[1:]:
        values = next(csv.reader([line]), [])
        if len(values) == len(COLUMNS) and line.endswith("\n"):
            try:
                rows.append({**dict(zip(COLUMNS, values, strict=True)), "mean_nll": float(values[4])})
                good.append(line)
                continue
            except ValueError:
                pass
        log.warning("%s: dropping an unreadable row %r (a run killed mid-write); it is scored again", path, line[:80])
    if len(good) != len(lines):
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(good))
    return rows


def filter_shards(
    model, tokenizer, shards: str | os.PathLike, out: str | os.PathLike, keep: float = 0.5, batch_size: int = 16,
    shard_size: int = 256, progress: bool = True, **processor_options,
) -> dict:  # fmt: skip
    """Score `shards` (resuming from out/scores.csv), write the `keep` fraction with the lowest perplexity as
    a shard set in `out`; returns the summary written to out/filter.json (see the module docstring)."""
    from vlm.prepare import FORMAT, claim_settings, iter_shard_samples, write_manifest, write_shard

    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep is the fraction of samples to keep, in (0, 1], not {keep}")
    shards, out = Path(shards), Path(out)
    if out.resolve() == shards.resolve():
        raise ValueError(f"--out {out} is the input shard set: write the filtered set into a new directory")
    claim_settings(out, {"format": FORMAT, "sources": [f"filter:{shards.resolve()}"], "shard_size": shard_size})
    scores_path, stats = out / SCORES_FILE, formats.SkipStats()
    rows = read_scores(scores_path)
    done = frozenset(row["key"] for row in rows)
    if done:
        log.info("%s: %d samples already scored, resuming", scores_path, len(done))
    new_file = not scores_path.exists()
    with open(scores_path, "a", newline="") as file:
        writer = csv.writer(file)
        if new_file:
            writer.writerow(COLUMNS)
        for sample, count, mean in iter_scores(model, tokenizer, shards, batch_size, skip=done, stats=stats,
                                               progress=progress, **processor_options):  # fmt: skip
            row = {"key": sample["key"], "id": sample.get("id", ""), "source": sample.get("source", ""),
                   "n_tokens": count, "mean_nll": mean, "perplexity": math.exp(min(mean, 700.0))}  # fmt: skip
            writer.writerow([row[c] for c in COLUMNS])
            file.flush()
            rows.append(row)
    if not rows:
        raise ValueError(f"{shards}: no sample could be scored (skipped: {dict(stats)})")
    ranked = sorted(rows, key=lambda r: (r["mean_nll"], r["key"]))
    kept = ranked[: max(1, round(keep * len(ranked)))]
    kept_keys = {r["key"] for r in kept}
    for old in list_shards(out):  # shards of an earlier --keep are replaced
        old.with_suffix(".stats.json").unlink(missing_ok=True)
        old.unlink()
    chunk, written = [], 0  # streamed: one output shard's samples in memory at a time
    for shard in list_shards(shards):
        for sample, images in iter_shard_samples(shard, decode=False):
            if sample["key"] in kept_keys:
                raw = {k: v for k, v in sample.items() if k not in ("key", "num_images")}
                chunk.append(raw | {"images": list(images)})
            if len(chunk) == shard_size:
                write_shard(shard_path(out, written // shard_size), chunk, start=written)
                chunk, written = [], written + len(chunk)
    if chunk:
        write_shard(shard_path(out, written // shard_size), chunk, start=written)
    manifest = write_manifest(out)
    summary = {
        "input": str(shards), "scored": len(rows), "kept": manifest["samples"], "keep": keep,
        "threshold_mean_nll": kept[-1]["mean_nll"], "threshold_perplexity": math.exp(min(kept[-1]["mean_nll"], 700.0)),
        "skipped_this_run": dict(stats), "scores": str(scores_path),
    }  # fmt: skip
    with atomic_path(out / SUMMARY_FILE) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a saved VLM directory (vlm.VLM.from_pretrained)")
    parser.add_argument("--tokenizer", required=True, help="the VLM's text tokenizer directory (vlm.text)")
    parser.add_argument("--shards", required=True, help="the shard set to filter (made by python -m vlm.prepare)")
    parser.add_argument("--out", required=True, help="directory for the kept shards, scores.csv and filter.json")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of samples kept, lowest perplexity first (0.5)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (16)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per output shard (256)")
    parser.add_argument("--tiling", default="none", choices=TILINGS, help="image tiling, as the model was trained (none)")
    parser.add_argument("--max-tiles", type=int, default=6, help="tiles per image at most, as the model was trained (6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vlm import VLM
    from vlm.text import load_text_tokenizer

    try:
        model, tokenizer = VLM.from_pretrained(args.model), load_text_tokenizer(args.tokenizer)
        summary = filter_shards(model, tokenizer, args.shards, args.out, args.keep, args.batch_size, args.shard_size,
                                tiling=args.tiling, max_tiles=args.max_tiles)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
