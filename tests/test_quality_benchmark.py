"""The quality benchmark (benchmarks/quality.py) end to end on a tiny model: every kind of row, both texts side
by side, outputs consistent with a direct recomputation."""

import json
import sys
from pathlib import Path

import pytest
from test_evaluation import save_tiny_model

from optimum_edkm import data, models
from optimum_edkm.evaluation import evaluate_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import quality  # noqa: E402
import quality_methods  # noqa: E402


def test_quality_harness_runs_every_kind_of_row_on_both_texts(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    monkeypatch.setenv("OPTIMUM_EDKM_CACHE", str(tmp_path / "cache"))  # teacher text and texts stay in tmp

    (tmp_path / "eval.txt").write_text(topics["assert"] + topics["pass"], encoding="utf-8")
    (tmp_path / "ood.txt").write_text(
        topics["lambda"][:600] + " The river ran past the old mill at dawn.", encoding="utf-8"
    )
    (tmp_path / "calib.txt").write_text(topics["del"] + topics["global"], encoding="utf-8")
    save_tiny_model(tmp_path / "model", topics["assert"] + topics["lambda"])
    outputs = {"json": tmp_path / "r.json", "table": tmp_path / "t.md", "plot": tmp_path / "p.png"}
    methods = ("rtn", "gptq", "awq", "kmeans-channel", "skm-g16", "ptq-channel", "edkm-tensor")
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--text",
        str(tmp_path / "eval.txt"),
        "--ood-text",
        str(tmp_path / "ood.txt"),
        "--calib-text",
        str(tmp_path / "calib.txt"),
        "--bits",
        "2",
        "3",
        "--group-size",
        "32",
        "--eval-tokens",
        "200",
        "--context-length",
        "64",
        "--recipe-calibration-samples",
        "4",
        "--recipe-calibration-seq-len",
        "32",
        "--recipe-teacher-share",
        "0.5",
        "--methods",
        *methods,
        "fp-finetuned",
        "--recipe-block-epochs",
        "1",
        "--recipe-steps",
        "2",
        "--recipe-batch-size",
        "2",
        "--recipe-seq-len",
        "32",
        "--no-progress",
    ] + [a for key, path in outputs.items() for a in (f"--{key}", str(path))]
    results = quality.run(quality.parse_args(argv))

    rows = {(r["method"], r["bits"]): r for r in results["rows"]}
    assert set(rows) == {("fp", None), ("fp-finetuned", None)} | {(m, b) for m in methods for b in (2, 3)}
    assert len(results["rows"]) == len(rows)  # the float reference runs once, not per bit width
    for row in rows.values():  # palettized weights are packed buffers, still counted
        assert row["model_parameters"] == rows["fp", None]["model_parameters"]
        assert set(row["perplexity"]) == {"in_domain", "out_of_domain"}
    tuned = rows["fp-finetuned", None]
    assert tuned["bits_per_weight_model"] == 16
    assert tuned["perplexity"]["in_domain"] != rows["fp", None]["perplexity"]["in_domain"]
    # one fp16 LUT of 2**bits entries per output channel of every decoder linear, 64 or 128 inputs wide
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    for b in (2, 3):
        expected = sum(o * i * b + o * 2**b * 16 for o, i in shapes) / sum(o * i for o, i in shapes)
        assert rows["kmeans-channel", b]["bits_per_weight_linears"] == pytest.approx(expected)
        # one LUT per 16 rows plus an fp16 scale per row
        grouped = sum(o * i * b + (o // 16) * 2**b * 16 + o * 16 for o, i in shapes) / sum(o * i for o, i in shapes)
        assert rows["skm-g16", b]["bits_per_weight_linears"] == pytest.approx(grouped)
        assert rows["skm-g16", b]["report"]["settings"]["start"] == "fisher"
        assert rows["ptq-channel", b]["report"]["settings"]["start"] == "post_training"
        assert rows["ptq-channel", b]["bits_per_weight_linears"] == pytest.approx(expected)
        trained = rows["edkm-tensor", b]["report"]
        assert trained["settings"]["steps"] == 2 and trained["settings"]["block_epochs"] == 1
        assert list(trained["details"]["stages"]) == [
            "float model and teacher text",
            "start",
            "block-wise reconstruction",
            "end-to-end distillation",
            "palettize and measure",
        ]
        assert trained["details"]["stages"]["end-to-end distillation"]["steps"] == 2
    # every method calibrated on the same windows: 2 of the calibration text and 2 of the float model's samples
    assert results["settings"]["calib_samples"] == 4 and results["settings"]["calib_seq_len"] == 32
    model, tokenizer, _ = models.load_causal_lm(str(tmp_path / "model"))
    for label, path in (("in_domain", "eval.txt"), ("out_of_domain", "ood.txt")):
        ids = data.load_text(str(tmp_path / path)).token_ids(tokenizer, max_tokens=200)
        assert rows["fp", None]["perplexity"][label] == pytest.approx(
            evaluate_perplexity(model, ids, context_length=64, progress=False).perplexity, rel=1e-6
        )
    assert rows["rtn", 3]["bits_per_weight_linears"] == pytest.approx(3 + 32 / 32)
    assert json.loads(outputs["json"].read_text()) == json.loads(json.dumps(results))
    table = outputs["table"].read_text()
    assert table.count("\n| ") == 1 + len(rows) and "eval.txt" in table and "ood.txt" in table
    assert outputs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_quality_harness_refuses_the_same_text_for_evaluation_and_calibration(tmp_path):
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    args = quality.parse_args(
        ["--text", str(tmp_path / "t.txt"), "--calib-text", str(tmp_path / "t.txt"), "--output-root", str(tmp_path)]
    )
    with pytest.raises(ValueError, match="calibration text are the same"):
        quality.run(args)
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "nothing"])
    with pytest.raises(SystemExit):
        quality.parse_args(["--recipe-distillation-weight", "2"])


def test_register_method_checks_its_arguments():
    with pytest.raises(ValueError, match="other than 'fp'"):
        quality_methods.register_method("fp", lambda *a: None)
    with pytest.raises(TypeError, match="callable"):
        quality_methods.register_method("x", 3)
