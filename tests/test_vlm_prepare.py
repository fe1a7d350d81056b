"""VLM data formats to shards and back (vlm/formats.py, vlm/prepare.py): round trip, bad samples, resume, ranks."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.shards import list_shards
from vlm.formats import BadSample, SkipStats
from vlm.prepare import iter_shard_samples, main, prepare, read_manifest


def encoded(seed, fmt="PNG", size=(24, 16), mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def conversation(id, image, *turns):
    record = {"id": id, "conversations": [{"from": f, "value": v} for f, v in turns]}
    return record if image is None else {**record, "image": image}


GOOD = [
    conversation("one", "a.png", ("human", "<image>\nWhat is it?"), ("gpt", "noise"), ("human", "Sure?"), ("gpt", "yes")),
    conversation("two", ["sub/b.jpg", "a.png"], ("system", "Be brief."), ("human", "<image> vs <image>\nSame?"), ("gpt", "no")),
    conversation("text-only", None, ("human", "Say hi."), ("gpt", "hi")),
    conversation("gray", "c.png", ("human", "<image>\nMode?"), ("gpt", "L")),
]


@pytest.fixture
def llava(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(encoded(0))
    (images / "sub" / "b.jpg").write_bytes(encoded(1, "JPEG"))
    (images / "c.png").write_bytes(encoded(2, mode="L"))
    (images / "broken.jpg").write_bytes(encoded(3, "JPEG")[:200])
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(GOOD))
    return path, images


def read_all(out, decode=False, stats=None):
    stats = SkipStats() if stats is None else stats
    return [pair for shard in list_shards(out) for pair in iter_shard_samples(shard, stats, decode=decode)]


def test_llava_json_to_shards_and_back_unchanged(llava, tmp_path):
    path, images = llava
    manifest = prepare([f"llava:{path}:{images}"], tmp_path / "out", shard_size=3, progress=False)
    assert (manifest["shards"], manifest["samples"], manifest["images"], manifest["skipped"]) == (2, 4, 4, {})
    assert manifest["per_kind"] == {"conversation": 3, "text": 1} and manifest["per_source"] == {"llava": 4}
    back = read_all(tmp_path / "out")
    assert [s["id"] for s, _ in back] == [r["id"] for r in GOOD]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for (sample, stored), record in zip(back, GOOD, strict=True):
        assert sample["turns"] == [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
        names = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        assert stored == [(images / n).read_bytes() for n in names]  # the original encoded bytes
        assert sample["num_images"] == len(names)
    plain = [s for shard in list_shards(tmp_path / "out") for s in wds.WebDataset(str(shard), shardshuffle=False)]
    assert [json.loads(s["json"])["id"] for s in plain] == [r["id"] for r in GOOD]  # any webdataset reader reads them
    assert plain[1]["0.jpg"] == (images / "sub" / "b.jpg").read_bytes() and plain[1]["1.png"] == (images / "a.png").read_bytes()
    decoded = read_all(tmp_path / "out", decode=True)
    assert [im.format for im in decoded[1][1]] == ["JPEG", "PNG"] and decoded[3][1][0].mode == "L"
    assert np.array_equal(np.asarray(decoded[0][1][0]), np.asarray(Image.open(images / "a.png")))


def test_bad_samples_skipped_with_reasons_or_raised_in_strict_mode(llava, tmp_path, caplog):
    path, images = llava
    bad = [
        conversation("missing", "nowhere.png", ("human", "<image>\nQ"), ("gpt", "A")),
        conversation("no-marker", "a.png", ("human", "What is it?"), ("gpt", "A")),
        conversation("too-many", "a.png", ("human", "<image><image>\nQ"), ("gpt", "A")),
        conversation("corrupt", "broken.jpg", ("human", "<image>\nQ"), ("gpt", "A")),
        {"id": "not-a-conversation"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in [*GOOD, *bad]))  # JSONL this time
    manifest = prepare([f"llava:{path}:{images}"], tmp_path / "out", shard_size=4, progress=False)
    assert manifest["samples"] == 4
    expected = {"missing_image": 1, "no_image_placeholder": 1, "too_many_placeholders": 1, "corrupt_image": 1, "bad_record": 1}
    assert manifest["skipped"] == expected and manifest["skipped_per_source"] == {"llava": expected}
    assert sum("skipped: sample 'missing' of llava: image" in r.getMessage() for r in caplog.records) == 1
    for record, reason in zip(bad[:4], ["does not exist", "no <image> in the text", "2 <image> placeholders but 1", "cannot be decoded"], strict=True):
        path.write_text(json.dumps([record]))
        with pytest.raises(BadSample, match=reason):
            prepare([f"llava:{path}:{images}"], tmp_path / f"strict-{record['id']}", strict=True, progress=False)


def test_resume_ranks_and_settings(tmp_path):
    out = tmp_path / "out"
    spec = ["scenes:6:train:32", "photos:val"]
    parts = [prepare(spec, out, shard_size=8, rank=r, world_size=3, progress=False) for r in (2, 0)]
    assert parts[0]["shards"] < parts[1]["shards"] < 6  # rank 1's shards are still missing
    mtimes = {p.name: p.stat().st_mtime_ns for p in list_shards(out)}
    full = main(["--source", spec[0], "--source", spec[1], "--out", str(out), "--shard-size", "8", "--rank", "1", "--world-size", "3"])
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(out) if p.name in mtimes} == mtimes  # not rewritten
    whole = prepare(spec, tmp_path / "whole", shard_size=8, progress=False)
    assert full["samples"] == whole["samples"] == read_manifest(out)["samples"] and full["shards"] == whole["shards"]
    assert [s for s, _ in read_all(out)] == [s for s, _ in read_all(tmp_path / "whole")]
    with pytest.raises(ValueError, match="same sources and shard size"):
        prepare(spec, out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="KIND:SPEC"):
        prepare(["nonsense:x"], tmp_path / "other", progress=False)


def test_caption_folder_table_tars_and_interleaved(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encoded(i))
        if i < 2:
            (folder / f"{i}.txt").write_text(f"caption {i}\n")
    with open(tmp_path / "pairs.tsv", "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerows([["filepath", "title"], ["folder/0.png", "a tsv caption"], ["folder/missing.png", "x"]])
    with open(tmp_path / "pairs.tar", "wb") as stream, wds.TarWriter(stream) as writer:
        writer.write({"__key__": "000", "jpg": encoded(5, "JPEG"), "txt": "from a tar", "json": {"url": "x"}})
        writer.write({"__key__": "001", "txt": "no image"})
    doc = {"text_list": ["First.", "Second."], "image_info": [{"image_name": "folder/1.png", "matched_text_index": 1}]}
    obelics = {"id": "obelics", "texts": ["Look:", None, "done."], "images": [None, "folder/0.png", None]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps(obelics) + "\n")
    sources = [f"captions:{folder}", f"table:{tmp_path / 'pairs.tsv'}", f"tars:{tmp_path / 'pairs.tar'}", f"mmc4:{tmp_path / 'docs.jsonl'}"]
    manifest = prepare(sources, tmp_path / "out", progress=False)
    assert manifest["skipped"] == {"missing_caption": 1, "missing_image": 2}
    samples = {s["id"]: (s, im) for s, im in read_all(tmp_path / "out")}
    assert samples["0"][0]["turns"] == [{"role": "text", "content": "<image>\ncaption 0"}]
    assert samples["0"][1] == [(folder / "0.png").read_bytes()]
    assert samples["pairs-2"][0]["turns"][0]["content"] == "<image>\na tsv caption"
    assert samples["000"][0]["kind"] == "caption" and samples["000"][1] == [encoded(5, "JPEG")]
    doc_sample, doc_images = samples["docs-1"]
    assert doc_sample["turns"] == [{"role": "text", "content": "First. <image>\nSecond."}] and doc_images == [(folder / "1.png").read_bytes()]
    assert samples["obelics"][0]["turns"][0]["content"] == "Look: <image>\ndone." and samples["obelics"][0]["kind"] == "interleaved"


def test_reading_damaged_shards_skips_and_counts(tmp_path):
    prepare(["scenes:3:train:32"], tmp_path / "out", progress=False)
    shard = list_shards(tmp_path / "out")[0]
    count = len(read_all(tmp_path / "out"))
    members = [(info, tarfile.open(shard).extractfile(info).read()) for info in tarfile.open(shard)]
    with tarfile.open(tmp_path / "damaged.tar", "w") as tar:
        for info, data in members:
            if info.name.endswith(".png") and info.name.startswith("000000001."):
                data = data[:50]  # a corrupt image
            if info.name == "000000002.0.png":
                continue  # a missing image
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats = SkipStats()
    assert len(list(iter_shard_samples(tmp_path / "damaged.tar", stats))) == count - 2
    assert stats == {"corrupt_image": 1, "missing_image": 1}
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stats = SkipStats()
    assert 0 < len(list(iter_shard_samples(tmp_path / "cut.tar", stats))) < count and stats["corrupt_shard"] == 1
