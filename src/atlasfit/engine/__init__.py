"""Shards of whole samples, map rounds over them, reduction on the driver."""

from ._checkpoint import Checkpoint, CheckpointInfo
from ._dask import DaskEngine, place_shards
from ._errors import ShardLostError, StateMissingError
from ._loop import resume, run_iterations
from ._protocol import Engine, ShardSpec, plan_shards
from ._serial import SerialEngine

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "DaskEngine",
    "Engine",
    "SerialEngine",
    "ShardLostError",
    "ShardSpec",
    "StateMissingError",
    "place_shards",
    "plan_shards",
    "resume",
    "run_iterations",
]
