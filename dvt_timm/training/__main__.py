"""`python -m dvt_timm.training ...` / `torchrun --nproc_per_node N -m dvt_timm.training ...`."""
import sys

from .commands import main

if __name__ == '__main__':
    sys.exit(main())
