"""``python -m xsession.gui``: the same as ``xsession-gui``."""

import sys

from .window import main

sys.exit(main())
