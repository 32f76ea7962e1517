"""apt-get installs for tests that need a system program (Chromium for the book, bubblewrap for the grader).

Where the program is missing, the test installs its Debian package with apt-get when it runs as root; otherwise
(not root, or apt-get fails) it is skipped with one line, and failed instead where CI=true, since CI must run it.
Used by tests/test_book.py and tests/test_exercises.py.
"""

import os
import shutil
import subprocess

import pytest


def unavailable(what: str, reason: str):
    """Skip the running test with one line naming `what` and `reason`; fail it instead where CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} cannot run, and CI=true requires it: {reason}")
    pytest.skip(f"{what} skipped: {reason}")


def apt_install(package: str, program: str, what: str) -> None:
    """Make `program` (an absolute path, or a name looked up on PATH) exist: apt-get install `package` as root.

    Returns at once if `program` exists. `what` names the test for the skip or CI failure (`unavailable`) when
    not root, when apt-get update / install fails or runs over 900 s (the last 300 characters of its stderr
    quoted), or when `program` is still missing after the install.
    """
    if shutil.which(program):
        return
    if os.geteuid() != 0:
        unavailable(what, f"no {program}, and not root to apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            unavailable(what, f"{' '.join(cmd)} failed: {error}")
        if done.returncode != 0:
            unavailable(what, f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
    if not shutil.which(program):
        unavailable(what, f"apt-get install {package} succeeded, yet there is no {program}")
