"""Shards of whole samples, map rounds over them, reduction on the driver."""

from ._protocol import Engine, ShardSpec, plan_shards
from ._serial import SerialEngine

__all__ = ["Engine", "SerialEngine", "ShardSpec", "plan_shards"]
