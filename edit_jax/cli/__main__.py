"""`python -m edit_jax.cli ...` is `edit-jax ...`."""

import sys

from edit_jax.cli import main

sys.exit(main())
