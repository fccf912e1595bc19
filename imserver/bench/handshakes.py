"""
What a TLS handshake costs the gate, full and resumed with a session
ticket: C{python -m imserver.bench.handshakes}.

A gate (C{twistd im}, the memory store, one C{ssl:} listener on loopback,
pinned to C{--server-cpu}) takes C{--count} TLS 1.3 handshakes of each kind
from Python's own TLS client (C{ssl}, which keeps and offers tickets, unlike
Twisted's), in alternating blocks; the gate's CPU time over each block
(C{/proc/PID/stat}) divided by its handshakes is the figure.  Each
connection reads until the gate has sent its tickets, then closes without
authenticating.  Prints one JSON object.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from twisted.python import usage

from imserver.datadir import CERT_FILE_NAME
from imserver.spawn import childEnvironment, listeningPattern, twistdArgv

_LISTENING = listeningPattern()


class Options(usage.Options):
    optParameters = [
        ["count", "n", 500, "Handshakes of each kind.", int],
        ["blocks", None, 4, "Alternating blocks of each kind.", int],
        ["server-cpu", None, "0", "CPU list the gate is pinned to (taskset)."],
    ]


def _cpuSeconds(pid):
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime, fields 14 and 15 of stat(5) (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _handshake(port, context, session):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as sock:
            # The tickets follow the handshake under TLS 1.3.
            sock.settimeout(0.005)
            try:
                sock.recv(1)
            except TimeoutError:
                pass
            return sock.session, sock.session_reused


def run(count, blocks, serverCPU):
    """
    @return: the result, a L{dict}.
    """
    with tempfile.TemporaryDirectory() as dataDir:
        argv = twistdArgv(
            [
                "--data-dir",
                dataDir,
                "--store",
                "memory",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--api",
                "none",
            ],
            cpu=serverCPU,
        )
        # The gate's log goes to a file: a pipe nobody reads would fill and
        # stop the gate.
        logPath = os.path.join(dataDir, "gate.log")
        with open(logPath, "wb") as log:
            gate = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=childEnvironment()
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                with open(logPath, "rb") as log:
                    output = log.read()
                match = _LISTENING.search(output)
                if match:
                    port = int(match.group(1))
                    break
                if gate.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the gate did not listen:\n" + output.decode())
                time.sleep(0.05)
            context = ssl.create_default_context(cafile=os.path.join(dataDir, CERT_FILE_NAME))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            session, _ = _handshake(port, context, None)
            cpu = {"full": 0.0, "resumed": 0.0}
            done = {"full": 0, "resumed": 0}
            resumed = 0
            per = max(1, count // blocks)
            for _ in range(blocks):
                for kind in ("full", "resumed"):
                    before = _cpuSeconds(gate.pid)
                    for _ in range(per):
                        if kind == "full":
                            _handshake(port, context, None)
                        else:
                            session, reused = _handshake(port, context, session)
                            resumed += reused
                    cpu[kind] += _cpuSeconds(gate.pid) - before
                    done[kind] += per
            return {
                "handshakes": done,
                "resumed": resumed,
                "gate_cpu_us_per_handshake": {
                    kind: round(cpu[kind] / done[kind] * 1e6, 1) for kind in cpu
                },
            }
        finally:
            gate.terminate()
            gate.wait(10)


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit("{}\n{}".format(options, e))
    result = run(options["count"], options["blocks"], options["server-cpu"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
