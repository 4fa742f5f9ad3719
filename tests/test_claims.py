"""The daemon's state on real folders: the trusted state root (refused when it
is not ours), claims of both shapes by descriptor, what is quarantined in a
dead instance's folder, and the journal's validation against hostile
journals. End to end crash paths are in test_commit_faults."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from digitwatch.daemon import claims, commit
from digitwatch.errors import ConfigError, RefusedError
from digitwatch.results import Result


def _result(name: str, status: str = "ok") -> Result:
    return Result(file=name, digit=3, confidence=0.9, status=status, error="", sha256="x",
                  width=28, height=28, model="m", latency_ms=1.0)


def _drop(inbox: Path, rel: bytes, data: bytes = b"png") -> bytes:
    path = os.path.join(os.fsencode(inbox), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _ws(tmp_path: Path, name: str = "one", results: str = "r.jsonl") -> claims.Workspace:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return claims.Workspace(tmp_path / "inbox", name, tmp_path / results)


def _kill(ws: claims.Workspace) -> None:
    """The process died: its lock is gone, its folder stays."""
    os.close(ws.folder.lock_fd)
    ws.folder.lock_fd = None


class TestTrustedRoot:
    """The state root is created 0700 and refused (config error, exit 78) when it is not ours."""

    def test_created_private(self, tmp_path):
        ws = _ws(tmp_path)
        for p in (ws.root_path, ws.root_path / "quarantine", ws.dir):
            st = os.lstat(p)
            assert oct(st.st_mode & 0o777) == oct(0o700) and st.st_uid == os.geteuid()
        assert json.loads((ws.dir / "owner.json").read_text())["results"] == str(tmp_path / "r.jsonl")
        ws.close()
        assert sorted(os.listdir(ws.root_path)) == ["quarantine"]

    @pytest.mark.parametrize(("plant", "reason"), [
        ("symlink_outside", "is a symbolic link"),
        ("symlink_parent", "is a symbolic link"),
        ("regular_file", "is not a directory"),
        ("world_writable", "writable by group or others"),
        ("other_owner", "owned by uid 65534"),
    ])
    def test_refused(self, tmp_path, plant, reason):
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.txt").write_text("keep")
        root = inbox / ".digitwatch"
        if plant == "symlink_outside":
            root.symlink_to(outside)
        elif plant == "symlink_parent":
            root.symlink_to("..")
        elif plant == "regular_file":
            root.write_text("x")
        else:
            root.mkdir(mode=0o700)
            if plant == "world_writable":
                root.chmod(0o777)
            else:
                os.chown(root, 65534, 65534)
        with pytest.raises(ConfigError) as err:
            claims.Workspace(inbox, "one", tmp_path / "r.jsonl")
        assert str(root) in str(err.value) and reason in str(err.value)
        assert "\n" not in str(err.value)
        assert sorted(os.listdir(outside)) == ["victim.txt"]

    def test_live_instance_with_another_results_file_is_refused_at_start(self, tmp_path):
        first = _ws(tmp_path, "first", "a.jsonl")
        second = _ws(tmp_path, "second", "b.jsonl")
        with pytest.raises(ConfigError, match="one results file per inbox"):
            list(second.others(starting=True))
        assert list(second.others(starting=False)) == []  # later rescans just skip it
        second.close()
        same = _ws(tmp_path, "third", "a.jsonl")
        assert list(same.others(starting=True)) == []
        for ws in (first, same):
            ws.close()


class TestClaims:
    """Claims by descriptor: names as bytes, both shapes, nothing followed."""

    @pytest.mark.parametrize("rel", [b"a b,=c.png", b"bytes-\xff.png", b"sub/deeper/a.png", b"x" * 250 + b".png"])
    def test_take_and_release(self, tmp_path, rel):
        ws = _ws(tmp_path)
        src = _drop(ws.inbox, rel)
        claim = ws.reserve(os.fsdecode(rel))
        assert claim.rel == rel and claim.flat == (b"/" not in rel and len(rel) < 240)
        assert ws.take(claim)
        assert not os.path.lexists(src)
        assert claims.read_claim(claim, 100) == b"png"
        listed = claims.list_folder(ws.folder)
        assert [(c.token, c.rel) for c in listed.claims] == [(claim.token, rel)] and not listed.junk
        claims.release(claim)
        assert sorted(os.listdir(ws.folder.fd)) == ["lock", "owner.json"]

    def test_vanished_file_is_not_claimed(self, tmp_path):
        ws = _ws(tmp_path)
        for rel in ("gone.png", "sub/gone.png"):
            assert not ws.take(ws.reserve(rel))
        assert sorted(os.listdir(ws.folder.fd)) == ["lock", "owner.json"]

    def test_inbox_sub_folder_swapped_for_a_link_is_not_entered(self, tmp_path):
        ws = _ws(tmp_path)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "a.png").write_bytes(b"secret")
        (ws.inbox / "sub").symlink_to(outside)
        assert not ws.take(ws.reserve("sub/a.png"))
        assert (outside / "a.png").read_bytes() == b"secret"
        assert sorted(os.listdir(ws.folder.fd)) == ["lock", "owner.json"]

    def test_a_claimed_link_is_refused_not_read(self, tmp_path):
        ws = _ws(tmp_path)
        os.symlink("/etc/passwd", ws.inbox / "p.png")
        claim = ws.reserve("p.png")
        assert ws.take(claim)
        with pytest.raises(RefusedError, match="symbolic link"):
            claims.read_claim(claim, 1 << 20)


class TestDeadInstances:
    """What another instance left: adopted only after every check, else quarantined."""

    def test_planted_entries_are_quarantined_not_followed(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.txt").write_text("keep")
        dead = _ws(tmp_path, "dead")
        _drop(dead.inbox, b"good.png")
        assert dead.take(dead.reserve("good.png"))
        fd = dead.folder.fd
        os.symlink(outside, "00000007", dir_fd=fd)  # a "token folder" linking outside
        os.mkdir("notes", dir_fd=fd)  # not a name we make
        os.mkdir("00000009-x.png", dir_fd=fd)  # a flat claim name that is a folder
        _kill(dead)
        root = dead.root_path
        os.symlink(outside, root / "evil-1-1")  # an "instance folder" linking outside
        (root / "loose.txt").write_text("x")
        (root / "open-2-2").mkdir(mode=0o777)
        (root / "open-2-2").chmod(0o777)
        (root / "lockless-3-3").mkdir(mode=0o700)
        os.symlink(outside / "victim.txt", root / "lockless-3-3" / "lock")

        alive = _ws(tmp_path, "alive")
        folders = alive.others(starting=True)
        folder = next(folders)  # locked and open while the generator holds it
        assert folder.name == dead.folder.name
        listing = claims.list_folder(folder)
        assert [c.rel for c in listing.claims] == [b"good.png"]
        assert sorted(n for n, _ in listing.junk) == ["00000007", "00000009-x.png", "notes"]
        assert next(folders, None) is None
        q = sorted(n.split("-", 1)[1] for n in os.listdir(root / "quarantine"))
        assert q == ["evil-1-1", "lockless-3-3", "loose.txt", "open-2-2"]
        assert sorted(os.listdir(outside)) == ["victim.txt"] and (outside / "victim.txt").read_text() == "keep"

    def test_unjournaled_claims_move_into_our_folder(self, tmp_path):
        dead = _ws(tmp_path, "dead")
        for rel in (b"j.png", b"sub/n.png", b"\xff.png"):
            _drop(dead.inbox, rel, rel)
            assert dead.take(dead.reserve(os.fsdecode(rel)))
        _kill(dead)
        alive = _ws(tmp_path, "alive")
        folders = alive.others(starting=True)
        folder = next(folders)
        mine = [alive.adopt(c) for c in claims.list_folder(folder).claims]
        assert sorted(c.rel for c in mine) == sorted([b"j.png", b"sub/n.png", b"\xff.png"])
        assert all(claims.read_claim(c, 100) == c.rel for c in mine)
        assert claims.remove_if_empty(alive.root_fd, folder)

    def test_a_live_instance_is_left_alone(self, tmp_path):
        live = _ws(tmp_path, "live")
        other = _ws(tmp_path, "other")
        assert list(other.others(starting=True)) == []
        fcntl.flock(live.folder.lock_fd, fcntl.LOCK_UN)
        assert [f.name for f in other.others(starting=False)] == [live.folder.name]


class TestJournal:
    """Every journal field is checked; a journal failing any check is refused whole."""

    def _intent(self, ws, rel=b"a.png", target=b"a.png"):
        claim = claims.Claim(ws.folder, b"00000001", rel)
        return commit.Intent(claim, "processed", "2026-01-02", target, "link", _result("a.png"))

    def roots(self, tmp_path):
        return {"processed": tmp_path / "p", "failed": tmp_path / "f"}

    def test_round_trip_keeps_bytes(self, tmp_path):
        ws = _ws(tmp_path)
        intent = self._intent(ws, rel=b"sub/\xff.png", target=b"\xff-1.png")
        data = commit.encode_journal(tmp_path / "r.jsonl", [intent])
        [back] = commit.decode_journal(ws.folder, data, tmp_path / "r.jsonl", self.roots(tmp_path))
        assert back.claim.rel == b"sub/\xff.png" and back.target == b"\xff-1.png"
        assert back.result.moved_to == str(tmp_path / "p" / "2026-01-02") + "/\\xff-1.png"

    def _mutated(self, ws, tmp_path, how: str) -> bytes:
        good = json.loads(commit.encode_journal(tmp_path / "r.jsonl", [self._intent(ws)]))
        e = good["entries"][0]
        edits = {
            "rel_parent": lambda: e.update(rel=b"../../victim/secret.txt".hex()),
            "rel_absolute": lambda: e.update(rel=b"/etc/passwd".hex()),
            "rel_dot": lambda: e.update(rel=b"sub/./a.png".hex()),
            "target_slash": lambda: e.update(target=b"../../x".hex()),
            "target_dotdot": lambda: e.update(target=b"..".hex()),
            "target_hidden": lambda: e.update(target=b".errors".hex()),
            "target_nul": lambda: e.update(target=b"a\0b".hex()),
            "tmp_elsewhere": lambda: e.update(tmp=b"../../x".hex()),
            "dest_unknown": lambda: e.update(dest="etc"),
            "day_climbs": lambda: e.update(day="../.."),
            "day_not_a_date": lambda: e.update(day="2026-13-45"),
            "kind_unknown": lambda: e.update(kind="move"),
            "token_bad": lambda: e.update(token="../x"),
            "result_extra": lambda: e["result"].update(evil=1),
            "result_type": lambda: e["result"].update(digit="7"),
            "not_hex": lambda: e.update(rel="zz"),
            "other_results": lambda: good.update(results="/elsewhere/results.jsonl"),
            "old_schema": lambda: good.update(v=1),
            "entry_not_object": lambda: good.update(entries=[1]),
            "token_twice": lambda: good["entries"].append(dict(e)),
        }
        edits[how]()
        return json.dumps(good).encode()

    HOSTILE = ["rel_parent", "rel_absolute", "rel_dot", "target_slash", "target_dotdot", "target_hidden",
               "target_nul", "tmp_elsewhere", "dest_unknown", "day_climbs", "day_not_a_date", "kind_unknown",
               "token_bad", "result_extra", "result_type", "not_hex", "other_results", "old_schema",
               "entry_not_object", "token_twice"]

    @pytest.mark.parametrize("how", HOSTILE)
    def test_hostile_fields_refused(self, tmp_path, how):
        ws = _ws(tmp_path)
        with pytest.raises(commit.JournalError):
            commit.decode_journal(ws.folder, self._mutated(ws, tmp_path, how), tmp_path / "r.jsonl",
                                  self.roots(tmp_path))

    @pytest.mark.parametrize("data", [b"", b"\x00\x00\x00", b'{"v": 2, "entries": [', b"[]", b"null",
                                      b'[{"token": "00000001", "rel": "a.png"}]', os.urandom(64)])
    def test_garbage_refused(self, tmp_path, data):
        ws = _ws(tmp_path)
        with pytest.raises(commit.JournalError):
            commit.decode_journal(ws.folder, data, tmp_path / "r.jsonl", self.roots(tmp_path))

    def test_a_journal_that_is_a_link_is_not_read(self, tmp_path):
        ws = _ws(tmp_path)
        target = tmp_path / "real.json"
        target.write_bytes(commit.encode_journal(tmp_path / "r.jsonl", [self._intent(ws)]))
        os.symlink(target, "journal-00000001.json", dir_fd=ws.folder.fd)
        with pytest.raises(commit.JournalError):
            commit.read_journal(ws.folder, "journal-00000001.json", tmp_path / "r.jsonl", self.roots(tmp_path))
        assert claims.list_folder(ws.folder).junk == [("journal-00000001.json", "journal is not a regular file")]


def test_collision_names_are_unique_and_fit():
    tag = b"1a2b3c-00000042"
    assert commit.unique_name(b"scan.png", tag) == b"scan-1a2b3c-00000042.png"
    assert commit.unique_name(b"noext", tag) == b"noext-1a2b3c-00000042"
    long = commit.unique_name(b"x" * 255, tag)
    assert len(long) == 255 and long.endswith(b"-" + tag)


class TestCommitter:
    """The protocol's own edge cases, on real folders without a daemon."""

    def test_target_taken_after_planning_gets_a_new_journaled_name(self, tmp_path):
        import datetime as dt

        from digitwatch.daemon.results_file import ResultsFile

        ws = _ws(tmp_path)
        _drop(ws.inbox, b"a.png", b"mine")
        claim = ws.reserve("a.png")
        assert ws.take(claim)
        roots = {"processed": tmp_path / "p", "failed": tmp_path / "f"}
        results = tmp_path / "r.jsonl"
        c = commit.Committer(roots, ResultsFile(results, "jsonl"), results, "jsonl")
        now = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
        [intent] = c.plan([(claim, _result("a.png"), "processed")], now, "one")
        assert intent.target == b"a.png"
        name = ws.folder.journal_name()
        c.journal(ws.folder, name, [intent])
        (tmp_path / "p" / "2026-01-02" / "a.png").write_bytes(b"someone else's")  # taken since
        out = c.run(ws.folder, name, [intent], dedupe=False)
        [done] = out.done
        assert done.target.startswith(b"a-") and not out.parked
        assert (tmp_path / "p" / "2026-01-02" / "a.png").read_bytes() == b"someone else's"
        assert (tmp_path / "p" / "2026-01-02" / os.fsdecode(done.target)).read_bytes() == b"mine"
        [line] = results.read_text().splitlines()
        assert json.loads(line)["moved_to"].endswith(os.fsdecode(done.target))
        assert sorted(os.listdir(ws.folder.fd)) == ["lock", "owner.json"]  # released, journal gone

    def test_folder_vanishing_during_recovery_is_contained(self, tmp_path):
        import shutil

        from digitwatch.daemon import recovery
        from digitwatch.daemon.results_file import ResultsFile

        dead = _ws(tmp_path, "dead")
        _drop(dead.inbox, b"a.png")
        assert dead.take(dead.reserve("a.png"))
        dead.folder.journal_name()
        (dead.dir / "journal-00000001.json").write_bytes(b"{}")
        _kill(dead)
        alive = _ws(tmp_path, "alive")
        results = tmp_path / "r.jsonl"
        c = commit.Committer({"processed": tmp_path / "p", "failed": tmp_path / "f"},
                             ResultsFile(results, "jsonl"), results, "jsonl")
        folders = alive.others(starting=True)
        folder = next(folders)
        shutil.rmtree(dead.dir)  # removed by a person, or finished by another instance, mid-way
        rec = recovery.recover_folder(alive, c, folder)
        assert rec.done == [] and rec.adopted == [] and next(folders, None) is None
