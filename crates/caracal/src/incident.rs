//! `caracal incident`: the runbook's containment actions through the running API role (so
//! each is authorised and audited as over the API), and a zone's timeline from the ledger.

use anyhow::{Context as _, bail};
use caracal_services::Settings;
use serde_json::{Value, json};

use caracal_services::recovery::{Canary, Check, OperatorTools, Preserved};

use crate::admin_http;
use crate::cli::IncidentCommand;
use crate::config::Resolved;

/// Runs an incident command; `Ok(false)` means "ran, but the answer is no" (exit 1).
pub async fn run(resolved: &Resolved, command: &IncidentCommand) -> anyhow::Result<bool> {
    let settings = &resolved.settings;
    match command {
        IncidentCommand::Rotate { what } => rotate(settings, what).await,
        IncidentCommand::Preserve { out } => {
            let preserved = crate::preserve::preserve(resolved, out).await?;
            println!(
                "evidence bundle written to {} ({} files, signed by {}){}",
                out.display(),
                preserved.files,
                preserved.key_id,
                if preserved.complete() {
                    ""
                } else {
                    "; some parts failed (the bundle's *error* files hold the detail):"
                }
            );
            for part in &preserved.failed {
                println!("  FAIL {part}");
            }
            for zone in &preserved.unverified {
                println!("  UNVERIFIED audit export of {zone} (kept in the bundle)");
            }
            Ok(preserved.complete())
        }
        IncidentCommand::VerifyBundle { dir, public_key } => {
            crate::preserve::verify_bundle(resolved, dir, public_key.as_deref()).await
        }
        IncidentCommand::Validate {
            zone,
            app,
            secret_file,
            resource,
            old_secret_file,
            old_kid,
            json,
            token_file,
        } => {
            let canary = Canary {
                zone: zone.clone(),
                app: app.clone(),
                secret: read_secret(secret_file.as_deref())?,
                resource: resource.clone(),
                old_secret: read_secret(old_secret_file.as_deref())?,
                old_kid: old_kid.clone(),
            };
            validate(resolved, &canary, *json, token_file.as_deref()).await
        }
        IncidentCommand::Contain {
            freeze,
            fail_closed,
            zone,
            revoke_subject,
            revoke_session,
            revoke_app,
            policy,
            policy_set,
            reason,
            token_file,
        } => {
            let token = token_file.as_deref();
            let needs_zone = revoke_subject.is_some()
                || revoke_session.is_some()
                || revoke_app.is_some()
                || policy.is_some();
            let zone_of = || {
                zone.as_deref().context(
                    "--zone is required with --revoke-subject, --revoke-session, --revoke-app and --policy",
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
            if let Some(app) = revoke_app {
                let path = format!("/v1/zones/{}/applications/{app}/revoke", zone_of()?);
                ok &= report(
                    "application revocation",
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
        request_id: request.clone(),
        session_id: session.clone(),
        ..caracal_store::AuditFilter::default()
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

fn read_secret(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .with_context(|| format!("secret file {}", path.display()))
    })
    .transpose()
}

async fn validate(
    resolved: &Resolved,
    canary: &Canary,
    as_json: bool,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let token = admin_http::read_token(&resolved.settings, token_file)?;
    let checks = checks(resolved, canary, &token).await;
    let ok = checks.iter().all(|check| check.ok);
    if as_json {
        println!("{}", json!({ "ok": ok, "checks": checks }));
    } else {
        for check in &checks {
            println!(
                "{} {:<40} {}",
                if check.ok { "PASS" } else { "FAIL" },
                check.name,
                check.evidence
            );
        }
        println!(
            "{}",
            if ok {
                "recovered: every check passes"
            } else {
                "not recovered"
            }
        );
    }
    Ok(ok)
}

/// The runbook's recovery checks, reading through the API with `token`: every role ready, the
/// freshness and backlog bounds, no containment left; with a canary zone, exchanges and a
/// Gateway call as an agent.
async fn checks(resolved: &Resolved, canary: &Canary, token: &str) -> Vec<Check> {
    let settings = &resolved.settings;
    let client = crate::status::probe_client(settings);
    let mut checks = Vec::new();
    let targets = crate::status::targets(resolved, &[]);
    let addresses: Vec<_> = targets.iter().map(|(_, address)| *address).collect();
    let (readiness, metrics) = caracal_services::peer_probe::survey(&client, &addresses).await;
    for ((role, address), ready) in targets.iter().zip(readiness) {
        checks.push(Check {
            name: format!("{role} ready"),
            ok: ready.ready,
            evidence: ready
                .reason
                .unwrap_or_else(|| format!("ready at {address}")),
        });
    }
    checks.extend(caracal_services::recovery::backlog_checks(&metrics));
    match admin_http::get_as(settings, token, "/v1/incident/containment").await {
        Ok((status, answer)) if status.is_success() => {
            let switches = answer
                .get("switches")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            checks.push(Check {
                name: "no containment left in force".to_owned(),
                ok: switches == 0,
                evidence: format!("{switches} switch(es) in force"),
            });
        }
        Ok((status, answer)) => checks.push(Check {
            name: "no containment left in force".to_owned(),
            ok: false,
            evidence: format!(
                "refused ({}): {}",
                status.as_u16(),
                admin_http::error_code(&answer)
            ),
        }),
        Err(error) => checks.push(Check {
            name: "no containment left in force".to_owned(),
            ok: false,
            evidence: format!("{error:#}"),
        }),
    }
    let sts = targets
        .iter()
        .find(|(role, _)| *role == caracal_core::Role::Sts)
        .map(|(_, address)| *address);
    if let (Some(zone), Some(sts)) = (canary.zone.as_deref(), sts) {
        canary_checks(&mut checks, canary, zone, sts).await;
    }
    let address_of = |wanted: caracal_core::Role| {
        targets
            .iter()
            .find(|(role, _)| *role == wanted)
            .map(|(_, address)| *address)
    };
    if let (Some(zone), Some(sts), Some(coordinator), Some(gateway)) = (
        canary.zone.as_deref(),
        sts,
        address_of(caracal_core::Role::Coordinator),
        address_of(caracal_core::Role::Gateway),
    ) {
        let roles = Roles {
            sts,
            coordinator,
            gateway,
        };
        gateway_canaries(&mut checks, canary, zone, &roles, settings, token).await;
    }
    checks
}

/// Bootstrap exchanges at the STS: the current secret allowed, a wrong one and an exposed old
/// one denied; an old signing key no longer published.
async fn canary_checks(
    checks: &mut Vec<Check>,
    canary: &Canary,
    zone: &str,
    sts: std::net::SocketAddr,
) {
    let exchange = |secret: String| {
        let form = serde_urlencoded::to_string([
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("zone_id", zone),
            ("application_id", canary.app.as_deref().unwrap_or_default()),
            ("client_secret", secret.as_str()),
            ("scope", "agent:lifecycle"),
            ("resource", canary.resource.as_deref().unwrap_or_default()),
        ])
        .unwrap_or_default();
        async move { post_form(sts, "/oauth/2/token", form).await }
    };
    let describe = |result: &anyhow::Result<(u16, Value)>| match result {
        Ok((status, body)) => format!(
            "{status} {}",
            body.get("error").and_then(Value::as_str).unwrap_or("ok")
        ),
        Err(error) => format!("{error:#}"),
    };
    if let (Some(_), Some(secret), Some(_)) = (&canary.app, &canary.secret, &canary.resource) {
        let allowed = exchange(secret.clone()).await;
        checks.push(Check {
            name: "canary exchange allowed".to_owned(),
            ok: matches!(allowed, Ok((200, _))),
            evidence: describe(&allowed),
        });
        let denied = exchange(format!("{secret}-wrong")).await;
        checks.push(Check {
            name: "canary exchange with a wrong secret denied".to_owned(),
            ok: matches!(denied, Ok((401, _))),
            evidence: describe(&denied),
        });
    }
    if let (Some(_), Some(old), Some(_)) = (&canary.app, &canary.old_secret, &canary.resource) {
        let refused = exchange(old.clone()).await;
        checks.push(Check {
            name: "exposed secret no longer authenticates".to_owned(),
            ok: matches!(refused, Ok((401, _))),
            evidence: describe(&refused),
        });
    }
    if let Some(kid) = &canary.old_kid {
        let jwks = get_json(sts, &format!("/.well-known/jwks.json?zone_id={zone}")).await;
        let published = jwks.as_ref().ok().is_some_and(|keys| {
            keys.get("keys")
                .and_then(Value::as_array)
                .is_some_and(|keys| {
                    keys.iter()
                        .any(|key| key.get("kid").and_then(Value::as_str) == Some(kid))
                })
        });
        checks.push(Check {
            name: "rotated signing key no longer published".to_owned(),
            ok: jwks.is_ok() && !published,
            evidence: match &jwks {
                Ok(_) if published => format!("`{kid}` is still in the JWKS"),
                Ok(_) => format!("`{kid}` is not in the JWKS"),
                Err(error) => format!("{error:#}"),
            },
        });
    }
}

async fn post_form(
    address: std::net::SocketAddr,
    path: &str,
    form: String,
) -> anyhow::Result<(u16, Value)> {
    let (status, body) = admin_http::send(
        address,
        hyper::Method::POST,
        path,
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    )
    .await?;
    Ok((status.as_u16(), body))
}

/// The roles a Gateway canary goes through.
struct Roles {
    sts: std::net::SocketAddr,
    coordinator: std::net::SocketAddr,
    gateway: std::net::SocketAddr,
}

/// A Gateway call's answer: its status, whether the Gateway itself refused it (its
/// `X-Caracal-Refused-By`, which no upstream can send through it), and the JSON body.
type Called = (u16, bool, Value);

fn refused_by_gateway(answer: &Called) -> bool {
    answer.1
}

/// As an agent would, through the Coordinator, the STS and the Gateway: a delegated mandate
/// is let through; once its session is terminated, another mandate of that session is not.
async fn gateway_canaries(
    checks: &mut Vec<Check>,
    canary: &Canary,
    zone: &str,
    roles: &Roles,
    settings: &Settings,
    token: &str,
) {
    const ALLOWED: &str = "canary call authorised by the Gateway";
    const REVOKED: &str = "terminated session refused at the Gateway";
    let (Some(app), Some(secret), Some(resource)) = (
        canary.app.as_deref(),
        canary.secret.as_deref(),
        canary.resource.as_deref(),
    ) else {
        return;
    };
    let describe = |answer: &anyhow::Result<Called>| match answer {
        Ok((status, _, body)) => format!(
            "{status} {}",
            body.get("error")
                .and_then(Value::as_str)
                .unwrap_or("from the upstream")
        ),
        Err(error) => format!("{error:#}"),
    };
    let agent = crate::agent::Agent {
        sts: roles.sts,
        coordinator: roles.coordinator,
        zone,
        app,
        secret,
        resource,
    };
    let (mandates, path, delegation) = match delegated_mandates(&agent, settings, token).await {
        Ok(delegated) => delegated,
        Err(error) => {
            checks.push(Check {
                name: ALLOWED.to_owned(),
                ok: false,
                evidence: format!("{error:#}"),
            });
            return;
        }
    };
    let call = |mandate: &str| {
        let bearer = format!("Bearer {mandate}");
        let path = path.clone();
        async move {
            let headers = [
                ("authorization", bearer.as_str()),
                ("x-caracal-resource", resource),
            ];
            let (status, answer_headers, body) = admin_http::send_full(
                roles.gateway,
                hyper::Method::GET,
                &path,
                &headers,
                String::new(),
            )
            .await?;
            let refused = answer_headers.contains_key(caracal_services::gateway::REFUSED_BY);
            Ok((status.as_u16(), refused, body))
        }
    };
    let mut mandates = mandates.iter();
    let first = match mandates.next() {
        Some(mandate) => call(mandate).await,
        None => Err(anyhow::anyhow!("no mandate minted")),
    };
    checks.push(Check {
        name: ALLOWED.to_owned(),
        ok: first
            .as_ref()
            .is_ok_and(|answer| !refused_by_gateway(answer)),
        evidence: describe(&first),
    });
    if let Err(error) = agent
        .terminate(&delegation.lifecycle, &delegation.target)
        .await
    {
        checks.push(Check {
            name: REVOKED.to_owned(),
            ok: false,
            evidence: format!("{error:#}"),
        });
        return;
    }
    // The revocation reaches the Gateway within moments: one fresh mandate per try.
    let started = std::time::Instant::now();
    let mut last = Err(anyhow::anyhow!("no mandate left to try"));
    for mandate in mandates {
        last = call(mandate).await;
        if last.as_ref().is_ok_and(refused_by_gateway) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    checks.push(Check {
        name: REVOKED.to_owned(),
        ok: last.as_ref().is_ok_and(refused_by_gateway),
        evidence: format!(
            "{} {} ms after the termination",
            describe(&last),
            started.elapsed().as_millis()
        ),
    });
    // The canary's other session is ended too: validate leaves no session behind.
    if let Err(error) = agent
        .terminate(&delegation.lifecycle, &delegation.source)
        .await
    {
        tracing::warn!(error = %format!("{error:#}"), "the canary's source session was not ended");
    }
}

/// Two sessions of `app` (labelled with its id) and a delegation between them for the
/// resource's first scope, then
/// six one-shot `use=gateway` mandates for the target session; returns them with the path to
/// call, the target session and the lifecycle mandate that can terminate it.
async fn delegated_mandates(
    agent: &crate::agent::Agent<'_>,
    settings: &Settings,
    token: &str,
) -> anyhow::Result<(Vec<String>, String, crate::agent::Delegation)> {
    let (_, resources) = admin_http::get_as(
        settings,
        token,
        &format!("/v1/zones/{}/resources?limit=500", agent.zone),
    )
    .await?;
    let item = resources
        .get("items")
        .and_then(Value::as_array)
        .and_then(|items| {
            items
                .iter()
                .find(|item| item.get("identifier").and_then(Value::as_str) == Some(agent.resource))
        })
        .with_context(|| format!("no resource `{}` in zone `{}`", agent.resource, agent.zone))?;
    let (path, scope) = canary_operation(item).with_context(|| {
        format!(
            "`{}` declares no GET operation for the canary",
            agent.resource
        )
    })?;
    let delegation = agent.delegate(&scope, "incident validate canary").await?;
    let mut mandates = Vec::new();
    for _ in 0..6 {
        mandates.push(agent.mint(agent.delegated_form(&delegation)).await?);
    }
    Ok((mandates, path, delegation))
}

/// What the canary calls: the resource's first declared `GET` operation, or `GET /` with its
/// first scope when operations are not enforced. Never a method that could change anything.
fn canary_operation(resource: &Value) -> Option<(String, String)> {
    let get = resource
        .get("operations")
        .and_then(Value::as_array)
        .and_then(|operations| {
            operations.iter().find(|operation| {
                operation
                    .get("method")
                    .and_then(Value::as_str)
                    .is_some_and(|method| method.eq_ignore_ascii_case("GET"))
            })
        })
        .and_then(|operation| {
            Some((
                operation.get("path")?.as_str()?.to_owned(),
                operation.get("scope")?.as_str()?.to_owned(),
            ))
        });
    let enforced = resource
        .get("operation_enforcement")
        .and_then(Value::as_str)
        == Some("enforced");
    get.or_else(|| {
        (!enforced)
            .then(|| {
                resource
                    .pointer("/scopes/0")?
                    .as_str()
                    .map(|scope| ("/".to_owned(), scope.to_owned()))
            })
            .flatten()
    })
}

async fn get_json(address: std::net::SocketAddr, path: &str) -> anyhow::Result<Value> {
    let client = caracal_services::peer_probe::client();
    match caracal_services::peer_probe::get(&client, address, path).await {
        Ok((200, body)) => Ok(serde_json::from_slice(&body)?),
        Ok((status, _)) => bail!("{path} answered {status}"),
        Err(reason) => bail!("{path}: {reason}"),
    }
}

async fn rotate(settings: &Settings, what: &crate::cli::RotateCommand) -> anyhow::Result<bool> {
    use crate::cli::RotateCommand;
    match what {
        RotateCommand::SigningKey {
            zone,
            overlap_seconds,
            invalidate_sessions,
            reason,
            token_file,
        } => {
            let token = token_file.as_deref();
            let path = format!("/v1/zones/{zone}/signing-keys/rotate");
            let body = json!({ "overlap_seconds": overlap_seconds, "reason": reason });
            let mut ok = report(
                "signing key rotation",
                admin_http::post(settings, token, &path, body).await?,
            );
            if ok && *invalidate_sessions {
                let path = format!("/v1/zones/{zone}/invalidate-sessions");
                ok &= report(
                    "sessions invalidated",
                    admin_http::post(settings, token, &path, json!({ "reason": reason })).await?,
                );
            }
            Ok(ok)
        }
        RotateCommand::AppSecret {
            zone,
            app,
            invalidate_sessions,
            reason,
            token_file,
        } => {
            let token = token_file.as_deref();
            let path = format!("/v1/zones/{zone}/applications/{app}/rotate-secret");
            let (status, answer) = admin_http::post(settings, token, &path, json!({})).await?;
            if !status.is_success() {
                return Ok(report("secret rotation", (status, answer)));
            }
            println!("secret rotation: done; the new client secret (shown once):");
            println!(
                "{}",
                answer
                    .get("client_secret")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            );
            if *invalidate_sessions {
                let path = format!("/v1/zones/{zone}/applications/{app}/revoke");
                return Ok(report(
                    "application revocation",
                    admin_http::post(settings, token, &path, json!({ "reason": reason })).await?,
                ));
            }
            Ok(true)
        }
        RotateCommand::AdminToken {
            token_file,
            invalidate,
        } => {
            let path = token_file
                .clone()
                .unwrap_or_else(|| settings.home.join(caracal_store::ADMIN_TOKEN_FILE));
            let (status, answer) =
                admin_http::post(settings, Some(&path), "/v1/admin-tokens/rotate", json!({}))
                    .await?;
            if !status.is_success() {
                return Ok(report("admin token rotation", (status, answer)));
            }
            let token = answer
                .get("token")
                .and_then(Value::as_str)
                .context("the API answered no token")?;
            replace_private_file(&path, token)?;
            println!(
                "admin token rotation: done; the new token is in {} (the old one no longer works)",
                path.display()
            );
            invalidate_after(settings, Some(&path), invalidate).await
        }
        RotateCommand::ChainKey { invalidate } => {
            if !crate::audit::run(settings, &crate::cli::AuditCommand::RotateKey).await? {
                return Ok(false);
            }
            invalidate_after(settings, None, invalidate).await
        }
        RotateCommand::StreamKey => rotate_stream_key(settings),
    }
}

/// A new `$CARACAL_HOME/stream-key`, the old one kept as `stream-key.previous` (accepted, never
/// used to sign, by every role started while it is there).
fn rotate_stream_key(settings: &Settings) -> anyhow::Result<bool> {
    if settings.stream_key.is_some() {
        bail!(
            "the stream key is set by configuration (--stream-key, CARACAL_STREAM_KEY or the \
             config file's stream_key): put a new key there and the old one in \
             stream_key_previous, restart every replica, then remove stream_key_previous"
        );
    }
    let path = settings.home.join(caracal_services::STREAM_KEY_FILE);
    let old = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no stream key at {} (the first start creates it)",
            path.display()
        )
    })?;
    caracal_services::decode_key_hex(old.trim())
        .with_context(|| format!("{} does not hold a stream key", path.display()))?;
    let new: [u8; 32] = caracal_crypto::random_bytes()?;
    let previous = settings
        .home
        .join(caracal_services::PREVIOUS_STREAM_KEY_FILE);
    // The old key is kept before it is replaced: a failure between the two loses nothing.
    replace_private_file(&previous, old.trim())?;
    replace_private_file(&path, &caracal_crypto::hex(&new))?;
    println!(
        "stream key rotation: done; restart every role to sign with the new key. Messages the old \
         one signed are still accepted while {} exists: delete it once the streams have drained \
         (`caracal status`). Give the new key to every other consumer of the streams (the Redis \
         revocation consumer's stream_hmac_key).",
        previous.display()
    );
    Ok(true)
}

/// Writes an owner-only file beside `path` and renames it over: the file never holds half a
/// secret.
fn replace_private_file(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let staged = path.with_extension("rotating");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)
        .with_context(|| format!("writing {}", staged.display()))?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&staged, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// `--invalidate-sessions` of a rotation: every session of the zone (or of every zone) ended
/// and every authority record revoked, so nothing minted before the rotation stays usable.
async fn invalidate_after(
    settings: &Settings,
    token: Option<&std::path::Path>,
    invalidate: &crate::cli::Invalidate,
) -> anyhow::Result<bool> {
    if !invalidate.invalidate_sessions {
        return Ok(true);
    }
    let reason = invalidate.reason.as_deref().unwrap_or_default();
    let zones = match &invalidate.zone {
        Some(zone) => vec![zone.clone()],
        None => {
            let mut zones = Vec::new();
            let mut cursor = String::new();
            loop {
                let path = format!("/v1/zones?limit=500{cursor}");
                let (status, answer) = admin_http::get(settings, token, &path).await?;
                if !status.is_success() {
                    return Ok(report("listing the zones", (status, answer)));
                }
                zones.extend(
                    answer
                        .get("items")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|zone| zone.get("id").and_then(Value::as_str))
                        .map(str::to_owned),
                );
                match answer.get("next_cursor").and_then(Value::as_str) {
                    Some(next) => cursor = format!("&cursor={next}"),
                    None => break zones,
                }
            }
        }
    };
    let mut ok = true;
    for zone in zones {
        let path = format!("/v1/zones/{zone}/invalidate-sessions");
        ok &= report(
            &format!("sessions of zone {zone} invalidated"),
            admin_http::post(settings, token, &path, json!({ "reason": reason })).await?,
        );
    }
    Ok(ok)
}

/// The binary's validate and preserve, offered to the running roles (the API's
/// `/v1/incident/validate` and `/v1/incident/bundles`, and through them the console).
pub struct Tools {
    resolved: Resolved,
}

impl Tools {
    pub fn new(resolved: Resolved) -> Tools {
        Tools { resolved }
    }
}

#[async_trait::async_trait]
impl OperatorTools for Tools {
    async fn validate(&self, admin_token: &str, canary: &Canary) -> Vec<Check> {
        checks(&self.resolved, canary, admin_token).await
    }

    async fn preserve(&self, out: &std::path::Path) -> Result<Preserved, String> {
        crate::preserve::preserve(&self.resolved, out)
            .await
            .map_err(|error| format!("{error:#}"))
    }
}
