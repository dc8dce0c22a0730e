"""`python -m lfi_jax.experiments`: see lfi_jax.experiments."""

import sys

from lfi_jax.experiments.cli import build_parser, enable_compilation_cache, main

if __name__ == "__main__":
    known, _ = build_parser().parse_known_args(sys.argv[1:])  # argparse reports bad arguments again in main()
    enable_compilation_cache(known.workdir)
    sys.exit(main())
