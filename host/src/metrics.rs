//! The node's metrics for `/metrics`: one [`prometheus::Registry`] of typed
//! counters, gauges and histograms, rendered in the Prometheus text format
//! by the `prometheus` crate, which escapes label values (a guest's name may
//! hold quotes and backslashes).
//!
//! Counters and histograms are updated where things happen (the batcher,
//! the state machine's apply, the database's flushes, the service); the
//! gauges that mirror Raft's state are set from a [`Scrape`] when rendered.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use crate::raft::batcher::BatchObserver;

/// Bucket bounds (upper, inclusive) for batch sizes.
const BATCH_BUCKETS: [f64; 8] = [1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Upper bounds of the latency buckets, in microseconds: 50 µs doubling to
/// about 0.8 s, fine enough to tell a page-cache sync from a disk flush.
const LATENCY_BOUNDS_US: [u64; 15] = [
    50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 204_800, 409_600,
    819_200,
];

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    // The options are constants of this module: valid names, sorted bounds.
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| unreachable!("histogram {name}: {e}"))
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("counter {name}: {e}"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("gauge {name}: {e}"))
}

/// A latency histogram in seconds, with the buckets of [`LATENCY_BOUNDS_US`].
/// Cheap to clone: clones share their counts.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram);

impl LatencyHistogram {
    /// A histogram named `name` (in seconds) with its help text.
    pub fn new(name: &str, help: &str) -> Self {
        let bounds = LATENCY_BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .collect();
        Self(histogram(name, help, bounds))
    }

    /// The synced writes of the node's database.
    pub fn disk_flushes() -> Self {
        Self::new(
            "raftwasm_disk_flush_duration_seconds",
            "Flushes of the node's sled database (the state, in the background and at snapshots; votes and purges), and how long each took.",
        )
    }

    /// Syncs of the Raft log file: one per appended batch of entries.
    pub fn log_syncs() -> Self {
        Self::new(
            "raftwasm_log_sync_duration_seconds",
            "Syncs of the Raft log file (one per appended batch of log entries), and how long each took.",
        )
    }

    /// Counts one event that took `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }

    /// How many events were observed.
    pub fn count(&self) -> u64 {
        self.0.get_sample_count()
    }
}

/// What the state machine's apply path did, in one place: the entries and
/// operations applied, the time spent, and how long each apply call took.
/// Cheap to clone: clones share their counts.
#[derive(Debug, Clone)]
pub struct ApplyStats {
    entries: IntCounter,
    ops: IntCounter,
    nanos: IntCounter,
    latency: LatencyHistogram,
}

impl Default for ApplyStats {
    fn default() -> Self {
        Self {
            entries: counter(
                "raftwasm_applied_entries_total",
                "Log entries applied by the state machine.",
            ),
            ops: counter("raftwasm_applied_ops_total", "Guest operations applied."),
            nanos: counter(
                "raftwasm_apply_nanoseconds_total",
                "Time spent applying entries (guest calls and the sled writes).",
            ),
            latency: LatencyHistogram::new(
                "raftwasm_apply_duration_seconds",
                "Calls of the state machine's apply (one or more committed entries through the guest, and their writes), and how long each took.",
            ),
        }
    }
}

impl ApplyStats {
    /// Counts one apply call of `entries` log entries holding `ops` guest
    /// operations, which took `elapsed`.
    pub fn record(&self, entries: usize, ops: usize, elapsed: Duration) {
        self.entries.inc_by(entries as u64);
        self.ops.inc_by(ops as u64);
        self.nanos
            .inc_by(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        self.latency.observe(elapsed);
    }

    /// Log entries applied so far.
    pub fn entries(&self) -> u64 {
        self.entries.get()
    }
}

/// The values of the gauges that mirror Raft's state, read when `/metrics`
/// is asked for.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// The current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Index up to which the log is purged.
    pub purged_index: u64,
    /// The active guest: name, version, module hash, and the log index
    /// from which it runs.
    pub guest: Option<GuestLabels>,
}

/// The active guest, as `raftwasm_guest_info` labels it.
#[derive(Debug, Clone, Default)]
pub struct GuestLabels {
    /// The guest's name, any text.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The module's SHA-256, in hex.
    pub hash: String,
    /// The log index from which it runs.
    pub since: u64,
}

/// The node's metrics, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    writes: IntCounter,
    write_errors: IntCounter,
    reads: IntCounter,
    leader_changes: IntCounter,
    early_appends: IntCounter,
    batch_ops: Histogram,
    guest_active_since_index: IntGauge,
    is_leader: IntGauge,
    term: IntGauge,
    last_log_index: IntGauge,
    applied_index: IntGauge,
    log_entries: IntGauge,
    guest_info: IntGaugeVec,
    /// Renders one scrape at a time: the gauges are set, then read.
    rendering: Mutex<()>,
}

impl Metrics {
    /// The node's metrics, including the state machine's `apply` stats, the
    /// database's `flushes` and the log file's `syncs`, which their owners
    /// update.
    pub fn new(apply: &ApplyStats, flushes: &LatencyHistogram, syncs: &LatencyHistogram) -> Self {
        let guest_info = IntGaugeVec::new(
            Opts::new("raftwasm_guest_info", "The active guest."),
            &["name", "version", "hash"],
        )
        .unwrap_or_else(|e| unreachable!("raftwasm_guest_info: {e}"));
        let metrics = Self {
            registry: Registry::new(),
            writes: counter(
                "raftwasm_writes_total",
                "Writes acknowledged with a result.",
            ),
            write_errors: counter(
                "raftwasm_write_errors_total",
                "Writes refused or with unknown outcome.",
            ),
            reads: counter("raftwasm_reads_total", "Reads answered."),
            leader_changes: counter(
                "raftwasm_leader_changes_total",
                "Leader changes seen by this node.",
            ),
            early_appends: counter(
                "raftwasm_early_appends_total",
                "Append requests written to a follower while this leader synced the same entries (one per follower).",
            ),
            batch_ops: histogram(
                "raftwasm_batch_ops",
                "Operations per proposed log entry.",
                BATCH_BUCKETS.to_vec(),
            ),
            guest_active_since_index: gauge(
                "raftwasm_guest_active_since_index",
                "Log index from which the active guest runs.",
            ),
            is_leader: gauge("raftwasm_is_leader", "1 if this node is the leader."),
            term: gauge("raftwasm_term", "Current Raft term."),
            last_log_index: gauge("raftwasm_last_log_index", "Index of the last log entry."),
            applied_index: gauge("raftwasm_applied_index", "Index of the last applied entry."),
            log_entries: gauge(
                "raftwasm_log_entries",
                "Entries in the log (not yet purged).",
            ),
            guest_info,
            rendering: Mutex::new(()),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.writes.clone()),
            Box::new(metrics.write_errors.clone()),
            Box::new(metrics.reads.clone()),
            Box::new(metrics.leader_changes.clone()),
            Box::new(metrics.early_appends.clone()),
            Box::new(metrics.batch_ops.clone()),
            Box::new(apply.entries.clone()),
            Box::new(apply.ops.clone()),
            Box::new(apply.nanos.clone()),
            Box::new(apply.latency.0.clone()),
            Box::new(flushes.0.clone()),
            Box::new(syncs.0.clone()),
            Box::new(metrics.guest_active_since_index.clone()),
            Box::new(metrics.is_leader.clone()),
            Box::new(metrics.term.clone()),
            Box::new(metrics.last_log_index.clone()),
            Box::new(metrics.applied_index.clone()),
            Box::new(metrics.log_entries.clone()),
            Box::new(metrics.guest_info.clone()),
        ];
        for collector in collectors {
            // Every name above is distinct, so registering cannot fail.
            if let Err(error) = metrics.registry.register(collector) {
                tracing::error!(%error, "a metric could not be registered");
            }
        }
        metrics
    }

    /// The count of early append requests, for the log store to increment
    /// (see [`crate::raft::early`]).
    pub fn early_appends(&self) -> IntCounter {
        self.early_appends.clone()
    }

    /// Counts a change of leader.
    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// The counters `/status` reports (for the dashboard's rates), with the
    /// state machine's `apply` stats.
    pub fn counters(&self, apply: &ApplyStats) -> crate::proto::Counters {
        crate::proto::Counters {
            writes: self.writes.get(),
            write_errors: self.write_errors.get(),
            reads: self.reads.get(),
            batches: self.batch_ops.get_sample_count(),
            batch_ops: self.batch_ops.get_sample_sum() as u64,
            applied_entries: apply.entries.get(),
            applied_ops: apply.ops.get(),
            apply_calls: apply.latency.count(),
            apply_nanos: apply.nanos.get(),
        }
    }

    /// Counts a write acknowledged with a result.
    pub fn write_succeeded(&self) {
        self.writes.inc();
    }

    /// Counts a write that failed (not leader, unknown outcome, unavailable).
    pub fn write_failed(&self) {
        self.write_errors.inc();
    }

    /// Counts a read answered.
    pub fn read_answered(&self) {
        self.reads.inc();
    }

    /// Every metric in the Prometheus text format, with the gauges set from
    /// `scrape`.
    pub fn render(&self, scrape: &Scrape) -> String {
        let _rendering = self
            .rendering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set =
            |gauge: &IntGauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&self.is_leader, u64::from(scrape.is_leader));
        set(&self.term, scrape.term);
        set(&self.last_log_index, scrape.last_log_index);
        set(&self.applied_index, scrape.applied_index);
        set(
            &self.log_entries,
            scrape.last_log_index.saturating_sub(scrape.purged_index),
        );
        set(
            &self.guest_active_since_index,
            scrape.guest.as_ref().map_or(0, |g| g.since),
        );
        self.guest_info.reset();
        if let Some(guest) = &scrape.guest {
            self.guest_info
                .with_label_values(&[&guest.name, &guest.version, &guest.hash])
                .set(1);
        }
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| format!("# metrics could not be encoded: {error}\n"))
    }
}

impl BatchObserver for Metrics {
    fn batch_proposed(&self, ops: usize) {
        self.batch_ops.observe(ops as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unescaped value of label `label` in the one sample of `name`.
    fn label(exposition: &str, name: &str, label: &str) -> Option<String> {
        let line = exposition
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))?;
        let start = line.find(&format!("{label}=\""))? + label.len() + 2;
        let mut value = String::new();
        let mut chars = line[start..].chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(value),
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        None
    }

    #[test]
    fn every_metric_is_rendered_with_escaped_guest_labels() {
        let apply = ApplyStats::default();
        let flushes = LatencyHistogram::disk_flushes();
        let syncs = LatencyHistogram::log_syncs();
        let metrics = Metrics::new(&apply, &flushes, &syncs);
        apply.record(2, 5, Duration::from_micros(300));
        flushes.observe(Duration::from_millis(2));
        syncs.observe(Duration::from_micros(70));
        syncs.observe(Duration::from_micros(80));
        metrics.batch_proposed(3);
        metrics.write_succeeded();
        metrics.early_appends().inc_by(2);
        let name = "a\"b \\ c\nd";
        let text = metrics.render(&Scrape {
            is_leader: true,
            term: 3,
            last_log_index: 10,
            applied_index: 9,
            purged_index: 4,
            guest: Some(GuestLabels {
                name: name.into(),
                version: "1.0.0".into(),
                hash: "ab".into(),
                since: 7,
            }),
        });
        for expected in [
            "raftwasm_writes_total 1",
            "raftwasm_write_errors_total 0",
            "raftwasm_reads_total 0",
            "raftwasm_leader_changes_total 0",
            "raftwasm_early_appends_total 2",
            "raftwasm_applied_entries_total 2",
            "raftwasm_applied_ops_total 5",
            "raftwasm_apply_nanoseconds_total 300000",
            "raftwasm_apply_duration_seconds_count 1",
            "raftwasm_disk_flush_duration_seconds_count 1",
            "raftwasm_log_sync_duration_seconds_count 2",
            "raftwasm_batch_ops_count 1",
            "raftwasm_batch_ops_sum 3",
            "raftwasm_guest_active_since_index 7",
            "raftwasm_is_leader 1",
            "raftwasm_term 3",
            "raftwasm_last_log_index 10",
            "raftwasm_applied_index 9",
            "raftwasm_log_entries 6",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "{expected:?} in:\n{text}"
            );
        }
        assert!(text.contains(r#"name="a\"b \\ c\nd""#), "{text}");
        assert_eq!(
            label(&text, "raftwasm_guest_info", "name").as_deref(),
            Some(name)
        );
        // Every line is a comment or one sample: the newline did not split one.
        assert!(
            text.lines().all(|l| l.starts_with('#')
                || l.rsplit_once(' ')
                    .is_some_and(|(_, v)| v.parse::<f64>().is_ok())),
            "{text}"
        );

        let without = metrics.render(&Scrape::default());
        assert!(!without.contains("raftwasm_guest_info{"), "{without}");
    }
}
