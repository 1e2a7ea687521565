"""Moves of partitions (meshq.cluster.moves): what a node reports of the moves it makes,
and their cluster-wide sum, as table tests; and the progress bar of ``meshq-ctl
rebalance``."""

from __future__ import annotations

import json
import sys

from meshq.cli import ctl
from meshq.cli.ctl import format_rebalance, progress_bar, progress_line
from meshq.cluster.changes import Move, MovesAnswer
from meshq.cluster.moves import Moves, PartView, annotate, fraction, summary

P0 = ("jobs", 0)


def view(primary: str | None, holders: tuple[str, ...], *, active: bool = True,
         messages: int = 0, tombs: int = 0, part: tuple[str, int] = P0) -> PartView:
    return PartView(part, primary, holders, active, messages, tombs)


def kinds(moves: tuple[Move, ...]) -> list[tuple[str, str, str, str, int, int]]:
    return [(m.kind, m.source, m.target, m.phase, m.total, m.done) for m in moves]


def test_a_declare_here_is_a_baseline_and_a_new_holder_waits_for_its_copy() -> None:
    m = Moves()
    m.dispatching(P0, 7, ("b",), now=1.0)
    assert m.report("a", [view("a", ("a", "b"), messages=10)], 1.0) == ()
    m.dispatching(P0, 7, ("b", "c"), now=2.0)  # c joined
    assert m.waiting(P0, "c") and not m.waiting(P0, "b")
    [move] = m.report("a", [view("a", ("a", "b", "c"), messages=10)], 3.5)
    assert kinds((move,)) == [("copy", "a", "c", "waiting", 10, 0)]  # all it may lack
    assert move.age == 1.5
    m.dispatching(P0, 7, ("b",), now=4.0)  # c left again: nothing to copy there
    assert m.report("a", [view("a", ("a", "b"), messages=10)], 4.0) == ()


def test_a_sync_reports_progress_and_a_complete_one_finishes_the_move() -> None:
    m = Moves()
    m.dispatching(P0, 7, ("b",), now=0.0)
    m.dispatching(P0, 7, ("b", "c"), now=1.0)
    m.syncing(P0, "c", "comparing")
    m.syncing(P0, "c", "copying", 4, 6)
    m.syncing(P0, "b", "copying", 1, 1)  # b waits for nothing: ignored
    views = [view("a", ("a", "b", "c"), messages=10)]
    assert kinds(m.report("a", views, 2.0)) == [("copy", "a", "c", "copying", 6, 4)]
    m.synced(P0, "c", started=0.5)  # began before c waited: does not vouch for it
    assert kinds(m.report("a", views, 2.0)) == [("copy", "a", "c", "waiting", 10, 0)]
    m.syncing(P0, "c", "copying", 6, 6)
    m.synced(P0, "c", started=1.5)
    assert kinds(m.report("a", views, 3.0)) == [("copy", "a", "c", "done", 6, 6)]
    assert not m.waiting(P0, "c")
    m.placement_changed()
    assert m.report("a", views, 3.0) == ()


def test_a_takeover_leaves_waiting_only_the_holders_it_did_not_read() -> None:
    m = Moves()
    m.taken_over(P0, 9, ("b", "c"), synced=("b",), now=0.0)
    views = [view("a", ("a", "b", "c"), messages=3)]
    assert kinds(m.report("a", views, 1.0)) == [("copy", "a", "c", "waiting", 3, 0)]
    m.dispatching(P0, 9, ("b", "c"), now=1.0)  # same epoch: still waiting
    assert m.waiting(P0, "c")
    m.stopped(P0)  # another node dispatches it now
    assert not m.waiting(P0, "c")
    assert kinds(m.report("a", [view("a", ("a", "b"), active=False)], 1.0)) == [
        ("takeover", "", "a", "reading", 0, 0)]


def test_a_copy_held_by_a_non_holder_is_a_hand_off_until_dropped() -> None:
    m = Moves()
    views = [view("b", ("b", "c"), active=False, messages=5, tombs=2)]
    assert kinds(m.report("a", views, 0.0)) == [("handoff", "a", "b", "waiting", 7, 0)]
    m.handing_off(P0, "b", "copying", 0.0, 3, 5)
    assert kinds(m.report("a", views, 1.0)) == [("handoff", "a", "b", "copying", 5, 3)]
    m.handing_off(P0, "b", "copying", 0.0, 5, 5)
    m.handed_off(P0, dropped=True)
    gone = [view("b", ("b", "c"), active=False)]
    assert kinds(m.report("a", gone, 2.0)) == [("handoff", "a", "b", "done", 5, 5)]
    m.handed_off(P0, dropped=True)  # nothing under way: nothing more finished
    assert len(m.report("a", gone, 2.0)) == 1
    # A holder's copy, or no copy at all, is no hand-off.
    assert Moves().report("c", views, 0.0) == ()
    assert Moves().report("a", [view("b", ("b", "c"), active=False)], 0.0) == ()


def answer(live: tuple[str, ...], *moves: Move, ready: bool = True) -> MovesAnswer:
    return MovesAnswer(live, ready, moves)


COPY = Move("jobs", 3, "copy", "b", "c", "copying", 50, 20, 1.5)
DONE = Move("jobs", 1, "handoff", "a", "b", "done", 30, 30, 0.0)
ABC = ("a", "b", "c")


def test_the_sum_is_moving_until_all_answered_agree_and_nothing_moves() -> None:
    quiet = summary({"a": answer(ABC), "b": answer(ABC), "c": answer(ABC)})
    assert quiet["moving"] is False and quiet["nodes"] == list(ABC)
    assert fraction(quiet) == 1.0
    cases = {
        "a move": {"a": answer(ABC, DONE), "b": answer(ABC, COPY), "c": answer(ABC)},
        "no answer": {"a": answer(ABC), "b": answer(ABC), "c": None},
        "views differ": {"a": answer(ABC), "b": answer(ABC), "c": answer(("a", "c"))},
        "catalog": {"a": answer(ABC), "b": answer(ABC), "c": answer(ABC, ready=False)},
    }
    for what, answers in cases.items():
        assert summary(answers)["moving"] is True, what
    s = summary(cases["a move"])
    assert (s["partitions_moving"], s["moves_under_way"], s["moves_done"]) == (1, 1, 1)
    assert (s["messages_total"], s["messages_done"]) == (80, 50)
    assert s["moves"] == [{"queue": "jobs", "index": 3, "kind": "copy", "from": "b",
                           "to": "c", "phase": "copying", "messages_total": 50,
                           "messages_done": 20, "age_s": 1.5}]
    assert fraction(s) == 50 / 80
    assert summary(cases["no answer"])["unreachable"] == ["c"]
    assert "c sees a,c" in summary(cases["views differ"])["settling"][0]
    assert summary(cases["catalog"])["settling"] == [
        "c has not learned the cluster's queues yet"]
    # No records counted: progress by moves.
    takeover = Move("jobs", 0, "takeover", "", "a", "reading", 0, 0, 0.0)
    empty_done = Move("jobs", 2, "copy", "a", "c", "done", 0, 0, 0.0)
    assert fraction(summary({"a": answer(ABC, takeover, empty_done)})) == 0.5


def test_annotate_gives_each_partition_its_moves() -> None:
    status = {"queues": [{"name": "jobs", "partitions": [{"index": i} for i in range(4)]}]}
    annotate(status, summary({"b": answer(ABC, COPY)}))
    assert status["rebalance"]["moves_under_way"] == 1
    assert [len(p["moves"]) for p in status["queues"][0]["partitions"]] == [0, 0, 0, 1]
    assert status["queues"][0]["partitions"][3]["moves"][0]["to"] == "c"


def test_progress_bar() -> None:
    assert progress_bar(0.0, 10) == "[..........]   0%"
    assert progress_bar(0.5, 10) == "[#####.....]  50%"
    assert progress_bar(0.999, 10) == "[#########.]  99%"  # 100% only when whole
    assert progress_bar(1.0, 10) == "[##########] 100%"
    assert progress_bar(7.0, 10) == progress_bar(1.0, 10)


def test_the_rebalance_table_and_line() -> None:
    moving = summary({"a": answer(ABC, DONE), "b": answer(ABC, COPY), "c": None})
    table = format_rebalance(moving)
    assert table.startswith("moving: 1 partitions, 1 moves under way, 1 done\n[")
    assert "50 of 80 messages" in table and "no answer from: c" in table
    assert "copying" in table
    line = progress_line(moving)
    assert "\n" not in line and line.endswith("; no answer from c")
    done = format_rebalance(summary({"a": answer(ABC, DONE), "b": answer(ABC)}))
    assert done == ("nothing moving (2 of 2 nodes answered; 1 moves done since the last "
                    "membership change, 30 messages)")


class FakeClient:
    """Answers ``rebalance`` from a script of summaries (the last one repeats)."""

    def __init__(self, answers: list[dict]) -> None:
        self.answers = answers
        self.asked = 0

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def rebalance(self) -> dict:
        self.asked += 1
        return self.answers[min(self.asked, len(self.answers)) - 1]


def run_ctl(monkeypatch, capsys, answers: list[dict], *args: str) -> tuple[int, str, str]:
    client = FakeClient(answers)
    monkeypatch.setattr(ctl, "connect", lambda a: client)
    monkeypatch.setattr(ctl.time, "sleep", lambda s: None)  # (polls back to back)
    code = ctl.main(["rebalance", *args])
    out, err = capsys.readouterr()
    return code, out, err


MOVING = summary({"a": answer(ABC, DONE), "b": answer(ABC, COPY), "c": answer(ABC)})
QUIET = summary({"a": answer(ABC, DONE), "b": answer(ABC), "c": answer(ABC)})


def test_rebalance_watch_polls_until_nothing_moves(monkeypatch, capsys) -> None:
    code, out, err = run_ctl(monkeypatch, capsys, [MOVING, MOVING, QUIET], "--watch")
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert len(lines) == 3 and all(ln.startswith("[") for ln in lines[:2])  # a pipe: lines
    assert lines[2].startswith("nothing moving (3 of 3 nodes answered")
    code, out, _ = run_ctl(monkeypatch, capsys, [MOVING, QUIET], "--watch", "--json")
    assert code == 0 and [json.loads(ln)["moving"] for ln in out.splitlines()] == [True,
                                                                                  False]
    code, out, _ = run_ctl(monkeypatch, capsys, [MOVING], "--json")  # once, not watched
    assert code == 0 and json.loads(out)["moves_under_way"] == 1


def test_rebalance_watch_gives_up_after_its_timeout(monkeypatch, capsys) -> None:
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(ctl.time, "monotonic", lambda: float(next(clock)))
    code, out, err = run_ctl(monkeypatch, capsys, [MOVING], "--watch", "--timeout", "12")
    assert code == 6 and err.startswith("TIMEOUT: partitions still moving after 12 s")
    assert 1 <= len(out.splitlines()) <= 3


def test_rebalance_watch_redraws_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run_ctl(monkeypatch, capsys, [MOVING, QUIET], "--watch")
    assert code == 0 and out.count(ctl.CLEAR) == 2 and "copying" in out


def test_the_status_table_shows_each_partition_s_moves_and_the_rebalance() -> None:
    status = {"queues": [{"name": "jobs", "ready": 9, "partitions": [
        {"index": i, "primary": "b", "holders": ["b", "c"], "ready": 3, "leased": 0,
         "delayed": 0} for i in range(4)]}]}
    annotate(status, MOVING)
    out = ctl.format_status(status)
    block = out.split("\npartitions\n")[1].split("\n\n")[0]
    rows = {ln.split()[1]: ln for ln in block.splitlines() if ln.startswith("  jobs ")}
    assert rows["3"].endswith("copy b->c 20/50") and rows["0"].endswith("-")
    assert "\nrebalance\n  moving: 1 partitions" in out
    annotate(status, QUIET)
    assert "\nrebalance\n  nothing moving" in ctl.format_status(status)


def test_metrics_count_the_moves_under_way_by_kind() -> None:
    from meshq.metrics import NodeCollector

    families = {f.name: f for f in NodeCollector(None)._moves(MOVING)}  # type: ignore[arg-type]
    by_kind = {s.labels["kind"]: s.value for s in families["meshq_moves"].samples}
    assert by_kind == {"copy": 1, "handoff": 0, "takeover": 0}
    [remaining] = families["meshq_move_messages_remaining"].samples
    assert remaining.value == 30  # 50 to send, 20 sent; the finished hand-off not counted


def test_the_summary_is_the_documented_json() -> None:
    from test_ctl import check_documented

    check_documented("rebalance", MOVING)
    check_documented("meshq-ctl rebalance --json", MOVING)
    check_documented("rebalance.moves", MOVING["moves"])
