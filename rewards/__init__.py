"""slime_rl.rewards"""
