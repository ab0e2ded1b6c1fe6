"""Entry point of the frozen desktop app: `--self-test` checks the build offscreen; anything else opens the app."""

import sys

if sys.argv[1:] == ["--self-test"]:
    from app.selftest import main
else:
    from app.gui.main import main

sys.exit(main())
