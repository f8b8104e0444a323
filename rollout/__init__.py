"""slime_rl.rollout"""
