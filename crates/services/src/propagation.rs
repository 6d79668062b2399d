//! How revocations reach resource servers and Gateways (`sdk-wire-contract.md` §6): the
//! messages a cascade enqueues in its own transaction, built from what it changed.

use caracal_store::{OutboxMessage, TerminatedTree};

/// The stream resource servers and Gateways follow for revoked anchors.
pub const SESSIONS_REVOKE: &str = "caracal.sessions.revoke";
/// The stream carrying each zone's new delegation graph epoch.
pub const DELEGATIONS_INVALIDATE: &str = "caracal.delegations.invalidate";

/// Every revoked authority record of `tree` as a `session_id` anchor (the subject kill switch,
/// a zone's invalidation).
pub fn record_revocations(tree: &TerminatedTree) -> Vec<OutboxMessage> {
    tree.records
        .iter()
        .map(|record| OutboxMessage {
            stream: SESSIONS_REVOKE.to_owned(),
            fields: [
                ("zone_id".to_owned(), tree.zone_id.clone()),
                ("session_id".to_owned(), record.clone()),
                ("reason".to_owned(), tree.reason.clone()),
            ]
            .into(),
            dedupe_key: None,
        })
        .collect()
}

/// The propagation of a termination (`sdk-wire-contract.md` §6): per terminated session, a
/// revoke message anchored on it (and on the edge that targeted it, if any); per revoked edge
/// not already covered, one anchored on the edge; and the zone's new epoch.
pub fn revocations(tree: &TerminatedTree) -> Vec<OutboxMessage> {
    let mut messages = record_revocations(tree);
    let message = |fields: Vec<(&str, String)>| OutboxMessage {
        stream: SESSIONS_REVOKE.to_owned(),
        fields: fields
            .into_iter()
            .chain([("zone_id", tree.zone_id.clone())])
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
        dedupe_key: None,
    };
    messages.extend(tree.sessions.iter().map(|(session_id, _)| {
        let mut fields = vec![
            ("agent_session_id", session_id.clone()),
            ("reason", tree.reason.clone()),
        ];
        if let Some((edge_id, _)) = tree.edges.iter().find(|(_, target)| target == session_id) {
            fields.push(("delegation_edge_id", edge_id.clone()));
        }
        message(fields)
    }));
    for (edge_id, target) in &tree.edges {
        if !tree
            .sessions
            .iter()
            .any(|(session_id, _)| session_id == target)
        {
            messages.push(message(vec![
                ("delegation_edge_id", edge_id.clone()),
                ("reason", tree.reason.clone()),
            ]));
        }
    }
    messages.push(OutboxMessage {
        stream: DELEGATIONS_INVALIDATE.to_owned(),
        fields: [
            ("zone_id".to_owned(), tree.zone_id.clone()),
            ("epoch".to_owned(), tree.epoch.to_string()),
            ("event".to_owned(), "edge_revoke".to_owned()),
            (
                "affected_edges".to_owned(),
                tree.edges
                    .iter()
                    .map(|(edge_id, _)| edge_id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("reason".to_owned(), tree.reason.clone()),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect(),
        dedupe_key: None,
    });
    messages
}
