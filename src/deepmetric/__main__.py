"""``python -m deepmetric`` (also what ``torchrun -m deepmetric train ...`` runs)."""

import sys

from deepmetric.cli import main

sys.exit(main())
