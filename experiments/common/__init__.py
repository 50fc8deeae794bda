"""What the paper's three experiments share: checkpoints with resume, interrupt handling, results folders."""
from .checkpoint import CheckpointManager, StopRequested
from .results import ResultsDir, pick_device, restores_torch_threads, set_seed, add_common_args

__all__ = ["CheckpointManager", "StopRequested", "ResultsDir", "pick_device", "restores_torch_threads", "set_seed",
           "add_common_args"]
