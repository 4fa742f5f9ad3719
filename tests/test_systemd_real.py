"""The units under a real systemd 252 (PID 1 of a container booted by
shared/tools/systemd-nspawn/boot.sh), installed by running systemd/README.md's
install blocks as they stand: READY, STATUS, a file's line, reload, SIGKILL
with restart, the watchdog, exit 78 without a restart loop, a clean stop,
journald priorities, and logrotate with `tail -F` on the results file.

Needs root (CI runs as root); skips with the reason otherwise. What differs
from a real install, all in one test drop-in (`_test_dropin()`), plus `chmod o+x /root` inside the
container for the check-config line when the venv's Python is under /root: the code is
this checkout (symlinked at /opt/digitwatch, its venv at /opt/digitwatch/.venv,
PYTHONPATH pointing at the checkout); a Python under /root or /home is bound
into the sandbox read-only (ProtectHome=tmpfs); WatchdogSec=4 so that the
SIGSTOP check takes seconds. /var/lib/digitwatch is a bind mount of a real
host folder, because inotify on the container's overlay is unreliable.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCAN_FIXTURES, label_of

pytestmark = pytest.mark.system

README = ROOT / "systemd" / "README.md"
FIXTURES = sorted(SCAN_FIXTURES.glob("mnist-clean-*.png"))
STOP_TIMEOUT = 20.0  # the shipped default of stop_timeout
WATCHDOG_SEC = 4
RESTART_SEC = 5  # as shipped


def _find_tool(rel: str) -> Path | None:
    for parent in ROOT.parents:
        candidate = parent / "shared" / "tools" / rel
        if candidate.is_file():
            return candidate
    return None


def readme_block(marker: str) -> str:
    """The shell block between `<!-- MARKER-begin ... -->` and `<!-- MARKER-end -->`."""
    text = README.read_text()
    m = re.search(rf"<!-- {marker}-begin[^>]*-->\n```\w*\n(.*?)```\n<!-- {marker}-end -->", text, re.S)
    assert m, f"no {marker} block in {README}"
    return m.group(1)


# `sudo` is not installed in every image; as root it is the identity.
_SUDO_SHIM = """command -v sudo >/dev/null || sudo() {
  if [ "$1" = -u ]; then u=$2; shift 2; runuser -u "$u" -- "$@"; else "$@"; fi; }
"""


def _hidden_by_sandbox() -> tuple[list[str], list[str]]:
    """Paths the service must read (the interpreter, the venv, the checkout)
    that the unit's sandbox would hide: under /root or /home (ProtectHome=),
    under /tmp or /var/tmp (PrivateTmp= gives the service empty ones)."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, ROOT)}
    home = sorted(p for p in needed if p.startswith(("/root/", "/home/")) or p in ("/root", "/home"))
    tmp = sorted(p for p in needed if p.startswith(("/tmp/", "/var/tmp/")))
    return home, tmp


def _test_dropin() -> str:
    lines = ["[Service]", f"Environment=PYTHONPATH={ROOT}", f"WatchdogSec={WATCHDOG_SEC}"]
    home, tmp = _hidden_by_sandbox()
    if home:
        # tmpfs rather than an inaccessible /home, so the bind targets can be made.
        lines.append("ProtectHome=tmpfs")
    if home or tmp:
        # Bound into the sandbox read-only, after its private /tmp is mounted.
        lines.append("BindReadOnlyPaths=" + " ".join(home + tmp))
    return "\n".join(lines) + "\n"


class Machine:
    """A booted container; commands run inside through nsenter."""

    def __init__(self, name: str, state: Path) -> None:
        self.name = name
        self.state = state  # host folder seen as /var/lib/digitwatch inside
        self.pid: str | None = None

    def boot(self, tool: Path) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", str(tool), self.name, f"{self.state}:/var/lib/digitwatch"],
                           capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            self.pid = r.stdout.strip().splitlines()[-1]
        return r

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", "-t", self.pid, "-a", "bash", "-s"], input=script,
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"rc {r.returncode}\n{script}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show -p {','.join(props)} {unit}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_show(self, unit: str, cond, *props: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            values = self.show(unit, *props)
            if cond(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: {values} not reached in {timeout}s\n{self.journal(unit)[-3000:]}")
            time.sleep(0.2)

    def journal(self, unit: str, *args: str) -> str:
        return self.sh(f"journalctl --no-pager -o cat -u {unit} {' '.join(args)}", check=False).stdout

    def wait_started(self, unit: str, pid: str, timeout: float = 60) -> None:
        """Until the daemon with this PID logged daemon_started: start-up
        recovery and the backlog scan are done by then."""
        deadline = time.monotonic() + timeout
        while not any('"daemon_started"' in line and f'"pid": {pid}' in line
                      for line in self.journal(unit).splitlines()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: no daemon_started from pid {pid} in {timeout}s")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def machine():
    if os.geteuid() != 0:
        pytest.skip("needs root to boot a systemd container (CI runs as root)")
    tool = _find_tool("systemd-nspawn/boot.sh")
    if tool is None:
        pytest.skip("shared/tools/systemd-nspawn/boot.sh not found beside or above the checkout")
    if shutil.which("nsenter") is None:
        pytest.skip("nsenter not installed")
    if shutil.which("logrotate") is None and shutil.which("apt-get"):
        # Before the boot: the container is an overlay of this root filesystem.
        # .ci/run installs it too; without it the logrotate test skips.
        subprocess.run("apt-get install -y -qq logrotate || (apt-get update -qq && apt-get install -y -qq logrotate)",
                       shell=True, capture_output=True, timeout=600)
    state = Path(tempfile.mkdtemp(prefix="dw-systemd-"))
    m = Machine(f"dwtest{os.getpid()}", state)
    started = time.monotonic()
    r = m.boot(tool)
    if r.returncode != 0:
        subprocess.run(["bash", str(tool.with_name("stop.sh")), m.name], capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"boot.sh failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    m.boot_s = time.monotonic() - started
    # The container is an overlay of the host's root filesystem only: a
    # checkout or venv on another mount is not inside.
    seen = m.sh(f"test -f {ROOT}/pyproject.toml && test -x {sys.prefix}/bin/python", check=False)
    if seen.returncode != 0:
        subprocess.run(["bash", str(tool.with_name("stop.sh")), m.name], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"{ROOT} or {sys.prefix} is not on the root filesystem, so not inside the container")
    # The checkout at /opt/digitwatch (what `git clone` + `make` give a real
    # install), with this interpreter's venv as its .venv.
    entries = " ".join(str(p) for p in ROOT.iterdir() if p.name != ".venv")
    dropin = _test_dropin()
    m.sh(f"""set -e
mkdir -p /opt/digitwatch
for e in {entries}; do ln -sfn "$e" /opt/digitwatch/; done
ln -sfn {sys.prefix} /opt/digitwatch/.venv
for u in digitwatch.service digitwatch@.service; do
  mkdir -p /etc/systemd/system/$u.d
  cat > /etc/systemd/system/$u.d/zz-test.conf <<'EOF'
{dropin}EOF
done
""")
    yield m
    subprocess.run(["bash", str(tool.with_name("stop.sh")), m.name], capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


def drop(inbox: Path, name: str, data: bytes) -> None:
    """As a scanner does it: write under a dot-name, then rename."""
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return list(csv.DictReader(io.StringIO(path.read_text(errors="replace"))))


def wait_rows(path: Path, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = read_csv(path)
        if len(rows) >= n:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(rows)} of {n} lines in {path} after {timeout}s")
        time.sleep(0.1)


def _active(v: dict) -> bool:
    return v.get("ActiveState") == "active"


# ---------------------------------------------------------------- the plain unit


@pytest.fixture(scope="module")
def installed(machine):
    """systemd/README.md's install block, pasted as is (cwd /opt/digitwatch)."""
    started = time.monotonic()
    r = machine.sh(_SUDO_SHIM + "cd /opt/digitwatch\nset -e\n" + readme_block("install"), check=False)
    machine.install_s = time.monotonic() - started
    assert r.returncode == 0, f"install block failed: rc {r.returncode}\n{r.stdout}\n{r.stderr}\n" + \
        machine.journal("digitwatch")[-3000:]
    machine.install_out = r.stdout
    return machine


def test_install_block_gives_a_ready_service(installed):
    m = installed
    assert "ActiveState=active" in m.install_out, m.install_out
    assert m.install_s < 30, f"enable --now took {m.install_s:.1f}s"
    v = m.show("digitwatch", "ActiveState", "SubState", "StatusText", "NRestarts", "User")
    assert v["ActiveState"] == "active" and v["SubState"] == "running", v
    assert v["StatusText"], "no STATUS= text"
    assert v["NRestarts"] == "0"
    # What the unit created, and the modes the README promises.
    st = os.stat(m.state)
    assert oct(st.st_mode & 0o7777) == "0o750"
    inbox = os.stat(m.state / "inbox")
    assert oct(inbox.st_mode & 0o7777) == "0o3770", oct(inbox.st_mode)
    assert inbox.st_uid == st.st_uid != 0


def test_dropped_png_gets_its_line_and_status(installed):
    m = installed
    src = FIXTURES[0]
    before = len(read_csv(m.state / "results.csv"))
    drop(m.state / "inbox", "first-" + src.name, src.read_bytes())
    rows = wait_rows(m.state / "results.csv", before + 1)
    row = rows[-1]
    assert row["file"] == "first-" + src.name and row["status"] == "ok"
    assert int(row["digit"]) == label_of(src)
    assert oct(os.stat(m.state / "results.csv").st_mode & 0o777) == "0o640"  # group-readable, no more
    v = m.wait_show("digitwatch", lambda v: "ok=" in v["StatusText"] and "ok=0 " not in v["StatusText"],
                    "StatusText", timeout=WATCHDOG_SEC * 3)
    assert re.search(r"\bok=[1-9]", v["StatusText"]), v


def test_a_group_member_drops_and_reads_nobody_else_does(installed):
    """systemd/README.md, "Who may write the inbox": a scanner account in the
    group drops a scan (umask 0027) and reads the results; it cannot remove
    the daemon's claim folder; an account outside the group cannot even list."""
    m = installed
    src = FIXTURES[-1]
    m.sh(f"""set -e
id scanner >/dev/null 2>&1 || useradd --no-create-home scanner
id outsider >/dev/null 2>&1 || useradd --no-create-home outsider
usermod -aG digitwatch scanner
cat {src} > /run/scan.png
chmod 0644 /run/scan.png
""")
    r = m.sh("cd / && runuser -u scanner -- sh -c 'umask 0027 && cp /run/scan.png "
             "/var/lib/digitwatch/inbox/.member.part && mv /var/lib/digitwatch/inbox/.member.part "
             "/var/lib/digitwatch/inbox/member-scan.png'", check=False)
    assert r.returncode == 0, r.stderr
    rows = wait_rows(m.state / "results.csv", 1)
    deadline = time.monotonic() + 30
    while "member-scan.png" not in [x["file"] for x in rows] and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = read_csv(m.state / "results.csv")
    row = [x for x in rows if x["file"] == "member-scan.png"]
    assert row and row[0]["status"] == "ok" and int(row[0]["digit"]) == label_of(src), row
    read = m.sh("runuser -u scanner -- tail -n 1 /var/lib/digitwatch/results.csv", check=False)
    assert read.returncode == 0 and read.stdout.strip(), read.stderr
    rm = m.sh("runuser -u scanner -- rm -rf /var/lib/digitwatch/inbox/.digitwatch", check=False)
    assert rm.returncode != 0, "a group member removed the daemon's claim folder"
    assert (m.state / "inbox" / ".digitwatch").is_dir()
    other = m.sh("runuser -u outsider -- ls /var/lib/digitwatch/inbox", check=False)
    assert other.returncode != 0, "an account outside the group can list the inbox"
    other = m.sh("runuser -u outsider -- cat /var/lib/digitwatch/results.csv", check=False)
    assert other.returncode != 0, "an account outside the group can read the results"


def test_journal_warning_priority_shows_file_failed(installed):
    """Depends on the daemon writing `<4>` prefixes under JOURNAL_STREAM (i13-app)."""
    m = installed
    before = len(read_csv(m.state / "results.csv"))
    drop(m.state / "inbox", "broken.png", b"this is not a png\n")
    rows = wait_rows(m.state / "results.csv", before + 1)
    assert rows[-1]["file"] == "broken.png" and rows[-1]["status"] == "error"
    deadline = time.monotonic() + 10
    while "file_failed" not in (warn := m.journal("digitwatch", "-p", "warning")) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "file_failed" in warn, "journalctl -p warning has no file_failed:\n" + warn[-2000:]
    assert "file_classified" not in warn


def test_check_config_as_the_readme_says_agrees_with_the_service(installed):
    m = installed
    prep = ""
    if any(p.startswith("/root") for p in _hidden_by_sandbox()[0]):
        prep = "chmod o+x /root\n"  # inside the container only: the venv's Python is under /root here
    r = m.sh(_SUDO_SHIM + prep + "cd /opt/digitwatch\n" + readme_block("check-config"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    shown = dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split(None, 1)) == 2)
    journal = m.journal("digitwatch")
    started = [json.loads(x) for x in journal.splitlines() if '"daemon_started"' in x][-1]
    for key in ("inbox", "processed", "failed", "results"):
        assert shown[key].strip() == started["settings"][key], (key, shown[key], started["settings"][key])


def _results_fds(m: Machine, pid: str) -> list[str]:
    out = m.sh(f"for f in /proc/{pid}/fd/*; do readlink $f; done", check=False).stdout
    return [line for line in out.splitlines() if "results.csv" in line]


def test_reload_reopens_the_results_file(installed):
    m = installed
    results = m.state / "results.csv"
    wait_rows(results, 1)
    pid = m.show("digitwatch", "MainPID")["MainPID"]
    os.rename(results, m.state / "results.csv.old")
    assert any(f.endswith("results.csv.old") for f in _results_fds(m, pid)), _results_fds(m, pid)
    m.sh("systemctl reload digitwatch")
    deadline = time.monotonic() + 10
    while any(f.endswith("results.csv.old") for f in _results_fds(m, pid)):
        assert time.monotonic() < deadline, "still writing the renamed file after reload"
        time.sleep(0.1)
    assert "results_reopened" in m.journal("digitwatch")
    src = FIXTURES[1]
    drop(m.state / "inbox", "after-reload-" + src.name, src.read_bytes())
    rows = wait_rows(results, 1)
    assert [r["file"] for r in rows] == ["after-reload-" + src.name]  # a new file, header first
    assert m.show("digitwatch", "MainPID")["MainPID"] == pid


def _drop_many(inbox: Path, prefix: str, n: int) -> list[str]:
    names = []
    for i in range(n):
        src = FIXTURES[i % len(FIXTURES)]
        name = f"{prefix}-{i:03d}-{src.name}"
        drop(inbox, name, src.read_bytes())
        names.append(name)
    return names


def _check_sigkill_run(m: Machine, unit: str, base: Path, prefix: str, n: int) -> None:
    results = base / "results.csv"
    before = {r["file"] for r in read_csv(results)}
    restarts = int(m.show(unit, "NRestarts")["NRestarts"])
    pid = m.show(unit, "MainPID")["MainPID"]
    names = _drop_many(base / "inbox", prefix, n)
    deadline = time.monotonic() + 30
    while not ({r["file"] for r in read_csv(results)} - before):  # mid-run: the first line is out
        assert time.monotonic() < deadline
        time.sleep(0.02)
    out_at_kill = len({r["file"] for r in read_csv(results)} - before)
    m.sh(f"systemctl kill -s SIGKILL {unit}")
    killed = time.monotonic()
    v = m.wait_show(unit, lambda v: _active(v) and v["MainPID"] not in ("0", pid),
                    "ActiveState", "MainPID", "NRestarts", timeout=RESTART_SEC + 30)
    assert int(v["NRestarts"]) == restarts + 1, v
    deadline = time.monotonic() + 60
    while True:
        mine = [r["file"] for r in read_csv(results) if r["file"].startswith(prefix + "-")]
        if len(mine) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    after_kill = time.monotonic() - killed
    # Anything duplicated would come with the new process's start-up recovery,
    # which is over once it says daemon_started.
    m.wait_started(unit, v["MainPID"])
    mine = [r["file"] for r in read_csv(results) if r["file"].startswith(prefix + "-")]
    assert len(mine) == n and len(set(mine)) == n, (len(mine), len(set(mine)))
    assert set(mine) == set(names)
    placed = [p.name for p in (base / "processed").rglob("*.png") if p.name.startswith(prefix + "-")]
    assert sorted(placed) == sorted(names), "an extra or missing copy in processed/"
    assert not [p for p in (base / "inbox").iterdir() if p.name.startswith(prefix)]
    print(f"{unit}: {n} files, SIGKILL with {out_at_kill} lines out, NRestarts {restarts} -> {v['NRestarts']}, "
          f"all {n} lines {after_kill:.1f}s after the kill")


def test_sigkill_mid_run_restarts_with_nothing_lost_or_doubled(installed):
    _check_sigkill_run(installed, "digitwatch", installed.state, "kill", 60)


def test_watchdog_catches_a_stopped_daemon(installed):
    m = installed
    v = m.wait_show("digitwatch", _active, "ActiveState", "MainPID", "NRestarts")
    started = time.monotonic()
    m.sh(f"kill -STOP {v['MainPID']}")
    after = m.wait_show("digitwatch", lambda w: _active(w) and w["MainPID"] not in ("0", v["MainPID"]),
                        "ActiveState", "MainPID", "NRestarts", timeout=WATCHDOG_SEC + RESTART_SEC + 40)
    took = time.monotonic() - started
    assert int(after["NRestarts"]) == int(v["NRestarts"]) + 1
    assert "watchdog timeout" in m.journal("digitwatch").lower()
    assert took < WATCHDOG_SEC + RESTART_SEC + 20, took


def test_stop_exits_zero_within_stop_timeout(installed):
    m = installed
    m.wait_show("digitwatch", _active, "ActiveState")
    started = time.monotonic()
    m.sh("systemctl stop digitwatch")
    took = time.monotonic() - started
    v = m.show("digitwatch", "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert v["ActiveState"] == "inactive" and v["Result"] == "success", v
    assert v["ExecMainStatus"] == "0", v
    assert took < STOP_TIMEOUT, took
    m.sh("systemctl start digitwatch")  # for the tests after this one


# ---------------------------------------------------------------- the template unit


@pytest.fixture(scope="module")
def template(installed):
    r = installed.sh(_SUDO_SHIM + "cd /opt/digitwatch\nset -e\n" + readme_block("template"), check=False)
    assert r.returncode == 0, f"template block failed: {r.stdout}\n{r.stderr}\n" + \
        installed.journal("digitwatch@scanner1")[-3000:]
    assert "ActiveState=active" in r.stdout, r.stdout
    return installed


def test_template_instance_sigkill_then_clean_stop(template):
    m = template
    base = m.state / "scanner1"
    assert oct(os.stat(base / "inbox").st_mode & 0o7777) == "0o3770"
    _check_sigkill_run(m, "digitwatch@scanner1", base, "tpl", 60)
    host = m.sh("hostname").stdout.strip()
    assert {r["instance"] for r in read_csv(base / "results.csv")} == {f"{host}-scanner1"}
    started = time.monotonic()
    m.sh("systemctl stop digitwatch@scanner1")
    v = m.show("digitwatch@scanner1", "ActiveState", "Result", "ExecMainStatus")
    assert v == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, v
    assert time.monotonic() - started < STOP_TIMEOUT


def test_inbox_outside_readwritepaths_exits_78_without_restarts(template):
    """Depends on the start-up writability check (i13-app): today an unwritable
    inbox is a traceback and a restart loop."""
    m = template
    m.sh("""set -e
install -d -o digitwatch -g digitwatch -m 3770 /srv/dw-outside/inbox
cat > /etc/digitwatch/outside.toml <<'EOF'
[digitwatch]
inbox = "/srv/dw-outside/inbox"
processed = "/var/lib/digitwatch/outside/processed"
failed = "/var/lib/digitwatch/outside/failed"
results = "/var/lib/digitwatch/outside/results.csv"
EOF
""")
    m.sh("systemctl start digitwatch@outside", check=False)
    # systemd decides on a restart when the process exits: a unit it will
    # restart waits in SubState auto-restart; one it will not is failed for good.
    v = m.wait_show("digitwatch@outside",
                    lambda v: v["ActiveState"] in ("failed", "inactive") and v["SubState"] != "auto-restart",
                    "ActiveState", "SubState", "ExecMainStatus", "NRestarts", "Result", timeout=30)
    journal = m.journal("digitwatch@outside")
    assert v["ExecMainStatus"] == "78", f"{v}\n{journal[-2000:]}"
    assert v["NRestarts"] == "0", v
    assert "/srv/dw-outside/inbox" in journal
    assert "Traceback" not in journal


# ---------------------------------------------------------------- logrotate + tail -F


def test_logrotate_three_rotations_lose_nothing_and_tail_follows(installed):
    m = installed
    if m.sh("command -v logrotate", check=False).returncode != 0:
        pytest.skip("logrotate not installed (apt-get install logrotate; .ci/run does)")
    m.sh("systemctl is-active digitwatch")
    conf = readme_block("logrotate")
    m.sh(f"cat > /etc/logrotate.d/digitwatch <<'EOF'\n{conf}EOF\n")
    results = m.state / "results.csv"
    wait_rows(results, 1)
    tail = subprocess.Popen(["tail", "-n", "+1", "-F", str(results)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    followed_lines: list[str] = []
    reader = threading.Thread(target=lambda: followed_lines.extend(tail.stdout), daemon=True)
    reader.start()
    try:
        names: list[str] = []
        for rotation in range(3):
            for i in range(25):
                names += _drop_many(m.state / "inbox", f"rot{rotation}x{i:02d}", 1)
                time.sleep(0.02)
            m.sh("logrotate -f -s /run/dw-logrotate.status /etc/logrotate.d/digitwatch")
        names += _drop_many(m.state / "inbox", "rot3", 25)
        deadline = time.monotonic() + 60
        while True:
            lines = _all_rotated_lines(m.state)
            got = [x for x in lines if x.split(",")[1].startswith("rot")] if lines else []
            if len(got) >= len(names) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        # Until tail -F (1 s poll fallback) has shown every line that was written.
        deadline = time.monotonic() + 30
        while (set(names) - {x.split(",")[1] for x in list(followed_lines) if x.count(",") > 1}
               and time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        tail.terminate()
        tail.wait(timeout=10)
        reader.join(timeout=10)
        followed = "".join(followed_lines)
    files = sorted(p.name for p in m.state.iterdir() if p.name.startswith("results.csv"))
    got = [x.split(",")[1] for x in _all_rotated_lines(m.state) if x.split(",")[1].startswith("rot")]
    assert len(got) == len(names) and set(got) == set(names), (len(got), len(set(got)), len(names), files)
    assert len(files) >= 4, files  # results.csv, .1, .2.gz, .3.gz
    tailed = {x.split(",")[1] for x in followed.splitlines() if x.count(",") > 5}
    assert set(names) <= tailed, f"tail -F missed {len(set(names) - tailed)} of {len(names)}"


def _all_rotated_lines(state: Path) -> list[str]:
    lines = []
    for p in state.iterdir():
        if not p.name.startswith("results.csv"):
            continue
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        lines += [x for x in data.decode(errors="replace").splitlines()[1:] if x.count(",") > 5]
    return lines
