//! `caracal incident`: the runbook's containment actions through the running API role (so
//! each is authorised and audited as over the API), and a zone's timeline from the ledger.

use anyhow::{Context as _, bail};
use caracal_services::Settings;
use serde_json::{Value, json};

use crate::admin_http;
use crate::cli::IncidentCommand;

/// Runs an incident command; `Ok(false)` means "ran, but the answer is no" (exit 1).
pub async fn run(settings: &Settings, command: &IncidentCommand) -> anyhow::Result<bool> {
    match command {
        IncidentCommand::Contain {
            freeze,
            fail_closed,
            zone,
            revoke_subject,
            revoke_session,
            policy,
            policy_set,
            reason,
            token_file,
        } => {
            let token = token_file.as_deref();
            let needs_zone =
                revoke_subject.is_some() || revoke_session.is_some() || policy.is_some();
            let zone_of = || {
                zone.as_deref().context(
                    "--zone is required with --revoke-subject, --revoke-session and --policy",
                )
            };
            if needs_zone {
                zone_of()?;
            }
            if !(*freeze || *fail_closed || needs_zone) {
                bail!(
                    "name an action: --freeze, --fail-closed, --revoke-subject, --revoke-session or --policy"
                );
            }
            let mut ok = true;
            if *freeze || *fail_closed {
                let body = json!({
                    "freeze": freeze,
                    "fail_closed": fail_closed,
                    "zone_id": if *fail_closed { zone.clone() } else { None },
                    "reason": reason,
                });
                ok &= report(
                    "containment",
                    admin_http::post(settings, token, "/v1/incident/contain", body).await?,
                );
            }
            if let Some(subject) = revoke_subject {
                let path = format!("/v1/zones/{}/subjects/{subject}/revoke", zone_of()?);
                ok &= report(
                    "subject revocation",
                    admin_http::post(settings, token, &path, json!({ "reason": reason })).await?,
                );
            }
            if let Some(session) = revoke_session {
                let path = format!("/v1/zones/{}/sessions/{session}/terminate", zone_of()?);
                ok &= report(
                    "session termination",
                    admin_http::post(settings, token, &path, json!({ "reason": reason })).await?,
                );
            }
            if let Some(which) = policy {
                if which != "last-known-good" {
                    bail!("--policy accepts only `last-known-good`");
                }
                let set = policy_set
                    .as_deref()
                    .context("--policy last-known-good needs --policy-set")?;
                let path = format!("/v1/zones/{}/policy-sets/{set}/rollback", zone_of()?);
                ok &= report(
                    "policy rollback to last known good",
                    admin_http::post(settings, token, &path, json!({})).await?,
                );
            }
            Ok(ok)
        }
        IncidentCommand::Release {
            freeze,
            fail_closed,
            zone,
            reason,
            token_file,
        } => {
            if !(*freeze || *fail_closed) {
                bail!("name a switch: --freeze or --fail-closed");
            }
            let body = json!({
                "freeze": freeze,
                "fail_closed": fail_closed,
                "zone_id": if *fail_closed { zone.clone() } else { None },
                "reason": reason,
            });
            Ok(report(
                "release",
                admin_http::post(
                    settings,
                    token_file.as_deref(),
                    "/v1/incident/release",
                    body,
                )
                .await?,
            ))
        }
        IncidentCommand::Status { token_file } => {
            let (status, answer) =
                admin_http::get(settings, token_file.as_deref(), "/v1/incident/containment")
                    .await?;
            if !status.is_success() {
                println!(
                    "refused ({}): {}",
                    status.as_u16(),
                    admin_http::error_code(&answer)
                );
                return Ok(false);
            }
            let switches = answer
                .get("switches")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if switches.is_empty() {
                println!("no containment in force");
                return Ok(true);
            }
            for switch in &switches {
                let field = |name: &str| switch.get(name).and_then(Value::as_str);
                println!(
                    "{} {} since {} by {}: {}",
                    field("kind").unwrap_or("?"),
                    field("zone_id").unwrap_or("(deployment)"),
                    field("since").unwrap_or("?"),
                    field("actor").unwrap_or("?"),
                    field("reason").unwrap_or(""),
                );
            }
            Ok(false)
        }
        IncidentCommand::Timeline {
            zone,
            from,
            to,
            request,
            session,
            json,
            limit,
        } => timeline(settings, zone, from, to, request, session, *json, *limit).await,
    }
}

/// Prints one action's outcome; `true` if it succeeded.
fn report(action: &str, (status, answer): (hyper::StatusCode, Value)) -> bool {
    if status.is_success() {
        println!("{action}: done");
        true
    } else {
        println!(
            "{action}: refused ({}): {} {}",
            status.as_u16(),
            admin_http::error_code(&answer),
            answer
                .get("error_description")
                .and_then(Value::as_str)
                .unwrap_or_default()
        );
        false
    }
}

#[allow(clippy::too_many_arguments)]
async fn timeline(
    settings: &Settings,
    zone: &str,
    from: &Option<String>,
    to: &Option<String>,
    request: &Option<String>,
    session: &Option<String>,
    as_json: bool,
    limit: usize,
) -> anyhow::Result<bool> {
    let store = crate::audit::open_store(settings).await?;
    let filter = caracal_store::AuditFilter {
        since_ms: from.as_deref().map(crate::audit::parse_time).transpose()?,
        until_ms: to.as_deref().map(crate::audit::parse_time).transpose()?,
        event_type: None,
        decision: None,
        request_id: request.clone(),
        session_id: session.clone(),
        edge_id: None,
    };
    // Newest first from the store, in pages; shown oldest first.
    let mut rows = Vec::new();
    let mut before = None;
    while rows.len() < limit {
        let page = store
            .search_audit(
                zone,
                &filter,
                before,
                500.min(i64::try_from(limit - rows.len()).unwrap_or(500)),
            )
            .await?;
        let Some(last) = page.last() else { break };
        before = Some(last.chain_seq);
        let full = page.len() == 500;
        rows.extend(page);
        if !full {
            break;
        }
    }
    rows.sort_by_key(|row| (row.occurred_at_ms, row.chain_seq));
    for row in &rows {
        if as_json {
            println!(
                "{}",
                json!({
                    "chain_seq": row.chain_seq,
                    "id": row.id,
                    "occurred_at_ms": row.occurred_at_ms,
                    "event_type": row.event_type,
                    "request_id": row.request_id,
                    "decision": row.decision,
                    "evaluation_status": row.evaluation_status,
                    "metadata": serde_json::from_str::<Value>(&row.metadata).unwrap_or(Value::Null),
                })
            );
        } else {
            println!(
                "{} #{} {} {} {} request={}",
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_millis(
                            u64::try_from(row.occurred_at_ms).unwrap_or(0)
                        )
                ),
                row.chain_seq,
                row.event_type,
                row.decision,
                row.evaluation_status,
                row.request_id
            );
        }
    }
    if !as_json {
        eprintln!("{} event(s) in zone `{zone}`", rows.len());
    }
    Ok(true)
}
