"""The key -> partition mapping every host and client must agree on for the life of a store."""

from actors.engine.wire import partition_of


def test_partition_of_is_fnv1a_of_the_key() -> None:
    # Published FNV-1a 32-bit test vectors: "" -> 0x811c9dc5, "a" -> 0xe40c292c, "foobar" -> 0xbf9cf968.
    assert partition_of("", 2**32 - 1) == 0x811C9DC5 % (2**32 - 1)
    assert partition_of("a", 2**31) == 0xE40C292C % 2**31
    assert partition_of("foobar", 1000) == 0xBF9CF968 % 1000
    assert partition_of("order:created", 1) == 0
    assert {partition_of(f"k{i}", 4) for i in range(100)} == {0, 1, 2, 3}
