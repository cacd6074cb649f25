"""Issue 17: private Twisted names are used only inside llamaproxy/fastpath/ (and the few
documented exceptions below, which both the fast and the stock path need)."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent.parent / "llamaproxy"

#: An import of a private Twisted name, a private module, or a name-mangled attribute.
IMPORTS = re.compile(
    r"from twisted[.a-z_]* import .*\b_[A-Za-z]|twisted\.[a-z_.]*\._[a-z]|\._HTTPChannel__")
#: Private attributes of Twisted objects this project has used (and might use again).
KNOWN = re.compile(
    r"\b(_maybeChooseTransferDecoder|_ChunkedTransferDecoder|_MalformedChunkedDataError|"
    r"_IdentityTransferDecoder|_respondToBadRequestAndDisconnect|_exitSignal|_newclient|_abnf|"
    r"_DataLoss|_selectables|_poller|_doReadOrWrite|_disconnectSelectable|_tempDataBuffer|"
    r"_writeDisconnect\w*|_aborting|_NO_FILEDESC|_transferDecoder|_command|_dataReceived|"
    r"_handleSignals|_disconnected|_handlingRequest|_networkProducer|_dataBuffer|"
    r"_savedTimeOut|_requestProducer|_finishRequestBody|_send100Continue|_rawHeaders)\b")

#: Outside fastpath/, on purpose: none (the HTTP edge is gateway/channel.py, public APIs only).
ALLOWED: set[tuple[str, str]] = set()


class PrivateNamesTests(SynchronousTestCase):
    def test_only_the_fast_path_package_uses_private_twisted_names(self) -> None:
        found = set()
        for path in sorted(PACKAGE.rglob("*.py")):
            relative = path.relative_to(PACKAGE).as_posix()
            if relative.startswith("fastpath/"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if IMPORTS.search(line):
                    found.add((relative, f"line {number}: {line.strip()}"))
                for match in KNOWN.finditer(line):
                    found.add((relative, match.group(1)))
        self.assertEqual(found - ALLOWED, set())
        self.assertEqual(ALLOWED - found, set())  # an exception no longer needed is removed
