"""vlm/lmms.py: our VLM runs lmms-eval tasks, offline, on a tiny local task (a task YAML and a JSON lines file).

The adapter's own logic is checked without lmms-eval; the end-to-end test needs the optional extra
(`pip install -e '.[lmms]'`) and skips, saying so, where lmms_eval is not importable. It runs a generate_until
task only: lmms-eval 0.7.3's evaluator turns every loglikelihood result into a string
(`unwrap_generation_output` -> `str((loss, greedy))`), so its multiple_choice tasks fail for any model with
"too many values to unpack"; `loglikelihood` is checked directly below."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.chat import Chat
from vlm.lmms import cut_at_stops, loglikelihood, user_turn

ROOT = Path(__file__).resolve().parents[1]
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
QUESTIONS = ["What colour is it?", "How many shapes?"]


def test_prompts_and_stop_strings():
    assert user_turn("Q?", ["x", "y"]) == [{"role": "user", "content": "<image>\n<image>\nQ?"}]
    assert user_turn("<image> then Q?", ["x"]) == [{"role": "user", "content": "<image> then Q?"}]  # the task placed it
    assert cut_at_stops("red\nQuestion: blue", ["\n", "Question:"]) == "red"
    assert cut_at_stops("red", []) == "red"


def test_loglikelihood_scores_the_continuation_tokens_after_the_prompt(vlm_dir):
    """Catches an off-by-one between the prompt and the continuation: a one-token continuation's loss is minus
    the prompt-only forward's last log-softmax at that token, and it is greedy exactly when it is the argmax."""
    chat = Chat.load(str(vlm_dir))
    image = Image.open(vlm_dir / "red.png")
    ids, pixels = chat.prompt_ids(user_turn(QUESTIONS[0], [image]), [image])
    with torch.no_grad():
        last = chat.vlm(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].log_softmax(-1)

    def clean(token):  # a token whose text encodes back to it alone (not a piece of a UTF-8 character)
        return chat.tokenizer(chat.tokenizer.decode([token]), add_special_tokens=False)["input_ids"] == [token]

    ranked = [t for t in last.argsort(descending=True).tolist() if clean(t)]
    best, worse = ranked[0], ranked[-1]
    docs = {"t": {"test": [{"image": image}]}}
    requests = [(QUESTIONS[0], chat.tokenizer.decode([t]), lambda doc: [doc["image"]], 0, "t", "test") for t in (best, worse)]
    (best_nll, best_greedy), (worse_nll, worse_greedy) = loglikelihood(chat, requests, docs)
    assert best_nll == pytest.approx(-float(last[best]), abs=1e-4) and worse_nll == pytest.approx(-float(last[worse]), abs=1e-4)
    assert best_greedy == (best == int(last.argmax())) and not worse_greedy


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (the optional extra: pip install -e '.[lmms]')")
def test_lmms_eval_runs_a_local_task_offline(vlm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from vlm.lmms import MODEL_ID, manifest

    if MODEL_ID not in MODEL_REGISTRY_V2.list_model_names():  # the project is not pip-installed: no entry point
        MODEL_REGISTRY_V2.register_manifest(manifest())
    chat = Chat.load(str(vlm_dir))
    image = Image.open(vlm_dir / "red.png")
    expected = chat.answer([image, image], QUESTIONS, max_new_tokens=4)
    # the first document's truth is what the model answers, the second's is not: exact match 1/2
    docs = [{"image": str(vlm_dir / "red.png"), "question": q, "answer": a}
            for q, a in zip(QUESTIONS, [expected[0], expected[1] + " never"], strict=True)]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "utils.py").write_text("from PIL import Image\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image'])]\n")
    (tmp_path / "tiny.yaml").write_text(f"""task: lvm_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "data.jsonl"}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    results = simple_evaluate(model=MODEL_ID, model_args=f"model={vlm_dir}", tasks=["lvm_tiny_vqa"],
                              task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)  # fmt: skip
    assert results["results"]["lvm_tiny_vqa"]["exact_match,none"] == pytest.approx(0.5)
    answers = [s["filtered_resps"][0] for s in sorted(results["samples"]["lvm_tiny_vqa"], key=lambda s: s["doc_id"])]
    assert answers == expected
