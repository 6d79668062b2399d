//! Test doubles shared by the unit tests of this crate.

use std::time::Duration;

use caracal_bus::{BusError, Entry, PendingEntry, StreamInfo, Streams};

/// A bus whose appends always fail, as Redis does while it is down.
pub struct DownBus;

#[async_trait::async_trait]
impl Streams for DownBus {
    async fn append(&self, _: &str, _: &caracal_bus::Fields) -> Result<String, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn append_many(
        &self,
        _: &str,
        _: &[caracal_bus::Fields],
    ) -> Result<Vec<String>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ensure_group(&self, _: &str, _: &str) -> Result<(), BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn read_group(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: usize,
        _: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ack(&self, _: &str, _: &str, _: &[String]) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn pending(&self, _: &str, _: &str, _: usize) -> Result<Vec<PendingEntry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn claim_idle(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Duration,
        _: usize,
    ) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn info(&self, _: &str) -> Result<StreamInfo, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn range(&self, _: &str, _: Option<&str>, _: usize) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn delete(&self, _: &str, _: &[String]) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn trim_consumed(&self, _: &str) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ping(&self) -> Result<(), BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
}
