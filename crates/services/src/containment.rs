//! Incident containment as every role sees it: the switches in the store (`freeze`,
//! `fail_closed` for the deployment or a zone), held in memory and refreshed every second, so
//! a switch thrown on one replica holds on all of them within a second. The replica that
//! throws a switch applies it at once.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use caracal_store::{Containment, Store};

pub const FREEZE: &str = "freeze";
pub const FAIL_CLOSED: &str = "fail_closed";
/// How often each process re-reads the switches.
pub const REFRESH: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub struct ContainmentView {
    switches: Arc<RwLock<Vec<Containment>>>,
}

impl ContainmentView {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Containment>> {
        self.switches
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Policy activations, provider and resource changes are refused.
    pub fn frozen(&self) -> bool {
        self.read().iter().any(|switch| switch.kind == FREEZE)
    }

    /// Protected traffic of `zone_id` is refused (a deployment-wide switch covers every zone).
    pub fn fail_closed(&self, zone_id: &str) -> bool {
        self.read().iter().any(|switch| {
            switch.kind == FAIL_CLOSED && (switch.zone_id.is_empty() || switch.zone_id == zone_id)
        })
    }

    pub fn switches(&self) -> Vec<Containment> {
        self.read().clone()
    }

    /// Re-reads the switches; on a store error the last known ones stay in force.
    pub async fn refresh(&self, store: &dyn Store) -> Result<(), caracal_store::StoreError> {
        let switches = store.list_containment().await?;
        *self
            .switches
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = switches;
        Ok(())
    }
}

/// Keeps `view` in step with the store until `stop`.
pub async fn follow(
    view: ContainmentView,
    store: Arc<dyn Store>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(error) = view.refresh(store.as_ref()).await {
            tracing::warn!(%error, "containment switches could not be read; the last ones stay in force");
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(REFRESH) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
