//! The LRU queue of free KV blocks: an intrusive doubly linked list over block ids, so pushing
//! a freed block, popping the least recently freed one, and pulling a block out of the middle
//! (a prefix-cache hit on a free block) are all O(1).

use crate::block_hash::BlockId;

const NIL: u32 = u32::MAX;

/// Free blocks, least recently freed first.
#[derive(Debug, Clone)]
pub struct FreeQueue {
    /// Per block: previous block in the queue (NIL at the head or when not queued).
    prev: Vec<u32>,
    /// Per block: next block in the queue (NIL at the tail or when not queued).
    next: Vec<u32>,
    /// Least recently freed block, or NIL.
    head: u32,
    /// Most recently freed block, or NIL.
    tail: u32,
    /// Blocks in the queue.
    len: usize,
}

impl FreeQueue {
    /// Largest number of blocks a queue can index (NIL is reserved).
    pub const MAX_BLOCKS: usize = NIL as usize - 1;

    /// A queue holding all `num_blocks` blocks in id order.
    pub fn full(num_blocks: usize) -> Self {
        assert!(
            num_blocks <= Self::MAX_BLOCKS,
            "num_blocks {num_blocks} too large"
        );
        let n = num_blocks as u32;
        FreeQueue {
            prev: (0..n).map(|b| if b == 0 { NIL } else { b - 1 }).collect(),
            next: (0..n)
                .map(|b| if b + 1 == n { NIL } else { b + 1 })
                .collect(),
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            len: num_blocks,
        }
    }

    /// Blocks in the queue.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Takes the least recently freed block.
    pub fn pop_front(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.remove(b);
        Some(b)
    }

    /// Appends a block that just became free. The caller guarantees it is not queued.
    pub fn push_back(&mut self, b: BlockId) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    /// Pulls a queued block out of the queue. The caller guarantees it is queued.
    pub fn remove(&mut self, b: BlockId) {
        let (prev, next) = (self.prev[b as usize], self.next[b as usize]);
        match prev {
            NIL => self.head = next,
            p => self.next[p as usize] = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.prev[n as usize] = prev,
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.len -= 1;
    }

    /// Walks the queue front to back, checking its links; returns the blocks in order.
    pub fn walk(&self) -> Result<Vec<BlockId>, String> {
        let mut order = Vec::with_capacity(self.len);
        let (mut b, mut prev) = (self.head, NIL);
        while b != NIL {
            if order.len() > self.len {
                return Err(format!("free queue longer than its length {}", self.len));
            }
            if self.prev[b as usize] != prev {
                return Err(format!("free block {b} has a wrong prev link"));
            }
            order.push(b);
            (prev, b) = (b, self.next[b as usize]);
        }
        if prev != self.tail || order.len() != self.len {
            return Err(format!(
                "free queue walked {} blocks, counted {}",
                order.len(),
                self.len
            ));
        }
        Ok(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_middle_removal() {
        let mut q = FreeQueue::full(4);
        assert_eq!(q.walk().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(q.pop_front(), Some(0));
        q.remove(2);
        q.push_back(0);
        q.push_back(2);
        assert_eq!(q.walk().unwrap(), vec![1, 3, 0, 2]);
        for want in [1, 3, 0, 2] {
            assert_eq!(q.pop_front(), Some(want));
        }
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.len(), 0);
        q.push_back(3);
        assert_eq!(q.walk().unwrap(), vec![3]);
    }
}
