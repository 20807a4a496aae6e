"""Run by tests/test_fsdp.py under ``torchrun`` (or directly for one process): eDKM fine-tuning of a tiny model
with FSDP2 (``torch.distributed.fsdp.fully_shard`` per decoder layer and on the root, gloo on CPU).

Usage: fsdp_training_worker.py FLOAT_MODEL_DIR OUT_DIR PER_RANK_BATCH STEPS [save_at=K] [resume] [export]

One process runs without FSDP (the reference). Step ``s`` trains on global sequences ``[8s, 8s + 8)``, split
evenly over the ranks, so 2 ranks with batch 4 see what 1 process with batch 8 sees. ``save_at=K`` writes a
distributed checkpoint (``torch.distributed.checkpoint``: model with centroids, optimizer) after step K;
``resume`` loads it from OUT_DIR/checkpoint and continues from step K. Every rank writes ``rank<r>.pt``: losses,
full weights and centroids, its local shard shapes. With ``export`` (2+ processes), every rank computes cluster
statistics and palettizes the sharded model, and rank 0 checks both against an unsharded model loaded from the
gathered full state dict, which it palettizes and saves.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8


def sequences(step):
    return [[((step * GLOBAL_BATCH + i) * 7 + j * 3) % 120 + 3 for j in range(16)] for i in range(GLOBAL_BATCH)]


def main():
    float_dir, out_dir, per_rank, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    options = sys.argv[5:]
    save_at = next((int(o.split("=")[1]) for o in options if o.startswith("save_at=")), None)
    resume = "resume" in options
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import optimum_edkm
    from optimum_edkm import EDKMConfig
    from optimum_edkm.nn import is_clustered

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    # a soft map: every weight gets a gradient well above rounding noise (see ddp_training_worker.py)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=EDKMConfig(bits=3, temperature=0.25))
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    checkpoint = os.path.join(out_dir, "checkpoint")
    first = 0
    if resume:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        first = save_at
    losses = []
    for step in range(first, steps):
        batch = torch.tensor(sequences(step)[rank * per_rank : (rank + 1) * per_rank])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reported)
            reported /= world
        losses.append(float(reported))
        if save_at is not None and not resume and step + 1 == save_at:
            dcp.save(
                {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                checkpoint_id=checkpoint,
            )

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    modules = {}
    for name, module in model.named_modules():
        if is_clustered(module):
            weight = module.weight
            modules[name] = {
                "weight": full[f"{name}.weight"].detach().clone(),
                "centroids": module.weight_centroids.detach().clone(),
                "sharded": isinstance(weight, DTensor),
                "local_shape": tuple(weight.to_local().shape) if isinstance(weight, DTensor) else tuple(weight.shape),
            }
    palettize_outcome, palettized_dir, agreement = None, None, {}
    if world > 1 and "export" in options:
        from optimum_edkm import PalettizedLinear

        positions = torch.arange(0, 64)
        # statistics and palettization read whole weights outside forward: every rank takes part (collectives)
        sharded_stats = {
            name: module.assignment_sample(positions) for name, module in model.named_modules() if is_clustered(module)
        }
        if rank == 0:
            # the export that needs no gathering inside the modules: the full state dict in an unsharded model
            unsharded = AutoModelForCausalLM.from_pretrained(
                float_dir, quantization_config=EDKMConfig(bits=3, temperature=0.25)
            )
            unsharded.load_state_dict(full)
            modules_by_name = dict(unsharded.named_modules())
            agreement["stats"] = all(
                torch.equal(labels, modules_by_name[name].assignment_sample(positions)[0])
                and torch.equal(entropy, modules_by_name[name].assignment_sample(positions)[1])
                for name, (labels, entropy) in sharded_stats.items()
            )
            optimum_edkm.palettize(unsharded)
            palettized_dir = optimum_edkm.save_pretrained(unsharded, os.path.join(out_dir, "palettized"))
            reference_packed = {
                name: (m.weight.clone(), m.weight_lut.clone())
                for name, m in unsharded.named_modules()
                if isinstance(m, PalettizedLinear)
            }
        try:
            optimum_edkm.palettize(model)
            palettize_outcome = "ok"
        except Exception as error:  # noqa: BLE001  (recorded for the test and the docs)
            palettize_outcome = f"{type(error).__name__}: {str(error)[:200]}"
        if rank == 0 and palettize_outcome == "ok":
            packed = {
                name: (m.weight, m.weight_lut) for name, m in model.named_modules() if isinstance(m, PalettizedLinear)
            }
            agreement["palettized"] = packed.keys() == reference_packed.keys() and all(
                torch.equal(packed[n][0], reference_packed[n][0]) and torch.equal(packed[n][1], reference_packed[n][1])
                for n in packed
            )
    torch.save(
        {
            "losses": losses,
            "modules": modules,
            "world_size": world,
            "palettize": palettize_outcome,
            "palettized_dir": palettized_dir,
            "agreement": agreement,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
