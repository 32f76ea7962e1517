"""tests/_apt.py: the apt-get install of the book's Chromium and the grader's bubblewrap, skip or CI failure."""

import subprocess

import pytest

import _apt

WHAT = "the frobnicator test"


@pytest.fixture
def no_program(monkeypatch):
    """No program on PATH, not CI; apt-get calls recorded (and answered by `replies`) instead of run."""
    monkeypatch.setattr(_apt.shutil, "which", lambda program: None)
    monkeypatch.delenv("CI", raising=False)
    calls, replies = [], []

    def run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]["DEBIAN_FRONTEND"]))
        reply = replies.pop(0) if replies else 0
        if isinstance(reply, Exception):
            raise reply
        return subprocess.CompletedProcess(cmd, reply, "", "E: Unable to locate package frob")

    monkeypatch.setattr(_apt.subprocess, "run", run)
    return calls, replies


def test_a_present_program_installs_nothing(no_program, monkeypatch):
    monkeypatch.setattr(_apt.shutil, "which", lambda program: f"/usr/bin/{program}")
    _apt.apt_install("frob", "frob", WHAT)
    assert no_program[0] == []


def test_not_root_skips_with_one_line_or_fails_under_ci(no_program, monkeypatch):
    monkeypatch.setattr(_apt.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="^the frobnicator test skipped: no frob, and not root to "
                                                    "apt-get install frob-pkg$"):
        _apt.apt_install("frob-pkg", "frob", WHAT)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="the frobnicator test cannot run, and CI=true requires it: no "
                                                    "frob"):
        _apt.apt_install("frob-pkg", "frob", WHAT)
    assert no_program[0] == []


def test_root_runs_apt_get_update_then_install(no_program, monkeypatch):
    calls, replies = no_program
    monkeypatch.setattr(_apt.os, "geteuid", lambda: 0)
    installed = iter([None, "/usr/bin/frob"])  # missing before the install, present after it
    monkeypatch.setattr(_apt.shutil, "which", lambda program: next(installed))
    _apt.apt_install("frob-pkg", "frob", WHAT)
    assert calls == [(["apt-get", "update", "-qq"], "noninteractive"),
                     (["apt-get", "install", "-y", "-qq", "frob-pkg"], "noninteractive")]


@pytest.mark.parametrize("reply, message", [
    ([0, 100], "apt-get install -y -qq frob-pkg failed: E: Unable to locate package frob"),
    ([subprocess.TimeoutExpired("apt-get", 900)], "apt-get update -qq failed: Command 'apt-get' timed out"),
    ([0, 0], "apt-get install frob-pkg succeeded, yet there is no frob")])
def test_a_failed_install_skips_or_fails_under_ci(no_program, monkeypatch, reply, message):
    calls, replies = no_program
    monkeypatch.setattr(_apt.os, "geteuid", lambda: 0)
    for ci, outcome in ((None, pytest.skip.Exception), ("true", pytest.fail.Exception)):
        if ci:
            monkeypatch.setenv("CI", ci)
        replies[:] = reply
        with pytest.raises(outcome, match="the frobnicator test .*" + message):
            _apt.apt_install("frob-pkg", "frob", WHAT)
