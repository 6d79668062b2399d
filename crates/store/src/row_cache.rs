//! Rows the embedded store answers from memory until their tables change: the directory
//! (zones, applications, providers, resources) and the delegation graph (edges, sessions, the
//! zone graph epoch). A governed call reads its application, resource and provider twice over
//! (at the mint and at the re-exchange), and its delegation edge with both sessions twice; each
//! read is a read transaction that starts on a page cache SQLite has just dropped, because the
//! writer commits hundreds of times a second, while those rows change only when an operator or
//! an agent's lifecycle call changes them.
//!
//! Why a remembered row is never stale to anyone who could know better: the writer
//! connection's update hook notes every change to a remembered table, and the writer bumps
//! that table group's generation after the transaction ends and before any of its callers
//! hears an answer. A read notes the generation *before* it starts and its rows are kept under
//! that generation, so a read that began before a change's commit is never reused after it: a
//! terminated session or a revoked edge is seen by the next mint, as a live read would see it.
//! Other processes may write the file too (the CLI's tools open it beside a running server,
//! though none of them writes these tables): the writer connection's `PRAGMA data_version`
//! changes with every commit but its own, and the writer looks at it every 50 ms (between
//! batches, or idle), forgetting everything when it has moved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::db::{Row, TableGroup, Value};

/// The tables of each group; a change to any of them forgets every row read from its group.
const GROUPS: [(TableGroup, &[&str]); 2] = [
    (
        TableGroup::Directory,
        &["zones", "applications", "providers", "resources"],
    ),
    (
        TableGroup::Delegations,
        &["delegation_edges", "sessions", "zone_graph_epochs"],
    ),
];

/// Remembered reads at most; a full cache is emptied, not trimmed (reads that miss refill it).
const CAPACITY: usize = 4_096;

/// A read: its group, the query text's address (every query is a `&'static str`) and its
/// parameters.
pub(crate) type Read = (TableGroup, usize, Vec<Value>);

pub(crate) fn read(group: TableGroup, sql: &'static str, params: Vec<Value>) -> Read {
    (group, sql.as_ptr() as usize, params)
}

#[derive(Default)]
struct Generation {
    current: AtomicU64,
    /// Set by the writer's update hook; cleared when the change's transaction has ended.
    touched: Arc<AtomicBool>,
}

#[derive(Default)]
pub(crate) struct RowCache {
    directory: Generation,
    delegations: Generation,
    /// The writer connection's `PRAGMA data_version` when last looked at.
    data_version: Mutex<Option<i64>>,
    reads: Mutex<HashMap<Read, (u64, Vec<Row>)>>,
}

impl RowCache {
    fn generation_of(&self, group: TableGroup) -> &Generation {
        match group {
            TableGroup::Directory => &self.directory,
            TableGroup::Delegations => &self.delegations,
        }
    }

    fn generations(&self) -> [&Generation; 2] {
        [&self.directory, &self.delegations]
    }

    /// Notes every change `connection` makes to a remembered table, including those made by
    /// triggers and foreign-key actions. (SQLite does not report changes to `WITHOUT ROWID`
    /// tables or a `DELETE` without `WHERE`; the remembered tables have rowids and are never
    /// emptied whole.)
    pub(crate) fn watch(&self, connection: &Connection) {
        let watched: Vec<(&'static [&'static str], Arc<AtomicBool>)> = GROUPS
            .iter()
            .map(|(group, tables)| (*tables, Arc::clone(&self.generation_of(*group).touched)))
            .collect();
        connection.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| {
                for (tables, touched) in &watched {
                    if tables.contains(&table) {
                        touched.store(true, Ordering::SeqCst);
                    }
                }
            },
        ));
    }

    /// Called by the writer after every transaction (committed or not) and before it answers
    /// the transaction's callers: every row read from a group the transaction changed is
    /// forgotten.
    pub(crate) fn transaction_ended(&self) {
        for generation in self.generations() {
            if generation.touched.swap(false, Ordering::SeqCst) {
                generation.current.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Forgets every remembered row if another connection has committed to the file since the
    /// last look (or if `connection` cannot tell). `connection` is the writer's: its own
    /// commits do not move its data version.
    pub(crate) fn notice_other_writers(&self, connection: &Connection) {
        let now = connection
            .query_row("PRAGMA data_version", [], |row| row.get::<_, i64>(0))
            .ok();
        let mut seen = self
            .data_version
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if now.is_none() || *seen != now {
            for generation in self.generations() {
                generation.current.fetch_add(1, Ordering::SeqCst);
            }
            *seen = now;
        }
    }

    /// The generation a read of `group` must note before it starts.
    pub(crate) fn generation(&self, group: TableGroup) -> u64 {
        self.generation_of(group).current.load(Ordering::SeqCst)
    }

    /// The rows of `read`, if remembered from a read that started in `generation` (the
    /// generation of the read's group, noted before it).
    pub(crate) fn get(&self, read: &Read, generation: u64) -> Option<Vec<Row>> {
        let reads = self
            .reads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match reads.get(read) {
            Some((noted, rows)) if *noted == generation => Some(rows.clone()),
            _ => None,
        }
    }

    /// Remembers the rows of a read that started in `generation`.
    pub(crate) fn put(&self, read: Read, generation: u64, rows: Vec<Row>) {
        let mut reads = self
            .reads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if reads.len() >= CAPACITY {
            reads.clear();
        }
        reads.insert(read, (generation, rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY: &str = "SELECT name FROM zones WHERE id = $1";

    fn rows(name: &str) -> Vec<Row> {
        vec![Row(vec![Value::Text(name.into())])]
    }

    /// A cache watching a fresh in-memory database with `schema`.
    fn watching(schema: &str) -> (RowCache, Connection) {
        let cache = RowCache::default();
        let connection = Connection::open_in_memory().unwrap();
        cache.watch(&connection);
        connection.execute_batch(schema).unwrap();
        (cache, connection)
    }

    #[test]
    fn a_read_that_began_before_a_change_is_never_reused_after_it() {
        let (cache, connection) = watching(
            "CREATE TABLE zones (id TEXT PRIMARY KEY, name TEXT); CREATE TABLE other (x INTEGER);",
        );
        let key = read(TableGroup::Directory, QUERY, vec![Value::Text("z".into())]);
        let noted = || cache.generation(TableGroup::Directory);
        let remember = |noted, name| cache.put(key.clone(), noted, rows(name));
        let remembered = || cache.get(&key, noted());
        let commit = |sql| {
            connection.execute(sql, []).unwrap();
            cache.transaction_ended();
        };

        // A read notes the generation, then a change commits before the read is remembered.
        let before = noted();
        commit("INSERT INTO zones VALUES ('z', 'new')");
        remember(before, "old");
        assert_eq!(remembered(), None);

        // A read that began after it is reused until the next change to its tables.
        remember(noted(), "new");
        assert_eq!(remembered(), Some(rows("new")));
        commit("INSERT INTO other VALUES (1)");
        assert_eq!(remembered(), Some(rows("new")));
        commit("DELETE FROM zones WHERE id = 'z'");
        assert_eq!(remembered(), None);
    }

    #[test]
    fn a_change_forgets_the_rows_of_its_own_group_only() {
        let (cache, connection) = watching(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY); CREATE TABLE applications (id TEXT PRIMARY KEY);",
        );
        let key = |group| read(group, QUERY, vec![Value::Text("z".into())]);
        let remember = |group| cache.put(key(group), cache.generation(group), rows("r"));
        let remembered = |group| cache.get(&key(group), cache.generation(group)).is_some();
        remember(TableGroup::Directory);
        remember(TableGroup::Delegations);
        connection
            .execute("INSERT INTO sessions VALUES ('s')", [])
            .unwrap();
        cache.transaction_ended();
        assert!(remembered(TableGroup::Directory));
        assert!(!remembered(TableGroup::Delegations));
        remember(TableGroup::Delegations);
        connection
            .execute("UPDATE applications SET id = 'b' WHERE id = 'a'", [])
            .unwrap();
        cache.transaction_ended();
        assert!(remembered(TableGroup::Directory), "no row changed");
        connection
            .execute("INSERT INTO applications VALUES ('a')", [])
            .unwrap();
        cache.transaction_ended();
        assert!(!remembered(TableGroup::Directory));
        assert!(remembered(TableGroup::Delegations));
    }

    #[test]
    fn only_another_connections_commit_forgets_everything() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE other (x INTEGER);")
            .unwrap();
        let cache = RowCache::default();
        cache.notice_other_writers(&writer);
        let before = cache.generation(TableGroup::Directory);
        writer.execute("INSERT INTO other VALUES (1)", []).unwrap();
        cache.notice_other_writers(&writer);
        assert_eq!(
            cache.generation(TableGroup::Directory),
            before,
            "its own commit"
        );
        Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO other VALUES (2)", [])
            .unwrap();
        cache.notice_other_writers(&writer);
        assert!(cache.generation(TableGroup::Directory) > before);
        assert!(cache.generation(TableGroup::Delegations) > 0);
    }

    #[test]
    fn a_full_cache_is_emptied_not_grown() {
        let cache = RowCache::default();
        let key = |index: usize| read(TableGroup::Directory, QUERY, vec![Value::Int(index as i64)]);
        for index in 0..=CAPACITY {
            cache.put(key(index), 0, rows("r"));
        }
        let remembered = cache.reads.lock().unwrap().len();
        assert_eq!(remembered, 1);
        assert_eq!(cache.get(&key(CAPACITY), 0), Some(rows("r")));
    }
}
