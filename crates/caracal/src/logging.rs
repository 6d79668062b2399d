//! Structured logs on stderr, and the same lines as JSON in the process's recent-log buffer
//! (`caracal_services::recent_logs`, for evidence bundles). Request handlers log inside a span
//! that carries the request id, so every line of a request names it in both formats.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// One event's formatted text, handed to the recent-log buffer when the formatter is done.
#[derive(Default)]
struct RecentLine(Vec<u8>);

impl std::io::Write for RecentLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RecentLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        for line in text.lines().filter(|line| !line.is_empty()) {
            caracal_services::recent_logs::push(line.to_owned());
        }
    }
}

pub fn init(format: LogFormat, filter: &str) {
    // The filter was validated with the rest of the configuration.
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let recent = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(RecentLine::default);
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(recent);
    let result = match format {
        LogFormat::Text => registry.with(stderr).try_init(),
        LogFormat::Json => registry
            .with(stderr.json().with_current_span(true).with_span_list(false))
            .try_init(),
    };
    // A second initialisation (never in the binary) keeps the first subscriber.
    drop(result);
}
