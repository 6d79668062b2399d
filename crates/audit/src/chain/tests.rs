use super::*;
use crate::Event;

fn event(zone_id: &str, n: usize) -> Event {
    Event {
        id: format!("ev-{n}"),
        zone_id: zone_id.to_owned(),
        event_type: "token.exchange".into(),
        request_id: format!("req-{n}"),
        decision: if n.is_multiple_of(3) { "deny" } else { "allow" }.into(),
        policy_set_id: Some("set-1".into()),
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([{"id": "baseline"}]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({"n": n}),
        occurred_at_ms: 1_760_000_000_000 + n as i64,
    }
}

fn keys() -> (ChainKey, HashMap<String, ChainKey>) {
    let old = ChainKey::new("chain-1", b"first key");
    let new = ChainKey::new("chain-2", b"second key");
    let map = [
        (old.id().to_owned(), old.clone()),
        (new.id().to_owned(), new),
    ]
    .into();
    (old, map)
}

/// A zone chain of `count` rows; rows from `rotate_at` on use the second key.
fn chain(count: usize, rotate_at: usize) -> Vec<StoredRow> {
    let (_, keys) = keys();
    let mut rows: Vec<StoredRow> = Vec::new();
    for n in 1..=count {
        let key = &keys[if n >= rotate_at { "chain-2" } else { "chain-1" }];
        let head = rows.last().map(|row| {
            (
                row.link.seq,
                caracal_crypto::unhex32(&row.link.content_sha256).unwrap(),
            )
        });
        let content = event("zone-1", n).content();
        let (link, _) = next_link(key, head, &content);
        rows.push(StoredRow { content, link });
    }
    rows
}

fn kinds(rows: &[StoredRow], anchor: Anchor) -> Vec<FindingKind> {
    let mut kinds: Vec<FindingKind> = verify("zone-1", rows, &keys().1, anchor)
        .into_iter()
        .map(|f| f.kind)
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

type Tamper = fn(&mut Vec<StoredRow>);

/// One row per kind of tampering: what is done to an intact 10-row chain, and the finding kind
/// that must be reported (others may accompany it).
const TAMPERS: &[(&str, Tamper, FindingKind)] = &[
    (
        "edit a field",
        |rows| rows[4].content.decision = "allow-all".into(),
        FindingKind::ContentMismatch,
    ),
    (
        "edit a field and recompute its content hash",
        |rows| {
            rows[4].content.decision = "allow-all".into();
            rows[4].link.content_sha256 = hex(&content_hash(&rows[4].content));
        },
        FindingKind::MacFailure,
    ),
    (
        "delete a row",
        |rows| drop(rows.remove(5)),
        FindingKind::SequenceGap,
    ),
    (
        "delete the newest rows",
        |rows| rows.truncate(8),
        FindingKind::Truncated,
    ),
    (
        "swap two rows",
        |rows| {
            let (five, six) = (rows[4].link.seq, rows[5].link.seq);
            rows[4].link.seq = six;
            rows[5].link.seq = five;
            rows.sort_by_key(|row| row.link.seq);
        },
        FindingKind::Reordered,
    ),
    (
        "insert a row",
        |rows| {
            let last = rows.last().unwrap();
            let forged = event("zone-1", 99).content();
            let (mut link, _) = next_link(
                &ChainKey::new("chain-2", b"guessed key"),
                Some((
                    last.link.seq,
                    caracal_crypto::unhex32(&last.link.content_sha256).unwrap(),
                )),
                &forged,
            );
            link.chain_key_id = "chain-2".into();
            rows.push(StoredRow {
                content: forged,
                link,
            });
        },
        FindingKind::MacFailure,
    ),
    (
        "insert a row in the middle, renumbering the rest",
        |rows| {
            let forged = event("zone-1", 99).content();
            let link = rows[3].link.clone();
            rows.insert(
                4,
                StoredRow {
                    content: forged,
                    link,
                },
            );
            for (index, row) in rows.iter_mut().enumerate().skip(4) {
                row.link.seq = index as i64 + 1;
            }
        },
        FindingKind::MacFailure,
    ),
    (
        "rewrite the MAC key id",
        |rows| rows[2].link.chain_key_id = "chain-9".into(),
        FindingKind::UnknownKey,
    ),
    (
        "relink a row to a made-up predecessor",
        |rows| rows[6].link.prev_content_sha256 = hex(&[7u8; 32]),
        FindingKind::ChainBreak,
    ),
];

#[test]
fn an_intact_chain_reports_nothing_even_across_a_key_rotation() {
    let rows = chain(10, 6);
    assert_eq!(
        kinds(
            &rows,
            Anchor {
                after: None,
                at_least: 10
            }
        ),
        []
    );
    // A window in the middle, anchored on the row before it.
    let anchor = Anchor {
        after: Some((
            4,
            caracal_crypto::unhex32(&rows[3].link.content_sha256).unwrap(),
        )),
        at_least: 10,
    };
    assert_eq!(kinds(&rows[4..], anchor), []);
}

#[test]
fn every_kind_of_tampering_is_reported() {
    for (name, tamper, expected) in TAMPERS {
        let mut rows = chain(10, 6);
        tamper(&mut rows);
        let found = kinds(
            &rows,
            Anchor {
                after: None,
                at_least: 10,
            },
        );
        assert!(
            found.contains(expected),
            "{name}: expected {expected:?}, found {found:?}"
        );
    }
}

#[test]
fn findings_name_the_zone_and_row() {
    let mut rows = chain(5, 99);
    rows[2].content.request_id = "forged".into();
    let findings = verify("zone-1", &rows, &keys().1, Anchor::default());
    assert_eq!(findings.len(), 1);
    assert_eq!(
        (findings[0].zone_id.as_str(), findings[0].seq),
        ("zone-1", 3)
    );
    assert_eq!(findings[0].kind.as_str(), "content_mismatch");
}

#[test]
fn a_row_of_another_zone_does_not_verify_here() {
    let rows = chain(3, 99);
    let findings = verify("zone-2", &rows, &keys().1, Anchor::default());
    assert!(
        findings
            .iter()
            .any(|finding| finding.kind == FindingKind::MacFailure)
    );
}
