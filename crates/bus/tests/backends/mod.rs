//! The backends every conformance case runs against. Redis is required: an unreachable server
//! fails the test. Outside CI a developer may opt out with `CARACAL_TEST_SKIP_EXTERNAL=1`;
//! with `CI=true` that opt-out is refused.

#![allow(dead_code)]

use std::sync::Arc;

use caracal_bus::{EmbeddedBus, RateCounter, RedisBus, ReplayRegistry, Streams};
use caracal_store::SqliteStore;

pub struct Backend {
    pub streams: Arc<dyn Streams>,
    pub replay: Arc<dyn ReplayRegistry>,
    pub rates: Arc<dyn RateCounter>,
    /// Part of every stream name and register key, so tests sharing one Redis never see each
    /// other.
    pub prefix: String,
    _directory: Option<tempfile::TempDir>,
}

impl Backend {
    pub fn stream(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Deletes the keys a Redis case created; the embedded store goes with its directory.
    pub async fn cleanup(&self) {
        if self._directory.is_some() {
            return;
        }
        let client = redis::Client::open(redis_url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
}

pub fn embedded() -> Backend {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let bus = Arc::new(EmbeddedBus::new(store));
    Backend {
        streams: bus.clone(),
        replay: bus.clone(),
        rates: bus,
        prefix: format!("test:{}:", uuid::Uuid::now_v7()),
        _directory: Some(directory),
    }
}

pub fn redis_url() -> String {
    std::env::var("CARACAL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// `None` only when the developer opted out outside CI.
pub async fn redis() -> Option<Backend> {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var("CARACAL_TEST_SKIP_EXTERNAL").is_ok_and(|value| value == "1");
    assert!(
        !(in_ci && opted_out),
        "CARACAL_TEST_SKIP_EXTERNAL is refused when CI=true"
    );
    if opted_out {
        eprintln!("SKIPPED: Redis case (CARACAL_TEST_SKIP_EXTERNAL=1)");
        return None;
    }
    let url = redis_url();
    let bus = RedisBus::connect(&url).await.unwrap_or_else(|error| {
        panic!(
            "Redis at {url} is required for this test ({error}); start it with \
             `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`"
        )
    });
    let bus = Arc::new(bus);
    Some(Backend {
        streams: bus.clone(),
        replay: bus.clone(),
        rates: bus,
        prefix: format!("test:{}:", uuid::Uuid::now_v7()),
        _directory: None,
    })
}

/// Declares `mod embedded` and `mod redis`, each with one `#[tokio::test]` per case; a case is
/// an `async fn(&Backend)`.
#[macro_export]
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::backends::embedded();
                    super::$case(&backend).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(backend) = super::backends::redis().await {
                        super::$case(&backend).await;
                        backend.cleanup().await;
                    }
                }
            )*
        }
    };
}
