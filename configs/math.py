"""`--config=configs/math.py[:variant]` from a checkout: the config lives in the package.

The variants and every field are documented in `omniopd_jax/configs/math.py`.
"""

from omniopd_jax.configs.math import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
