import meshq


def test_send_receive_ack_roundtrip(daemon):
    with daemon.client() as c:
        c.declare("q")
        mid = c.send("q", b"hello")
        [d] = c.receive("q", max=5)
        assert (d.id, d.body, d.delivery_count, d.redelivered) == (mid, b"hello", 1, False)
        assert c.ack("q", [d.id]) == [mid]
        assert c.stats("q")[0]["ready"] == 0
        assert c.stats("q")[0]["leased"] == 0


def test_public_surface():
    assert set(meshq.__all__) >= {"Client", "AsyncClient", "MeshqError", "NotFound"}
    for name in meshq.__all__:
        assert hasattr(meshq, name)


def test_every_module_declares_a_public_surface_that_exists():
    import importlib
    import pkgutil

    missing = []
    for info in pkgutil.walk_packages(meshq.__path__, "meshq."):
        if info.name.endswith("__main__") or info.name == "meshq.store._writer":
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
            continue
        for name in names:
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}, not defined"
    assert missing == []


def test_the_client_works_with_descriptors_above_1023(daemon):
    """select(2) cannot watch descriptor 1024 and up; a busy program reaches them."""
    import os

    pipes = [os.pipe() for _ in range(520)]  # 1040 descriptors
    try:
        with daemon.client(timeout=5) as c:
            assert c._sock.fileno() > 1023
            c.declare("many-fds")
            msg_id = c.send("many-fds", "x")
            assert [m.id for m in c.receive("many-fds", wait=1)] == [msg_id]
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_ctrl_c_to_the_process_group_stops_the_daemon_cleanly(tmp_path):
    """A terminal's Ctrl-C signals meshqd and its SQLite writer together: the daemon
    must still commit what it staged and exit 0 (the writer must not die first)."""
    import os
    import signal

    from meshq.testing import DaemonProcess

    d = DaemonProcess(tmp_path / "d", new_session=True).start()
    try:
        with d.client(timeout=5) as c:
            c.declare("sigint")
            rids = [c.submit("send", queue="sigint", messages=[{"body": b"x"}])
                    for _ in range(200)]
            os.killpg(d.pid, signal.SIGINT)
            answered = 0
            for rid in rids:
                try:
                    c.wait(rid)
                    answered += 1
                except Exception:
                    break
        assert d.proc is not None and d.proc.wait(15) == 0, d.log_tail()
        assert "Traceback" not in d.log_tail(20000)
    finally:
        d.kill()
    with DaemonProcess(tmp_path / "d") as again, again.client() as c:
        assert c.stats("sigint")[0]["ready"] >= answered


def test_no_import_cycles_between_meshq_modules():
    """Module-level imports (not those under TYPE_CHECKING or inside functions) form no
    cycle: every layer can be imported, and tested, without the ones above it."""
    import ast
    from pathlib import Path

    root = Path(meshq.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def imports(path: Path) -> set[str]:
        found: set[str] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("meshq"):
                    found.add(child.module)  # type: ignore[arg-type]
                    found.update(f"{child.module}.{a.name}" for a in child.names)
                elif isinstance(child, ast.Import):
                    found.update(a.name for a in child.names if a.name.startswith("meshq"))
                visit(child)

        visit(ast.parse(path.read_text()))
        return found

    graph = {name: {m for m in imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    path_: list[str] = []

    def cycle_from(u: str) -> list[str] | None:
        state[u] = 1
        path_.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*path_[path_.index(v):], v]
            if v not in state and (found := cycle_from(v)):
                return found
        path_.pop()
        state[u] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = cycle_from(name)
            assert found is None, "import cycle: " + " -> ".join(found)
