"""`python -m serve_app.agent.sandbox_check`: does the python tool's sandbox work on this
machine? Prints what it found; exits 1 (with the reason) if code cannot be run isolated."""
from __future__ import annotations

import asyncio
from pathlib import Path

from serve_app.agent.config import SandboxSettings
from serve_app.agent.sandbox import Sandbox, SandboxUnavailable


def main() -> None:
    import sys
    import tempfile

    sandbox = Sandbox(SandboxSettings())
    try:
        sandbox.check()
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(sandbox.run_python(
                "import socket, os\ntry:\n    socket.create_connection(('1.1.1.1', 53), 2)\n"
                "    print('NETWORK')\nexcept OSError:\n    print('isolated', os.getuid())\n",
                Path(tmp) / "ws", "sandbox-check"))
    except SandboxUnavailable as error:
        print(f"sandbox unavailable: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    if not result.ok or not result.stdout.startswith("isolated"):
        print(f"sandbox check failed: {result.as_dict()}", file=sys.stderr)
        raise SystemExit(1)
    limits = sandbox.limits
    print(f"sandbox ok: bwrap={sandbox.bwrap} privileged={sandbox.privileged} "
          f"tmpfs_size={sandbox.supports_tmpfs_size} run_limits={limits.backend}"
          + (f" (fallback: {limits.reason})" if limits.reason else "")
          + f" {result.stdout.strip()}")


if __name__ == "__main__":
    main()
