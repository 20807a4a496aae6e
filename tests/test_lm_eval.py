"""lm-evaluation-harness (real library) on a palettized model loaded in memory, over local tasks built from
the offline help topics: no network, and the scores equal a recomputation from the model's own logits."""

import json
import math
import socket

import pytest
import torch
from tiny_text_model import help_topic_texts, save_tiny_text_model

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed: pip install 'optimum-edkm[eval]'"
)

MAX_LENGTH = 512


@pytest.fixture
def no_network(monkeypatch):
    """Every connection to a non-loopback address is refused and recorded."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(address)
            raise OSError("network access is disabled in this test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return attempts


@pytest.fixture(scope="module")
def palettized_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_edkm
    from optimum_edkm import EDKMConfig

    train, _ = help_topic_texts()
    folder = save_tiny_text_model(tmp_path_factory.mktemp("tiny-lm"), train)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=EDKMConfig(bits=3))
    optimum_edkm.palettize(model)
    saved = optimum_edkm.save_pretrained(model, str(tmp_path_factory.mktemp("palettized")))
    return AutoModelForCausalLM.from_pretrained(saved).eval(), AutoTokenizer.from_pretrained(folder)


def _continuation_logprob(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0]
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return float(logprobs[positions, torch.tensor(continuation_ids)].sum())


def test_lm_eval_scores_a_palettized_model_offline_as_its_own_logits_do(palettized_model, tmp_path, no_network):
    from optimum_edkm.evaluation.harness import MC_TASK, PPL_TASK, run_lm_eval, write_help_topic_tasks

    model, tokenizer = palettized_model
    files = write_help_topic_tasks(tmp_path / "tasks", max_items=6)
    assert files.multiple_choice_items == files.perplexity_documents == 6
    results = run_lm_eval(model, tokenizer, include_path=files.folder, max_length=MAX_LENGTH)["results"]
    assert no_network == []

    items = [json.loads(line) for line in open(f"{files.folder}/{MC_TASK}.jsonl")]
    correct = correct_norm = 0
    for item in items:
        context = tokenizer.encode(item["context"], add_special_tokens=False)
        scores = []
        for choice in item["choices"]:
            whole = tokenizer.encode(item["context"] + " " + choice, add_special_tokens=False)
            assert whole[: len(context)] == context and len(whole) <= MAX_LENGTH
            scores.append(_continuation_logprob(model, context, whole[len(context) :]))
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
        normalised = [s / len(c) for s, c in zip(scores, item["choices"])]
        correct_norm += max(range(len(scores)), key=normalised.__getitem__) == item["label"]
    assert results[MC_TASK]["acc,none"] == pytest.approx(correct / len(items))
    assert results[MC_TASK]["acc_norm,none"] == pytest.approx(correct_norm / len(items))

    documents = [json.loads(line)["text"] for line in open(f"{files.folder}/{PPL_TASK}.jsonl")]
    total_logprob, total_bytes = 0.0, 0
    for document in documents:
        tokens = tokenizer.encode(document, add_special_tokens=False)
        assert len(tokens) < MAX_LENGTH  # one rolling window per document
        total_logprob += _continuation_logprob(model, [tokenizer.bos_token_id], tokens)
        total_bytes += len(document.encode("utf-8"))
    assert results[PPL_TASK]["bits_per_byte,none"] == pytest.approx(
        -total_logprob / total_bytes / math.log(2), rel=1e-4
    )


def test_task_items_hold_the_true_continuation_once_and_no_paragraph_of_the_training_split():
    from optimum_edkm.data import CALIBRATION_SPLIT, EVALUATION_SPLIT, load_text
    from optimum_edkm.evaluation.harness import multiple_choice_items, paragraphs

    held_out = paragraphs(load_text(split=EVALUATION_SPLIT).documents)
    training = set(paragraphs(load_text(split=CALIBRATION_SPLIT).documents))
    assert len(held_out) > 50 and not training & set(held_out)
    items = multiple_choice_items(held_out, choices=4, seed=0)
    for paragraph, item in zip(held_out, items):
        truth = item["choices"][item["label"]]
        assert item["context"] + " " + truth == paragraph
        assert item["choices"].count(truth) == 1 and len(item["choices"]) == 4
    labels = [item["label"] for item in items]
    assert {0, 1, 2, 3} == set(labels)  # the answer is not always in the same place
    assert multiple_choice_items(held_out, seed=0) == items


def test_run_lm_eval_names_a_missing_task_folder(palettized_model, tmp_path):
    from optimum_edkm.evaluation.harness import run_lm_eval

    with pytest.raises(FileNotFoundError, match="write_help_topic_tasks"):
        run_lm_eval(*palettized_model, include_path=str(tmp_path / "missing"))


def test_the_evaluate_library_needs_the_hub_for_its_metrics(no_network, tmp_path, monkeypatch):
    """What docs/workflows.md says: evaluate's wheel ships no metric script, so evaluate.load("accuracy")
    cannot work offline (lm-eval's own metrics are used instead)."""
    evaluate = pytest.importorskip("evaluate", reason="evaluate is not installed: pip install 'optimum-edkm[eval]'")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, ConnectionError, OSError)):
        evaluate.load("accuracy")
