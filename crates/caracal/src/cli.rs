//! The command line: what the user typed, before any validation beyond syntax.

use std::path::PathBuf;

use caracal_core::Role;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "caracal",
    version,
    about = "Authorization control plane for AI agents: STS, Gateway, Coordinator, API, Audit and Console in one binary",
    long_about = None,
)]
pub struct Cli {
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(subcommand)]
    pub command: Command,
}

/// Configuration flags, accepted by every command. Each one outranks its `CARACAL_*`
/// environment variable, which outranks `$CARACAL_HOME/caracal.toml`, which outranks the default.
#[derive(Debug, Default, Args)]
pub struct Overrides {
    /// Data directory [env: CARACAL_HOME] [default: ~/.caracal]
    #[arg(long, global = true, value_name = "PATH")]
    pub home: Option<PathBuf>,
    /// Configuration file [env: CARACAL_CONFIG] [default: $CARACAL_HOME/caracal.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address every role binds to [env: CARACAL_BIND] [default: 127.0.0.1]
    #[arg(long, global = true, value_name = "IP")]
    pub bind: Option<String>,
    /// Store: sqlite://PATH or postgres://… [env: CARACAL_STORE_URL] [default: sqlite://$CARACAL_HOME/caracal.db]
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Event bus: embedded or redis://… [env: CARACAL_BUS_URL] [default: embedded]
    #[arg(long, global = true, value_name = "URL")]
    pub bus: Option<String>,
    /// Issuer URL of minted mandates [env: CARACAL_ISSUER_URL] [default: http://127.0.0.1:8080]
    #[arg(long, global = true, value_name = "URL")]
    pub issuer_url: Option<String>,
    /// A role's port, e.g. `--port gateway=9081`; repeatable; 0 picks a free port
    /// [env: CARACAL_<ROLE>_PORT]
    #[arg(long = "port", global = true, value_name = "ROLE=PORT")]
    pub ports: Vec<String>,
    /// Log format: text or json [env: CARACAL_LOG_FORMAT] [default: text]
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, RUST_LOG syntax [env: CARACAL_LOG or RUST_LOG] [default: info]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// Seconds shutdown waits for in-flight requests [env: CARACAL_SHUTDOWN_GRACE_SECONDS] [default: 30]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub shutdown_grace_seconds: Option<String>,
    /// Days audit rows are kept; older rows a signed checkpoint covers are dropped, 0 keeps
    /// every row [env: CARACAL_AUDIT_RETENTION_DAYS] [default: 365]
    #[arg(long, global = true, value_name = "DAYS")]
    pub audit_retention_days: Option<String>,
    /// Seconds an audit event read but not stored waits before it is delivered again; after
    /// eight deliveries it is dead-lettered [env: CARACAL_AUDIT_RECLAIM_IDLE_SECONDS] [default: 30]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub audit_reclaim_idle_seconds: Option<String>,
    /// `true` when the console is reached over HTTPS (a TLS-terminating proxy): its cookies
    /// then carry `Secure` [env: CARACAL_CONSOLE_SECURE_COOKIES] [default: false]
    #[arg(long, global = true, value_name = "BOOL")]
    pub console_secure_cookies: Option<String>,
    /// `true` lets control keys run catalog commands at `POST /v1/control/invoke` (the
    /// published `ControlClient`); off, it answers 503 `control_disabled`
    /// [env: CARACAL_CONTROL_ENABLED] [default: false]
    #[arg(long, global = true, value_name = "BOOL")]
    pub control_enabled: Option<String>,
    /// Roles of other processes, `role=host:port` comma-separated: the console's overview,
    /// `caracal status` and `caracal incident validate` probe them too [env: CARACAL_PEERS]
    #[arg(long, global = true, value_name = "ROLE=ADDR,…")]
    pub peers: Option<String>,
    /// Mints a minute per zone, resource and application before the STS answers 429
    /// [env: CARACAL_STS_MINT_RATE_LIMIT_PER_MINUTE] [default: 1000]
    #[arg(long, global = true, value_name = "N")]
    pub mint_rate_limit_per_minute: Option<String>,
    /// Session tree depth, 1-100 [env: CARACAL_COORDINATOR_MAX_DEPTH] [default: 10]
    #[arg(long, global = true, value_name = "N")]
    pub coordinator_max_depth: Option<String>,
    /// Live children per session, 1-10000 [env: CARACAL_COORDINATOR_MAX_CHILDREN] [default: 10]
    #[arg(long, global = true, value_name = "N")]
    pub coordinator_max_children: Option<String>,
    /// Live sessions per zone, 1-10000000 [env: CARACAL_COORDINATOR_SESSIONS_PER_ZONE] [default: 50]
    #[arg(long, global = true, value_name = "N")]
    pub coordinator_sessions_per_zone: Option<String>,
    /// Live sessions per application, 1-10000000 [env: CARACAL_COORDINATOR_SESSIONS_PER_APPLICATION] [default: 200]
    #[arg(long, global = true, value_name = "N")]
    pub coordinator_sessions_per_application: Option<String>,
    /// Days ended sessions, edges and expired authority records are kept, 2-36500
    /// [env: CARACAL_COORDINATOR_RETENTION_DAYS] [default: 30]
    #[arg(long, global = true, value_name = "DAYS")]
    pub coordinator_retention_days: Option<String>,
    /// PostgreSQL connections per process [env: CARACAL_STORE_POOL_SIZE] [default: 16]
    #[arg(long, global = true, value_name = "N")]
    pub store_pool_size: Option<String>,
    /// PostgreSQL schema for Caracal's tables, created if missing [env: CARACAL_STORE_SCHEMA]
    /// [default: the connection's search path]
    #[arg(long, global = true, value_name = "NAME")]
    pub store_schema: Option<String>,
    /// PostgreSQL statement timeout [env: CARACAL_STORE_STATEMENT_TIMEOUT_MS] [default: 5000]
    #[arg(long, global = true, value_name = "MS")]
    pub store_statement_timeout_ms: Option<String>,
    /// Hex key (≥ 32 bytes) signing stream messages; replicas sharing a bus must share it
    /// [env: CARACAL_STREAM_KEY] [default: $CARACAL_HOME/stream-key, created on first start]
    #[arg(long, global = true, value_name = "HEX")]
    pub stream_key: Option<String>,
    /// During a stream key rotation, the previous key: still accepted on messages it signed,
    /// never used to sign [env: CARACAL_STREAM_KEY_PREVIOUS]
    /// [default: $CARACAL_HOME/stream-key.previous, when present and --stream-key is unset]
    #[arg(long, global = true, value_name = "HEX")]
    pub stream_key_previous: Option<String>,
    /// Bearer token every role's GET /metrics then needs (16-256 visible ASCII characters)
    /// [env: CARACAL_METRICS_BEARER] [default: none, /metrics is open]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub metrics_bearer: Option<String>,
    /// The STS's http:// base URL when it runs in another process than the Gateway
    /// [env: CARACAL_GATEWAY_STS_URL] [default: issuer_url]
    #[arg(long, global = true, value_name = "URL")]
    pub gateway_sts_url: Option<String>,
    /// Comma-separated upstream host names the Gateway may dial
    /// [env: CARACAL_GATEWAY_UPSTREAM_HOST_ALLOWLIST] [default: any host]
    #[arg(long, global = true, value_name = "HOSTS")]
    pub gateway_upstream_host_allowlist: Option<String>,
    /// Largest request body the Gateway forwards [env: CARACAL_GATEWAY_MAX_REQUEST_BYTES]
    /// [default: 10485760]
    #[arg(long, global = true, value_name = "BYTES")]
    pub gateway_max_request_bytes: Option<String>,
    /// Seconds the upstream may take to answer [env: CARACAL_GATEWAY_UPSTREAM_TIMEOUT_SECONDS]
    /// [default: 30]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub gateway_upstream_timeout_seconds: Option<String>,
    /// Seconds a response stream may stay silent
    /// [env: CARACAL_GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS] [default: 60]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub gateway_stream_idle_timeout_seconds: Option<String>,
    /// Seconds after which a revocation view not confirmed by the store, or whose stream was
    /// not read, refuses every call
    /// [env: CARACAL_GATEWAY_REVOCATION_FRESHNESS_SECONDS] [default: 70]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub gateway_revocation_freshness_seconds: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start every role in one process (API, Console, Coordinator, STS, Gateway, Audit)
    Up,
    /// Start only the chosen roles, e.g. `caracal serve sts gateway`
    Serve {
        #[arg(required = true, value_name = "ROLE", value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// Probe each role's /health and /ready; exit 1 if any probed role is not ready
    Status(StatusArgs),
    /// Without a subcommand: governed requests over HTTP (a fresh delegated mint plus the
    /// Gateway call) beside nginx proxying and direct calls to the same upstream, closed and
    /// open loop, CPU per 1,000 requests, RSS and the audit check, in one run. Subcommands:
    /// the micro-benchmarks, each printing side-by-side ratios
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        command: Option<BenchCommand>,
        #[command(flatten)]
        governed: GovernedArgs,
    },
    /// Audit ledger: export with proofs, verify an export offline, show checkpoint keys
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The console's local operator accounts
    Console {
        #[command(subcommand)]
        command: ConsoleCommand,
    },
    /// Incident runbook: contain (freeze, fail closed, revoke, last known good), release, show
    /// what is in force, and the ledger's timeline of a zone
    Incident {
        #[command(subcommand)]
        command: IncidentCommand,
    },
    /// Zone signing keys: rotate through the running API role
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Inspect the effective configuration
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Start a program with its workload's credentials: the workload is CARACAL_WORKLOAD_ID with
    /// CARACAL_WORKLOAD_SECRET or CARACAL_WORKLOAD_SECRET_FILE (else, outside
    /// CARACAL_ENV=production, $CARACAL_HOME/runtime/<id>/secret); the program gets each binding's
    /// credential and only an allowlist of this environment (PATH, HOME, locale, terminal), runs
    /// without a shell, receives INT, TERM, HUP and QUIT, and its exit status is this one's
    /// (128 + N for signal N; 1 if anything before the start failed; 127 if it cannot start)
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The STS the workload authenticates at (http://; put TLS in front of it) [env:
    /// CARACAL_STS_URL] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    pub sts_url: Option<String>,
    /// The program and its arguments, after `--`
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Roles to probe [default: those of the running stack, else all]
    #[arg(value_name = "ROLE", value_parser = parse_role)]
    pub roles: Vec<Role>,
    /// Wait until every probed role is ready (up to --timeout) instead of probing once
    #[arg(long)]
    pub ready: bool,
    /// Seconds --ready waits before giving up
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Streams, outbox and authority-record writes: embedded (SQLite + in-process streams)
    /// beside distributed (PostgreSQL + Redis), measured in one run
    Backends(BenchArgs),
    /// Audit ledger: ingestion rate, sweep verification rate and stored bytes per event,
    /// SQLite beside PostgreSQL, measured in one run
    Audit(BenchArgs),
    /// Token exchange: raw ES256 signing beside full bootstrap and delegated mints with the
    /// embedded store in the loop, measured in one run
    Sts(BenchArgs),
    /// Revocation: terminating the root of a 1,111-session tree with its edges, committed and
    /// every message published, embedded beside distributed
    Coordinator(BenchArgs),
    /// Governed requests (a fresh delegated mint plus the Gateway call, proxied to a loopback
    /// upstream) beside direct requests to the same upstream, measured in one run
    Gateway(BenchArgs),
    /// The hot path's operations alone, call by call: policy decision, ES256 sign and verify,
    /// the Gateway's revocation lookup
    Hotpath(BenchArgs),
    /// Revocation propagation: the time from a terminate call to the first refusal by each of
    /// two Gateway replicas' revocation views, on PostgreSQL and Redis, over repeated runs
    /// (`--messages` / 1,000 runs, 5 to 100)
    Revocation(BenchArgs),
}

#[derive(Debug, Args)]
pub struct GovernedArgs {
    /// Requests per closed-loop case
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    pub requests: usize,
    /// Seconds of the open-loop case
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub open_seconds: f64,
    /// Rate of the open-loop case instead of half the governed peak: latency at a load that
    /// leaves the cores idle shows the path's own waits, not the queueing
    #[arg(long, value_name = "REQ/S", value_parser = parse_rate)]
    pub open_rate: Option<f64>,
    /// Connections of the closed-loop cases, comma-separated: each case runs once at each, and
    /// its best rate is its peak (governed calls need more in flight than a plain proxy to
    /// keep the cores busy, and share more of each commit)
    #[arg(
        long,
        default_value = "32,128",
        value_name = "N,…",
        value_delimiter = ',',
        value_parser = parse_connections
    )]
    pub connections: Vec<usize>,
    /// Where the JSON results go
    #[arg(long, default_value = "caracal-bench.json", value_name = "PATH")]
    pub out: std::path::PathBuf,
    /// Store of the measured stack [default: embedded]
    #[arg(long = "stack-store", value_name = "URL")]
    pub store: Option<String>,
    /// Bus of the measured stack [default: embedded]
    #[arg(long = "stack-bus", value_name = "URL")]
    pub bus: Option<String>,
    /// A short run (under two minutes) that proves the harness and the audit check
    #[arg(long)]
    pub quick: bool,
}

fn parse_connections(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(connections) if (1..=1024).contains(&connections) => Ok(connections),
        _ => Err("connections from 1 to 1024".to_owned()),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        _ => Err("a rate of at least 1 request a second".to_owned()),
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// PostgreSQL to measure (a fresh schema is created and dropped)
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        value_name = "URL"
    )]
    pub postgres: String,
    /// Redis to measure (keys are prefixed and deleted afterwards)
    #[arg(long, default_value = "redis://127.0.0.1:6379", value_name = "URL")]
    pub redis: String,
    /// Messages (or records) per case
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    pub messages: usize,
    /// A tiny run that only checks every case works
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write a zone's rows with the latest signed checkpoint and an inclusion proof per row
    Export(ExportArgs),
    /// Check an export with the checkpoint public key alone; exit 1 and say what fails if not
    Verify {
        /// The export bundle (JSON lines)
        bundle: std::path::PathBuf,
        /// Checkpoint public key, lower-case hex (`caracal audit public-key` prints it)
        #[arg(long, value_name = "HEX")]
        public_key: String,
    },
    /// Print the published checkpoint public keys
    PublicKey,
    /// Start a new chain MAC key: new rows use it from the next batch on; older rows keep
    /// verifying with the key they name
    RotateKey,
    /// Acknowledge the open tamper findings (recorded in the ledger) so the Audit role is
    /// ready again; talks to the running API role
    AckTamper {
        /// Why the findings are resolved (kept with them and in the audit event)
        #[arg(long)]
        reason: String,
        /// Admin token file [default: $CARACAL_HOME/admin-token]
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Show the audit dead letters by reason; with --replay, re-send the replayable ones
    /// (transient store failures) to ingestion first. Exit 1 while any dead letter is left.
    /// Talks to the running API role
    Dlq {
        #[arg(long)]
        replay: bool,
        /// Admin token file [default: $CARACAL_HOME/admin-token]
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// Add a local operator account: it signs in to the console with EMAIL and a password
    /// (from --password-file, else one line of standard input; at least 12 characters) and acts
    /// with an admin token of its own (revoking that token disables the account)
    AddUser {
        #[arg(value_name = "EMAIL")]
        email: String,
        /// `read`, or `write` (write and approve)
        #[arg(long, default_value = "read")]
        capability: String,
        #[arg(long, value_name = "PATH")]
        password_file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new signing key for a zone: it signs at once; the previous key keeps verifying
    /// for the overlap, then drops out of the JWKS (audited, needs a write admin token)
    Rotate {
        /// The zone whose key to rotate
        #[arg(long)]
        zone: String,
        /// How long the previous key keeps verifying, in seconds (at most 604800)
        #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
        overlap_seconds: u64,
        /// Why (written to the API role's log with the rotation)
        #[arg(long)]
        reason: Option<String>,
        /// Admin token file [default: $CARACAL_HOME/admin-token]
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IncidentCommand {
    /// Contain an incident through the running API role; each action is audited with the
    /// reason. Several actions may be combined in one call.
    Contain {
        /// Refuse policy activations, provider and resource changes (423 `change_freeze`);
        /// revocation, rollback and rotation stay allowed
        #[arg(long)]
        freeze: bool,
        /// Refuse protected traffic at the STS and the Gateway (503 `contained`): the whole
        /// deployment, or only `--zone`
        #[arg(long)]
        fail_closed: bool,
        /// The zone of `--fail-closed`, `--revoke-*` and `--policy`
        #[arg(long)]
        zone: Option<String>,
        /// Revoke everything issued for this subject in `--zone`
        #[arg(long, value_name = "SUBJECT")]
        revoke_subject: Option<String>,
        /// End this session, its subtree and its delegations in `--zone`
        #[arg(long, value_name = "SESSION")]
        revoke_session: Option<String>,
        /// Revoke everything issued to this application in `--zone`
        #[arg(long, value_name = "APP")]
        revoke_app: Option<String>,
        /// `last-known-good`: re-activate `--policy-set`'s last known good version in `--zone`
        #[arg(long, value_name = "WHICH")]
        policy: Option<String>,
        /// The policy set of `--policy`
        #[arg(long, value_name = "ID")]
        policy_set: Option<String>,
        /// Why (recorded with every action)
        #[arg(long)]
        reason: String,
        /// Admin token file [default: $CARACAL_HOME/admin-token]
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Rotate exposed material; with `--invalidate-sessions` also revoke what was minted
    /// under the old material
    Rotate {
        #[command(subcommand)]
        what: RotateCommand,
    },
    /// Switch containment off (audited with the reason)
    Release {
        #[arg(long)]
        freeze: bool,
        #[arg(long)]
        fail_closed: bool,
        /// The zone of `--fail-closed` (omit for the deployment-wide switch)
        #[arg(long)]
        zone: Option<String>,
        #[arg(long)]
        reason: String,
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Check recovery: every role ready, backlogs drained, revocation and policy fresh, no
    /// containment left, and with `--zone`/`--app`/`--secret-file` canary exchanges (the
    /// right secret allowed, a wrong one denied), `--old-secret-file` refused, `--old-kid`
    /// gone from the JWKS. Each check prints its evidence; exit 0 only if all pass.
    Validate {
        #[arg(long)]
        zone: Option<String>,
        /// An application of `--zone` for the canary exchanges
        #[arg(long, value_name = "ID")]
        app: Option<String>,
        /// A file holding that application's current client secret
        #[arg(long, value_name = "PATH")]
        secret_file: Option<std::path::PathBuf>,
        /// The resource of the canary exchanges
        #[arg(long, value_name = "ID")]
        resource: Option<String>,
        /// A file holding an exposed, rotated-away client secret that must no longer work
        #[arg(long, value_name = "PATH")]
        old_secret_file: Option<std::path::PathBuf>,
        /// A rotated-away signing key id that must no longer be published for `--zone`
        #[arg(long, value_name = "KID")]
        old_kid: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Write one evidence bundle to DIR: every zone's audit export with its verification,
    /// stream state and dead letters, a database snapshot, the effective configuration and its
    /// difference from the defaults, containment, every role's metrics, and a manifest signed
    /// with the deployment key
    Preserve {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
    /// Check an evidence bundle: the manifest's signature and every file's hash
    VerifyBundle {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
        /// The deployment key (hex) to check with [default: the key the manifest names, if
        /// this deployment published it]
        #[arg(long, value_name = "HEX")]
        public_key: Option<String>,
    },
    /// Show the containment switches in force (exit 1 if any is)
    Status {
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// A zone's events from the audit ledger, oldest first
    Timeline {
        #[arg(long)]
        zone: String,
        /// Earliest event time: RFC 3339 or epoch milliseconds
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Latest event time: RFC 3339 or epoch milliseconds
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Only this request id
        #[arg(long, value_name = "ID")]
        request: Option<String>,
        /// Only events naming this session
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// One JSON object per line instead of text
        #[arg(long)]
        json: bool,
        /// At most this many events (the newest ones within the window)
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// A zone's signing key (the old one keeps verifying for the overlap unless
    /// `--invalidate-sessions` ends every session and revokes every authority record)
    SigningKey {
        #[arg(long)]
        zone: String,
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        overlap_seconds: u64,
        #[arg(long)]
        invalidate_sessions: bool,
        #[arg(long)]
        reason: String,
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// An application's client secret (printed once); `--invalidate-sessions` also revokes
    /// everything issued to the application
    AppSecret {
        #[arg(long)]
        zone: String,
        #[arg(long)]
        app: String,
        #[arg(long)]
        invalidate_sessions: bool,
        #[arg(long)]
        reason: String,
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
    /// The admin token in the token file: a new one with the same scope and capabilities
    /// replaces it (the old one stops working at once) and is written back to the file;
    /// `--invalidate-sessions` then ends the sessions of `--zone` (default: every zone)
    AdminToken {
        /// Admin token file [default: $CARACAL_HOME/admin-token]
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
        #[command(flatten)]
        invalidate: Invalidate,
    },
    /// The audit chain MAC key (rows written before keep verifying with theirs);
    /// `--invalidate-sessions` then ends the sessions of `--zone` (default: every zone)
    ChainKey {
        #[command(flatten)]
        invalidate: Invalidate,
    },
    /// The stream key in $CARACAL_HOME/stream-key: a new one replaces it and the old one moves
    /// to stream-key.previous, still accepted on messages it signed until you delete that file;
    /// restart every role to sign with the new key
    StreamKey,
}

/// After rotating material that is not one zone's own: what else to invalidate.
#[derive(Debug, Args)]
pub struct Invalidate {
    /// End every session and revoke every authority record minted before the rotation
    #[arg(long, requires = "reason")]
    pub invalidate_sessions: bool,
    /// The zone whose sessions to end [default: every zone]
    #[arg(long, requires = "invalidate_sessions")]
    pub zone: Option<String>,
    /// Why (recorded with the invalidation)
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The zone to export
    #[arg(long)]
    pub zone: String,
    /// Earliest event time to include: RFC 3339 (`2026-11-28T00:00:00Z`) or epoch milliseconds
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Events before this time only (same forms as --from)
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// First row (chain sequence) to include
    #[arg(long, default_value_t = 1, value_name = "SEQ")]
    pub from_seq: i64,
    /// Last row to include (clipped to the latest checkpoint)
    #[arg(long, default_value_t = i64::MAX, value_name = "SEQ")]
    pub to_seq: i64,
    /// Write here instead of standard output
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every setting, its effective value (secrets redacted) and where it came from
    Show {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse::<Role>().map_err(|error| error.to_string())
}
