"""`python -m okdpose ...` is the `okdpose` command (`okdpose.cli`)."""
import sys

from okdpose.cli import main

sys.exit(main())
