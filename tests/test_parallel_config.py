"""Where a rank sits and whether a model divides over the group (worker_svc/parallel_config.py),
without torch: the CLI checks a --tensor-parallel-size before it spawns a rank."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker_svc.parallel_config import (
    ParallelConfig,
    check_shardable,
    default_init_method,
    env_int,
    threads_per_rank,
)


def config(heads: int = 9, kv_heads: int | None = 3, intermediate: int = 1536) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate)


def test_a_rank_lies_inside_its_group():
    assert ParallelConfig(0, 1) == ParallelConfig(rank=0, world_size=1)
    ParallelConfig(2, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        ParallelConfig(3, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got -1"):
        ParallelConfig(-1, 2)
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        ParallelConfig(0, 0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_sizes_that_divide_every_count_pass(world_size):
    check_shardable(config(), world_size)


def test_each_count_that_does_not_divide_is_named():
    with pytest.raises(ValueError) as error:
        check_shardable(config(), 2)
    assert str(error.value) == ("tensor parallel size 2 must divide num_attention_heads=9, num_key_value_heads=3 "
                                "(each rank keeps whole query and KV heads and an equal MLP slice)")
    with pytest.raises(ValueError, match=r"must divide intermediate_size=1537 \("):
        check_shardable(config(heads=8, kv_heads=4, intermediate=1537), 2)
    with pytest.raises(ValueError, match=r"must divide num_key_value_heads=2 \("):
        check_shardable(config(heads=6, kv_heads=2, intermediate=12), 3)


def test_a_config_without_kv_heads_has_as_many_as_query_heads():
    check_shardable(config(heads=8, kv_heads=None, intermediate=16), 4)
    check_shardable(SimpleNamespace(num_attention_heads=8, intermediate_size=16), 4)  # an older config: no field
    with pytest.raises(ValueError, match="num_attention_heads=6, num_key_value_heads=6"):
        check_shardable(config(heads=6, kv_heads=None, intermediate=16), 4)


def test_launcher_variables():
    assert env_int("RANK", 0, {}) == 0
    assert env_int("RANK", 5, {"RANK": " "}) == 5
    assert env_int("RANK", 0, {"RANK": "3"}) == 3
    with pytest.raises(ValueError, match=r"environment variable WORLD_SIZE='two' is not an integer"):
        env_int("WORLD_SIZE", 1, {"WORLD_SIZE": "two"})
    assert default_init_method({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}) == "env://"
    assert default_init_method({"MASTER_ADDR": "10.0.0.1"}) is None
    assert default_init_method({"MASTER_PORT": "29500"}) is None
    assert default_init_method({"MASTER_ADDR": "", "MASTER_PORT": "29500"}) is None


def test_cores_are_shared_among_a_hosts_ranks():
    assert threads_per_rank(16, 4) == 4
    assert threads_per_rank(16, 3) == 5
    assert threads_per_rank(2, 3) == 1
    assert threads_per_rank(8, 1) == 8
    assert threads_per_rank(8, 0) == 8  # no launcher variable: this rank alone
