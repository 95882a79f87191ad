//! ShmRows between ranks living in one process (threads), with the fixture moe_exchange's
//! tests share.

use super::*;
use std::time::Duration;

#[test]
fn rows_reach_their_destinations_and_add_back_in_order() {
    let (_segs, rows) = ranks_in_process(3, 4, 16);
    // Each rank sends f32 rows of 2 values: row j = [100*rank + j, 0.5]; two to every rank,
    // gathered in reverse to check the gather.
    let data: Vec<Vec<f32>> = (0..3)
        .map(|r| {
            (0..6)
                .flat_map(|j| [100.0 * r as f32 + j as f32, 0.5])
                .collect()
        })
        .collect();
    let gather: Vec<i64> = (0..6).rev().collect();
    for (r, rank) in rows.iter().enumerate() {
        let src = RowSource {
            base: data[r].as_ptr() as usize,
            stride: 8,
            width: 8,
            rows: 6,
            gather: Some(&gather),
        };
        rank.send(0, 0, &[src], &[2, 2, 2], true).unwrap();
    }
    for rank in &rows {
        assert_eq!(rank.wait(0, 0).unwrap(), vec![2, 2, 2]);
    }
    // Rank 1 got rows 3, 2 (reversed gather, its share) of every source; add them into 2 rows.
    let mut out = vec![0f32; 4];
    rows[1]
        .add_rows_f32(0, &[2, 2, 2], 2, &mut out, &[0, 1, 0, 1, 0, 1])
        .unwrap();
    assert_eq!(
        out,
        vec![3.0 + 103.0 + 203.0, 1.5, 2.0 + 102.0 + 202.0, 1.5]
    );
}

#[test]
fn bad_sizes_and_indices_are_refused_with_the_limit() {
    let (_segs, rows) = ranks_in_process(2, 2, 8);
    let data = [0u8; 64];
    let src = |w, g| RowSource {
        base: data.as_ptr() as usize,
        stride: 8,
        width: w,
        rows: 4,
        gather: g,
    };
    let e = rows[0]
        .send(0, 0, &[src(16, None)], &[1, 1], true)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "row bytes must be <= max_row_bytes=8, got 16"
    );
    let e = rows[0]
        .send(0, 0, &[src(8, None)], &[3, 0], true)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rows sent to one rank must be <= slot_rows=2, got 3"
    );
    let g = [0i64, 9];
    let e = rows[0]
        .send(0, 0, &[src(8, Some(&g))], &[1, 1], true)
        .unwrap_err();
    assert_eq!(e.to_string(), "gather[1] must be in [0, 4), got 9");
    assert!(rows[0].send(2, 0, &[src(8, None)], &[1, 1], true).is_err());
}

#[test]
fn a_missing_peer_times_out_and_a_dead_one_is_named() {
    let layout = SegmentLayout {
        world: 2,
        phases: 2,
        slot_rows: 1,
        max_row_bytes: 8,
    };
    let mut segs: Vec<Vec<u64>> = (0..2)
        .map(|_| vec![0u64; layout.bytes().div_ceil(8)])
        .collect();
    let addrs: Vec<usize> = segs.iter_mut().map(|s| s.as_mut_ptr() as usize).collect();
    let me = std::process::id() as i64;
    let slow = unsafe {
        ShmRows::new(
            addrs.clone(),
            layout,
            0,
            vec![me, me],
            Duration::from_millis(600),
        )
        .unwrap()
    };
    slow.send(0, 0, &[], &[0, 0], true).unwrap();
    let e = slow.wait(0, 0).unwrap_err();
    assert!(
        matches!(e, CoreError::PeerTimeout { rank: 0, ref peers, .. } if peers == &vec![1]),
        "{e}"
    );
    // pid i64::MAX never runs: the wait names the rank as dead.
    let dead = unsafe {
        ShmRows::new(
            addrs,
            layout,
            0,
            vec![me, i64::MAX],
            Duration::from_secs(30),
        )
        .unwrap()
    };
    dead.send(1, 0, &[], &[0, 0], true).unwrap();
    let e = dead.wait(1, 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rank 0: rank(s) [1] died during shared-memory all-to-all call 0"
    );
}

#[test]
fn ranks_on_threads_exchange_many_calls() {
    let (_segs, rows) = ranks_in_process(2, 8, 8);
    std::thread::scope(|s| {
        for rank in &rows {
            s.spawn(move || {
                for seq in 0..500u64 {
                    let vals: Vec<u64> = (0..4)
                        .map(|j| seq * 10 + j + 1000 * rank.rank as u64)
                        .collect();
                    let src = RowSource {
                        base: vals.as_ptr() as usize,
                        stride: 8,
                        width: 8,
                        rows: 4,
                        gather: None,
                    };
                    let phase = (seq % 2) as usize;
                    rank.send(phase, seq, &[src], &[2, 2], true).unwrap();
                    assert_eq!(rank.wait(phase, seq).unwrap(), vec![2, 2]);
                }
            });
        }
    });
}

/// R segments in one process (8-aligned, zeroed) and each rank's ShmRows over them: the
/// ranks of the unit tests here and in moe_exchange.rs. Keep the segments alive while using them.
pub(crate) fn ranks_in_process(
    world: usize,
    slot_rows: usize,
    max_row_bytes: usize,
) -> (Vec<Vec<u64>>, Vec<ShmRows>) {
    let layout = SegmentLayout {
        world,
        phases: 2,
        slot_rows,
        max_row_bytes,
    };
    let mut segs: Vec<Vec<u64>> = (0..world)
        .map(|_| vec![0u64; layout.bytes().div_ceil(8)])
        .collect();
    let addrs: Vec<usize> = segs.iter_mut().map(|s| s.as_mut_ptr() as usize).collect();
    let me = std::process::id() as i64;
    let rows = (0..world)
        .map(|r| unsafe {
            ShmRows::new(
                addrs.clone(),
                layout,
                r,
                vec![me; world],
                Duration::from_secs(5),
            )
            .unwrap()
        })
        .collect();
    (segs, rows)
}
