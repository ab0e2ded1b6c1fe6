"""The Qt-free engine behind both the desktop app and the `tailor` command line.

Nothing in this package may import Qt; torch and transformers are imported lazily inside functions so the
GUI can paint before the ML stack has loaded.
"""

import logging

# bitsandbytes warns on import that it cannot fetch optional CPU kernels from the hub (offline, or the `kernels`
# package absent); it falls back to its own kernels, so the warning would only alarm users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
