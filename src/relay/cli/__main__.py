"""`python -m relay.cli`: the `relay` command."""

import sys

from .main import main

sys.exit(main())
