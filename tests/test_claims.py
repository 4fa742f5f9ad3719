"""Claims on real folders: the two claim shapes, release, and adoption of a dead
instance's folder (the crash paths are exercised end to end in test_daemon)."""

from __future__ import annotations

import os

from digitwatch import claims
from digitwatch.results import Result


def _result(name: str) -> Result:
    return Result(file=name, digit=3, confidence=0.9, status="ok", error="", sha256="x",
                  width=28, height=28, model="m", latency_ms=1.0)


def _drop(inbox, rel: str, data: bytes = b"png") -> os.PathLike:
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_short_flat_names_are_claimed_without_a_token_folder(tmp_path):
    ws = claims.Workspace(tmp_path, "one")
    src = _drop(tmp_path, "a b,=c.png")
    claim = ws.reserve("a b,=c.png")
    assert claim.flat and claim.path.parent == ws.dir
    assert ws.take(claim, src)
    assert not src.exists() and claim.path.read_bytes() == b"png"
    ws.release(claim)
    assert sorted(p.name for p in ws.dir.iterdir()) == ["lock"]


def test_nested_and_long_names_get_a_token_folder(tmp_path):
    ws = claims.Workspace(tmp_path, "one")
    long_name = "x" * 250 + ".png"  # fits NAME_MAX alone, not beside a token
    for rel in ("sub/deeper/a.png", long_name):
        src = _drop(tmp_path, rel)
        claim = ws.reserve(rel)
        assert not claim.flat
        assert claim.path == ws.dir / claim.token / rel
        assert ws.take(claim, src)
        ws.release(claim)
    assert sorted(p.name for p in ws.dir.iterdir()) == ["lock"]


def test_a_vanished_file_is_not_claimed_and_leaves_nothing(tmp_path):
    ws = claims.Workspace(tmp_path, "one")
    for rel in ("gone.png", "sub/gone.png"):
        assert not ws.take(ws.reserve(rel), tmp_path / rel)
    assert sorted(p.name for p in ws.dir.iterdir()) == ["lock"]


def test_leftovers_read_the_name_as_dropped_back_off_both_shapes(tmp_path):
    ws = claims.Workspace(tmp_path, "one")
    rels = ["plain.png", "with-dash-00000001-x.png", "sub/a.png", "y" * 248 + ".png"]
    taken = []
    for rel in rels:
        c = ws.reserve(rel)
        assert ws.take(c, _drop(tmp_path, rel))
        taken.append(c)
    found = {(c.token, c.rel, c.path) for c in ws.leftover_claims(set())}
    assert found == {(c.token, c.rel, c.path) for c in taken}
    skip = {taken[0].token, taken[2].token}
    assert {c.rel for c in ws.leftover_claims(skip)} == {rels[1], rels[3]}


def test_a_dead_instances_claims_and_journal_are_adopted(tmp_path):
    dead = claims.Workspace(tmp_path, "dead")
    taken = []
    for rel in ("j.png", "k.png", "sub/n.png", "z" * 246 + ".png"):
        c = dead.reserve(rel)
        assert dead.take(c, _drop(tmp_path, rel, rel.encode()))
        taken.append(c)
    # j.png was placed and journaled before the crash; the others were not.
    claims.write_journal(dead.journal_path(), [claims.Entry(taken[0], _result("j.png"))])
    os.close(dead._lock_fd)  # the process died: its lock is gone, its folder stays

    alive = claims.Workspace(tmp_path, "alive")
    journals = alive.adopt_dead()
    assert not dead.dir.exists()
    [journal] = journals
    [entry] = claims.read_journal(journal)
    assert entry.claim.rel == "j.png" and entry.claim.path.read_bytes() == b"j.png"
    assert entry.claim.path.parent == alive.dir
    left = alive.leftover_claims({entry.claim.token})
    assert sorted(c.rel for c in left) == sorted(c.rel for c in taken[1:])
    for c in left:
        assert c.path.read_bytes() == c.rel.encode()
        alive.release(c)
    alive.release(entry.claim)
    journal.unlink()
    assert sorted(p.name for p in alive.dir.iterdir()) == ["lock"]
