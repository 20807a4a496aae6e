"""Saving never loses data and loading never returns something other than what was saved (issue 13).

Every case builds its own tiny palettized checkpoint, damages or interrupts it the way a user or a crash
would, and checks what is left on disk and what a load does - against the untouched model's logits.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_edkm
from optimum_edkm import CheckpointError, EDKMConfig, atomic, palettize
from optimum_edkm.checkpoint import KEY_CONFIG


def _model(directory, **config):
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=EDKMConfig(bits=3, **config))
    palettize(model)
    return model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _listing(folder):
    """Every path under ``folder`` with its bytes and mode (what must not change)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            content = open(path, "rb").read() if stat.S_ISREG(info.st_mode) else None
            found[os.path.relpath(path, folder)] = (stat.S_IMODE(info.st_mode), content)
    return found


@pytest.fixture
def models(tiny_llama_dir):
    """Two different palettized models (3 and 4 bits) to save over each other."""
    return _model(tiny_llama_dir), _model(tiny_llama_dir, enable_per_channel_scale=True)


# ----------------------------------------------------------------------------------------------- data loss
def test_saving_into_a_folder_keeps_every_file_the_model_does_not_own(models, tmp_path, input_ids):
    first, second = models
    target = tmp_path / "project"
    (target / "checkpoint-500").mkdir(parents=True)
    (target / "checkpoint-500" / "optimizer.pt").write_bytes(b"optimizer state")
    (target / "tokenizer.json").write_text("{}")
    (target / "train.py").write_text("print('my code')\n")
    (target / "README.md").write_text("# My model\n\nNotes I wrote.\n")
    # a stale sharded checkpoint of an earlier, larger model
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard 1")
    (target / "model-00002-of-00002.safetensors").write_bytes(b"old shard 2")
    (target / "model.safetensors.index.json").write_text("{}")
    kept = {
        name: value
        for name, value in _listing(target).items()
        if name.startswith(("checkpoint-500", "tokenizer", "train.py"))
    }
    optimum_edkm.save_pretrained(first, str(target))
    optimum_edkm.save_pretrained(second, str(target))
    after = _listing(target)
    assert {name: after[name] for name in kept} == kept
    assert not any(name.startswith("model-0000") or name.endswith(".index.json") for name in after)
    card = (target / "README.md").read_text()
    assert card.startswith("# My model\n\nNotes I wrote.") and card.count("## Palettization (optimum-edkm)") == 1
    assert not any(name.startswith(".edkm-") for name in after)
    assert torch.equal(
        _logits(AutoModelForCausalLM.from_pretrained(str(target)), input_ids), _logits(second, input_ids)
    )


def test_saving_into_the_current_directory_keeps_the_project(models, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("x = 1\n")
    (project / "setup.cfg").write_text("[metadata]\n")
    before = _listing(project)
    monkeypatch.chdir(project)
    optimum_edkm.save_pretrained(models[0], ".")
    after = _listing(project)
    assert {name: after[name] for name in before} == before
    assert {"config.json", "model.safetensors"} <= set(after)


def test_a_regular_file_at_the_target_is_refused_and_left_alone(models, tmp_path):
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"'.*model' is a regular file"):
        optimum_edkm.save_pretrained(models[0], str(path))
    assert path.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["model"]


def test_a_non_main_process_writes_and_removes_nothing(models, tmp_path):
    target = tmp_path / "model"
    optimum_edkm.save_pretrained(models[0], str(target))
    before = _listing(target)
    optimum_edkm.save_pretrained(models[1], str(target), is_main_process=False)
    optimum_edkm.save_pretrained(models[1], str(tmp_path / "absent"), is_main_process=False)
    assert _listing(target) == before and not (tmp_path / "absent").exists()


def test_saved_folders_have_normal_permissions_and_a_symlink_updates_its_folder(models, tmp_path, input_ids):
    real = tmp_path / "real"
    link = tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    optimum_edkm.save_pretrained(models[0], str(link))
    assert link.is_symlink() and (real / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    fresh = tmp_path / "fresh" / "model"
    optimum_edkm.save_pretrained(models[0], str(fresh))
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(fresh / "model.safetensors").st_mode) == 0o666 & ~umask


def test_a_mount_point_target_is_saved_without_renaming_the_folder_itself(models, tmp_path, monkeypatch):
    target = tmp_path / "mounted"
    target.mkdir()
    real_replace = os.replace

    def replace(source, destination):
        if os.path.abspath(source) == str(target) or os.path.abspath(destination) == str(target):
            raise OSError(16, "Device or resource busy")  # what renaming a mount point does
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    optimum_edkm.save_pretrained(models[0], str(target))
    optimum_edkm.save_pretrained(models[1], str(target))
    assert (target / "model.safetensors").is_file()


def _count_replaces(function):
    calls = []
    real_replace = os.replace

    def counting(source, destination):
        calls.append((source, destination))
        return real_replace(source, destination)

    os.replace = counting
    try:
        function()
    finally:
        os.replace = real_replace
    return len(calls)


@pytest.mark.parametrize("crash_at", range(0, 6))
def test_an_interrupted_save_leaves_the_old_or_the_new_model_never_a_mix(
    models, tmp_path, input_ids, crash_at, monkeypatch
):
    old, new = models
    expected_old, expected_new = _logits(old, input_ids), _logits(new, input_ids)
    target = tmp_path / "model"
    optimum_edkm.save_pretrained(old, str(target))
    total = _count_replaces(lambda: optimum_edkm.save_pretrained(old, str(tmp_path / "probe")))
    if crash_at >= total:
        pytest.skip(f"a save makes only {total} renames")
    real_replace = os.replace
    calls = []

    def crashing(source, destination):
        calls.append(source)
        if len(calls) == crash_at + 1:
            raise KeyboardInterrupt("power cut")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        optimum_edkm.save_pretrained(new, str(target))
    monkeypatch.setattr(os, "replace", real_replace)
    committed = (target / atomic.JOURNAL_NAME).exists()
    # the next load repairs the folder first (and asks to load again when it completed a save)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(target))
    except CheckpointError as error:
        assert committed and "load it again" in str(error)
        loaded = AutoModelForCausalLM.from_pretrained(str(target))
    result = _logits(loaded, input_ids)
    assert torch.equal(result, expected_new if committed else expected_old)
    assert not [name for name in os.listdir(target) if name.startswith(".edkm-")]


def test_a_killed_save_is_rolled_forward_by_the_next_save(models, tmp_path, input_ids, tiny_llama_dir):
    old, new = models
    target = tmp_path / "model"
    optimum_edkm.save_pretrained(old, str(target))
    new_dir = tmp_path / "new"
    optimum_edkm.save_pretrained(new, str(new_dir))
    # a separate process commits a save and dies (os._exit: no cleanup, locks dropped by the kernel) after one rename
    script = textwrap.dedent(f"""
        import os, optimum_edkm
        from transformers import AutoModelForCausalLM
        from optimum_edkm import atomic
        model = AutoModelForCausalLM.from_pretrained({str(new_dir)!r})
        real_replace, committed = os.replace, []
        def dying(source, destination):
            real_replace(source, destination)
            if committed:
                os._exit(3)                    # after the first rename that follows the commit
            committed.extend([True] if os.path.basename(destination) == atomic.JOURNAL_NAME else [])
        os.replace = dying
        optimum_edkm.save_pretrained(model, {str(target)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert (target / atomic.JOURNAL_NAME).exists()
    assert atomic.recover_folder(str(target)) == "rolled-forward"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(target)), input_ids), _logits(new, input_ids))
    assert not [name for name in os.listdir(target) if name.startswith(".edkm-")]


def test_a_save_killed_while_staging_is_cleaned_up_and_the_old_model_kept(models, tmp_path, input_ids):
    target = tmp_path / "model"
    optimum_edkm.save_pretrained(models[0], str(target))
    staging = target / (atomic.STAGING_PREFIX + "dead")
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half a model")
    optimum_edkm.save_pretrained(models[1], str(target))  # the next save cleans up
    assert not staging.exists()
    assert torch.equal(
        _logits(AutoModelForCausalLM.from_pretrained(str(target)), input_ids), _logits(models[1], input_ids)
    )


def test_an_interrupted_trainer_save_never_pairs_new_weights_with_an_old_config(
    tiny_llama_dir, tmp_path, monkeypatch, input_ids
):
    from datasets import Dataset

    from optimum_edkm import EDKMTrainer, EDKMTrainingArguments

    sequences = [[(i * 7 + j * 3) % 120 + 3 for j in range(16)] for i in range(16)]
    dataset = Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    output = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
    args = EDKMTrainingArguments(
        output_dir=str(output),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = EDKMTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()  # train format
    first = AutoModelForCausalLM.from_pretrained(str(output))
    assert isinstance(first.model.layers[0].self_attn.q_proj, optimum_edkm.EDKMLinear)
    trainer.finalize()
    real_replace, calls = os.replace, []

    def crashing(source, destination):
        calls.append(source)
        if os.path.basename(destination) == "config.json":
            raise KeyboardInterrupt("power cut before the config")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model()  # palettized over the train-format save
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(CheckpointError, match="load it again"):
        AutoModelForCausalLM.from_pretrained(str(output))
    reloaded = AutoModelForCausalLM.from_pretrained(str(output))
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, optimum_edkm.PalettizedLinear)
    assert torch.equal(_logits(reloaded, input_ids), _logits(model, input_ids))


# ---------------------------------------------------------------------------------------- wrong models
@pytest.fixture
def saved(tiny_llama_dir, tmp_path):
    model = _model(tiny_llama_dir, enable_per_channel_scale=True)
    return optimum_edkm.save_pretrained(model, str(tmp_path / "saved"))


def _edit_config(directory, change):
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    change(config["quantization_config"])
    json.dump(config, open(path, "w"))


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda q: q.update(enable_per_channel_scale=False), "enable_per_channel_scale"),
        (lambda q: q["modules_to_not_convert"].append("model.layers.1.mlp.down_proj"), "modules_to_not_convert"),
        (lambda q: q.update(palettized=False), "palettized"),
        (lambda q: q.update(lut_dtype="float32"), "lut_dtype"),
    ],
)
def test_an_edited_config_json_is_refused_naming_the_field(saved, change, field):
    _edit_config(saved, change)
    with pytest.raises(CheckpointError, match=f"config.json's quantization_config differs .*{field}: saved"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_checkpoint_saved_by_0_2_with_the_plain_method_name_loads(saved, input_ids):
    """0.2 wrote ``quant_method: "edkm"`` in config.json and in the commit record; 0.3 writes it with the install
    hint. Both spellings name the same method: the record check must not call the old one an edited config."""
    expected = AutoModelForCausalLM.from_pretrained(saved).eval()
    _edit_config(saved, lambda q: q.update(quant_method="edkm"))
    path = os.path.join(saved, "model.safetensors")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    record = json.loads(metadata[KEY_CONFIG])
    record["quant_method"] = "edkm"
    save_file(tensors, path, metadata={**metadata, KEY_CONFIG: json.dumps(record, sort_keys=True)})
    loaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected(input_ids).logits)


def _flip_byte(directory, key, position=3):
    """Flip one byte of tensor ``key`` in place in the file (header and record untouched)."""
    from optimum_edkm.checkpoint import read_header

    path = os.path.join(directory, "model.safetensors")
    stored = read_header(path)[0][key]
    with open(path, "r+b") as handle:
        handle.seek(stored.begin + position)
        byte = handle.read(1)
        handle.seek(stored.begin + position)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_of_an_index_tensor_is_detected(saved, input_ids):
    _flip_byte(saved, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(
        CheckpointError, match="'model.layers.0.mlp.up_proj.weight' .* does not match its recorded sha256"
    ):
        AutoModelForCausalLM.from_pretrained(saved)
    with optimum_edkm.verify_checksums(False):  # trusted files: only the hash is skipped
        AutoModelForCausalLM.from_pretrained(saved)
    _edit_config(saved, lambda q: q.update(bits=4))
    with optimum_edkm.verify_checksums(False), pytest.raises(CheckpointError, match="bits: saved 3"):
        AutoModelForCausalLM.from_pretrained(saved)


def _rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_unexpected_palettized_tensors_are_refused(tiny_llama_dir, tmp_path):
    directory = optimum_edkm.save_pretrained(_model(tiny_llama_dir), str(tmp_path / "no-scale"))
    _rewrite(directory, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale": torch.ones(64).half()}))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.up_proj.weight_scale' .* unexpected"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize(
    "key", ["model.layers.1.self_attn.k_proj.weight_lut", "model.layers.0.self_attn.o_proj.weight_scale"]
)
def test_nan_or_inf_in_a_lut_or_scale_is_refused(saved, key):
    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = float("nan") if key.endswith("lut") else float("inf")

    _rewrite(saved, poison)
    with pytest.raises(CheckpointError, match=f"'{key}' holds NaN or infinite values"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_pickle_format_palettized_checkpoint_is_refused(saved):
    path = os.path.join(saved, "model.safetensors")
    torch.save(load_file(path), os.path.join(saved, "pytorch_model.bin"))
    os.remove(path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle-format weight file"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_weight_file_rewritten_without_its_record_is_refused(saved):
    path = os.path.join(saved, "model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has no optimum-edkm commit record"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_the_record_holds_the_saved_config(saved):
    with safe_open(os.path.join(saved, "model.safetensors"), framework="pt") as handle:
        recorded = json.loads(handle.metadata()[KEY_CONFIG])
    config = json.load(open(os.path.join(saved, "config.json")))["quantization_config"]
    config.pop("edkm_version")
    assert recorded == json.loads(json.dumps(config, sort_keys=True))


@pytest.fixture
def train_format(tiny_llama_dir, tmp_path, input_ids):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=EDKMConfig(bits=3, enable_per_channel_scale=True)
    )
    return optimum_edkm.save_pretrained(model, str(tmp_path / "train-format")), _logits(model, input_ids)


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.mlp.up_proj.weight_centroids",
        "model.layers.1.self_attn.q_proj.weight_scale",
        "model.layers.1.self_attn.q_proj.weight_temperature",
    ],
)
def test_a_train_format_checkpoint_is_verified_too(train_format, key):
    directory, _ = train_format
    _rewrite(directory, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_a_train_format_checkpoint_round_trips_and_fails_loudly_without_the_package(train_format, input_ids):
    directory, expected = train_format
    with safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [1, 64, 32]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(directory), input_ids), expected)
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({directory!r})
        except Exception as error:
            print("REFUSED", type(error).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in done.stdout, done.stdout[-1000:] + done.stderr[-2000:]


def test_a_checkpoint_loaded_into_another_architecture_names_the_modules_it_lacks(saved):
    from transformers import LlamaForSequenceClassification

    with pytest.raises(
        CheckpointError, match="the model has module\\(s\\) the checkpoint does not contain \\(e.g. 'score'\\)"
    ):
        LlamaForSequenceClassification.from_pretrained(saved)
