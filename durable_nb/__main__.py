"""``python -m durable_nb``: the same as the ``durable-nb`` command."""

import sys

from .cli import main

sys.exit(main())
