"""Reinforcement learning on verifiable rewards: GRPO (+ DARLING's diversity reward).

objectives.py: group advantages, DARLING's diversity-scaled rewards, the token-level PPO-clip
surrogate and the k3 KL estimator (pure jnp), and the canonical answers that DARLING's
equivalence classes are drawn from (host). update.py: the fixed-shape RL update, `epochs`
optimizer updates on one sampled rollout inside one jit.
"""
