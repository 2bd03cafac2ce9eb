import sys

from arcsim.cli import main

sys.exit(main())
