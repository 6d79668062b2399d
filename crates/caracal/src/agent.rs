//! Acting as an agent would, over HTTP: a lifecycle mandate from the STS, two governed
//! sessions at the Coordinator and a delegation between them, then one-shot `use=gateway`
//! mandates for the delegation's target. `incident validate`'s canaries and `caracal bench`
//! both go this way.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::admin_http;

/// An application of a zone and where its STS and Coordinator are.
pub(crate) struct Agent<'a> {
    pub sts: SocketAddr,
    pub coordinator: SocketAddr,
    pub zone: &'a str,
    pub app: &'a str,
    pub secret: &'a str,
    pub resource: &'a str,
}

/// A delegation from one session of the agent to another, for one scope of the resource.
pub(crate) struct Delegation {
    /// The lifecycle mandate that started both sessions (and can terminate them).
    pub lifecycle: String,
    pub source: String,
    pub target: String,
    pub edge: String,
    pub scope: String,
}

impl Agent<'_> {
    /// The token-exchange form of the application with `extra` fields.
    pub fn form(&self, extra: &[(&str, &str)]) -> String {
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("zone_id", self.zone),
            ("application_id", self.app),
            ("client_secret", self.secret),
            ("resource", self.resource),
        ];
        form.extend_from_slice(extra);
        serde_urlencoded::to_string(&form).unwrap_or_default()
    }

    /// The form of a `use=gateway` mint along `delegation`.
    pub fn delegated_form(&self, delegation: &Delegation) -> String {
        self.form(&[
            ("scope", &delegation.scope),
            ("agent_session_id", &delegation.target),
            ("delegation_edge_id", &delegation.edge),
        ])
    }

    /// A mandate minted with `form`, or the STS's refusal.
    pub async fn mint(&self, form: String) -> anyhow::Result<String> {
        let (status, body) = admin_http::send(
            self.sts,
            hyper::Method::POST,
            "/oauth/2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        )
        .await?;
        if status != hyper::StatusCode::OK {
            bail!(
                "the STS refused the mint: {} {} ({})",
                status.as_u16(),
                admin_http::error_code(&body),
                body.get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
        }
        body.get("access_token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .context("no access_token")
    }

    /// Two sessions labelled with the application's id (the role the grants of
    /// `ensure_grants` name) and a delegation from the first to the second for `scope`.
    pub async fn delegate(&self, scope: &str, purpose: &str) -> anyhow::Result<Delegation> {
        let lifecycle = self
            .mint(self.form(&[("scope", "agent:lifecycle")]))
            .await?;
        let auth = format!("Bearer {lifecycle}");
        let coordinator = |path: String, body: Value| {
            let auth = auth.clone();
            async move {
                let headers = [
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ];
                let (status, answer) = admin_http::send(
                    self.coordinator,
                    hyper::Method::POST,
                    &path,
                    &headers,
                    body.to_string(),
                )
                .await?;
                if !status.is_success() {
                    bail!(
                        "the Coordinator refused {path}: {} {}",
                        status.as_u16(),
                        admin_http::error_code(&answer)
                    );
                }
                answer
                    .get("agent_session_id")
                    .or_else(|| answer.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .with_context(|| format!("no id in the answer to {path}: {answer}"))
            }
        };
        let zone = self.zone;
        let agents = format!("/zones/{zone}/agents");
        let session = json!({
            "application_id": self.app,
            "labels": [self.app],
            "metadata": {"purpose": purpose},
        });
        let source = coordinator(agents.clone(), session.clone()).await?;
        let target = coordinator(agents, session).await?;
        let edge = coordinator(
            format!("/zones/{zone}/delegations"),
            json!({
                "issuer_application_id": self.app,
                "source_session_id": source,
                "target_session_id": target,
                "receiver_application_id": self.app,
                "scopes": [scope],
                "resource_id": self.resource,
                "ttl_seconds": 3600,
            }),
        )
        .await?;
        Ok(Delegation {
            lifecycle,
            source,
            target,
            edge,
            scope: scope.to_owned(),
        })
    }

    /// Terminates `session` (with its subtree and edges) under the lifecycle mandate.
    pub async fn terminate(&self, lifecycle: &str, session: &str) -> anyhow::Result<()> {
        let auth = format!("Bearer {lifecycle}");
        let (status, answer) = admin_http::send(
            self.coordinator,
            hyper::Method::DELETE,
            &format!("/zones/{}/agents/{session}?reason=canary_done", self.zone),
            &[("authorization", auth.as_str())],
            String::new(),
        )
        .await?;
        if !status.is_success() {
            bail!(
                "the Coordinator refused to terminate {session}: {} {}",
                status.as_u16(),
                admin_http::error_code(&answer)
            );
        }
        Ok(())
    }
}
