"""slime_rl.trainer"""
