"""Run by tests/test_trainer.py under ``torchrun`` (or directly for one process): a few EDKMTrainer steps on a
tiny model, then every rank writes its centroids and weights to ``<out>/rank<r>.pt``.

Usage: ddp_training_worker.py FLOAT_MODEL_DIR OUT_DIR PER_DEVICE_BATCH STEPS [shard]

With ``shard``, plain DKM (no uniquification, so that per-weight maps are saved for backward) runs with the
saved tensors sharded across the processes, and the per-step marshaling counters are recorded.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    float_dir, out_dir, per_device_batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from optimum_edkm import EDKMConfig, EDKMTrainer, EDKMTrainingArguments
    from optimum_edkm.nn import is_clustered

    shard = "shard" in sys.argv[5:]
    # A soft map gives every weight a gradient well above rounding noise; with a near-hard one Adam normalises
    # noise-sized gradients into lr-sized steps, and 1 vs 2 processes (different summation order) would diverge.
    config = EDKMConfig(bits=3, temperature=0.25)
    if shard:
        config = EDKMConfig(bits=3, temperature=0.25, uniquify=False)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    sequences = [[(i * 7 + j * 3) % 120 + 3 for j in range(16)] for i in range(64)]
    dataset = Dataset.from_dict({"input_ids": sequences, "labels": sequences})
    args = EDKMTrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        learning_rate=3e-3,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_drop_last=True,
        shard_saved_tensors=shard,
        offload_saved_tensors={"min_bytes": 1, "memory_threshold": 1.0} if shard else False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = EDKMTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    state = {
        name: {"centroids": m.weight_centroids.clone(), "weight": m.weight.detach().clone()}
        for name, m in model.named_modules()
        if is_clustered(m)
    }
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    kept = [
        entry["edkm/bytes_on_device"] + entry["edkm/bytes_offloaded"]
        for entry in trainer.state.log_history
        if "edkm/bytes_on_device" in entry
    ]
    torch.save(
        {"modules": state, "losses": losses, "world_size": trainer.args.world_size, "kept_bytes": kept},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
