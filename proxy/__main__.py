"""`python -m proxy` is the `engram` command."""

import sys

from proxy.cli import main

sys.exit(main())
