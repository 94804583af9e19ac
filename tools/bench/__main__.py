"""`python -m taskedge.tools.bench`: the bench's command line, and each variant's worker process."""
import sys

from .cli import main

sys.exit(main())
