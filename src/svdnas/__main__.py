import sys

from svdnas.cli import main

sys.exit(main())
