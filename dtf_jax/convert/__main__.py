"""``python -m dtf_jax.convert``: see ``dtf_jax.convert.cli``."""

import sys

from dtf_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
