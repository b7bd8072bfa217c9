import sys

from pyconv.cli import main

sys.exit(main())
