"""The RLVR trainer behind `drpo train`.

    from drpo.train.config import load_config
    from drpo.train.loop import train
    cfg = load_config("configs/default.yaml", ["objective.params.delta=0.15"])
    summary = train(cfg, "runs/delta0.15")        # writes metrics.jsonl, checkpoints, curves.png, summary.json

Modules: config (typed config tree), loop (the training loop), warmstart (cached SFT of the
tiny default), checkpoint (atomic, verified checkpoints), metrics (jsonl, TensorBoard, PNG),
batching (prompt encoding and padding), cli (`drpo train`). Kept import-light on purpose:
`drpo train` validates the config before torch/transformers are loaded.
"""
