//! The small SQL surface both backends share, so every query of the [`Store`](crate::Store) is
//! written once and behaves the same on SQLite and PostgreSQL.
//!
//! Queries use `$1…$n` parameters (SQLite sees `?1…?n`), store integers as 64-bit and text as
//! text (JSON documents included), keep times as milliseconds since the epoch, and read results
//! with `RETURNING` instead of a second query.

use crate::store::StoreError;

/// A parameter or result value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&str> for Value {
    fn from(text: &str) -> Value {
        Value::Text(text.to_owned())
    }
}

impl From<String> for Value {
    fn from(text: String) -> Value {
        Value::Text(text)
    }
}

impl From<&String> for Value {
    fn from(text: &String) -> Value {
        Value::Text(text.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(bytes: Vec<u8>) -> Value {
        Value::Bytes(bytes)
    }
}

impl From<i64> for Value {
    fn from(number: i64) -> Value {
        Value::Int(number)
    }
}

impl From<u32> for Value {
    fn from(number: u32) -> Value {
        Value::Int(i64::from(number))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Value {
        value.map_or(Value::Null, Into::into)
    }
}

/// `vec![a.into(), b.into(), …]`.
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        vec![$($crate::db::Value::from($value)),*]
    };
}
pub(crate) use params;

/// Tables whose rows change when someone edits them, not on every request, so that reads of
/// them alone may be remembered ([`Db::remembered_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableGroup {
    /// Zones, applications, providers, resources.
    Directory,
    /// Delegation edges, sessions, the zone graph epochs.
    Delegations,
}

/// One result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn value(&self, index: usize) -> Result<&Value, StoreError> {
        self.0
            .get(index)
            .ok_or_else(|| StoreError::Corrupt(format!("result has no column {index}")))
    }

    pub fn text(&self, index: usize) -> Result<String, StoreError> {
        match self.value(index)? {
            Value::Text(text) => Ok(text.clone()),
            other => Err(StoreError::Corrupt(format!(
                "column {index}: expected text, found {other:?}"
            ))),
        }
    }

    /// A byte column as lower-case hex. Text where bytes belong (written around Caracal) is
    /// read as its bytes, so it never passes for a genuine hash.
    pub fn hex(&self, index: usize) -> Result<String, StoreError> {
        match self.value(index)? {
            Value::Bytes(bytes) => Ok(caracal_crypto::hex(bytes)),
            Value::Text(text) => Ok(caracal_crypto::hex(text.as_bytes())),
            other => Err(StoreError::Corrupt(format!(
                "column {index}: expected bytes, found {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        match self.value(index)? {
            Value::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    pub fn int(&self, index: usize) -> Result<i64, StoreError> {
        match self.value(index)? {
            Value::Int(number) => Ok(*number),
            other => Err(StoreError::Corrupt(format!(
                "column {index}: expected integer, found {other:?}"
            ))),
        }
    }

    pub fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        match self.value(index)? {
            Value::Null => Ok(None),
            _ => self.int(index).map(Some),
        }
    }
}

/// A statement of an atomic batch.
#[derive(Debug, Clone)]
pub struct Statement {
    pub sql: &'static str,
    pub params: Vec<Value>,
    /// Roll the whole batch back with this error if the statement changes no row.
    pub must_change: Option<fn() -> StoreError>,
}

impl Statement {
    pub fn new(sql: &'static str, params: Vec<Value>) -> Statement {
        Statement {
            sql,
            params,
            must_change: None,
        }
    }

    pub fn must_change(mut self, error: fn() -> StoreError) -> Statement {
        self.must_change = Some(error);
        self
    }
}

/// What one statement of a batch produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub changed: u64,
    /// Rows of a `RETURNING` clause or a `SELECT`.
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Builds the second part of a transaction from the outcomes of the first.
pub type Then = Box<dyn FnOnce(&[Outcome]) -> Result<Vec<Statement>, StoreError> + Send>;

#[async_trait::async_trait]
pub trait Db: Send + Sync {
    fn dialect(&self) -> Dialect;

    /// The share of pooled connections in use, where there is a pool (PostgreSQL).
    fn pool_in_use_ratio(&self) -> Option<f64> {
        None
    }

    /// Runs `first`, then the statements `then` builds from their outcomes, all in one
    /// transaction, and returns every outcome in order. Any error, or a `must_change` statement
    /// that changed nothing, rolls everything back.
    async fn atomic_with(
        &self,
        first: Vec<Statement>,
        then: Then,
    ) -> Result<Vec<Outcome>, StoreError>;

    /// Runs the statements in one transaction (see [`Db::atomic_with`]).
    async fn atomic(&self, statements: Vec<Statement>) -> Result<Vec<Outcome>, StoreError> {
        self.atomic_with(statements, Box::new(|_| Ok(Vec::new())))
            .await
    }

    /// Like [`Db::atomic`], visible to every reader once it returns, but a backend may return
    /// before the commit reaches the disk; the next durable commit carries it there. For
    /// records whose loss in a power cut fails closed (an authority record: a mandate whose
    /// record is missing is refused wherever its record is checked). The embedded store skips
    /// the fsync; PostgreSQL commits as usual.
    async fn atomic_unsynced(
        &self,
        statements: Vec<Statement>,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.atomic(statements).await
    }

    /// Rows of one statement (a `SELECT`, or a write with `RETURNING`).
    async fn rows(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let mut outcomes = self.atomic(vec![Statement::new(sql, params)]).await?;
        Ok(outcomes
            .pop()
            .map(|outcome| outcome.rows)
            .unwrap_or_default())
    }

    /// Rows of a `SELECT` that reads the tables of `group` alone. The embedded store answers
    /// it from memory until the next change to any of those tables; PostgreSQL, which other
    /// processes write too, runs it.
    async fn remembered_rows(
        &self,
        _group: TableGroup,
        sql: &'static str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, StoreError> {
        self.rows(sql, params).await
    }

    /// Rows changed by one statement.
    async fn change(&self, sql: &'static str, params: Vec<Value>) -> Result<u64, StoreError> {
        let mut outcomes = self.atomic(vec![Statement::new(sql, params)]).await?;
        Ok(outcomes
            .pop()
            .map(|outcome| outcome.changed)
            .unwrap_or_default())
    }
}
