"""Entry point for ``python -m fusemux``; it owns nothing but the hand-off to the CLI."""

from fusemux.cli import main

raise SystemExit(main())
