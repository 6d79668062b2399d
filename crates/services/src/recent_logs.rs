//! The last log lines of this process, kept in memory so an incident's evidence bundle can
//! hold them (`GET /v1/incident/logs`). The binary's logging setup feeds it; nothing here
//! knows how lines are formatted.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};

/// How many lines are kept; older ones are dropped first.
pub const CAPACITY: usize = 2000;

static RECENT: LazyLock<Mutex<VecDeque<String>>> =
    LazyLock::new(|| Mutex::new(VecDeque::with_capacity(CAPACITY)));

pub fn push(line: String) {
    let mut lines = RECENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if lines.len() >= CAPACITY {
        lines.pop_front();
    }
    lines.push_back(line);
}

/// The kept lines, oldest first.
pub fn recent() -> Vec<String> {
    RECENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_lines_are_kept() {
        for n in 0..CAPACITY + 5 {
            push(format!("line {n}"));
        }
        let lines = recent();
        assert_eq!(lines.len(), CAPACITY);
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("line {}", CAPACITY + 4).as_str())
        );
        assert!(!lines.contains(&"line 4".to_owned()));
    }
}
