"""Contract of a :class:`flexgen.scheduling.base.Scheduler`.

The engine trusts the order completely: a (layer, batch) pair visited twice computes a layer
twice on the same hidden state, one never visited leaves a batch behind, and a batch visiting
layer j before layer j-1 reads activations that do not exist yet. So every order must cover
every pair exactly once and keep each batch's layers increasing; the rest (which batch goes
first, how layers interleave) is the scheduler's to choose.
"""

from __future__ import annotations

import pytest

from flexgen.scheduling.base import Scheduler, Task

GEOMETRIES = [(1, 1), (1, 5), (6, 1), (4, 3), (26, 8)]


class SchedulerContract:
    """Subclass as ``Test...`` and implement :meth:`make_scheduler` (or override ``scheduler``)."""

    def make_scheduler(self) -> Scheduler:
        """The scheduler under test."""
        raise NotImplementedError("subclass SchedulerContract and implement make_scheduler()")

    @pytest.fixture
    def scheduler(self) -> Scheduler:
        return self.make_scheduler()

    @pytest.mark.parametrize("layers,batches", GEOMETRIES)
    def test_every_task_exactly_once(self, scheduler: Scheduler, layers: int, batches: int) -> None:
        order = list(scheduler.order(layers, batches))
        assert all(isinstance(task, Task) for task in order), "order() must yield flexgen.scheduling.base.Task"
        pairs = [(task.layer, task.batch) for task in order]
        expected = {(j, k) for j in range(layers) for k in range(batches)}
        assert len(pairs) == len(expected), f"{len(pairs)} tasks for {len(expected)} (layer, batch) pairs"
        assert set(pairs) == expected, f"missing {sorted(expected - set(pairs))[:5]}, extra {sorted(set(pairs) - expected)[:5]}"

    @pytest.mark.parametrize("layers,batches", GEOMETRIES)
    def test_layers_increase_within_each_batch(self, scheduler: Scheduler, layers: int, batches: int) -> None:
        seen: dict[int, list[int]] = {}
        for task in scheduler.order(layers, batches):
            seen.setdefault(task.batch, []).append(task.layer)
        for batch, visited in seen.items():
            assert visited == sorted(visited), f"batch {batch} visits layers {visited}"

    def test_same_order_every_call(self, scheduler: Scheduler) -> None:
        """The engine prefetches from the order it was given; it must not change between steps."""
        assert list(scheduler.order(4, 3)) == list(scheduler.order(4, 3))

    def test_unknown_option_is_a_type_error(self, scheduler: Scheduler) -> None:
        with pytest.raises(TypeError):
            type(scheduler)(no_such_option_xyz=1)
