"""The hostile-state corpus: state planted where the daemon keeps its own
(`inbox/.digitwatch`, which inbox writers can reach) and history it must not
destroy, run against the real daemon subprocess.

Every planted case ends one of two ways, and nothing else passes:

- the daemon starts, nothing outside its folders is touched (a victim folder
  with a PNG, a text file and a sub-folder keeps the same names, bytes and
  inodes), and a good file dropped beside the planted state gets exactly one
  result line (and no other line is written); or
- the daemon refuses to start: exit 78 and a one-line reason naming the path.

The journal format is being redesigned, so hostile journals are written
generically (garbage bytes, empty, `{`, JSON of the wrong shape, and JSON in
the format of this writing with `../` names); the assertions are black-box.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import time
import zlib
from pathlib import Path

import pytest

from tests.daemon_harness import PNG_GOOD, DaemonProc, drop

pytestmark = pytest.mark.system

EX_CONFIG = 78
SCANS = sorted((Path(__file__).parent / "fixtures" / "scans").glob("*.png"))
OLD = time.time() - 3 * 86400  # mtime for planted folders: long dead
RESULT_KEYS = ("file", "digit", "confidence", "status", "error", "sha256", "width", "height",
               "model", "latency_ms", "ts", "moved_to", "instance")


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """Names, kinds, inodes and contents under `root`, links never followed."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = None
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_ino, what)
    return out


def make_victim(folder: Path) -> Path:
    """A folder outside the daemon's: a scan, a text file, a sub-folder of scans."""
    (folder / "sub").mkdir(parents=True)
    (folder / "x.png").write_bytes(SCANS[1].read_bytes())
    (folder / "secret.txt").write_text("keep out\n")
    (folder / "sub" / "y.png").write_bytes(SCANS[2].read_bytes())
    os.utime(folder / "sub", (OLD, OLD))
    return folder


def start_or_refuse(d: DaemonProc, names: str, timeout: float = 90) -> bool:
    """True when the daemon started; False when it refused as it should (exit
    78, one line naming the path, no traceback). Anything else fails."""
    d.start(wait=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = d.log.read_text(errors="replace") if d.log.exists() else ""
        if d.events("daemon_started"):
            return True
        if d.proc.poll() is not None:
            d._log_fh.close()
            assert d.proc.returncode == EX_CONFIG, f"exit {d.proc.returncode}, not 78:\n{text[-3000:]}"
            assert "Traceback" not in text, text[-3000:]
            reasons = [line for line in text.splitlines() if names in line]
            assert reasons, f"no line names {names}:\n{text[-3000:]}"
            return False
        time.sleep(0.05)
    d.kill()
    raise AssertionError(f"neither started nor refused in {timeout}s:\n{d.log.read_text()[-3000:]}")


def one_good_line(d: DaemonProc, before: int, name: str = "good.png", rescans: int = 3,
                  honest_refusal=None) -> None:
    """Drop a good scan; it gets exactly one line, and no other line is written
    from `before` (the line count before the daemon started) while recovery
    runs again at each of `rescans` rescans (the daemon runs with
    --rescan-seconds 1; waiting raises if it dies). `honest_refusal(row)` may
    allow other lines that only report an entry refused without being read."""
    drop(d.inbox, name, PNG_GOOD)
    d.wait_lines(before + 1, timeout=60)
    d.wait_rescans(rescans)
    assert d.proc.poll() is None, f"daemon died:\n{d.log.read_text()[-3000:]}"
    rows = d.lines()[before:]
    assert [r["file"] for r in rows].count(name) == 1, rows
    others = [r for r in rows if r["file"] != name]
    assert all(honest_refusal is not None and honest_refusal(r) for r in others), others
    assert not (d.inbox / name).exists()


def link_refused(row: dict) -> bool:
    """A line that reports a link refused: an error, nothing read (no hash), and
    what was placed is the link itself, never its target."""
    placed = Path(row["moved_to"]) if row["moved_to"] else None
    return (row["status"] == "error" and "link" in row["error"] and not row["sha256"]
            and (placed is None or placed.is_symlink()))


def finish(d: DaemonProc) -> None:
    if d.proc is not None and d.proc.poll() is None:
        try:
            assert d.terminate(timeout=30) == 0
        finally:
            if d.proc.poll() is None:
                d.kill()


def check_case(d: DaemonProc, victims: dict[Path, dict], names: str, honest_refusal=None) -> bool:
    """Run the two-way contract; returns whether the daemon started."""
    before = len(d.lines())
    try:
        started = start_or_refuse(d, names)
        if started:
            one_good_line(d, before, honest_refusal=honest_refusal)
    finally:
        finish(d)
    for root, before in victims.items():
        assert snapshot(root) == before, f"{root} was touched"
    return started


def dead_instance(workdir: Path, name: str) -> Path:
    """A folder that looks like an instance that died: named as the daemon
    names its own (`<instance>-<pid>-<hex>`), with a lock nobody holds, so the
    planted contents are read rather than set aside for the name alone."""
    folder = workdir / f"{name}-999999-{zlib.crc32(name.encode()):x}"
    folder.mkdir(parents=True)
    (folder / "lock").write_bytes(b"")
    os.utime(folder, (OLD, OLD))
    return folder


def forged_entry(token: str, rel: str, path: str, moved_to: str) -> dict:
    """One journal record in the format of this writing (token, rel, path, result)."""
    result = dict.fromkeys(RESULT_KEYS, "")
    result.update(file="forged.png", digit=1, confidence=0.99, status="ok", width=28, height=28,
                  latency_ms=1.0, moved_to=moved_to)
    return {"token": token, "rel": rel, "path": path, "result": result}


# ---------------------------------------------------------------- the claim folder


def test_workdir_symlink_to_outside_folder(tmp_path):
    victim = make_victim(tmp_path / "victim")
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    (d.inbox / ".digitwatch").symlink_to(victim, target_is_directory=True)
    check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch")


def test_workdir_is_a_regular_file(tmp_path):
    victim = make_victim(tmp_path / "victim")
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    (d.inbox / ".digitwatch").write_text("not a folder\n")
    check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch")


def test_workdir_links_to_parent_in_make_run_layout(tmp_path):
    """`ln -s .. inbox/.digitwatch` where inbox, processed, failed and the
    results file share one var/ (the `make run` layout)."""
    var = tmp_path / "var"
    d = DaemonProc(var, "--rescan-seconds", "1")
    history = var / "processed" / "2026-11-20"
    history.mkdir(parents=True)
    for i, src in enumerate(SCANS[3:6]):
        (history / f"old-{i}.png").write_bytes(src.read_bytes())
    (var / "failed" / "2026-11-20").mkdir(parents=True)
    (var / "failed" / "2026-11-20" / "bad.png").write_bytes(b"not a png")
    (var / "notes.txt").write_text("an unrelated file\n")
    old_line = json.dumps({"file": "old-0.png", "status": "ok"}) + "\n"
    d.results.write_text(old_line)
    for folder in (var / "processed", var / "failed", history):
        os.utime(folder, (OLD, OLD))
    (d.inbox / ".digitwatch").symlink_to("..", target_is_directory=True)
    victim = make_victim(tmp_path / "victim")
    keep = {victim: snapshot(victim), var / "processed": snapshot(var / "processed"),
            var / "failed": snapshot(var / "failed")}
    notes = (var / "notes.txt").stat().st_ino
    started = check_case(d, {victim: keep[victim]}, "inbox/.digitwatch")
    # processed/ and failed/ may gain today's folder; their history must not change.
    for root in (var / "processed", var / "failed"):
        now = snapshot(root)
        assert {k: v for k, v in now.items() if k in keep[root]} == keep[root], f"{root} history touched"
        assert set(keep[root]) <= set(now)
    assert (var / "notes.txt").stat().st_ino == notes
    assert (var / "notes.txt").read_text() == "an unrelated file\n"
    assert d.results.read_text().startswith(old_line)
    if not started:
        assert d.results.read_text() == old_line


def test_planted_dead_instance_linking_outside(tmp_path):
    """A fake dead instance: a lock, a claim that is a link to an outside file,
    and a token folder that is a link to an outside folder."""
    victim = make_victim(tmp_path / "victim")
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    for evil in (dead_instance(d.inbox / ".digitwatch", "evil"), d.inbox / ".digitwatch" / "evil"):
        evil.mkdir(exist_ok=True)
        (evil / "lock").touch()
        (evil / "00000001-x.png").symlink_to(victim / "x.png")
        (evil / "00000002").symlink_to(victim, target_is_directory=True)
        (evil / "00000003-secret.txt").symlink_to(victim / "secret.txt")
        os.utime(evil, (OLD, OLD))
    # A link among a dead instance's claims is what a link dropped into the
    # inbox and claimed looks like: reporting it refused (link placed, never
    # followed) is the daemon's own honest line, not a forged one.
    check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch", honest_refusal=link_refused)


GARBAGE_JOURNALS = {
    "garbage": os.urandom(64) + b"\xff\xfe\x00",
    "empty": b"",
    "brace": b"{",
    "object": b'{"token": "00000001"}',
    "list-of-numbers": b"[1, 2, 3]",
    "list-of-wrong-records": b'[{"token": 5, "rel": null, "path": [], "result": "x"}]',
    "null": b"null",
    "truncated": json.dumps([forged_entry("00000001", "gone.png", "/nonexistent/gone.png",
                                          "/nonexistent/out.png")]).encode()[:70],
}


def plant_garbage_journals(workdir: Path) -> None:
    for kind, body in GARBAGE_JOURNALS.items():
        folder = dead_instance(workdir, f"dead-{kind}")
        (folder / "journal-00000001.json").write_bytes(body)
        os.utime(folder, (OLD, OLD))


def test_garbage_journals_in_dead_instances(tmp_path):
    victim = make_victim(tmp_path / "victim")
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    (d.inbox / ".digitwatch").mkdir(mode=0o700)
    plant_garbage_journals(d.inbox / ".digitwatch")
    check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch")


def test_garbage_journals_planted_while_running(tmp_path):
    """One planted file must not kill a running instance at its next rescan."""
    victim = make_victim(tmp_path / "victim")
    before = snapshot(victim)
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    try:
        assert start_or_refuse(d, "inbox"), "a clean start was refused"
        plant_garbage_journals(d.inbox / ".digitwatch")
        d.wait_rescans(3)  # each runs recovery over the planted folders; raises if the daemon dies
        one_good_line(d, 0)
    finally:
        finish(d)
    assert snapshot(victim) == before


def test_journal_climbing_out_with_dotdot(tmp_path):
    """A journal whose `rel` climbs out of the claim folder (to base/victim) and
    whose `moved_to` names a path outside, or one inside processed/."""
    d = DaemonProc(tmp_path, "--rescan-seconds", "1")
    victim = make_victim(tmp_path / "victim")
    workdir = d.inbox / ".digitwatch"
    workdir.mkdir(mode=0o700)
    targets = [str(victim / "planted-link.txt"), str(d.processed / "forged.txt")]
    for i, moved_to in enumerate(targets):
        folder = dead_instance(workdir, f"forger-{i}")
        (folder / "00000001").mkdir()  # a token folder for `rel` to climb out of
        rel = "../../../../victim/secret.txt"
        entry = forged_entry("00000001", rel, str(victim / "secret.txt"), moved_to)
        flat = forged_entry("00000002", "../../../victim/x.png", str(victim / "x.png"), moved_to + ".2")
        (folder / "journal-00000001.json").write_text(json.dumps([entry, flat]))
        os.utime(folder, (OLD, OLD))
    # The same attack in the version 2 journal (i10-core's commit protocol:
    # names as hex bytes, a destination key, a day and a target name).
    climbs = [(b"../../../../victim/secret.txt", b"secret.txt"), (b"x.png", b"../../../victim/planted"),
              (b"/" + os.fsencode(victim / "x.png"), b"x.png"), (b"sub/../../../../victim/x.png", b"y.png")]
    for i, (rel, target) in enumerate(climbs):
        folder = dead_instance(workdir, f"forger-v2-{i}")
        (folder / "00000001").mkdir()
        result = forged_entry("", "", "", str(victim / "planted-v2.txt"))["result"]
        body = {"v": 2, "results": str(d.results), "entries": [
            {"token": "00000001", "rel": rel.hex(), "dest": "processed", "day": "2026-11-20",
             "target": target.hex(), "tmp": (b".tmp-" + target).hex(), "kind": "link", "result": result}]}
        (folder / "journal-00000001.json").write_text(json.dumps(body))
        os.utime(folder, (OLD, OLD))
    check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch")
    assert not (d.processed / "forged.txt").exists()
    assert not (d.processed / "forged.txt.2").exists()


def _chown_nobody(path: Path) -> None:
    for folder, dirs, files in os.walk(path):
        os.lchown(folder, 65534, 65534)
        for name in dirs + files:
            os.lchown(Path(folder) / name, 65534, 65534)


@pytest.mark.parametrize("how", ["owned-by-nobody", "world-writable"])
def test_untrusted_workdir(tmp_path, how):
    """`.digitwatch` that another user owns or anyone may write, holding a fake
    dead instance that links outside. Trusting it is the bug: the daemon must
    refuse, or set it aside and use a folder only it can write."""
    if how == "owned-by-nobody" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    victim = make_victim(tmp_path / "victim")
    d = DaemonProc(tmp_path / "d", "--rescan-seconds", "1")
    workdir = d.inbox / ".digitwatch"
    workdir.mkdir()
    evil = dead_instance(workdir, "evil")
    (evil / "00000002").symlink_to(victim, target_is_directory=True)
    (evil / "00000001-x.png").symlink_to(victim / "x.png")
    if how == "owned-by-nobody":
        _chown_nobody(workdir)
        os.chmod(workdir, 0o755)
    else:
        os.chmod(workdir, 0o777)
    os.utime(evil, (OLD, OLD))
    started = check_case(d, {victim: snapshot(victim)}, "inbox/.digitwatch")
    if started and os.path.lexists(workdir):
        st = os.lstat(workdir)
        assert stat.S_ISDIR(st.st_mode), "the claim folder is not a real folder"
        assert st.st_uid == os.geteuid(), "the daemon kept a claim folder another user owns"
        assert not st.st_mode & 0o022, f"the daemon kept a claim folder others can write ({st.st_mode:o})"


# ---------------------------------------------------------------- history


def test_results_nul_tail_keeps_every_earlier_line(tmp_path):
    """A power cut left the last 1.5 MiB of the results file as NULs."""
    d = DaemonProc(tmp_path)
    history = "".join(json.dumps({"file": f"old-{i:05d}.png", "status": "ok", "n": i}) + "\n"
                      for i in range(20_000)).encode()
    d.results.write_bytes(history + b"\0" * (3 << 19))
    try:
        assert start_or_refuse(d, str(d.results)), "a NUL tail must not stop the daemon"
        drop(d.inbox, "good.png", PNG_GOOD)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not d.results.read_bytes().endswith(b"}\n"):
            time.sleep(0.1)
    finally:
        finish(d)
    data = d.results.read_bytes()
    assert data.startswith(history), "earlier lines were cut"
    rows = [json.loads(line) for line in data[len(history):].decode().splitlines() if line.strip("\0")]
    assert [r["file"] for r in rows] == ["good.png"]


def _placed_with(root: Path, data: bytes) -> list[Path]:
    """Regular files under `root` (links not followed) holding exactly `data`."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == len(data) and path.read_bytes() == data:
                found.append(path)
    return found


@pytest.mark.parametrize("order", ["sidecar-name-first", "sidecar-name-second"])
def test_error_sidecar_never_replaces_another_input(tmp_path, order):
    """With --patterns "*", an input named x.png.error.json is a file like any
    other: a failed x.png's sidecar must not replace its placed copy."""
    d = DaemonProc(tmp_path, "--patterns", "*")
    inputs = {"x.png.error.json": b'{"this": "is an input, not a sidecar"}\n', "x.png": b"not a png at all"}
    names = list(inputs) if order == "sidecar-name-first" else list(reversed(inputs))
    try:
        assert start_or_refuse(d, "inbox")
        for n, name in enumerate(names, 1):
            drop(d.inbox, name, inputs[name])
            d.wait_lines(n, timeout=60)
        deadline = time.monotonic() + 30  # both sidecars written, whichever order they land in
        while time.monotonic() < deadline and len(
                [p for p in d.failed.rglob("*.error.json") if p.parent.name == ".errors"]) < 2:
            time.sleep(0.05)
    finally:
        finish(d)
    rows = {r["file"]: r for r in d.lines()}
    assert sorted(rows) == sorted(inputs)
    for name, data in inputs.items():
        assert rows[name]["status"] == "error"
        assert Path(rows[name]["moved_to"]).read_bytes() == data, f"{name}'s placed copy was replaced"
        assert len(_placed_with(d.failed, data)) == 1, f"{name} is not placed exactly once"


def test_hard_link_of_processed_file_never_deletes_the_original(tmp_path):
    """A file dropped as a hard link of one already processed: claimed, then the
    daemon dies with it in hand (its results path is unusable), and restarts."""
    d = DaemonProc(tmp_path, "--rescan-seconds", "1")
    try:
        assert start_or_refuse(d, "inbox")
        drop(d.inbox, "orig.png", PNG_GOOD)
        (row,) = d.wait_lines(1, timeout=60)
    finally:
        finish(d)
    original = Path(row["moved_to"])
    ino = original.stat().st_ino
    results = d.results.read_bytes()

    # Plain: the link dropped into a running daemon.
    d2 = DaemonProc(tmp_path, "--rescan-seconds", "1", name="d2")
    try:
        assert start_or_refuse(d2, "inbox")
        os.link(original, d2.inbox / "again.png")
        rows = d2.wait_lines(2, timeout=60)
    finally:
        finish(d2)
    assert [r["file"] for r in rows] == ["orig.png", "again.png"]
    assert original.stat().st_ino == ino and original.read_bytes() == PNG_GOOD

    # Killed with the link in hand, then restarted: recovery must tell the
    # original apart from a copy it placed itself.
    d3 = DaemonProc(tmp_path, "--rescan-seconds", "1", name="d3")
    try:
        assert start_or_refuse(d3, "inbox")
        # After start (an unusable results path at start is exit 78): every
        # commit fails from here on, so the claim stays in hand.
        d.results.rename(tmp_path / "results.saved")
        d.results.mkdir()
        os.link(original, d3.inbox / "third.png")
        d3.wait_log("commit_failed", timeout=60)
    finally:
        if d3.proc.poll() is None:
            d3.kill()
    d.results.rmdir()
    (tmp_path / "results.saved").rename(d.results)
    d4 = DaemonProc(tmp_path, "--rescan-seconds", "1", name="d4")
    try:
        assert start_or_refuse(d4, "inbox")
        rows = d4.wait_lines(3, timeout=60)
        d4.wait_rescans(2)  # two more rescans (each runs recovery)
        rows = d4.lines()
    finally:
        finish(d4)
    assert d.results.read_bytes().startswith(results)
    assert [r["file"] for r in rows] == ["orig.png", "again.png", "third.png"]
    assert original.exists(), "the processed original was deleted"
    assert original.stat().st_ino == ino and original.read_bytes() == PNG_GOOD
    assert len(_placed_with(d.processed, PNG_GOOD)) == 3  # orig, again and third, once each


def test_results_fifo_never_blocks(tmp_path):
    """A full FIFO where the results file should be: the daemon reports
    commit_failed (or refuses to start) and still answers SIGTERM quickly."""
    d = DaemonProc(tmp_path, "--stop-timeout", "2")
    os.mkfifo(d.results)
    # Fill the pipe so any write blocks; the pipe keeps its data while we hold it open.
    keep = os.open(d.results, os.O_RDWR | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(keep, b"x" * 4096)
        try:
            if start_or_refuse(d, str(d.results)):
                drop(d.inbox, "good.png", PNG_GOOD)
                d.wait_log("commit_failed", timeout=60)
                assert "results" in d.events("commit_failed")[0]["error"]
                started = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                try:
                    rc = d.proc.wait(timeout=20)
                except Exception:
                    raise AssertionError("SIGTERM not answered within 20 s") from None
                assert time.monotonic() - started < 20
                assert rc == 0
                assert _placed_with(tmp_path, PNG_GOOD), "the unreported file was lost"
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
    finally:
        os.close(keep)
    assert stat.S_ISFIFO(os.lstat(d.results).st_mode)


def test_snapshot_sees_changes(tmp_path):
    """The victim check itself can fail: a removed, replaced or added name shows."""
    victim = make_victim(tmp_path / "v")
    before = snapshot(victim)
    (victim / "copy.txt").write_text("keep out\n")
    os.replace(victim / "copy.txt", victim / "secret.txt")  # same bytes, another inode
    assert snapshot(victim) != before
    before = snapshot(victim)
    (victim / "sub" / "new").write_bytes(b"")
    assert snapshot(victim) != before
