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
