"""One process of the verl engine test (tests/integrations/verl/test_verl_engine.py), launched by torchrun.

verl's real `FSDPEngineWithLMHead` (FSDP2 on a tiny random Llama, gloo, CPU) is built by its
own `__init__` and `initialize()`; each case then runs the engine's own
`forward_backward_batch` (global token count all-reduced over ranks, dynamic-batch-size or fixed
micro-batches, one backward per micro-batch, FSDP's data-parallel gradient mean) with verl's
worker loss `partial(ppo_loss, config=actor)` on this rank's share of one mini-batch, built the
way verl's driver builds it (`DataProto` -> `to_tensordict` -> `left_right_2_no_padding`).

Patched for the CPU, nothing else (verl 0.9.1 has no CPU platform, so its device helpers fall
back to CUDA): `verl.utils.device.get_device_name`/`get_device_id` return "cpu" (set before
verl's engine modules import them), and `transformer_impl.log_gpu_memory_usage` (a log line that
reads CUDA memory counters) is a no-op. See `patch_verl_for_cpu`.

Rank 0 writes, per case, the accumulated gradient (every parameter, full tensors) and each
rank's per-micro-batch metrics; and, once, the whole mini-batch (padded) with the model path
so the test can compute the gradient of the whole mini-batch at once.

    torchrun --nproc_per_node 2 tests/integrations/verl/engine_worker.py OUT
    ENGINE_MODES=grpo,vanilla torchrun ...   # only these loss modes (to rerun a subset by hand)
"""

from __future__ import annotations

import itertools
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist


def patch_verl_for_cpu() -> None:
    """The only changes to verl: CPU instead of CUDA as the device (see the module docstring)."""
    import verl.utils.device as device

    device.get_device_name = lambda: "cpu"
    device.get_device_id = lambda: "cpu"
    from verl.workers.engine.fsdp import transformer_impl

    transformer_impl.log_gpu_memory_usage = lambda *args, **kwargs: None


# drpo's loss modes (every registered drpo method) and the verl losses they are compared with.
VERL_PAIRS = {"grpo": "vanilla", "drpo_dppo_tv": "dppo_tv", "drpo_dppo_kl": "dppo_kl", "drpo_cispo": "cispo"}
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's dynamic batch size: micro-batches of at most this many tokens (2-4 per rank here).
MAX_TOKEN_LEN = 18
N, MAX_PROMPT, MAX_RESPONSE = 8, 5, 7  # the global mini-batch


def tiny_model_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from drpo.models import make_char_tokenizer

    tok = make_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_engine(path: Path):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    model = HFModelConfig(path=str(path), use_remove_padding=False, override_config={"attn_implementation": "eager"})
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine_cfg = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, model_dtype="fp32", mixed_precision=fp32)
    engine = FSDPEngineWithLMHead(model, engine_cfg, FSDPOptimizerConfig(lr=1e-3), CheckpointConfig())
    engine.initialize()
    return engine


def mini_batch(vocab: int, model) -> dict[str, torch.Tensor]:
    """The global mini-batch as verl's driver holds it (left-padded prompts, right-padded
    responses), the same on every rank: ragged lengths, a masked span inside one response
    (tool output), old log-probs near the model's own (ratios spread around 1, so the clips
    act), one advantage per sequence, rollout IS weights."""
    g = torch.Generator().manual_seed(0)
    p_len = torch.randint(2, MAX_PROMPT + 1, (N,), generator=g)
    r_len = torch.randint(2, MAX_RESPONSE + 1, (N,), generator=g)
    p_len[0], r_len[0] = MAX_PROMPT, MAX_RESPONSE
    prompts = torch.zeros(N, MAX_PROMPT, dtype=torch.long)
    responses = torch.zeros(N, MAX_RESPONSE, dtype=torch.long)
    attention = torch.zeros(N, MAX_PROMPT + MAX_RESPONSE, dtype=torch.long)
    response_mask = torch.zeros(N, MAX_RESPONSE)
    for i in range(N):
        prompts[i, MAX_PROMPT - p_len[i]:] = torch.randint(3, vocab, (int(p_len[i]),), generator=g)
        responses[i, : r_len[i]] = torch.randint(3, vocab, (int(r_len[i]),), generator=g)
        attention[i, MAX_PROMPT - p_len[i]: MAX_PROMPT + r_len[i]] = 1
        response_mask[i, : r_len[i]] = 1
    response_mask[0, 2:4] = 0  # tool output inside a response
    input_ids = torch.cat([prompts, responses], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention,
                 position_ids=position_ids, response_mask=response_mask)
    with torch.no_grad():
        logp = response_logprobs(model, batch)
    batch["old_log_probs"] = (logp + 0.3 * torch.randn(logp.shape, generator=g)).clamp(max=0.0) * response_mask
    batch["advantages"] = torch.randn(N, 1, generator=g).expand(N, MAX_RESPONSE) * response_mask
    batch["rollout_is_weights"] = torch.rand(N, MAX_RESPONSE, generator=g) * 2 * response_mask
    return batch


def response_logprobs(model, batch) -> torch.Tensor:
    """log pi(response token) from one padded forward of the whole batch (the reference)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, MAX_PROMPT - 1: MAX_PROMPT + MAX_RESPONSE - 1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch["responses"][..., None])[..., 0]


def rank_data(batch: dict, rank: int, world: int, with_is: bool):
    """This rank's contiguous share (verl's dispatch chunks the batch by rank), converted as
    verl's driver converts it, with the keys verl's TrainingWorker.train_batch adds."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    share = slice(rank * N // world, (rank + 1) * N // world)
    keys = [k for k in batch if with_is or k != "rollout_is_weights"]
    proto = DataProto.from_dict(tensors={k: batch[k][share].clone() for k in keys}, meta_info={"temperature": 1.0})
    data = left_right_2_no_padding(proto.to_tensordict())
    tu.assign_non_tensor(data, global_batch_size=N, use_remove_padding=False, use_fused_kernels=False,
                         use_dynamic_bsz=True, max_token_len_per_gpu=MAX_TOKEN_LEN, micro_batch_size_per_gpu=2)
    return data


def actor_config(loss_mode: str, agg: str):
    """verl's actor config as its workers get it (test_verl_callsite.verl_actor) with these two
    keys set; verl's YAML is composed once, then copied."""
    import copy

    sys.path.insert(0, str(Path(__file__).parent))
    from test_verl_callsite import _compose
    from verl.utils.config import omega_conf_to_dataclass

    cfg = copy.deepcopy(_compose(()))
    cfg.actor_rollout_ref.actor.policy_loss.loss_mode = loss_mode
    cfg.actor_rollout_ref.actor.loss_agg_mode = agg
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def full_grad(engine) -> torch.Tensor:
    parts = []
    for p in engine.module.parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        parts.append(g.detach().double().flatten())
    return torch.cat(parts)


def main(out: Path) -> int:
    patch_verl_for_cpu()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import LlamaForCausalLM
    from verl.workers.utils.losses import ppo_loss

    from drpo.integrations.verl import VERL_LOSS_NAMES

    path = out / "model"
    if rank == 0:
        tiny_model_dir(path)
    dist.barrier()
    engine = build_engine(path)
    plain = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    batch = mini_batch(plain.config.vocab_size, plain)
    if rank == 0:
        torch.save({"batch": batch, "model": str(path), "world": world}, out / "batch.pt")
    modes = sorted(VERL_LOSS_NAMES.values()) + sorted(VERL_PAIRS.values())
    results = {}
    cases = list(itertools.product(modes, AGG_MODES, (False, True)))
    if os.environ.get("ENGINE_MODES"):
        cases = [c for c in cases if c[0] in os.environ["ENGINE_MODES"].split(",")]
    for mode, agg, with_is in cases:
        cfg = actor_config(mode, agg)
        data = rank_data(batch, rank, world, with_is)
        engine.optimizer_zero_grad()
        with engine.train_mode():  # which zeroes the gradients on exit: read them inside
            output = engine.forward_backward_batch(data, partial(ppo_loss, config=cfg))
            grad = full_grad(engine)
        # verl's Metric per key: one value per micro-batch, and how verl aggregates them.
        metrics = {k: (m.aggregation.value, [float(x) for x in m.values]) for k, m in output["metrics"].items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, metrics)
        if rank == 0:
            results[(mode, agg, with_is)] = {"grad": grad, "metrics": gathered}
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
