"""Package mapping: the top-level folders rollout/ trainer/ rewards/ buffers/ install as
slime_rl.rollout, slime_rl.trainer, slime_rl.rewards, slime_rl.buffers (with their
subpackages); nothing installs a top-level `trainer` or `buffers`. Metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

COMPONENTS = ("rollout", "trainer", "rewards", "buffers")

package_dir = {"slime_rl": "slime_rl"}
for sub in find_packages("slime_rl"):
    package_dir[f"slime_rl.{sub}"] = "slime_rl/" + sub.replace(".", "/")
for folder in COMPONENTS:
    package_dir[f"slime_rl.{folder}"] = folder
    for sub in find_packages(folder):
        package_dir[f"slime_rl.{folder}.{sub}"] = f"{folder}/" + sub.replace(".", "/")

setup(packages=sorted(package_dir), package_dir=package_dir)
