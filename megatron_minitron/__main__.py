"""``python -m megatron_minitron`` and ``torchrun ... -m megatron_minitron``."""

import sys

from megatron_minitron.cli import main

if __name__ == "__main__":
    sys.exit(main())
