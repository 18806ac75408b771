"""The RLVR trainer behind `drpo train`.

    from drpo.train.config import load_config
    from drpo.train.loop import train
    cfg = load_config("configs/default.yaml", ["objective.params.delta=0.15"])
    summary = train(cfg, "runs/delta0.15")        # writes metrics.jsonl, checkpoints, curves.png, summary.json

Modules: config (typed config tree), setup (the run's components, resolved once from the
config), step (one RL step), loop (the run: resume, steps, eval, checkpoints, summary),
warmstart (cached SFT of the tiny default), checkpoint (atomic, verified checkpoints), metrics
(jsonl, TensorBoard, PNG), batching (prompt encoding and padding), mismatch (`drpo mismatch`),
cli (`drpo train`). Kept import-light on purpose: `drpo train` validates the config before
torch/transformers are loaded.
"""
