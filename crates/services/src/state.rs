//! State shared by every role of a process, and the per-role state handed to its router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use caracal_core::Role;
use caracal_store::SqliteStore;

use crate::metrics::RoleMetrics;

/// What all roles of one process share. Cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub store: SqliteStore,
    draining: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(store: SqliteStore) -> Shared {
        Shared {
            store,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the process as shutting down: every `/ready` fails with `draining` from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// One role's view: the shared state plus its own metrics registry.
#[derive(Clone)]
pub struct RoleState {
    pub role: Role,
    pub shared: Shared,
    pub metrics: Arc<RoleMetrics>,
}

impl RoleState {
    pub fn new(role: Role, shared: Shared) -> RoleState {
        RoleState {
            role,
            shared,
            metrics: Arc::new(RoleMetrics::new(role)),
        }
    }
}
