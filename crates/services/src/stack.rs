//! Running a set of roles in one process: bind everything first, then open the data, then
//! serve until told to stop, then drain.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use caracal_core::Role;
use caracal_crypto::AdminToken;
use caracal_store::{
    Bootstrap, BootstrapError, BootstrapToken, DataDir, DataDirError, SqliteStore, StoreError,
    StoreUrl,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::router::router;
use crate::settings::{BusUrl, Settings};
use crate::state::{RoleState, Shared};

/// Written to `$CARACAL_HOME` once every port is bound, removed on clean exit: tells
/// `caracal status` where the running roles listen (ports may have been chosen by the OS).
pub const RUN_FILE: &str = "run.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunFile {
    pub pid: u32,
    pub roles: Vec<RunFileRole>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunFileRole {
    pub role: String,
    pub address: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "{what} `{url}` is not yet supported: this build runs the embedded {what} only \
         (the production backend lands with the stores-and-streams work)"
    )]
    NotYetSupported { what: &'static str, url: String },
    #[error("{role}: cannot listen on {address}: {source}")]
    Bind {
        role: Role,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("run file: {0}")]
    RunFile(String),
}

/// A started, not yet serving, set of roles.
pub struct Stack {
    shared: Shared,
    data_dir: DataDir,
    listeners: Vec<(Role, TcpListener)>,
    bootstrap: Bootstrap,
    shutdown_grace: Duration,
}

impl Stack {
    /// Binds every role's port (all or nothing), then opens the data directory and store and
    /// bootstraps the deployment. A failure leaves no listener open and no data changed beyond
    /// what a completed first start would have written.
    pub async fn start(settings: &Settings, roles: &[Role]) -> Result<Stack, StartError> {
        let store_path = match &settings.store {
            StoreUrl::Sqlite(path) => path.clone(),
            StoreUrl::Postgres(_) => {
                return Err(StartError::NotYetSupported {
                    what: "store",
                    url: settings.store.to_string(),
                });
            }
        };
        if let BusUrl::Redis(_) = settings.bus {
            return Err(StartError::NotYetSupported {
                what: "bus",
                url: settings.bus.to_string(),
            });
        }

        let mut listeners = Vec::with_capacity(roles.len());
        for &role in roles {
            let address = SocketAddr::new(settings.bind, settings.port(role));
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Bind {
                    role,
                    address,
                    source,
                })?;
            listeners.push((role, listener));
        }

        let data_dir = DataDir::open(&settings.home)?;
        let store = SqliteStore::open(&store_path)?;
        let bootstrap = caracal_store::bootstrap(&data_dir, &store)?;
        Ok(Stack {
            shared: Shared::new(store),
            data_dir,
            listeners,
            bootstrap,
            shutdown_grace: settings.shutdown_grace,
        })
    }

    /// Where each role listens, in start order.
    pub fn addresses(&self) -> Vec<(Role, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(role, listener)| {
                listener.local_addr().ok().map(|address| (*role, address))
            })
            .collect()
    }

    /// The bootstrap admin token if this start minted it: the only moment it can be shown.
    pub fn minted_token(&self) -> Option<&AdminToken> {
        match &self.bootstrap.admin_token {
            BootstrapToken::Minted(token) => Some(token),
            BootstrapToken::Existing => None,
        }
    }

    pub fn kek_id(&self) -> &str {
        self.bootstrap.kek.key_id()
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// Serves every role until `shutdown` completes, then drains: `/ready` turns 503
    /// `draining`, listeners stop accepting, in-flight requests finish (bounded by the grace
    /// period), and the run file is removed.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let run_file = RunFile {
            pid: std::process::id(),
            roles: self
                .addresses()
                .into_iter()
                .map(|(role, address)| RunFileRole {
                    role: role.name().to_owned(),
                    address,
                })
                .collect(),
        };
        let run_text = serde_json::to_string_pretty(&run_file)
            .map_err(|error| StartError::RunFile(error.to_string()))?;
        self.data_dir.write_private_file(RUN_FILE, &run_text)?;

        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        for (role, listener) in self.listeners {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(%role, %address, "serving");
            }
            let app = router(RoleState::new(role, self.shared.clone()));
            let stop = stop_receiver.clone();
            servers.spawn(async move {
                if let Err(error) = serve_until_stopped(listener, app, stop).await {
                    tracing::error!(%role, %error, "server stopped with an error");
                }
            });
        }

        shutdown.await;
        tracing::info!("shutdown requested: draining");
        self.shared.start_draining();
        let _ = stop_sender.send(true);
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_seconds = self.shutdown_grace.as_secs(),
                "in-flight requests did not finish within the grace period; cutting them off"
            );
            servers.abort_all();
        }
        // Pending audit evidence is flushed here once the audit producer exists (issue 4).
        let run_path = self.data_dir.path().join(RUN_FILE);
        if let Err(error) = std::fs::remove_file(&run_path) {
            tracing::warn!(%error, path = %run_path.display(), "could not remove the run file");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Serves `app` until `stop` turns true, then stops accepting and waits for the requests already
/// in flight to be answered.
async fn serve_until_stopped(
    listener: TcpListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stopped = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn stopping_finishes_requests_in_flight_and_refuses_new_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "done"
            }),
        );
        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve_until_stopped(listener, app, stop_receiver));

        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_sender.send(true).unwrap();

        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("done"), "{response}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(address).await.is_err());
    }
}
