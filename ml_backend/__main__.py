"""`python -m ml_backend ...` is the operator CLI (versions, rollback, status, train, worker)."""

import sys

from ml_backend.cli import main

sys.exit(main())
