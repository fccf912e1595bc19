# -*- test-case-name: tests.test_commandline -*-
"""
What every command-line parser of imserver's own commands shares
(C{python -m imserver} and its subcommands, C{im-bench} and its scenarios):
L{Options}.
"""

import sys

from twisted.python import usage

from imserver import __version__


class Options(usage.Options):
    """
    L{usage.Options} whose C{--version} prints imserver's version (not
    Twisted's), and whose C{--help} shows the class's own plain-text
    C{longdesc}: empty unless a subclass sets one, never the docstring of
    the C{__main__} module (epytext), which L{usage.Options} shows
    otherwise.
    """

    longdesc = ""

    def opt_version(self):
        """
        Display imserver's version and exit.
        """
        print("imserver", __version__)
        sys.exit(0)
