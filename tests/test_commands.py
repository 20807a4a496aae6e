"""The command line: ``optimum-edkm`` and, through optimum's registration namespace, ``optimum-cli edkm`` /
``optimum-cli export coreml-edkm`` (real optimum, real subprocesses where the entry point matters)."""

import json
import os
import subprocess
import sys

import pytest
from tiny_text_model import help_topic_texts, save_tiny_text_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    """The worktree first on the path (the editable install may point elsewhere), offline, one thread."""
    path = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    train, held_out = help_topic_texts()
    (folder / "train.txt").write_text(train, encoding="utf-8")
    (folder / "eval.txt").write_text(held_out, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, texts):
    train, _ = help_topic_texts()
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-lm"), train)


def _compress_argv(model, texts, output, *extra):
    return [
        "compress",
        "--model",
        model,
        "--output",
        str(output),
        "--train-text",
        str(texts / "train.txt"),
        "--eval-text",
        str(texts / "eval.txt"),
        "--context-length",
        "64",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--calibration-samples",
        "4",
        "--calibration-seq-len",
        "64",
        "--no-progress",
        *extra,
    ]


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_edkm  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _perplexity(model, tokenizer, path, context_length=64):
    from optimum_edkm.data import load_text
    from optimum_edkm.evaluation import evaluate_perplexity

    ids = load_text(str(path)).token_ids(tokenizer)
    return evaluate_perplexity(model, ids, context_length=context_length, progress=False).perplexity


# --------------------------------------------------------------------------------------------- optimum-cli
def test_optimum_cli_lists_the_edkm_commands_and_the_coreml_export():
    pytest.importorskip("optimum.commands.base", reason="optimum is not installed (pip install optimum-edkm[optimum])")
    cli = [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()"]
    root = subprocess.run(cli + ["--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert root.returncode == 0, root.stderr
    assert "edkm" in root.stdout
    edkm = subprocess.run(cli + ["edkm", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert "compress" in edkm.stdout and "evaluate" in edkm.stdout
    export = subprocess.run(cli + ["export", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert "coreml-edkm" in export.stdout
    compress = subprocess.run(
        cli + ["edkm", "compress", "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert "--bits" in compress.stdout and "--output" in compress.stdout and "--steps" in compress.stdout
    assert "register" not in root.stderr  # no warning about an __init__.py in the namespace


def test_the_registration_module_imports_neither_torch_nor_the_package():
    pytest.importorskip("optimum.commands.base", reason="optimum is not installed (pip install optimum-edkm[optimum])")
    probe = (
        "import sys, optimum.commands.register.register_edkm as r; r.EDKMCompressCommand.parse_args("
        "__import__('argparse').ArgumentParser()); "
        "print(sorted(m for m in ('torch', 'transformers', 'optimum_edkm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_coreml_entry_point_parses_the_same_options_into_the_same_namespace(monkeypatch):
    """``optimum-edkm export coreml``, ``optimum-edkm-coreml`` and ``optimum-cli export coreml-edkm`` are built from
    one declaration (commands/arguments.py) and hand the same parsed options to the same runner."""
    import argparse

    from optimum_edkm.commands import cli
    from optimum_edkm.commands.arguments import add_coreml_export_arguments

    seen = []
    monkeypatch.setattr(cli, "run_coreml", lambda args: seen.append(vars(args)) or 0)
    argv = ["saved", "out.mlpackage", "--seq-len", "32", "--no-tensors", "--overwrite", "--target", "iOS26"]
    assert cli.main(["export", "coreml", *argv]) == 0
    assert cli.coreml_main(argv) == 0  # the short form
    assert cli.coreml_main(["export", *argv]) == 0  # 0.2's subcommand name
    optimum_cli = argparse.ArgumentParser()
    add_coreml_export_arguments(optimum_cli)  # what register_edkm.py declares for coreml-edkm
    seen.append(vars(optimum_cli.parse_args(argv)))
    first = {k: v for k, v in seen[0].items() if k != "command"}
    assert all({k: v for k, v in other.items() if k != "command"} == first for other in seen[1:])
    assert first["coreml_command"] == "export" and first["seq_len"] == 32 and first["target"] == "iOS26"
    assert cli.coreml_main(["verify", "p.mlpackage", "--model", "saved"]) == 0
    assert seen[-1]["coreml_command"] == "verify" and seen[-1]["model"] == "saved"


# --------------------------------------------------------------------------------------------- compress
def test_compress_from_optimum_cli_writes_a_palettized_model_whose_report_matches_a_recomputation(
    tiny_model_dir, texts, tmp_path
):
    pytest.importorskip("optimum.commands.base", reason="optimum is not installed (pip install optimum-edkm[optimum])")
    from optimum_edkm import PalettizedLinear, size_report
    from optimum_edkm.models import load_causal_lm

    output = tmp_path / "out"
    cli = [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()", "edkm"]
    result = subprocess.run(
        cli + _compress_argv(tiny_model_dir, texts, output, "--bits", "3", "--steps", "2", "--ood-text", "none"),
        capture_output=True,
        text=True,
        env=dict(_env(), OPTIMUM_EDKM_CACHE=str(tmp_path / "cache")),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "compress_report.json").read_text())
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["float model", "post-training start, 3-bit", "trained, 3-bit"]
    assert report["config"]["group_size"] == 1  # the main job's layout: one LUT per output channel
    assert "| trained, 3-bit |" in result.stdout  # the summary table
    assert report["stages"]["end-to-end distillation"]["steps"] == 2
    assert report["recipe"]["steps"] == 2 and report["recipe"]["seq_len"] == 32

    model, tokenizer = _load(str(output))
    assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)
    assert model.config.quantization_config.bits == 3
    rows = {row["label"]: row["perplexity"]["in-domain"] for row in report["rows"]}
    assert rows[labels[-1]] == pytest.approx(_perplexity(model, tokenizer, texts / "eval.txt"), rel=1e-5)
    assert report["size"]["theoretical_bytes"] == size_report(model)["theoretical_bytes"]
    float_model, float_tokenizer, _ = load_causal_lm(tiny_model_dir)
    assert rows["float model"] == pytest.approx(_perplexity(float_model, float_tokenizer, texts / "eval.txt"), rel=1e-5)
    float_bytes = sum(p.numel() * p.element_size() for p in float_model.state_dict().values())
    assert report["float_size"]["model_bytes"] == float_bytes
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".edkm-")]  # no scratch folders left


def test_compress_keeps_the_recipe_defaults_for_options_not_given(tiny_model_dir, texts, tmp_path, monkeypatch):
    import dataclasses

    import optimum_edkm
    from optimum_edkm.commands import main
    from optimum_edkm.pipeline import DEFAULT_RECIPE

    recipes = []

    def spy(model, config, recipe, data, **kwargs):
        recipes.append(recipe)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(optimum_edkm.pipeline, "compress", spy)
    argv = _compress_argv(tiny_model_dir, texts, tmp_path / "out", "--no-eval", "--learning-rate", "0.002")
    with pytest.raises(RuntimeError, match="stop after the call"):
        main(argv + ["--steps", "1", "--e2e-train", "lut"])
    (recipe,) = recipes
    given = {
        "learning_rate": 0.002,
        "steps": 1,
        "e2e_train": "lut",
        "seq_len": 32,
        "batch_size": 2,
        "calibration_samples": 4,
        "calibration_seq_len": 64,
    }
    assert recipe == dataclasses.replace(DEFAULT_RECIPE, **given)
    # --steps 0 alone: no training at all, the post-training start is the result
    with pytest.raises(RuntimeError, match="stop after the call"):
        main(argv + ["--steps", "0"])
    assert (recipes[-1].steps, recipes[-1].block_epochs) == (0, 0) and not recipes[-1].needs_teacher


def test_compress_with_zero_steps_saves_the_post_training_start_and_distillation_keeps_a_teacher(
    tiny_model_dir, texts, tmp_path, monkeypatch
):
    import optimum_edkm.finetune
    from optimum_edkm.commands import main

    monkeypatch.setenv("OPTIMUM_EDKM_CACHE", str(tmp_path / "cache"))
    argv = _compress_argv(
        tiny_model_dir, texts, tmp_path / "zero", "--steps", "0", "--block-epochs", "0", "--bits", "2"
    )
    assert main(argv + ["--ood-text", "none"]) == 0
    report = json.loads((tmp_path / "zero" / "compress_report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["float model", "post-training start, 2-bit"]
    assert list(report["stages"]) == ["float model and teacher text", "start", "palettize and measure"]
    model, tokenizer = _load(str(tmp_path / "zero"))
    assert report["rows"][1]["perplexity"]["in-domain"] == pytest.approx(
        _perplexity(model, tokenizer, texts / "eval.txt"), rel=1e-5
    )
    assert report["config"]["bits"] == 2

    teachers = []
    monkeypatch.setattr(
        optimum_edkm.finetune,
        "finetune",
        lambda model, ids, config=None, **kw: (
            teachers.append(kw["teacher_model"]) or (_ for _ in ()).throw(RuntimeError("stop after the call"))
        ),
    )
    with pytest.raises(RuntimeError, match="stop after the call"):
        main(
            _compress_argv(
                tiny_model_dir,
                texts,
                tmp_path / "distil",
                "--no-eval",
                "--distillation-weight",
                "0.5",
                "--steps",
                "1",
                "--block-epochs",
                "0",
            )
        )
    (teacher,) = teachers
    assert not any("EDKM" in type(m).__name__ for m in teacher.modules())  # the float model, not the student


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--bits", "9"], ["bits", "1 to 8"]),
        (["--steps", "-1"], ["--steps", ">= 0"]),
        (["--granularity", "per_grouped_channel"], ["group_size"]),
        (["--eval-tokens", "1"], ["--eval-tokens"]),
    ],
)
def test_compress_refuses_bad_input_before_loading_anything(texts, tmp_path, capsys, extra, words):
    from optimum_edkm.commands import main

    status = main(_compress_argv(str(tmp_path / "no-such-model"), texts, tmp_path / "out", *extra))
    assert status == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error


def test_compress_refuses_a_non_empty_output_folder_unless_overwrite(tiny_model_dir, texts, tmp_path, capsys):
    from optimum_edkm.commands import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert main(_compress_argv(tiny_model_dir, texts, tmp_path / "out", "--steps", "0", "--no-eval")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert (
        main(_compress_argv(tiny_model_dir, texts, tmp_path / "out", "--steps", "0", "--no-eval", "--overwrite")) == 0
    )
    # the model's own files are written; nothing else in the folder is ever deleted
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious" and (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------------------------- evaluate
def test_evaluate_reports_the_perplexity_and_size_of_each_model(tiny_model_dir, texts, tmp_path, capsys):
    from optimum_edkm import size_report
    from optimum_edkm.commands import main
    from optimum_edkm.models import load_causal_lm

    assert main(_compress_argv(tiny_model_dir, texts, tmp_path / "out", "--steps", "0", "--no-eval")) == 0
    capsys.readouterr()
    status = main(
        [
            "evaluate",
            tiny_model_dir,
            str(tmp_path / "out"),
            "--eval-text",
            str(texts / "eval.txt"),
            "--context-length",
            "64",
            "--eval-tokens",
            "200",
            "--no-progress",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert status == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["table"] in capsys.readouterr().out
    float_row, palettized_row = results["rows"]
    model, tokenizer = _load(str(tmp_path / "out"))
    from optimum_edkm.data import load_text
    from optimum_edkm.evaluation import evaluate_perplexity

    ids = load_text(str(texts / "eval.txt")).token_ids(tokenizer, max_tokens=200)
    assert palettized_row["perplexity"] == pytest.approx(
        evaluate_perplexity(model, ids, context_length=64, progress=False).perplexity, rel=1e-6
    )
    assert palettized_row["size_bytes"] == size_report(model)["theoretical_bytes"]
    float_model, _, _ = load_causal_lm(tiny_model_dir)
    assert float_row["size_bytes"] == sum(t.numel() * t.element_size() for t in float_model.state_dict().values())
    assert palettized_row["size_bytes"] < float_row["size_bytes"]


def test_evaluate_names_a_missing_folder(tmp_path, capsys):
    from optimum_edkm.commands import main

    assert main(["evaluate", str(tmp_path / "missing"), "--eval-text", __file__]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_console_script_is_declared_and_runs():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    assert scripts["optimum-edkm"] == "optimum_edkm.commands.cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "optimum_edkm.commands", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0 and "compress" in result.stdout and "evaluate" in result.stdout
    usage = subprocess.run(
        [sys.executable, "-m", "optimum_edkm.commands", "export"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert usage.returncode == 2 and "optimum-edkm export" in usage.stderr and "{coreml,verify}" in usage.stderr
