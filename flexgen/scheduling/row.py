"""Row-by-row baseline: each GPU batch runs through every layer before the next batch.

This is what Accelerate and DeepSpeed-style offloading do; it reloads every offloaded weight
once per GPU batch, so it is kept as the baseline the zig-zag schedule is measured against.
"""

from flexgen.scheduling.base import Scheduler, Task


class RowScheduler(Scheduler):
    """Row by row: for each GPU batch, all layers."""

    def order(self, num_layers: int, num_batches: int) -> list[Task]:
        return [Task(layer, batch) for batch in range(num_batches) for layer in range(num_layers)]
