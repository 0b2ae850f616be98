"""FlexGen's block schedule: a layer's weights serve every GPU batch before the next layer."""

from flexgen.scheduling.base import Scheduler, Task


class ZigZagScheduler(Scheduler):
    """Column by column: for each layer, all GPU batches of the block.

    Weights not resident on the compute device cross the link once per layer and step,
    whatever the number of GPU batches; the KV cache and activations of each batch are what
    move between batches.
    """

    def order(self, num_layers: int, num_batches: int) -> list[Task]:
        return [Task(layer, batch) for layer in range(num_layers) for batch in range(num_batches)]
