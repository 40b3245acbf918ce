//! Counters and histograms for `/metrics`, in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::raft::batcher::BatchObserver;

/// Bucket bounds (upper, inclusive) for batch sizes.
const BATCH_BUCKETS: [u64; 8] = [1, 4, 16, 64, 128, 256, 512, 1024];

/// Upper bounds of the latency buckets, in microseconds: 50 µs doubling to
/// about 0.8 s, fine enough to tell a page-cache sync from a disk flush.
const LATENCY_BOUNDS_US: [u64; 15] = [
    50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 204_800, 409_600,
    819_200,
];

/// `value` escaped for a label value of the text format: a backslash, a
/// double quote and a line feed become `\\`, `\"` and `\n`, so no value
/// (a guest's name, say) can end its label or its line early.
pub fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A latency histogram in the Prometheus sense (cumulative buckets, sum and
/// count), updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one event that took `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let micros = elapsed.as_micros() as u64;
        if let Some(bucket) = LATENCY_BOUNDS_US.iter().position(|&b| micros <= b) {
            self.buckets[bucket].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(elapsed.as_nanos() as u64, Relaxed);
    }

    /// How many events were observed.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Appends the histogram as `name` (in seconds) with its help text.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BOUNDS_US.iter().zip(&self.buckets) {
            cumulative += count.load(Relaxed);
            let seconds = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{seconds}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The node's counters. All updates are relaxed atomics: cheap on the hot path.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Writes acknowledged with a result.
    pub writes: AtomicU64,
    /// Writes that failed (not leader, unknown outcome, unavailable).
    pub write_errors: AtomicU64,
    /// Reads answered.
    pub reads: AtomicU64,
    /// Leader changes seen by this node.
    pub leader_changes: AtomicU64,
    batches: AtomicU64,
    batch_ops: AtomicU64,
    batch_buckets: [AtomicU64; BATCH_BUCKETS.len()],
}

impl Metrics {
    /// Counts a change of leader.
    pub fn leader_changed(&self) {
        self.leader_changes.fetch_add(1, Relaxed);
    }

    /// The entries proposed for writes and the operations in them.
    pub fn batch_totals(&self) -> (u64, u64) {
        (self.batches.load(Relaxed), self.batch_ops.load(Relaxed))
    }

    /// Renders every metric, with the `counters` and `gauges` (name, help,
    /// value) that the caller knows.
    pub fn render(&self, counters: &[(&str, &str, u64)], gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "raftwasm_writes_total",
            "Writes acknowledged with a result.",
            self.writes.load(Relaxed),
        );
        counter(
            &mut out,
            "raftwasm_write_errors_total",
            "Writes refused or with unknown outcome.",
            self.write_errors.load(Relaxed),
        );
        counter(
            &mut out,
            "raftwasm_reads_total",
            "Reads answered.",
            self.reads.load(Relaxed),
        );
        counter(
            &mut out,
            "raftwasm_leader_changes_total",
            "Leader changes seen by this node.",
            self.leader_changes.load(Relaxed),
        );

        let name = "raftwasm_batch_ops";
        let _ = writeln!(
            out,
            "# HELP {name} Operations per proposed log entry.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in BATCH_BUCKETS.iter().zip(&self.batch_buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let batches = self.batches.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {batches}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {batches}",
            self.batch_ops.load(Relaxed)
        );

        for (name, help, value) in counters {
            counter(&mut out, name, help, *value);
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

impl BatchObserver for Metrics {
    fn batch_proposed(&self, ops: usize) {
        self.batches.fetch_add(1, Relaxed);
        self.batch_ops.fetch_add(ops as u64, Relaxed);
        let bucket = BATCH_BUCKETS
            .iter()
            .position(|&b| ops as u64 <= b)
            .unwrap_or(BATCH_BUCKETS.len() - 1);
        self.batch_buckets[bucket].fetch_add(1, Relaxed);
    }
}
