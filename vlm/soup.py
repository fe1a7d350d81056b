"""Model soups (Wortsman et al., 2022): average the weights of models fine-tuned from one start.

    python -m vlm.soup --method greedy --ingredients runs/a/export runs/b/export runs/c/export \\
        --val runs/vlm/shards/val --tokenizer runs/vlm/tokenizer --out runs/soup

Any saved model of the stack (a directory written by save_pretrained): a VLM (vlm.VLM, ours or a loaded
transformers family), an LVM (lvm.LVM) or a VQGAN tokenizer (tokenizer.VQGAN), and an AIM (lvm.aim.AIM, uniform
soups only); `load_saved` tells them apart.
Methods:
    uniform  the mean of the ingredients' floating-point tensors; integer and bool buffers must be equal in
             all of them and are copied
    greedy   the ingredients sorted by the held-out metric, best first; each next one joins the soup only if
             the soup's metric strictly improves (so the soup is never worse than the best ingredient)
    best     the best single ingredient
Held-out metrics (--metric; the first of each kind is its default):
    VLM      nll        mean NLL of the trained (answer / caption) tokens on VLM shards of `python -m vlm.prepare`
                        (vlm.filter's scorer); lower is better. Needs --tokenizer.
             scene_qa   QA exact match on --scenes held-out procedural scenes (vlm.evaluation.score_scenes);
                        higher is better; --val is not used. Needs --tokenizer.
    LVM      loss       validation loss on token shards (LVMModule's validation loop); lower is better
    VQGAN    psnr       reconstruction PSNR (dB) on an image folder, or on the embedded validation photos with
                        --val embedded; higher is better
Ingredients of different configs or tensor shapes are refused, naming the first tensor or config field that
differs. The soup is written with the model's own save_pretrained, beside soup.csv and soup.json: the metric of
every candidate (each ingredient, the uniform soup, the greedy soup and which ingredients it kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lvm.checkpoints import atomic_path

METHODS = ("uniform", "greedy", "best")
METRICS = {"vlm": ("nll", "scene_qa"), "lvm": ("loss",), "tokenizer": ("psnr",), "aim": ()}  # an AIM: uniform only
HIGHER_IS_BETTER = {"nll": False, "scene_qa": True, "loss": False, "psnr": True}
IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # provenance, not shape


# -- loading any saved model ------------------------------------------------------------------------------
def saved_kind(path: str | os.PathLike) -> str:
    """"vlm", "lvm", "tokenizer" or "aim": which of the stack's models a save_pretrained directory holds."""
    from vlm.hf_families import FAMILIES
    from vlm.model import OWN_MODEL_TYPE

    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} holds no config.json: pass directories written by a model's save_pretrained "
                                "(a VLM, an LVM or a VQGAN)")  # fmt: skip
    values = json.loads(config_file.read_text())
    model_type = values.get("model_type")
    if model_type == OWN_MODEL_TYPE or model_type in FAMILIES:
        return "vlm"
    if model_type == "lvm-vqgan":
        return "tokenizer"
    if model_type == "llama":
        return "lvm"
    if model_type is None and "patch_size" in values:  # AIM.save_pretrained writes its config fields only
        return "aim"
    raise ValueError(f"{config_file}: model_type {model_type!r} is none of the stack's saved models ({OWN_MODEL_TYPE!r} "
                     f"or a transformers VLM family {', '.join(FAMILIES)}; 'llama' for an LVM; 'lvm-vqgan'; an AIM's fields)")  # fmt: skip


def load_saved(path: str | os.PathLike) -> tuple[str, torch.nn.Module]:
    """(kind, model) of a save_pretrained directory of any of the stack's models, on the CPU, in eval mode."""
    kind = saved_kind(path)
    if kind == "vlm":
        from vlm.model import VLM as cls
    elif kind == "lvm":
        from lvm import LVM as cls
    elif kind == "aim":
        from lvm.aim import AIM as cls
    else:
        from tokenizer import VQGAN as cls
    return kind, cls.from_pretrained(path).eval()


# -- averaging --------------------------------------------------------------------------------------------
def check_ingredients(models: Sequence[torch.nn.Module], names: Sequence[str]) -> None:
    """Raise a ValueError naming the first tensor (name, shapes or dtypes) or config field (both values) in
    which an ingredient differs from the first one."""
    first = models[0].state_dict()
    for model, name in zip(models[1:], names[1:], strict=True):
        state = model.state_dict()
        for key in [*first, *state]:
            if key not in state or key not in first:
                where = name if key not in state else names[0]
                raise ValueError(f"ingredients differ: tensor {key} is missing from {where}; a soup needs models of one architecture")
            a, b = first[key], state[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"ingredients differ at tensor {key}: {names[0]} has {tuple(a.shape)} {a.dtype}, {name} "
                                 f"has {tuple(b.shape)} {b.dtype}; a soup needs models fine-tuned from one start")  # fmt: skip
        field = _first_difference(models[0].config.to_dict(), model.config.to_dict())
        if field is not None:
            key, a, b = field
            raise ValueError(f"ingredients differ in config field {key}: {names[0]} has {a!r}, {name} has {b!r}; a soup "
                             "needs models of one config")  # fmt: skip


def _first_difference(a: object, b: object, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, value in a, value in b) of the first difference between two config dicts, or None."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in [*a, *(k for k in b if k not in a)]:
            if key in IGNORED_CONFIG_KEYS:
                continue
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def average(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup of state dicts: floating-point tensors averaged (in float64, then cast back to their
    dtype), integer and bool ones copied after checking they are equal. One state gives itself, bit for bit."""
    soup = {}
    for key, first in states[0].items():
        if len(states) == 1:
            soup[key] = first.clone()
        elif first.is_floating_point() or first.is_complex():
            total = sum(state[key].double() if first.is_floating_point() else state[key].cdouble() for state in states)
            soup[key] = (total / len(states)).to(first.dtype)
        else:
            for index, state in enumerate(states[1:], 1):
                if not torch.equal(state[key], first):
                    raise ValueError(f"integer tensor {key} differs between ingredient 0 and {index}: such buffers "
                                     "cannot be averaged; a soup needs models fine-tuned from one start")  # fmt: skip
            soup[key] = first.clone()
    return soup


def greedy_soup(scores: Sequence[float], evaluate: Callable[[list[int]], float], higher_is_better: bool) -> tuple[list[int], float]:
    """Wortsman et al.'s greedy soup: (kept ingredient indices, the soup's metric). `scores`: each ingredient's
    metric; `evaluate(indices)` the metric of the uniform soup of those ingredients."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if higher_is_better else scores[i])
    kept, best = [order[0]], scores[order[0]]
    for index in order[1:]:
        value = evaluate([*kept, index])
        if (value > best) if higher_is_better else (value < best):
            kept, best = [*kept, index], value
    return kept, best


# -- held-out metrics -------------------------------------------------------------------------------------
def build_metric(kind: str, metric: str, args: argparse.Namespace, ingredient: str) -> Callable[[torch.nn.Module], float]:
    """model -> its held-out metric (see the module docstring)."""
    if not METRICS[kind]:
        raise ValueError(f"there is no held-out metric for an {kind} here: use --method uniform without --val")
    if metric not in METRICS[kind]:
        raise ValueError(f"--metric {metric} does not apply to a {kind}; use one of {', '.join(METRICS[kind])}")
    if kind == "vlm":
        if not args.tokenizer:
            raise ValueError("a VLM's metric needs --tokenizer DIR: the text tokenizer the ingredients were trained with")
        from vlm.text import load_text_tokenizer

        tokenizer = load_text_tokenizer(args.tokenizer)
        if metric == "scene_qa":
            from vlm.chat import Chat
            from vlm.evaluation import score_scenes

            return lambda model: score_scenes(Chat(model, tokenizer), args.scenes)["qa_exact_match"]["model"]
        from vlm.filter import mean_answer_nll

        limit = args.batches * args.batch_size if args.batches else None
        _need_val(args, "VLM shards made by `python -m vlm.prepare`")
        return lambda model: mean_answer_nll(model, tokenizer, args.val, args.batch_size, limit=limit)
    if kind == "lvm":
        return _lvm_loss(args, ingredient)
    return _reconstruction_psnr(args)


def _need_val(args: argparse.Namespace, what: str) -> None:
    if not args.val:
        raise ValueError(f"--val is needed for this metric: {what}")


def _lvm_loss(args: argparse.Namespace, ingredient: str) -> Callable[[torch.nn.Module], float]:
    import lightning as L

    from data.datamodule import TokenDataModule
    from lvm.module import LVMModule

    _need_val(args, "token shards (data.tokenize / the LVM's validation set)")
    module = LVMModule(init_from=ingredient)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per candidate

    def loss(model) -> float:
        module.model = model  # LVMModule's validation loop: token-weighted mean loss over the whole split
        data = TokenDataModule(args.val, val=args.val, seq_len=args.seq_len or model.config.max_position_embeddings,
                               batch_size=args.batch_size, num_workers=0)  # fmt: skip
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=args.batches or 1.0)  # fmt: skip
        return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])

    return loss


def _reconstruction_psnr(args: argparse.Namespace) -> Callable[[torch.nn.Module], float]:
    from data.images import ImageCrops
    from data.photos import embedded_photos
    from data.sources import list_images
    from tokenizer.images import reconstruction_psnr

    _need_val(args, "an image folder, or `embedded` for the embedded validation photos")
    images = embedded_photos("val") if args.val == "embedded" else list_images(args.val)
    if not images:
        raise ValueError(f"--val {args.val}: no images found (png, jpg, ...); give a folder of images, or `embedded`")
    if args.batches:
        images = images[: args.batches * args.batch_size]

    def score(model) -> float:
        crops = ImageCrops(images, model.config.resolution, train=False)  # each image resized and center-cropped
        pixels = torch.stack([crops[i] for i in range(len(crops))])  # [N, 3, R, R] in [0, 1]
        chunks = pixels.split(args.batch_size)
        return sum(reconstruction_psnr(model, chunk)[0] * len(chunk) for chunk in chunks) / len(pixels)

    return score


# -- the command ------------------------------------------------------------------------------------------
def make_soup(args: argparse.Namespace) -> dict:
    """Load, check, score and average the ingredients; write the soup and its table. Returns the table."""
    if len(set(args.ingredients)) != len(args.ingredients):
        raise ValueError("an ingredient is listed twice: each directory once (a soup weighs ingredients equally)")
    if Path(args.out).resolve() in {Path(path).resolve() for path in args.ingredients}:
        raise ValueError(f"--out {args.out} is an ingredient: write the soup into a new directory")
    loaded = [load_saved(path) for path in args.ingredients]
    kinds = {kind for kind, _ in loaded}
    if len(kinds) > 1:
        raise ValueError(f"the ingredients are of different kinds ({', '.join(sorted(kinds))}): a soup mixes one kind")
    kind, models = loaded[0][0], [model for _, model in loaded]
    check_ingredients(models, args.ingredients)
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()} for model in models]
    work = models[0]  # the model every candidate is evaluated in (its weights are overwritten)
    del models[1:]
    metric = args.metric or next(iter(METRICS[kind]), None)  # None: an AIM, which only soups uniformly
    rows = [{"candidate": path, "ingredients": [i], "metric": None} for i, path in enumerate(args.ingredients)]
    rows.append({"candidate": "uniform soup", "ingredients": list(range(len(states))), "metric": None})
    if args.method != "uniform" or args.val or metric == "scene_qa":
        evaluate_model = build_metric(kind, metric, args, args.ingredients[0])
        cache: dict[tuple[int, ...], float] = {}  # the greedy soup may revisit the uniform soup

        def evaluate(indices: list[int]) -> float:
            key = tuple(sorted(indices))
            if key not in cache:
                with torch.no_grad():
                    work.load_state_dict(average([states[i] for i in key]))
                cache[key] = evaluate_model(work.eval())
                print(f"{metric} {cache[key]:.4f}  " + " + ".join(args.ingredients[i] for i in key), file=sys.stderr)
            return cache[key]

        scores = [evaluate([i]) for i in range(len(states))]
        for row, value in zip(rows, scores, strict=False):
            row["metric"] = value
        rows[-1]["metric"] = evaluate(list(range(len(states))))
        kept, value = greedy_soup(scores, evaluate, HIGHER_IS_BETTER[metric])
        rows.append({"candidate": "greedy soup", "ingredients": sorted(kept), "metric": value})
        best = kept[0]  # greedy_soup starts from the best ingredient
        chosen = {"uniform": rows[-2], "greedy": rows[-1], "best": rows[best]}[args.method]
    else:
        chosen = rows[-1]
    with torch.no_grad():
        work.load_state_dict(average([states[i] for i in chosen["ingredients"]]))
    work.save_pretrained(args.out)
    table = {"kind": kind, "method": args.method, "metric": metric, "higher_is_better": HIGHER_IS_BETTER.get(metric),
             "written": {"path": str(args.out), **chosen}, "candidates": rows}  # fmt: skip
    write_table(Path(args.out), table, args.ingredients)
    return table


def table_lines(table: dict, names: Sequence[str]) -> list[str]:
    """The candidates' metrics as text: ingredients numbered #1.., soups listing theirs, '*' on the
    ingredients the greedy soup kept."""
    greedy = next((r["ingredients"] for r in table["candidates"] if r["candidate"] == "greedy soup"), [])
    direction = "higher" if table["higher_is_better"] else "lower"
    header = f"{table['metric']} ({direction} is better)" if table["metric"] else "metric"
    lines = [f"{'candidate':<60}{header:>28}"]
    for row in table["candidates"]:
        value = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        numbers = " ".join(f"#{i + 1}" for i in row["ingredients"])
        if row["candidate"].endswith("soup"):
            name = f"{row['candidate']} of {numbers}"
        else:
            kept = " *" if row["ingredients"][0] in greedy else ""
            name = f"{numbers} {_tail(row['candidate'], 52)}{kept}"
        lines.append(f"{name:<60}{value:>28}")
    lines.append(f"wrote the {table['method']} soup to {table['written']['path']}" + (" (* kept by the greedy soup)" if greedy else ""))
    return lines


def _tail(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def write_table(out: Path, table: dict, names: Sequence[str]) -> None:
    with atomic_path(out / "soup.json") as tmp:
        Path(tmp).write_text(json.dumps(table, indent=2))
    greedy = next((r["ingredients"] for r in table["candidates"] if r["candidate"] == "greedy soup"), [])
    with atomic_path(out / "soup.csv") as tmp, open(tmp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["candidate", "ingredients", table["metric"] or "metric", "kept_by_greedy"])
        for row in table["candidates"]:
            single = len(row["ingredients"]) == 1 and not row["candidate"].endswith("soup")
            writer.writerow([row["candidate"], " ".join(names[i] for i in row["ingredients"]),
                             "" if row["metric"] is None else row["metric"],
                             (row["ingredients"][0] in greedy) if single and greedy else ""])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ingredients", nargs="+", required=True, help="saved model directories of one kind and config")
    parser.add_argument("--out", required=True, help="directory to write the soup (save_pretrained), soup.csv, soup.json")
    parser.add_argument("--method", choices=METHODS, default="greedy", help="greedy (default), uniform or best")
    parser.add_argument("--val", help="held-out data for the metric (see below); optional for --method uniform")
    parser.add_argument("--metric", choices=list(HIGHER_IS_BETTER), help="the held-out metric (default: the kind's first; see below)")
    parser.add_argument("--tokenizer", help="a VLM's text tokenizer directory (VLM metrics)")
    parser.add_argument("--batches", type=int, help="score only this many batches of --val (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples / rows / images per batch (16)")
    parser.add_argument("--scenes", type=int, default=40, help="held-out scenes for --metric scene_qa (40)")
    parser.add_argument("--seq-len", type=int, help="an LVM's validation row length (default: its positions)")
    args = parser.parse_args(argv)
    try:
        table = make_soup(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print("\n".join(table_lines(table, args.ingredients)))
    return table


if __name__ == "__main__":
    main()
