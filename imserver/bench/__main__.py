"""
C{python -m imserver.bench}.
"""

import sys

from imserver.bench import main

sys.exit(main())
