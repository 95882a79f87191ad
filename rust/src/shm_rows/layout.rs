//! Where things sit in a rank's segment, and the rows a caller hands over to be sent.

use crate::error::{CoreError, CoreResult};

/// Where things sit in one rank's segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLayout {
    /// Ranks (R).
    pub world: usize,
    /// Buffer phases (P).
    pub phases: usize,
    /// Rows one source may write into one slot (C).
    pub slot_rows: usize,
    /// Bytes per slot row (Wmax).
    pub max_row_bytes: usize,
}

impl SegmentLayout {
    pub(super) fn header_words(&self) -> usize {
        self.world + 2 * self.phases * self.world
    }
    /// Bytes of one segment.
    pub fn bytes(&self) -> usize {
        self.header_words() * 8 + self.phases * self.world * self.slot_rows * self.max_row_bytes
    }
    pub(super) fn flag(&self, phase: usize, src: usize) -> usize {
        8 * (self.world + phase * self.world + src)
    }
    pub(super) fn count(&self, phase: usize, src: usize) -> usize {
        8 * (self.world + (self.phases + phase) * self.world + src)
    }
    pub(super) fn slot(&self, phase: usize, src: usize) -> usize {
        self.header_words() * 8 + (phase * self.world + src) * self.slot_rows * self.max_row_bytes
    }
}

/// The rows of one tensor to send.
#[derive(Debug, Clone, Copy)]
pub struct RowSource<'a> {
    /// Address of row 0.
    pub base: usize,
    /// Bytes from one row to the next.
    pub stride: usize,
    /// Bytes per row (contiguous).
    pub width: usize,
    /// Rows readable at `base`.
    pub rows: usize,
    /// Sent row j is row `gather[j]`; `None`: row j.
    pub gather: Option<&'a [i64]>,
}

/// Checks that a source's rows (and gather indices) lie inside what it says it holds.
pub(super) fn check_source(src: &RowSource<'_>, total: usize) -> CoreResult<()> {
    match src.gather {
        Some(g) => {
            if g.len() < total {
                return Err(CoreError::LengthMismatch {
                    field: "gather",
                    expected: total,
                    got: g.len(),
                });
            }
            if let Some((j, &row)) = g[..total]
                .iter()
                .enumerate()
                .find(|(_, &r)| r < 0 || r as usize >= src.rows)
            {
                return Err(CoreError::out_of_range(
                    format!("gather[{j}]"),
                    format!("in [0, {})", src.rows),
                    row,
                ));
            }
        }
        None if src.rows < total => {
            return Err(CoreError::LengthMismatch {
                field: "source rows",
                expected: total,
                got: src.rows,
            });
        }
        None => {}
    }
    Ok(())
}
