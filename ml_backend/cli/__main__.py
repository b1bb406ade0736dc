"""``python -m ml_backend.cli``: the same as the ``ml-backend`` console script."""

import sys

from ml_backend.cli import main

sys.exit(main())
