"""What the benchmarks share: a free loopback port for the servers they start, and how each ends (the JSON
on stdout and, for the record, under benchmarks/results/)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emit(report: dict, out: Path) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
