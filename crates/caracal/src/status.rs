//! `caracal status`: probe each role's `/health` and `/ready` and report in a table or JSON.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use caracal_core::Role;
use caracal_services::peer_probe::{self, Client as HttpClient};
use caracal_services::{RUN_FILE, RunFile};
use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::Resolved;

const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Serialize)]
pub struct RoleStatus {
    pub role: String,
    pub address: SocketAddr,
    pub live: bool,
    pub ready: bool,
    pub reason: Option<String>,
}

/// The probe client of this configuration: it presents `metrics_bearer` to `/metrics`.
pub fn probe_client(settings: &caracal_services::Settings) -> HttpClient {
    peer_probe::client().with_metrics_bearer(settings.metrics_bearer_text())
}

/// Probes the roles and prints the report; returns whether every probed role is ready.
pub async fn run(resolved: &Resolved, args: &StatusArgs) -> bool {
    let client = peer_probe::client();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let statuses = loop {
        let statuses = probe_all(&client, &targets(resolved, &args.roles)).await;
        let all_ready = statuses.iter().all(|status| status.ready);
        if all_ready || !args.ready || Instant::now() >= deadline {
            break statuses;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    print(&statuses, args.json);
    statuses.iter().all(|status| status.ready)
}

/// Where the API role listens: the running stack's run file, else the configured address.
pub fn api_address(resolved_settings: &caracal_services::Settings) -> SocketAddr {
    let running = std::fs::read_to_string(resolved_settings.home.join(RUN_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<RunFile>(&text).ok())
        .and_then(|run_file| run_file.roles.into_iter().find(|entry| entry.role == "api"))
        .map(|entry| entry.address);
    running.unwrap_or_else(|| {
        SocketAddr::new(
            reachable(resolved_settings.bind),
            resolved_settings.port(Role::Api),
        )
    })
}

/// The address to reach a role bound to `bind`: an unspecified bind is reached on loopback.
fn reachable(bind: IpAddr) -> IpAddr {
    match bind {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// The roles to probe: those the running process wrote to its run file (their ports may have
/// been picked by the OS), else every role at its configured address.
pub(crate) fn targets(resolved: &Resolved, wanted: &[Role]) -> Vec<(Role, SocketAddr)> {
    let settings = &resolved.settings;
    let running: Vec<(Role, SocketAddr)> = std::fs::read_to_string(settings.home.join(RUN_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<RunFile>(&text).ok())
        .map(|run_file| {
            run_file
                .roles
                .into_iter()
                .filter_map(|entry| {
                    entry
                        .role
                        .parse::<Role>()
                        .ok()
                        .map(|role| (role, entry.address))
                })
                .collect()
        })
        .unwrap_or_default();
    let configured = |role: Role| {
        (
            role,
            SocketAddr::new(reachable(settings.bind), settings.port(role)),
        )
    };
    let peers = settings.peers.iter().copied();
    match (wanted.is_empty(), running.is_empty()) {
        (true, false) => running.into_iter().chain(peers).collect(),
        (true, true) if !settings.peers.is_empty() => peers.collect(),
        (true, true) => Role::ALL.into_iter().map(configured).collect(),
        (false, _) => wanted
            .iter()
            .map(|role| {
                running
                    .iter()
                    .chain(&settings.peers)
                    .find(|(running_role, _)| running_role == role)
                    .copied()
                    .unwrap_or_else(|| configured(*role))
            })
            .collect(),
    }
}

async fn probe_all(client: &HttpClient, targets: &[(Role, SocketAddr)]) -> Vec<RoleStatus> {
    let probes = targets
        .iter()
        .map(|(role, address)| probe(client, *role, *address));
    let mut statuses = Vec::with_capacity(targets.len());
    for probe in probes {
        statuses.push(probe.await);
    }
    statuses
}

pub(crate) async fn probe(client: &HttpClient, role: Role, address: SocketAddr) -> RoleStatus {
    let live = matches!(
        peer_probe::get(client, address, "/health").await,
        Ok((200, _))
    );
    let readiness = peer_probe::ready(client, address).await;
    RoleStatus {
        role: role.name().to_owned(),
        address,
        live,
        ready: readiness.ready,
        reason: readiness.reason,
    }
}

fn print(statuses: &[RoleStatus], json: bool) {
    if json {
        match serde_json::to_string_pretty(statuses) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("error: {error}"),
        }
        return;
    }
    let yes_no = |flag: bool| if flag { "yes" } else { "no" };
    println!(
        "{:<12} {:<22} {:<5} {:<6} REASON",
        "ROLE", "ADDRESS", "LIVE", "READY"
    );
    for status in statuses {
        println!(
            "{:<12} {:<22} {:<5} {:<6} {}",
            status.role,
            status.address.to_string(),
            yes_no(status.live),
            yes_no(status.ready),
            status.reason.as_deref().unwrap_or("-")
        );
    }
}
