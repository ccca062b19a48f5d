"""`python -m lmc_connector.control.controller`: the same as `lmc-controller`."""

import sys

from lmc_connector.control.controller.main import main

sys.exit(main())
