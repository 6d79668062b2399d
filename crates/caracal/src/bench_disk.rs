//! The disk's `fdatasync` latency on the store's filesystem, measured beside the benchmarks
//! that wait for durable commits. Every governed call and every mint waits for its audit event
//! to be committed (invariant 5), so this latency is the floor under their tail: it is printed
//! with their percentiles, idle and while the open loop runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Percentiles of one series of `fdatasync` calls.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Syncs {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl std::fmt::Display for Syncs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} ms ({} syncs)",
            self.p50_ms, self.p99_ms, self.p999_ms, self.samples
        )
    }
}

fn syncs(mut latencies: Vec<Duration>) -> Syncs {
    latencies.sort_unstable();
    let at =
        |fraction: f64| crate::bench_sts::percentile(&latencies, fraction).as_secs_f64() * 1000.0;
    Syncs {
        samples: latencies.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
    }
}

/// 4 KiB appended then `fdatasync`ed, `pause` between, until `more` says enough.
fn probe(
    dir: &Path,
    pause: Duration,
    more: impl Fn(usize) -> bool,
) -> std::io::Result<Vec<Duration>> {
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let block = [0u8; 4096];
    let mut latencies = Vec::new();
    let result = (|| {
        while more(latencies.len()) {
            file.write_all(&block)?;
            let start = Instant::now();
            file.sync_data()?;
            latencies.push(start.elapsed());
            std::thread::sleep(pause);
        }
        Ok(())
    })();
    drop(file);
    std::fs::remove_file(&path)?;
    result.map(|()| latencies)
}

/// `count` syncs one after another, with nothing else running.
pub(crate) fn idle(dir: &Path, count: usize) -> std::io::Result<Syncs> {
    probe(dir, Duration::ZERO, |done| done < count).map(syncs)
}

/// Syncs every 5 ms on a thread of its own until [`Running::finish`].
pub(crate) struct Running {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<std::io::Result<Vec<Duration>>>,
}

pub(crate) fn start(dir: &Path) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let (dir, stopped): (PathBuf, _) = (dir.to_owned(), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        probe(&dir, Duration::from_millis(5), |_| {
            !stopped.load(Ordering::Relaxed)
        })
    });
    Running { stop, thread }
}

impl Running {
    pub(crate) fn finish(self) -> std::io::Result<Syncs> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| std::io::Error::other("the fsync probe panicked"))?
            .map(syncs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_sync_count_times_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let quiet = idle(dir.path(), 20).unwrap();
        assert_eq!(quiet.samples, 20);
        assert!(quiet.p50_ms > 0.0 && quiet.p50_ms <= quiet.p99_ms);
        let running = start(dir.path());
        std::thread::sleep(Duration::from_millis(60));
        let during = running.finish().unwrap();
        assert!(during.samples >= 1, "{during}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
