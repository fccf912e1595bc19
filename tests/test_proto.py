# -*- test-case-name: tests.test_proto -*-
"""
The generated protobuf code is current, and runs on the upb backend.
"""

import subprocess
import sys

from google.protobuf.internal import api_implementation
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

ROOT = FilePath(__file__).parent().parent()


class GeneratedCodeTests(SynchronousTestCase):
    """
    C{imserver/pb} matches C{proto/im.proto} and C{proto/bus.proto}.
    """

    #: The proto files, each generating C{<name>_pb2.py} and C{.pyi}.
    PROTOS = ["im", "bus"]

    def test_notStale(self):
        """
        Regenerating with the pinned generator gives the committed files
        byte for byte (run C{make proto} when this fails).
        """
        out = FilePath(self.mktemp())
        out.makedirs()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I" + ROOT.child("proto").path,
                "--python_out=" + out.path,
                "--pyi_out=" + out.path,
            ]
            + [ROOT.child("proto").child(name + ".proto").path for name in self.PROTOS],
            check=True,
        )
        for name in [n + "_pb2" + ext for n in self.PROTOS for ext in (".py", ".pyi")]:
            self.assertEqual(
                out.child(name).getContent(),
                ROOT.child("imserver").child("pb").child(name).getContent(),
                "{} is stale: run make proto".format(name),
            )

    def test_upb(self):
        """
        The protobuf runtime is the fast upb backend.
        """
        self.assertEqual(api_implementation.Type(), "upb")


class PackagingTests(SynchronousTestCase):
    """
    setup.cfg lists every package, so a non-editable install is complete.
    """

    def test_everyPackageListed(self):
        """
        Every directory under imserver/ with an __init__.py is in
        setup.cfg's C{packages}, and so is twisted.plugins.
        """
        import configparser

        config = configparser.ConfigParser()
        config.read(ROOT.child("setup.cfg").path)
        listed = set(config["options"]["packages"].split())
        found = {
            ".".join(path.segmentsFrom(ROOT))
            for path in ROOT.child("imserver").walk()
            if path.isdir() and path.child("__init__.py").exists()
        }
        self.assertEqual(found | {"twisted.plugins"}, listed)
