import sys

from fl_sim.cli import main

sys.exit(main())
