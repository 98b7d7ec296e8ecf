"""Content hashes of full KV blocks, chained so that a hash names a block *and* its whole prefix.

Block i's hash covers (block i-1's hash, block i's token ids); block 0's parent is the root of
the request's `cache_salt`. Two requests therefore share a block only when their salts and every
token up to the end of that block are equal. The root is random per process: hashes are never
predictable from outside, and never compared across restarts (the cache does not outlive them).
"""

from __future__ import annotations

import hashlib
import os
from array import array

BlockHash = bytes

_PROCESS_ROOT = os.urandom(16)


def salt_root(cache_salt: str) -> BlockHash:
    """The parent hash of a request's first block."""
    return hashlib.sha256(_PROCESS_ROOT + cache_salt.encode()).digest()


def hash_block(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    """The chained hash of one full block of `token_ids` following the block hashed `parent`."""
    return hashlib.sha256(parent + array("I", token_ids).tobytes()).digest()


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: list[int], block_size: int, cache_salt: str, num_blocks: int
) -> None:
    """Append to `hashes` until it covers the first `num_blocks` full blocks of `token_ids`.

    Token ids only ever grow at the end, so hashes computed earlier stay valid.
    """
    parent = hashes[-1] if hashes else salt_root(cache_salt)
    for index in range(len(hashes), num_blocks):
        parent = hash_block(parent, token_ids[index * block_size : (index + 1) * block_size])
        hashes.append(parent)
