"""`python -m rampiped.daemon`: the daemon, as the `rampiped` command runs it."""

import sys

from rampiped.daemon import main

sys.exit(main())
