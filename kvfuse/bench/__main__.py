"""``python -m kvfuse.bench``: the same as the ``kvfuse-bench`` command."""

from kvfuse.bench import main

raise SystemExit(main())
