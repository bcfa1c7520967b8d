"""`tera-run`: execute a plan on torch.distributed.

Not built yet: the runtime is issue 5. Until then the command says so plainly instead
of pretending to train.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "tera-run: the runtime is not implemented yet; `tera-plan evaluate` costs a layout",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
