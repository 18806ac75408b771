#!/usr/bin/env bash
# DRPO with verl 0.9.1 (FSDP + vLLM, GPUs): Qwen3-4B-Base on DAPO-Math-17k, the paper's recipe.
#
#   pip install 'drpo[verl]'     # registers the drpo losses in every verl process (entry point)
#   MODEL_PATH=/models/Qwen3-4B-Base TRAIN_FILE=/data/dapo-math-17k.parquet \
#   VAL_FILE=/data/aime-2024.parquet bash examples/verl/run_drpo_qwen3_4b_dapo_math.sh
#
#   METHOD=drpo_dppo_tv DRPO_PARAMS='{}' ...     # a baseline: drpo's verl name for it
#                                                 # (drpo, mask_drpo, spo, pg_is, grpo,
#                                                 #  drpo_dppo_tv, drpo_dppo_kl, drpo_cispo;
#                                                 #  plain dppo_tv/dppo_kl/cispo are verl's own)
#   ... algorithm.rollout_correction.rollout_rs=token_k1 \
#       algorithm.rollout_correction.rollout_rs_threshold=0.5_2.0   # bypass-mode rejection
#   DRY_RUN=1 bash examples/verl/run_...sh       # print the composed config and exit (CPU ok)
#   ... trainer.total_training_steps=500          # extra Hydra overrides are appended
#
# Recipe: group size 8, 64 prompts per step, 4 optimizer updates per rollout batch (mini-batch
# of 16 prompts, one epoch), temperature 1.0, the rollout engine's log-probs as the anchor
# (bypass mode: old_log_probs = rollout_log_probs, no recomputation), mean-centred group
# advantages (GRPO estimator without std division), seq-mean-token-sum-norm aggregation with
# a constant horizon (the maximum response length), no KL or entropy terms. DRPO's delta is
# the reference implementation's default 12.5 unless DRPO_PARAMS says otherwise. Thresholds of
# the baselines come from verl's clip keys (clip_ratio_low/high = 0.2, clip_ratio_c = 3 by
# default) unless DRPO_PARAMS sets them. verl does not hand algorithm.rollout_correction to the
# actor in bypass mode; the policy_loss.rollout_correction line below does, so drpo's loss
# applies its rejection sampling (rollout_rs) as verl's bypass loss would.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-4B-Base}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/dapo-math-17k.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/aime-2024.parquet}
METHOD=${METHOD:-drpo}
DRPO_PARAMS=${DRPO_PARAMS:-'{delta:12.5}'}
NGPUS=${NGPUS:-8}
NNODES=${NNODES:-1}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
LR=${LR:-1e-6}
ROLLOUT_TP=${ROLLOUT_TP:-1}
PROJECT=${PROJECT:-drpo}
EXPERIMENT=${EXPERIMENT:-qwen3-4b-base-dapo-math-${METHOD}}

case "$METHOD" in
  dppo_tv|dppo_kl|cispo|vanilla)
    echo "note: METHOD=$METHOD is verl's own loss (DRPO_PARAMS is ignored); drpo's is drpo_$METHOD (grpo for vanilla)" >&2 ;;
esac

# verl's own env switch also works where the entry point is not installed.
export VERL_USE_EXTERNAL_MODULES=${VERL_USE_EXTERNAL_MODULES:-drpo.integrations.verl}

EXTRA=()
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  EXTRA+=(--cfg job)  # Hydra: print the composed job config, run nothing
fi

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.norm_adv_by_std_in_grpo=False \
  algorithm.use_kl_in_reward=False \
  algorithm.rollout_correction.bypass_mode=True \
  data.train_files="$TRAIN_FILE" \
  data.val_files="$VAL_FILE" \
  data.prompt_key=prompt \
  data.train_batch_size=64 \
  data.max_prompt_length="$MAX_PROMPT_LENGTH" \
  data.max_response_length="$MAX_RESPONSE_LENGTH" \
  data.filter_overlong_prompts=True \
  data.truncation=error \
  actor_rollout_ref.model.path="$MODEL_PATH" \
  actor_rollout_ref.model.use_remove_padding=True \
  actor_rollout_ref.model.enable_gradient_checkpointing=True \
  actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig \
  actor_rollout_ref.actor.policy_loss.loss_mode="$METHOD" \
  "+actor_rollout_ref.actor.policy_loss.drpo_params=$DRPO_PARAMS" \
  '+actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}' \
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm \
  actor_rollout_ref.actor.loss_scale_factor="$MAX_RESPONSE_LENGTH" \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.use_dynamic_bsz=True \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 )) \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.optim.lr="$LR" \
  actor_rollout_ref.actor.optim.weight_decay=0.1 \
  actor_rollout_ref.actor.grad_clip=1.0 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.top_p=1.0 \
  actor_rollout_ref.rollout.top_k=-1 \
  actor_rollout_ref.rollout.calculate_log_probs=True \
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP" \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.7 \
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 )) \
  trainer.logger='["console","tensorboard"]' \
  trainer.project_name="$PROJECT" \
  trainer.experiment_name="$EXPERIMENT" \
  trainer.n_gpus_per_node="$NGPUS" \
  trainer.nnodes="$NNODES" \
  trainer.val_before_train=True \
  trainer.test_freq=10 \
  trainer.save_freq=50 \
  "${EXTRA[@]}" \
  "$@"
