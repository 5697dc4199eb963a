"""Only what pyproject.toml cannot say: ds_configs/ and recipes/ sit at the top of the checkout (where the docs and
`deepspeed launch/train.py` use them) but install inside the package, as ghostvis/ds_configs and ghostvis/recipes
(found by ghostvis.shipped.shipped_dir)."""

from setuptools import find_namespace_packages, setup

DATA = {"ghostvis.ds_configs": "ds_configs", "ghostvis.recipes": "recipes"}

setup(
    packages=find_namespace_packages(include=["ghostvis*", "data_prep*", "launch"]) + list(DATA),
    package_dir=DATA,
    package_data={"ghostvis.infer": ["static/*.html"], "ghostvis.ds_configs": ["*.json"], "ghostvis.recipes": ["*.toml"]},
)
