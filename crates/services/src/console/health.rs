//! The overview's health: every role this process serves, probed over its own `/ready` and
//! `/metrics`, the freshness and backlog bounds `validate` checks, and the shipped alert rules whose condition holds now. Only instantaneous rules
//! (`metric > n`, `metric < n`) can be judged from one scrape; rules over a window (`increase`,
//! `delta`, `changes`, `time()`) need Prometheus's history and are listed as such.

use std::collections::BTreeMap;

use super::*;

const RULES: &str = include_str!("../../../../deploy/prometheus/caracal-rules.yml");

/// The shipped rules as (alert, expression).
fn rules() -> Vec<(String, String)> {
    let mut rules = Vec::new();
    let mut alert = None;
    for line in RULES.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = Some(name.to_owned());
        } else if let (Some(expr), Some(name)) = (line.strip_prefix("expr: "), alert.take()) {
            rules.push((
                name,
                serde_json::from_str::<String>(expr).unwrap_or_default(),
            ));
        }
    }
    rules
}

/// Whether an instantaneous rule holds on these samples: `Some(value)` when it fires, `None`
/// when it does not; `Err(())` when the expression needs history.
fn judge(expr: &str, samples: &BTreeMap<String, Vec<f64>>) -> Result<Option<f64>, ()> {
    let mut parts = expr.split_whitespace();
    let (Some(metric), Some(op), Some(limit), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(());
    };
    let limit: f64 = limit.parse().map_err(|_| ())?;
    if !metric
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
    {
        return Err(());
    }
    let holds = |value: f64| match op {
        ">" => value > limit,
        "<" => value < limit,
        _ => false,
    };
    if !matches!(op, ">" | "<") {
        return Err(());
    }
    Ok(samples
        .get(metric)
        .into_iter()
        .flatten()
        .copied()
        .find(|value| holds(*value)))
}

/// The overview's health sections.
pub(super) async fn section(state: &RoleState) -> String {
    let client =
        crate::peer_probe::client().with_metrics_bearer(state.shared.metrics_bearer.clone());
    let mut readiness = String::from(
        "<table><tr><th>Role</th><th>Address</th><th>Ready</th><th>Failed checks</th></tr>",
    );
    let addresses: Vec<_> = state.peers.iter().map(|(_, address)| *address).collect();
    let (ready_of, metrics) = crate::peer_probe::survey(&client, &addresses).await;
    for ((role, address), ready) in state.peers.iter().zip(ready_of) {
        let (verdict, reasons) = if ready.ready {
            (
                "<span class=\"good\">ready</span>".to_owned(),
                String::new(),
            )
        } else if ready.answered {
            let failed: Vec<String> = ready
                .failed
                .iter()
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect();
            (
                "<span class=\"bad\">not ready</span>".to_owned(),
                failed.join("; "),
            )
        } else {
            (
                "<span class=\"bad\">no answer</span>".to_owned(),
                String::new(),
            )
        };
        readiness.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{verdict}</td><td>{}</td></tr>",
            escape(&role.to_string()),
            escape(&address.to_string()),
            escape(&reasons)
        ));
    }
    readiness.push_str("</table>");
    let mut backlogs = String::from("<table><tr><th>Check</th><th>Result</th><th>Now</th></tr>");
    for check in crate::recovery::backlog_checks(&metrics) {
        backlogs.push_str(&format!(
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(&check.name),
            if check.ok { "good" } else { "bad" },
            if check.ok { "ok" } else { "over its bound" },
            escape(&check.evidence)
        ));
    }
    backlogs.push_str("</table>");
    let mut firing = Vec::new();
    let mut windowed = Vec::new();
    for (alert, expr) in rules() {
        match judge(&expr, &metrics) {
            Ok(Some(value)) => firing.push(format!(
                "<li class=\"bad\">{} — <code>{}</code> (now {value})</li>",
                escape(&alert),
                escape(&expr)
            )),
            Ok(None) => {}
            Err(()) => windowed.push(escape(&alert)),
        }
    }
    let firing = if firing.is_empty() {
        "<p class=\"good\">No instantaneous rule holds.</p>".to_owned()
    } else {
        format!("<ul class=\"firing\">{}</ul>", firing.concat())
    };
    format!(
        "<section class=\"card\"><h2>Roles</h2>{readiness}</section>\
         <section class=\"card\"><h2>Freshness and backlogs</h2>{backlogs}</section>\
         <section class=\"card\"><h2>Alert rules that hold now</h2>{firing}\
         <p>Judged over a window by Prometheus only: {}.</p></section>",
        windowed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instantaneous_rules_are_judged_and_windowed_ones_are_not() {
        let mut metrics = BTreeMap::new();
        crate::recovery::samples(
            "# HELP x\ncaracal_audit_dlq_size 3\ncaracal_gateway_revocation_snapshot_fresh 1\n",
            &mut metrics,
        );
        assert_eq!(judge("caracal_audit_dlq_size > 0", &metrics), Ok(Some(3.0)));
        assert_eq!(
            judge("caracal_gateway_revocation_snapshot_fresh < 1", &metrics),
            Ok(None)
        );
        assert_eq!(judge("caracal_missing > 0", &metrics), Ok(None));
        assert_eq!(
            judge("delta(caracal_audit_dlq_size[10m]) > 0", &metrics),
            Err(())
        );
        assert!(rules().len() >= 20, "every shipped rule is read");
    }
}
