#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests stop loudly"
)]

use super::*;

/// The document the published admin SDK writes for `ensure_grants`.
const SDK_DOCUMENT: &str = r#"# caracal:data-document
package caracal.authz
import rego.v1
app_ids := {"billing": "app-1"}
grants := {"resource://ledger": {"application": "billing", "roles": {"app-1": ["ledger:read", "ledger:refund"], "clerk": ["ledger:read"]}}}
"#;

fn codes(result: Result<DataDocument, Vec<Diagnostic>>) -> Vec<String> {
    result
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|diagnostic| diagnostic.code)
        .collect()
}

#[test]
fn a_data_document_compiles_to_its_rules() {
    let document = compile(SDK_DOCUMENT).unwrap();
    assert_eq!(
        document.rules.keys().collect::<Vec<_>>(),
        ["app_ids", "grants"]
    );
    let bundle = Bundle::merge(&[document]).unwrap();
    assert_eq!(bundle.app_ids["billing"], "app-1");
    assert_eq!(
        bundle.grants["resource://ledger"].roles["clerk"],
        ["ledger:read"]
    );
}

#[test]
fn anything_but_a_data_document_is_refused_with_a_named_reason() {
    let header = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\n";
    let with = |body: &str| format!("{header}{body}\n");
    for (content, expected) in [
        (
            SDK_DOCUMENT.replacen("# caracal:data-document\n", "", 1),
            "missing_data_document_header",
        ),
        (
            with("grants := {\"x\": http.send({})}"),
            "forbidden_builtin",
        ),
        (with("app_ids := {\"a\": input.user}"), "input_not_allowed"),
        (with("app_ids := {\"a\": "), "compile_error"),
        (
            SDK_DOCUMENT.replace("package caracal.authz", "package other"),
            "wrong_package",
        ),
        (
            with("result := {\"decision\": \"allow\"}"),
            "rule_not_allowed",
        ),
        (with("allow := true"), "rule_not_allowed"),
        (
            with("grants := {\"r\": {\"application\": 7}}"),
            "malformed_grants",
        ),
        (with("risk := [{\"scope\": \"x\"}]"), "malformed_risk"),
        (
            with(
                "approval_tiers := [{\"tier\": \"high\", \"approver\": \"operator\", \"ttl_seconds\": \"soon\"}]",
            ),
            "malformed_approval_tiers",
        ),
        (
            format!("{header}{}", "#".repeat(MAX_DOCUMENT)),
            "document_too_large",
        ),
    ] {
        let found = codes(compile(&content));
        assert!(
            found.contains(&expected.to_owned()),
            "{expected}: {found:?}\n{content:.200}"
        );
    }
    // A word that merely contains `input` is fine.
    assert!(compile(&with("app_ids := {\"inputs\": \"app-9\"}")).is_ok());
}

#[test]
fn documents_merge_and_conflicts_are_refused() {
    let other = compile(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {\"billing\": \"app-2\"}\n",
    )
    .unwrap();
    let base = compile(SDK_DOCUMENT).unwrap();
    let found: Vec<String> = Bundle::merge(&[base.clone(), other])
        .unwrap_err()
        .into_iter()
        .map(|d| d.code)
        .collect();
    assert_eq!(found, ["conflicting_definition"]);
    let same_again = Bundle::merge(&[base.clone(), base]).unwrap();
    assert_eq!(same_again.app_ids.len(), 1);
}

fn bundle(extra: &str) -> Bundle {
    let document = compile(&format!("{SDK_DOCUMENT}{extra}\n")).unwrap();
    Bundle::merge(&[document]).unwrap()
}

fn mint(scopes: &[&str], labels: &[&str], edge: &[&str]) -> Request {
    Request {
        flow: Flow::Mint,
        application_id: "app-1".into(),
        resource: "resource://ledger".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        edge_scopes: Some(edge.iter().map(|s| s.to_string()).collect()),
        session: true,
        subject: false,
        target: vec![],
    }
}

#[test]
fn every_flow_allows_only_what_the_contract_allows_and_names_each_denial() {
    let plain = bundle("");
    let all = ["ledger:read", "ledger:refund"];
    let bootstrap = Request {
        flow: Flow::Bootstrap,
        scopes: vec!["agent:lifecycle".into()],
        edge_scopes: None,
        session: false,
        ..mint(&[], &[], &[])
    };
    let presented = Request {
        flow: Flow::Use,
        target: vec!["resource://ledger".into()],
        ..mint(&["ledger:read"], &["clerk"], &all)
    };
    type Case<'a> = (
        &'a str,
        Option<&'a Bundle>,
        Request,
        Result<&'a str, &'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "no bundle",
            None,
            bootstrap.clone(),
            Err("no_active_policy_set"),
        ),
        (
            "bootstrap",
            Some(&plain),
            bootstrap.clone(),
            Ok("caracal-bootstrap"),
        ),
        (
            "bootstrap, stranger",
            Some(&plain),
            Request {
                application_id: "app-9".into(),
                ..bootstrap.clone()
            },
            Err("resource_not_granted"),
        ),
        (
            "bootstrap, extra scope",
            Some(&plain),
            Request {
                scopes: vec!["agent:lifecycle".into(), "ledger:read".into()],
                ..bootstrap.clone()
            },
            Err("no_rule_matched"),
        ),
        (
            "mint",
            Some(&plain),
            mint(&["ledger:read"], &["clerk"], &all),
            Ok("caracal-billing-mint"),
        ),
        (
            "mint as the app role",
            Some(&plain),
            mint(&all, &["app-1"], &all),
            Ok("caracal-billing-mint"),
        ),
        (
            "mint beyond the edge",
            Some(&plain),
            mint(&all, &["app-1"], &["ledger:read"]),
            Err("delegation_scope_exceeded"),
        ),
        (
            "mint beyond the role",
            Some(&plain),
            mint(&["ledger:refund"], &["clerk"], &all),
            Err("role_scope_mismatch"),
        ),
        (
            "mint without a role",
            Some(&plain),
            mint(&["ledger:read"], &[], &all),
            Err("role_scope_mismatch"),
        ),
        (
            "mint of lifecycle",
            Some(&plain),
            mint(&["agent:lifecycle"], &["app-1"], &all),
            Err("no_rule_matched"),
        ),
        (
            "mint of another resource",
            Some(&plain),
            Request {
                resource: "resource://crm".into(),
                ..mint(&["ledger:read"], &["clerk"], &all)
            },
            Err("resource_not_granted"),
        ),
        (
            "mint without delegation",
            Some(&plain),
            Request {
                edge_scopes: None,
                ..mint(&["ledger:read"], &["clerk"], &all)
            },
            Err("no_rule_matched"),
        ),
        (
            "use",
            Some(&plain),
            presented.clone(),
            Ok("caracal-billing-use"),
        ),
        (
            "use elsewhere",
            Some(&plain),
            Request {
                target: vec!["resource://crm".into()],
                ..presented.clone()
            },
            Err("mandate_target_mismatch"),
        ),
        (
            "use after the role shrank",
            Some(&plain),
            Request {
                scopes: vec!["ledger:refund".into()],
                ..presented.clone()
            },
            Err("role_scope_mismatch"),
        ),
    ];
    for (name, bundle, request, expected) in cases {
        let decision = decide(bundle, &request);
        match expected {
            Ok(policy) => {
                assert_eq!(decision.decision, Verdict::Allow, "{name}: {decision:?}");
                assert_eq!(decision.determining_policies[0].policy, policy, "{name}");
            }
            Err(reason) => {
                assert_eq!(decision.reason(), Some(reason), "{name}: {decision:?}");
                assert!(decision.determining_policies.is_empty(), "{name}");
            }
        }
    }

    let restricted = bundle("restrict := [\"incident 42\"]");
    assert_eq!(
        decide(Some(&restricted), &bootstrap).reason(),
        Some("restriction_active")
    );
    // A workload's credential: allowed by the contract alone, unless the zone is restricted,
    // has no active set, or the request carries a session.
    let workload = Request {
        flow: Flow::Workload,
        application_id: "wl-1".into(),
        edge_scopes: None,
        session: false,
        ..mint(&["ledger:read"], &[], &[])
    };
    let allowed = decide(Some(&plain), &workload);
    assert_eq!(allowed.decision, Verdict::Allow);
    assert_eq!(
        allowed.determining_policies[0].policy,
        "caracal-workload-mint"
    );
    assert_eq!(
        decide(Some(&restricted), &workload).reason(),
        Some("restriction_active")
    );
    assert_eq!(
        decide(None, &workload).reason(),
        Some("no_active_policy_set")
    );
    let with_session = Request {
        session: true,
        ..workload.clone()
    };
    assert_eq!(
        decide(Some(&plain), &with_session).reason(),
        Some("no_rule_matched")
    );
    let confined =
        bundle("confinement := [{\"label_prefix\": \"cl\", \"scopes\": [\"ledger:read\"]}]");
    assert_eq!(
        decide(Some(&confined), &mint(&all, &["clerk", "app-1"], &all)).reason(),
        Some("confinement_violation")
    );
    let risky = bundle(
        "risk := [{\"scope\": \"ledger:refund\", \"tier\": \"high\"}]\napproval_tiers := [{\"tier\": \"high\", \"approver\": \"operator\", \"ttl_seconds\": 600}]",
    );
    let stepped = decide(Some(&risky), &mint(&all, &["app-1"], &all));
    assert_eq!(stepped.decision, Verdict::Allow);
    assert_eq!(stepped.step_up_required.unwrap().tiers, ["high"]);
    let untiered = bundle("risk := [{\"scope\": \"ledger:refund\", \"tier\": \"high\"}]");
    assert_eq!(
        decide(Some(&untiered), &mint(&all, &["app-1"], &all)).reason(),
        Some("malformed_approval_data")
    );
}

#[test]
fn deeply_nested_input_is_refused_not_a_crash() {
    let header = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\n";
    for (open, close) in [("[", "]"), ("{\"a\": ", "}"), ("(", ")")] {
        let depth = 20_000;
        // Just inside the limit still compiles (and quickly).
        let shallow = format!(
            "{header}app_ids := {}{}1{}{}\n",
            "{\"a\": ".repeat(0),
            open.repeat(MAX_NESTING - 2),
            close.repeat(MAX_NESTING - 2),
            ""
        );
        assert!(
            !codes(compile(&shallow)).contains(&"too_deeply_nested".to_owned()),
            "{open}"
        );
        let content = format!(
            "{header}app_ids := {}1{}\n",
            open.repeat(depth),
            close.repeat(depth)
        );
        assert_eq!(codes(compile(&content)), ["too_deeply_nested"], "{open}");
    }
}

#[test]
fn a_document_that_is_slow_to_evaluate_is_refused_in_bounded_time() {
    let header = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\n";
    let depth = MAX_NESTING - 1;
    let one = format!("{}1{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
    let many = vec![one; (MAX_DOCUMENT - 200) / 24].join(",");
    let content = format!("{header}app_ids := [{many}]\n");
    assert!(content.len() <= MAX_DOCUMENT);
    let started = std::time::Instant::now();
    let result = compile(&content);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    assert!(
        result.is_err(),
        "an array is not an app_ids object either way"
    );
}
