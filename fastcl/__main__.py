"""``python -m fastcl``: the same as the ``fastcl`` console script."""
from .cli import main

raise SystemExit(main())
