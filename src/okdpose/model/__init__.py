"""Multi-output HRNet with official key names, its checkpoints and its cost."""
from okdpose.model.checkpoint import (
    CheckpointError,
    LoadReport,
    load_model,
    load_pretrained,
    save_checkpoint,
)
from okdpose.model.cost import (
    count_params,
    cpu_latency_ms,
    forward_flops,
    stage_costs,
    stage_costs_table,
    stage_latencies_ms,
    truncated_cost,
)
from okdpose.model.multi_out import MultiOutHRNet
from okdpose.model.released import Architecture, load_released

__all__ = [
    "Architecture",
    "CheckpointError",
    "LoadReport",
    "MultiOutHRNet",
    "count_params",
    "cpu_latency_ms",
    "forward_flops",
    "load_model",
    "load_pretrained",
    "load_released",
    "save_checkpoint",
    "stage_costs",
    "stage_costs_table",
    "stage_latencies_ms",
    "truncated_cost",
]
