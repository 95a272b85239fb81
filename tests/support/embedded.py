"""`relais run` on the embedded bus as a real process, with the demo target beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO, free_port, readyz, wait_until
from tests.support.producers import write_targets


class EmbeddedRelais:
    def __init__(self, tmp_path: Path, *, targets_file: Path | None = None) -> None:
        """`targets_file`: deliver per this targets file instead of to the demo target (`start_target`)."""
        self.http_port, self.target_port = free_port(), free_port()
        self.tmp_path = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
        self.env |= {
            "RELAIS_HTTP_PORT": str(self.http_port),
            "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "RELAIS_EMBEDDED_LOG_PATH": str(tmp_path / "log.db"),
            "RELAIS_BLOB_DIR": str(tmp_path / "blobs"),
            "RELAIS_OPS_TOKEN": "embedded-ops-token",  # operator commands run with this env reach its /ops
            "RELAIS_RETRY_DELAYS_S": "[0.5, 1, 2]",
            "RELAIS_PRODUCERS_FILE": str(REPO / "deploy/dev/producers.yaml"),
            "RELAIS_TARGETS_FILE": str(targets_file or write_targets(
                tmp_path / "t.yaml", {"demo": f"http://127.0.0.1:{self.target_port}/fhir"})),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.target: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start_target(self) -> None:
        self.target = subprocess.Popen([sys.executable, "-m", "devtools.demotarget", "--port", str(self.target_port)],
                                       cwd=REPO, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        log = (self.tmp_path / "run.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run"], env=self.env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        wait_until(readyz(self.url), alive=lambda: proc.poll() is None, explain=self.log_tail,
                   interval_s=0.1, what="relais run to be ready")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(60)
        if self.target is not None and self.target.poll() is None:
            self.target.terminate()
            self.target.wait(10)
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> dict[str, int]:
        """The supervisor's children by name (ingress, worker-N, demo-target) -> pid, from /proc."""
        assert self.proc is not None
        names = {}
        pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, pids):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stages = argv[argv.index(b"--stages") + 1].decode() if b"--stages" in argv else "other"
            names["ingress" if stages.startswith("ingress") else f"{stages}:{pid}"] = pid
        return names

    def log_tail(self, chars: int = 3000) -> str:
        return (self.tmp_path / "run.log").read_text(errors="replace")[-chars:]
