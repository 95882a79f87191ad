//! Chained block hashes for the prefix cache: a full block's hash mixes its parent's hash with
//! its tokens, so equal hashes mean (barring collisions, which the pool verifies) equal prefixes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::request::TokenId;

/// Index of a KV block in `[0, num_blocks)`.
pub type BlockId = u32;
/// Chained hash of a full block: depends on every token from the start of the sequence.
pub type BlockHash = u64;

/// Parent hash of a sequence's first block.
pub const ROOT_HASH: BlockHash = 0x243F_6A88_85A3_08D3;

/// Hash of a full block given its parent's hash (splitmix64-style mixing per token).
pub fn hash_block(parent: BlockHash, tokens: &[TokenId]) -> BlockHash {
    let mut h = parent ^ (tokens.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// Extends `hashes` with the chained hashes of the full blocks of `tokens`, up to `num_full`
/// blocks. Blocks already hashed are not hashed again.
pub fn extend_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[TokenId],
    block_size: usize,
    num_full: usize,
) {
    while hashes.len() < num_full {
        let i = hashes.len();
        let parent = if i == 0 { ROOT_HASH } else { hashes[i - 1] };
        hashes.push(hash_block(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

/// Hasher for keys that already are well-mixed 64-bit hashes: passes them through, so a map
/// lookup costs no second round of hashing.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThroughHasher {
    /// The key, once written.
    value: u64,
}

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.value
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are used; fold anything else in so the hasher stays correct anyway.
        for &b in bytes {
            self.value = self.value.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.value = v;
    }
}

/// Hash -> block map keyed by chained block hashes.
pub type HashToBlock = HashMap<BlockHash, BlockId, BuildHasherDefault<PassThroughHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_parent_and_every_token() {
        let a = hash_block(ROOT_HASH, &[1, 2, 3]);
        assert_eq!(a, hash_block(ROOT_HASH, &[1, 2, 3]));
        assert_ne!(a, hash_block(ROOT_HASH, &[1, 2, 4]));
        assert_ne!(a, hash_block(ROOT_HASH, &[2, 1, 3]));
        assert_ne!(a, hash_block(a, &[1, 2, 3]));
    }

    #[test]
    fn extend_hashes_only_new_full_blocks() {
        let tokens = [5, 6, 7, 8, 9];
        let mut hashes = Vec::new();
        extend_block_hashes(&mut hashes, &tokens, 2, 1);
        assert_eq!(hashes, vec![hash_block(ROOT_HASH, &[5, 6])]);
        extend_block_hashes(&mut hashes, &tokens, 2, 2);
        assert_eq!(hashes[1], hash_block(hashes[0], &[7, 8]));
        extend_block_hashes(&mut hashes, &tokens, 2, 2);
        assert_eq!(hashes.len(), 2);
    }

    #[test]
    fn pass_through_map_works() {
        let mut m = HashToBlock::default();
        m.insert(42, 7);
        assert_eq!(m.get(&42), Some(&7));
    }
}
