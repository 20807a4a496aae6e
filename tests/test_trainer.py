"""EDKMTrainer: fine-tuning with clustering in the loop, schedules, checkpoints and multi-process runs."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

import optimum_edkm
from optimum_edkm import EDKMConfig, EDKMTrainer, EDKMTrainingArguments, PalettizedLinear
from optimum_edkm.nn import is_clustered
from optimum_edkm.trainer import temperature_factor

HERE = os.path.dirname(os.path.abspath(__file__))


def pattern_dataset(count=64, length=16):
    sequences = [[(i * 7 + j * 3) % 120 + 3 for j in range(length)] for i in range(count)]
    return Dataset.from_dict({"input_ids": sequences, "labels": sequences})


def arguments(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return EDKMTrainingArguments(**values)


def mean_loss(model, dataset):
    model.eval()
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def clustered_state(model):
    return {
        name: (m.weight.detach().clone(), m.weight_centroids.clone())
        for name, m in model.named_modules()
        if is_clustered(m)
    }


def test_fine_tuning_lowers_the_loss_of_the_palettized_model(tiny_llama_dir, tmp_path):
    dataset = pattern_dataset()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
    post_training = mean_loss(model, dataset)  # eval mode = nearest centroids = k-means palettization
    trainer = EDKMTrainer(model=model, args=arguments(tmp_path, max_steps=30), train_dataset=dataset)
    trainer.train()
    assert isinstance(model.model.layers[0].self_attn.q_proj, optimum_edkm.EDKMLinear)  # palettizing is explicit
    trainer.finalize()
    assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)
    after = mean_loss(model, dataset)
    assert after < post_training - 0.2
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert 0 < logged[0]["edkm/assignment_entropy"] <= torch.log(torch.tensor(8.0)).item()
    assert 0 <= logged[-1]["edkm/reassigned_fraction"] <= 1
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, PalettizedLinear)
    assert mean_loss(reloaded, dataset) == pytest.approx(after, abs=1e-6)


def test_resume_from_checkpoint_continues_exactly(tiny_llama_dir, tmp_path):
    dataset = pattern_dataset()

    def run(output_dir, resume=None):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
        args = arguments(
            tmp_path,
            output_dir=str(output_dir),
            max_steps=8,
            logging_steps=1,
            save_strategy="steps",
            save_steps=4,
            temperature_schedule="linear",
        )
        trainer = EDKMTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        return clustered_state(model), losses

    full_state, full_losses = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert os.path.exists(checkpoint / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        assert "model.layers.0.self_attn.q_proj.weight_centroids" in handle.keys()
    resumed_state, resumed_losses = run(tmp_path / "resumed", resume=str(checkpoint))
    assert {5, 6, 7, 8} <= set(resumed_losses)
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7)
    for name, (weight, centroids) in full_state.items():
        assert torch.allclose(resumed_state[name][0], weight, rtol=0, atol=1e-6), name
        assert torch.allclose(resumed_state[name][1], centroids, rtol=0, atol=1e-6), name


def test_milestone_trains_plain_weights_first_then_reinitialises_centroids(tiny_llama_dir, tmp_path):
    from transformers import TrainerCallback

    dataset = pattern_dataset()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    with pytest.raises(ValueError, match="clustering_milestone=3 is at or beyond max_steps=3"):
        EDKMTrainer(
            model=model, args=arguments(tmp_path, max_steps=3, clustering_milestone=3), train_dataset=dataset
        ).train()
    layer = model.model.layers[0].mlp.up_proj
    captured = {}

    class Capture(TrainerCallback):  # runs after the schedule callback
        def on_step_begin(self, args, state, control, **kwargs):
            captured.setdefault("enabled", []).append(layer.clustering_enabled)
            if state.global_step == 3:
                captured["weight"] = layer.weight.detach().clone()
                captured["centroids"] = layer.weight_centroids.clone()

    trainer = EDKMTrainer(
        model=model, args=arguments(tmp_path, max_steps=5, clustering_milestone=3), train_dataset=dataset
    )
    trainer.add_callback(Capture())
    trainer.train()
    assert captured["enabled"] == [False, False, False, True, True]
    expected = optimum_edkm.clustering.init_centroids(captured["weight"], layer.spec, seed=0)
    assert torch.equal(captured["centroids"], expected)


def test_temperature_schedules():
    args = EDKMTrainingArguments(
        output_dir="unused",
        temperature_schedule="linear",
        final_temperature_factor=0.2,
        clustering_milestone=10,
        report_to=[],
    )
    assert temperature_factor(args, 0, 110) == 1.0
    assert temperature_factor(args, 60, 110) == pytest.approx(0.6)
    assert temperature_factor(args, 110, 110) == pytest.approx(0.2)
    cosine = EDKMTrainingArguments(
        output_dir="unused", temperature_schedule="cosine", final_temperature_factor=0.2, report_to=[]
    )
    assert temperature_factor(cosine, 50, 100) == pytest.approx(0.6)
    assert temperature_factor(cosine, 100, 100) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="temperature_schedule must be one of"):
        EDKMTrainingArguments(output_dir="unused", temperature_schedule="exp", report_to=[])


def test_collapsed_centroids_are_spread_again(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    layer = model.model.layers[0].self_attn.o_proj
    layer.weight_centroids.copy_(torch.tensor([[-0.1, 0.05, 0.05, 0.2]]))
    assert layer.repair_collapsed_centroids(1e-3) == 1
    assert torch.allclose(layer.weight_centroids, torch.tensor([[-0.1, 0.05, 0.125, 0.2]]))
    assert layer.repair_collapsed_centroids(1e-3) == 0


def test_trainer_rejects_a_palettized_model(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
    optimum_edkm.palettize(model)
    with pytest.raises(ValueError, match="already palettized"):
        EDKMTrainer(model=model, args=arguments(tmp_path), train_dataset=pattern_dataset())


def test_plain_training_arguments_get_the_default_schedule(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=3))
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = EDKMTrainer(model=model, args=args, train_dataset=pattern_dataset())
    trainer.train()
    trainer.finalize()
    assert isinstance(model.model.layers[0].self_attn.q_proj, PalettizedLinear)
    with pytest.raises(ValueError, match="already palettized"):
        trainer.train()  # a second train() after palettizing


def test_a_plain_trainer_runs_the_schedule_through_the_callback(tiny_llama_dir, tmp_path):
    from transformers import Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        max_steps=3,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = optimum_edkm.ClusteringScheduleCallback(
        optimum_edkm.ClusteringSchedule(
            clustering_milestone=2, temperature_schedule="linear", final_temperature_factor=0.5
        )
    )
    layer = model.model.layers[0].mlp.up_proj
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append((m.clustering_enabled, m.temperature_factor)))
    Trainer(model=model, args=args, train_dataset=pattern_dataset(), callbacks=[callback]).train()
    assert [enabled for enabled, _ in seen] == [False, False, True]
    assert seen[2][1] == pytest.approx(1.0)  # step 2 of 3 after a milestone of 2: start of the schedule
    expected = optimum_edkm.clustering.init_centroids(layer.weight, layer.spec, seed=0)
    assert not torch.equal(layer.weight_centroids, expected)  # moved by the clustered step since the milestone


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_llama_dir, tmp_path):
    worker = os.path.join(HERE, "ddp_training_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, worker, tiny_llama_dir, str(tmp_path / "one"), "8", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            worker,
            tiny_llama_dir,
            str(tmp_path / "two"),
            "4",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    rank0, rank1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    assert rank0["world_size"] == 2 and one["world_size"] == 1
    assert rank0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, reference in one["modules"].items():
        assert torch.equal(rank0["modules"][name]["centroids"], rank1["modules"][name]["centroids"]), name
        assert torch.equal(rank0["modules"][name]["weight"], rank1["modules"][name]["weight"]), name
        assert torch.allclose(rank0["modules"][name]["weight"], reference["weight"], rtol=0, atol=1e-5), name
        assert torch.allclose(rank0["modules"][name]["centroids"], reference["centroids"], rtol=0, atol=1e-5), name


@pytest.mark.slow
def test_sharding_halves_what_each_of_two_processes_keeps_for_backward(tiny_llama_dir, tmp_path):
    worker = os.path.join(HERE, "ddp_training_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, worker, tiny_llama_dir, str(tmp_path / "one"), "8", "2", "shard"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            worker,
            tiny_llama_dir,
            str(tmp_path / "two"),
            "4",
            "2",
            "shard",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    # plain DKM keeps 3 iterations of |W| x 8 maps; per step and per rank, measured by the marshaling counters
    assert one["kept_bytes"] and min(one["kept_bytes"]) > 0
    for rank in ranks:
        for single_step, sharded_step in zip(one["kept_bytes"], rank["kept_bytes"]):
            assert sharded_step == pytest.approx(single_step / 2, rel=0.10)
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, reference in one["modules"].items():
        assert torch.equal(ranks[0]["modules"][name]["weight"], ranks[1]["modules"][name]["weight"]), name
        assert torch.allclose(ranks[0]["modules"][name]["weight"], reference["weight"], rtol=0, atol=1e-5), name


def test_distillation_loss_is_the_mix_of_cross_entropy_and_kl_to_the_teacher(tiny_llama_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    args = arguments(tmp_path, distillation_weight=0.3, distillation_temperature=2.0)
    trainer = EDKMTrainer(model=model, args=args, train_dataset=pattern_dataset(), teacher_model=teacher)
    ids = torch.tensor(pattern_dataset(count=2)["input_ids"])
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    value = float(loss.detach())
    assert loss.requires_grad
    with pytest.raises(ValueError, match="needs a teacher"):
        EDKMTrainer(model=model, args=args, train_dataset=pattern_dataset())
    # independent recomputation in float64: a second student built the same way (same k-means centroids)
    # gives the same forward; the token-level KL is written out by hand
    with torch.no_grad():
        teacher_logits = teacher(ids).logits.double()
    student_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=EDKMConfig(bits=2))
    student_model.train()
    with torch.no_grad():
        outputs = student_model(ids, labels=ids)
    t = 2.0
    s_logp = torch.log_softmax(outputs.logits.double()[:, :-1] / t, -1)
    t_logp = torch.log_softmax(teacher_logits[:, :-1] / t, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    expected = 0.7 * outputs.loss.double() + 0.3 * t * t * kl
    assert value == pytest.approx(float(expected), rel=1e-5)
    assert value != pytest.approx(float(outputs.loss), rel=1e-3)  # the KL term is really there
