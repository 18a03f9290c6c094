//! The Grafana dashboard plots only metrics that some service really records, so a renamed
//! metric cannot leave an empty panel behind.

use std::collections::BTreeSet;
use std::path::Path;

use herald_test_support::workspace_root;

fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("herald_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn rust_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).expect("read source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

#[test]
fn every_dashboard_metric_is_recorded_by_some_service() {
    let root = workspace_root();
    let dashboard = std::fs::read_to_string(root.join("grafana/dashboards/herald.json"))
        .expect("read the dashboard");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut sources = String::new();
    for dir in ["shared/src", "services"] {
        rust_sources(&root.join(dir), &mut sources);
    }
    let recorded = metric_names_in(&sources);
    let plotted = metric_names_in(&dashboard);
    assert!(!plotted.is_empty(), "the dashboard plots nothing");
    let missing: Vec<_> = plotted
        .iter()
        .filter(|name| {
            let base = name.strip_suffix("_bucket").unwrap_or(name);
            !recorded.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "plotted but never recorded: {missing:?}"
    );
}

/// Custom workers, in any language, record no metrics of their own: only the auditor's
/// counters, taken from the streams, include their outcomes and dead letters. So the panels of
/// dead letters and outcomes plot those, never a counter only Herald's services record.
#[test]
fn dead_letters_and_outcomes_are_plotted_from_what_the_auditor_counts() {
    let root = workspace_root();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/dashboards/herald.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let dead_letters: Vec<&String> = exprs
        .iter()
        .filter(|e| e.contains("dead_letters"))
        .collect();
    assert!(!dead_letters.is_empty(), "no dead-letter panel");
    for expr in dead_letters {
        let names = metric_names_in(expr);
        assert!(
            names
                .iter()
                .all(|n| n == "herald_auditor_dead_letters_total"),
            "a dead-letter panel misses custom workers' dead letters: {expr}"
        );
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("herald_auditor_outcomes_total") && e.contains("kind")),
        "no panel of outcomes by kind: {exprs:?}"
    );
}
