//! The record families of the store, each a trait implemented once over [`Db`](crate::db::Db).

mod audit;
mod deployment;
mod directory;
mod notifications;
mod objects;
mod outbox;
mod policies;
pub(crate) mod runtime;

pub use audit::{Audit, ChainAppend, ChainBuilder};
pub use deployment::Deployment;
pub use directory::Directory;
pub use notifications::Notifications;
pub use objects::Objects;
pub use outbox::Outbox;
pub use policies::Policies;
pub use runtime::Runtime;
