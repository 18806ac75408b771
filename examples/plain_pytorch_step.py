"""One RL update with a drpo objective in a plain PyTorch training step (the README example).

    .venv/bin/python examples/plain_pytorch_step.py
"""

import torch

from drpo.objectives import policy_loss

torch.manual_seed(0)
vocab, hidden, batch, seq = 50, 16, 4, 6
policy = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)

# What a rollout engine hands back: sampled tokens, their behaviour log-probs, a response mask.
tokens = torch.randint(vocab, (batch, seq))
with torch.no_grad():
    rollout_logp = torch.log_softmax(policy(tokens), -1).gather(-1, tokens[..., None]).squeeze(-1)
    rollout_logp += 0.05 * torch.randn_like(rollout_logp).clamp(max=0)  # rollout numerics differ a little
    rollout_logp = rollout_logp.clamp(max=0)
mask = torch.ones(batch, seq, dtype=torch.bool)
mask[0, 4:] = False  # padding
rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
advantages = rewards - rewards.mean()  # group mean-centering, one value per sequence

logp = torch.log_softmax(policy(tokens), -1).gather(-1, tokens[..., None]).squeeze(-1)
loss, metrics = policy_loss("drpo", logp, rollout_logp, advantages, mask, delta=12.5, agg="token-mean")
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(f"loss={loss.item():.4f} weight in [{metrics['weight_min']:.4f}, {metrics['weight_max']:.4f}] "
      f"mismatch |log r|={metrics['abs_log_ratio']:.4f} kept_grad_mass={metrics['kept_grad_mass']:.3f}")
