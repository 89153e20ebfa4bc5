"""The paged KV-cache arena: device memory mapped and returned chunk by chunk, blocks leased
to named pools, block tables, and compaction so the freed top goes back to the device.
See API.md for the contract."""
from .block_tables import BlockTables
from .errors import ArenaError, ArenaOutOfMemory, LeaseExceeded
from .mapper import BackgroundMapper
from .memory import DeviceMemory, HostMemory
from .paged_arena import PagedArena
from .pool import Pool
from .spec import KVSpec

__all__ = ["KVSpec", "PagedArena", "Pool", "BlockTables", "ArenaError", "ArenaOutOfMemory",
           "LeaseExceeded", "DeviceMemory", "HostMemory", "BackgroundMapper"]
