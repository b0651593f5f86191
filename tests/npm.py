"""Installing the npm packages a test suite needs (Better Auth, playwright-core), once per lock file."""

import fcntl
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

INSTALL_TIMEOUT_SECONDS = 600.0
STAMP = ".installed-lock.sha256"


def ensure_node_modules(directory: Path) -> None:
    """`npm ci` in `directory` unless its node_modules already matches its package-lock.json.

    A stamp file holds the lock's hash, and a file lock makes concurrent test processes install once.
    Install scripts are not run, so no tool can download a browser or a binary of its own.
    """
    lock = directory / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = directory / "node_modules" / STAMP
    mutex = Path(tempfile.gettempdir()) / f"npm-{hashlib.sha256(bytes(directory)).hexdigest()[:16]}.lock"
    with mutex.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == digest:
            return
        command = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        environment = os.environ | {"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        try:
            done = subprocess.run(
                command,
                cwd=directory,
                env=environment,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{' '.join(command)} timed out after {INSTALL_TIMEOUT_SECONDS:.0f} s") from error
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        stamp.write_text(digest + "\n")
