"""A private Postfix instance for the bounce tests: its own config, queue and data directories.

It relays the test's recipient domain to a local SMTP server (the tests'
aiosmtpd capture, which answers 550 5.1.1 to ``reject*`` recipients: Postfix
has already accepted the message, so it writes an RFC 3464 bounce to the
envelope sender) and the VERP bounce domain to the bounce receiver's port.
(Postfix's ``error:`` transport would not do: smtpd refuses such recipients
at RCPT, synchronously, and no bounce is ever written.) The machine's own Postfix (if any) is not touched: ``postfix -c <dir>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")
_START_SECONDS = 30.0  # a deadline for start-up only; no assertion depends on Postfix's speed

# Every service Postfix needs to relay and bounce, none chrooted (the chroot would need a copy of
# /etc files inside the temporary queue directory). The smtpd line is added per instance.
_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Postfix:
    """One private instance: ``start(relay_port, bounce_port)``, then ``stop()`` (always, even after a failure)."""

    def __init__(self, recipient_domain: str, bounce_domain: str) -> None:
        self.port = free_port()  # smtpd's: known before start, so the email service can be pointed at it
        self.recipient_domain = recipient_domain
        self.bounce_domain = bounce_domain
        # Not under pytest's tmp_path: its parents are mode 0700, and Postfix's daemons run as the
        # postfix user, who must reach the queue directory.
        self.root = Path(tempfile.mkdtemp(prefix="belfry-postfix-"))
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.log = self.root / "maillog"
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - fixed binary, our own arguments
            [str(POSTFIX), "-c", str(self.config), *args], capture_output=True, text=True, timeout=60, check=False
        )

    def write_config(self, relay_port: int, bounce_port: int) -> None:
        """main.cf, master.cf and the transport map."""
        self.config.mkdir()
        (self.root / "queue").mkdir()  # root's; `postfix check` creates its subdirectories with their owners
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", "postfix", "postfix")
        transport = self.config / "transport"
        transport.write_text(
            f"{self.recipient_domain} smtp:[127.0.0.1]:{relay_port}\n"
            f"{self.bounce_domain} smtp:[127.0.0.1]:{bounce_port}\n"
        )
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.root / "queue"),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "mta.postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": f"{self.recipient_domain}, {self.bounce_domain}",
            "relay_recipient_maps": "",
            "transport_maps": f"texthash:{transport}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # Bracketed next hops only: no DNS lookups in the test.
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtputf8_enable": "no",
            "biff": "no",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "delay_warning_time": "0",
            # Retry quickly if the receiver answered 4xx (it does so only while the database is away).
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        (self.config / "master.cf").write_text(smtpd + _MASTER)

    def start(self, relay_port: int, bounce_port: int) -> int:
        """Configure, check and start; wait until smtpd accepts connections; its port."""
        self.write_config(relay_port, bounce_port)
        checked = self._run("check")
        if checked.returncode != 0 or checked.stderr.strip() or "warning:" in self.maillog():
            raise RuntimeError(f"postfix check is not clean: {checked.stderr.strip()}\n{self.maillog()}")
        started = self._run("start")
        self.started = True  # stop() even if start reported a failure half-way
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr.strip()}\n{self.maillog()}")
        deadline = time.monotonic() + _START_SECONDS
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                    if conn.recv(64).startswith(b"220"):
                        return self.port
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix smtpd did not answer on port {self.port}\n{self.maillog()}")
            time.sleep(0.05)

    def maillog(self) -> str:
        """What Postfix logged (for failure messages)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no maillog)"

    def _master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the instance (its master and every daemon it started) and remove its directories."""
        try:
            if self.started:
                pid = self._master_pid()
                if self._run("stop").returncode != 0 and pid is not None:
                    # Only this instance's master (its own pid file): it takes its children with it.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                if pid is not None:
                    deadline = time.monotonic() + 10.0
                    while time.monotonic() < deadline and _alive(pid):
                        time.sleep(0.05)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
