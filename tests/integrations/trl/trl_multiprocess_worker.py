"""One process of the multi-process TRL comparison (tests/integrations/trl/test_integration_trl_multiprocess.py).

Launched by torchrun (gloo, CPU): every rank trains the listed runs one after another, each
from the same freshly built tiny model, data and seed, with TRL's own `GRPOTrainer` or with
`DRPOGRPOTrainer`. Rank 0 writes each run's `log_history` and final weights; every rank writes
the drpo metrics of each of its own loss calls before they are reduced over processes.

    torchrun --nproc_per_node 2 tests/integrations/trl/trl_multiprocess_worker.py OUT trl:dapo drpo-grpo:dapo ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer  # noqa: E402
from trl_helpers import TINY_ARGS, spread_reward, tiny_setup  # noqa: E402  (tests/: on PYTHONPATH)

PROMPTS = ["12+34=", "5+7=", "40+2=", "9+99=", "3+3=", "71+8=", "60+6=", "1+58="]
# Small enough for CI, large enough that the ratio moves: 2 processes x 4 rows per micro-batch,
# gradient accumulation 2, 2 iterations per generation batch (so TRL computes old log-probs
# and the second pass has ratio != 1), 4 optimizer steps = 2 generation batches.
COMMON = dict(TINY_ARGS, gradient_accumulation_steps=2, num_iterations=2, max_steps=4, lr_scheduler_type="constant",
              shuffle_dataset=False)
# The drpo runs: grpo at TRL's clip range (epsilon=0.2) must be TRL's loss; drpo at a small
# delta so its regulariser and the per-process extremes are not trivial.
DRPO_RUNS = {"drpo-grpo": ("grpo", {"eps_low": 0.2, "eps_high": 0.2}), "drpo": ("drpo", {"delta": 0.05})}


class RecordingTrainer(DRPOGRPOTrainer):
    """Keeps the metrics of each loss call on this process, before the cross-process reduction."""

    local: list

    def _log_metrics(self, mode, metrics, entropies, mask):
        m = mask.float()
        self.local.append({k: float(v) for k, v in metrics.items()}
                          | {"entropy_sum": float((entropies.detach() * m).sum()), "entropy_count": float(m.sum())})
        super()._log_metrics(mode, metrics, entropies, mask)


def train(name: str, loss_type: str, out: Path):
    tokenizer, model, data = tiny_setup(PROMPTS)
    common = dict(COMMON, output_dir=str(out / name), loss_type=loss_type)
    if name == "trl":
        cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        method, params = DRPO_RUNS[name]
        cls, args = RecordingTrainer, DRPOConfig(**common, drpo_method=method, drpo_params=params)
    trainer = cls(model=model, reward_funcs=spread_reward, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.local = []
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    tag = f"{name}-{loss_type}"
    if trainer.local:
        (out / f"{tag}.rank{rank}.local.json").write_text(json.dumps(trainer.local))
    if rank == 0:
        weights = {k: v.detach().cpu().double() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        torch.save(weights, out / f"{tag}.weights.pt")
        (out / f"{tag}.json").write_text(json.dumps({"num_processes": world, "log_history": trainer.state.log_history}))
    trainer.accelerator.wait_for_everyone()


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for run in argv[1:]:
        name, loss_type = run.split(":")
        train(name, loss_type, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
