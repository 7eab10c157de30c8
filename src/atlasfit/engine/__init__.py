"""Shards of whole samples, map rounds over them, reduction on the driver."""

from ._checkpoint import Checkpoint, CheckpointInfo, sample_dir_name
from ._dask import DaskEngine, place_shards
from ._device import gpu_available, resolve_device
from ._driver import (
    CheckpointPolicy,
    check_count,
    checkpoint_policy,
    config_fingerprint,
    default_checkpoint_dir,
    is_distributed,
    make_engine,
    run_fit,
)
from ._errors import ShardLostError, StateMissingError
from ._guard import CheckpointLock, CheckpointLockedError, CheckpointMismatchError, fingerprint_digest
from ._loop import resume, run_iterations
from ._protocol import Engine, ShardSpec, plan_shards
from ._reduce import gather_by_sample, ordered_sum
from ._serial import SerialEngine
from ._threaded import ThreadedEngine, resolve_threads

__all__ = [
    "Checkpoint",
    "CheckpointLock",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "check_count",
    "checkpoint_policy",
    "config_fingerprint",
    "default_checkpoint_dir",
    "fingerprint_digest",
    "gather_by_sample",
    "gpu_available",
    "is_distributed",
    "make_engine",
    "ordered_sum",
    "resolve_device",
    "run_fit",
    "sample_dir_name",
    "CheckpointInfo",
    "DaskEngine",
    "Engine",
    "SerialEngine",
    "ThreadedEngine",
    "resolve_threads",
    "ShardLostError",
    "ShardSpec",
    "StateMissingError",
    "place_shards",
    "plan_shards",
    "resume",
    "run_iterations",
]
