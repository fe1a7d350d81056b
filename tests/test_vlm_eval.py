"""scripts/vlm_eval.py and vlm.benchmark: both layouts read, scores per task and type, bad images left out
and counted, results.json and grids written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm import benchmark
from vlm.scenes import write_eval_folder

ROOT = Path(__file__).resolve().parents[1]


def test_scores_per_task_and_type_by_hand(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    records = [
        {"id": "a", "image": "x.png", "question": "Colour?", "answers": ["red"] * 3 + ["blue"] * 7, "type": "color"},
        {"id": "b", "image": "x.png", "question": "How many?", "answer": "2", "type": "count"},
        {"id": "c", "image": "x.png", "question": "Shape?", "options": ["circle", "square"], "answer": "B"},
        {"id": "d", "image": "x.png", "question": "Shape?", "options": ["circle", "square"], "answer": 0},
        {"id": "e", "image": "x.png", "captions": ["a red circle"]},
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = benchmark.read_eval_set(tmp_path)
    assert [i.task for i in items] == ["vqa", "vqa", "choice", "choice", "caption"]
    scores = benchmark.score(items, ["Red", "two", "(B)", "square", "a red circle"])
    assert scores["vqa"]["per_type"]["color"]["accuracy"] == pytest.approx(0.9)  # 3 of 10 humans agree
    assert scores["vqa"]["per_type"]["count"]["accuracy"] == 1.0  # "two" -> "2"
    assert scores["vqa"]["accuracy"] == pytest.approx(0.95) and scores["vqa"]["count"] == 2
    assert scores["choice"]["accuracy"] == 0.5  # "(B)" is right, "square" is not option A
    assert scores["caption"]["bleu_1"] == pytest.approx(1.0) and scores["caption"]["rouge_l"] == pytest.approx(1.0)
    assert any(line.strip().startswith("color") for line in benchmark.tables(scores))


def test_bad_records_are_refused_naming_them(tmp_path):
    (tmp_path / "questions.jsonl").write_text(json.dumps({"image": "x.png", "question": "Q?", "options": ["a"], "answer": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1: answer 'C' is none of the 1 options"):
        benchmark.read_eval_set(tmp_path)
    (tmp_path / "questions.jsonl").write_text('{"image": "x.png", "question": "Q?", "answer": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="record 2 is not a JSON object line"):
        benchmark.read_eval_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no questions.jsonl"):
        benchmark.read_eval_set(tmp_path / "..")


def test_llava_json_pairs_become_questions(tmp_path):
    record = {"id": "7", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]}  # fmt: skip
    (tmp_path / "set.json").write_text(json.dumps([record]))
    items = benchmark.read_eval_set(tmp_path / "set.json")
    assert [(i.id, i.question, i.answers, i.image) for i in items] == [
        ("7-0", "What colour?", ["red"], tmp_path / "img.png"), ("7-1", "And the shape?", ["circle"], tmp_path / "img.png")]


@pytest.mark.slow
def test_script_end_to_end_leaves_out_bad_images(tmp_path, vlm_dir):
    data = tmp_path / "scenes"
    questions = write_eval_folder(data, 2)
    (data / "images" / "bad.png").write_text("not an image")
    with questions.open("a") as file:
        for name in ("missing.png", "bad.png"):
            file.write(json.dumps({"id": name, "image": f"images/{name}", "question": "What?", "answer": "x"}) + "\n")
    total = len(questions.read_text().splitlines())
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "scripts.vlm_eval", "--model", vlm_dir, "--data", data, "--out", out,
                          "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["questions"] == total and result["scored"] == total - 2 and result["left_out"] == 2
    assert result["left_out_by_reason"] == {"missing_image": 1, "corrupt_image": 1}
    assert "left out missing.png" in run.stderr and "left out bad.png" in run.stderr
    assert {"vqa", "choice", "caption"} == set(result["scores"]) and "count" in result["scores"]["vqa"]["per_type"]
    assert len(result["predictions"]) == total - 2
    for task in ("vqa", "choice", "caption"):
        assert Image.open(out / f"grid_{task}.png").size[1] > 20
    assert "scored" in run.stdout and "cider_d" in run.stdout
